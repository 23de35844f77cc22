"""Mixed precision: what stays float32 under bf16 autocast. The localization logits (a cosine divided by tau = 0.06
amplifies bf16's rounding 17 times) and the clustering logits Sinkhorn turns into targets."""
import torch
from conftest import TINY_MODEL, tiny_align_config
from omegaconf import OmegaConf

from stellar_tok import StellarTokenizer
from stellar_tok.config import ViewsConfig
from stellar_tok.data.views import make_views
from stellar_tok.losses import alignment
from stellar_tok.losses.alignment import AlignmentLoss, ClusteringHead


def test_localization_is_float32_under_bf16_autocast():
    """log L in float32 end to end: bf16 autocast around the encoder must not round the projections, the cosine or
    its division by tau (1/0.06 amplifies bf16's 2^-8 rounding of a cosine to ~0.05 nats of log L)."""
    torch.manual_seed(0)
    tiny_tokenizer = StellarTokenizer(**TINY_MODEL)
    dense, sparse = torch.randn(2, 64, 64), torch.randn(2, 16, 64)
    exact = tiny_tokenizer.localize(dense, sparse)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = tiny_tokenizer.localize(dense, sparse)
    assert under_autocast.dtype == torch.float32
    assert (under_autocast - exact).abs().max() < 1e-5
    # bf16 inputs (the encoder's output under autocast) are widened, not rounded further
    with torch.autocast("cpu", dtype=torch.bfloat16):
        from_bf16 = tiny_tokenizer.localize(dense.bfloat16(), sparse.bfloat16())
    torch.testing.assert_close(from_bf16, tiny_tokenizer.localize(dense.bfloat16().float(), sparse.bfloat16().float()), atol=1e-5, rtol=0)


def test_clustering_head_float32_path_is_float32_under_autocast():
    torch.manual_seed(0)
    head = ClusteringHead(64, 128, 32, 256, prototype_std=1.0)
    x = torch.randn(128, 64)
    exact = head(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f32, bf16 = head(x, float32=True), head(x)
    assert f32.dtype == torch.float32 and (f32 - exact).abs().max() < 1e-5
    assert (bf16.float() - exact).abs().max() > 1e-3  # what the float32 path avoids
    f32.sum().backward()  # it trains like the plain path
    assert head.prototypes.weight.grad.abs().sum() > 0


def test_sinkhorn_targets_are_computed_from_float32_logits_under_bf16_autocast(monkeypatch):
    seen = []
    sinkhorn = alignment.sinkhorn_knopp

    def recording(logits, *args):
        seen.append(logits.dtype)
        return sinkhorn(logits, *args)

    monkeypatch.setattr(alignment, "sinkhorn_knopp", recording)
    torch.manual_seed(0)
    tok = StellarTokenizer(**TINY_MODEL).train()
    loss_fn = AlignmentLoss(TINY_MODEL["width"], tiny_align_config())
    vcfg = OmegaConf.merge(OmegaConf.structured(ViewsConfig), {"blur_kernel": 5})
    views = make_views(torch.rand(4, 3, 32, 32) * 2 - 1, vcfg, torch.Generator().manual_seed(0), 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = loss_fn(tok.encode_features, tok(views["main"]), views)
    total.backward()
    assert seen == [torch.float32, torch.float32]  # token and CLS targets
    assert tok.sparse_tokens.grad.abs().sum() > 0
