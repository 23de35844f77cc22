"""Shapes and invariants of the tokenizer: L rows sum to 1, F = L·S, latent round trip, save/load."""
import json
import os

import pytest
import torch

from stellar_tok import Latent, LatentStats, StellarTokenizer
from conftest import TINY_ALIGN, TINY_MODEL


def test_forward_shapes(tiny_tokenizer, images):
    out = tiny_tokenizer(images)
    b, n, r, d, c = 4, 64, 16, 64, 8
    assert out["cls"].shape == (b, d)
    assert out["dense"].shape == (b, n, d)
    assert out["sparse"].shape == (b, r, d)
    assert out["log_loc"].shape == (b, n, r)
    assert out["z"].shape == (b, r, c)
    assert out["recon"].shape == images.shape


def test_localization_rows_sum_to_one_and_lowrank_is_L_times_S(tiny_tokenizer, images):
    f = tiny_tokenizer.features(images)
    L, S = f["loc"], f["sparse"]
    torch.testing.assert_close(L.sum(-1), torch.ones(4, 64), atol=1e-5, rtol=0)
    assert (L >= 0).all()
    torch.testing.assert_close(f["lowrank"], torch.einsum("bnr,brd->bnd", L, S))
    # the low-rank map has rank <= r per image
    assert torch.linalg.matrix_rank(f["lowrank"][0]) <= 16
    # with_latent: the latent of the same encoder pass is what encode() returns
    lat, ref = tiny_tokenizer.features(images, with_latent=True)["latent"], tiny_tokenizer.encode(images)
    assert torch.equal(lat.z, ref.z) and torch.equal(lat.log_loc, ref.log_loc) and not lat.normalized


def test_temperature_sharpens_localization(images):
    torch.manual_seed(0)
    soft = StellarTokenizer(**{**TINY_MODEL, "tau": 1.0}).eval()
    sharp = StellarTokenizer(**{**TINY_MODEL, "tau": 0.01}).eval()
    sharp.load_state_dict(soft.state_dict())
    assert sharp.features(images)["loc"].max(-1).values.mean() > soft.features(images)["loc"].max(-1).values.mean()


def test_masked_view_uses_only_kept_patches(tiny_tokenizer, images):
    keep = torch.tensor([[0, 5, 9, 63]] * 4)
    cls, dense, s = tiny_tokenizer.encode_features(images, keep)
    assert dense.shape == (4, 4, 64) and s.shape == (4, 16, 64)
    # changing a dropped patch does not change the output
    changed = images.clone()
    changed[:, :, 0:4, 4:8] = 1.0  # patch 1 (row 0, col 1) is masked out
    cls2, _, s2 = tiny_tokenizer.encode_features(changed, keep)
    torch.testing.assert_close(s, s2)
    changed[:, :, 0:4, 0:4] = 1.0  # patch 0 is kept
    _, _, s3 = tiny_tokenizer.encode_features(changed, keep)
    assert not torch.allclose(s, s3)


def test_smaller_crop_interpolates_positions(tiny_tokenizer):
    cls, dense, s = tiny_tokenizer.encode_features(torch.zeros(2, 3, 16, 16))
    assert dense.shape == (2, 16, 64) and s.shape == (2, 16, 64)


def test_latent_round_trip(tiny_tokenizer, images):
    lat = tiny_tokenizer.encode(images)
    assert isinstance(lat, Latent) and not lat.normalized
    assert lat.z.shape == (4, 16, 8) and lat.log_loc.shape == (4, 64, 16)
    torch.testing.assert_close(lat.probs().sum(-1), torch.ones(4, 64), atol=1e-5, rtol=0)
    stats = LatentStats(torch.randn(8), torch.rand(8) + 0.5, torch.tensor(-3.0), torch.tensor(2.0))
    tiny_tokenizer.set_latent_stats(stats)
    norm = lat.normalize(tiny_tokenizer.latent_stats)
    assert norm.normalized
    back = norm.denormalize(tiny_tokenizer.latent_stats)
    torch.testing.assert_close(back.z, lat.z)
    torch.testing.assert_close(back.log_loc, lat.log_loc)
    # decode accepts both forms and gives the same image
    torch.testing.assert_close(tiny_tokenizer.decode(norm), tiny_tokenizer.decode(lat), atol=1e-5, rtol=0)
    img = tiny_tokenizer.decode(lat)
    assert img.shape == images.shape and img.min() >= -1 and img.max() <= 1
    # the decoder sees the latent only: encode -> decode equals the training forward's reconstruction
    torch.testing.assert_close(img, tiny_tokenizer(images)["recon"].clamp(-1, 1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        norm.normalize(tiny_tokenizer.latent_stats)


def test_latent_indexing_and_cat(tiny_tokenizer, images):
    lat = tiny_tokenizer.encode(images)
    assert len(lat[1:3]) == 2 and len(lat[0]) == 1
    both = Latent.cat([lat[:2], lat[2:]])
    assert torch.equal(both.z, lat.z)
    with pytest.raises(ValueError):
        Latent(torch.zeros(2, 16, 8), torch.zeros(2, 64, 15))


def test_decode_rejects_wrong_latent(tiny_tokenizer):
    with pytest.raises(ValueError, match="expects"):
        tiny_tokenizer.decode(Latent(torch.zeros(1, 8, 8), torch.zeros(1, 64, 8)))
    with pytest.raises(TypeError):
        tiny_tokenizer.decode(torch.zeros(1, 16, 8))


def test_save_load_bit_exact(tiny_tokenizer, images, tmp_path):
    tiny_tokenizer.set_latent_stats(LatentStats(torch.randn(8), torch.rand(8) + 0.5, torch.tensor(-3.0), torch.tensor(2.0)))
    tiny_tokenizer.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert "config.json" in files and any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    assert json.load(open(tmp_path / "config.json"))["num_tokens"] == 16
    loaded = StellarTokenizer.from_pretrained(tmp_path).eval()
    sd0, sd1 = tiny_tokenizer.state_dict(), loaded.state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k  # includes the decoder's random Fourier features
    lat = tiny_tokenizer.encode(images)
    assert torch.equal(loaded.encode(images).z, lat.z)
    assert torch.equal(loaded.decode(lat), tiny_tokenizer.decode(lat))


def test_bad_inputs_are_refused(tiny_tokenizer):
    with pytest.raises(ValueError, match="divisible"):
        tiny_tokenizer.encode(torch.zeros(1, 3, 30, 30))
    with pytest.raises(ValueError, match="divisible"):
        StellarTokenizer(image_size=30, patch_size=4)


@pytest.mark.parametrize("name,grid", [("vit_b16", 16), ("vit_l16", 16), ("vit_h14", 18)])
def test_imagenet_configs_build_with_expected_shapes(name, grid):
    from stellar_tok.config import load_config, tokenizer_kwargs

    cfg = load_config([f"config=configs/tokenizer/{name}.yaml", "data.path=/data/x.tar"])
    meta = StellarTokenizer(**tokenizer_kwargs(cfg.model)).to("meta")  # no memory, shapes only
    n_params = sum(p.numel() for p in meta.parameters())
    assert n_params > 80e6
    size = cfg.model.image_size
    with torch.device("meta"):
        out = meta(torch.zeros(1, 3, size, size, device="meta"))
    assert out["log_loc"].shape == (1, grid * grid, 16)
    assert out["z"].shape == (1, 16, cfg.model.latent_channels)
    assert out["recon"].shape == (1, 3, size, size)


def test_conv_stem_shapes_and_round_trip(tmp_path, images):
    torch.manual_seed(0)
    tok = StellarTokenizer(**{**TINY_MODEL, "stem": "conv"}).eval()
    out = tok(images)
    assert out["recon"].shape == images.shape and out["dense"].shape == (4, 64, 64)
    _, dense, _ = tok.encode_features(images[:, :, :16, :16])  # a 16 px local crop: 4x4 grid
    assert dense.shape == (4, 16, 64)
    tok.save_pretrained(str(tmp_path / "t"))
    back = StellarTokenizer.from_pretrained(str(tmp_path / "t")).eval()
    assert torch.equal(back(images)["recon"], out["recon"])
    with pytest.raises(ValueError, match="power-of-two"):
        StellarTokenizer(**{**TINY_MODEL, "patch_size": 3, "image_size": 30, "stem": "conv"})


def test_dense_decoder_reads_every_patch_feature(tmp_path, images):
    """decoder_input=dense: the degenerate case r = N, L = I of F = L·S; S is still there for alignment."""
    import math

    torch.manual_seed(0)
    tok = StellarTokenizer(**{**TINY_MODEL, "decoder_input": "dense"}).eval()
    assert not hasattr(tok, "loc_dense")  # no localization head to train
    out = tok(images)
    b, n, r, d, c = 4, 64, 16, 64, 8
    assert out["sparse"].shape == (b, r, d) and out["dense"].shape == (b, n, d)
    assert out["z"].shape == (b, n, c) and out["log_loc"].shape == (b, n, n)
    assert out["recon"].shape == images.shape
    eye = torch.eye(n, dtype=torch.bool).expand(b, n, n)
    assert (out["log_loc"][eye] == 0).all() and (out["log_loc"][~eye] == math.log(1e-4)).all()
    torch.testing.assert_close(out["z"], tok.to_latent(out["dense"]))
    # the decoder depends on each patch's own feature, not on S
    f = tok.features(images, with_latent=True)
    torch.testing.assert_close(f["lowrank"], f["dense"])
    assert torch.equal(f["latent"].z, tok.encode(images).z) and torch.equal(f["latent"].log_loc, tok.encode(images).log_loc)
    assert tok.latent_values(n) == n * c
    # encode -> decode equals the training forward, and the latent is (B,N,c) + (B,N,N)
    lat = tok.encode(images)
    assert lat.z.shape == (b, n, c) and lat.log_loc.shape == (b, n, n)
    torch.testing.assert_close(tok.decode(lat), out["recon"].clamp(-1, 1), atol=1e-5, rtol=0)
    stats = LatentStats(torch.randn(c), torch.rand(c) + 0.5, torch.tensor(-9.0), torch.tensor(1.0))
    tok.set_latent_stats(stats)
    torch.testing.assert_close(tok.decode(lat.normalize(tok.latent_stats)), tok.decode(lat), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="dense decoder"):
        tok.decode(Latent(torch.zeros(1, 16, c), torch.zeros(1, 64, 16)))
    # save/load keeps the mode and the weights
    tok.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "config.json"))["decoder_input"] == "dense"
    back = StellarTokenizer.from_pretrained(tmp_path).eval()
    assert back.dense_decoder and torch.equal(back.decode(lat), tok.decode(lat))
    with pytest.raises(ValueError, match="decoder_input"):
        StellarTokenizer(**{**TINY_MODEL, "decoder_input": "sparse"})


def test_dense_decoder_trains_through_the_trainer_objective(images):
    """Every parameter of the dense-decoder tokenizer gets a gradient from reconstruction + alignment."""
    from omegaconf import OmegaConf

    from stellar_tok.config import Config
    from stellar_tok.training.objective import TokenizerWithHeads
    from stellar_tok.data.views import make_views

    torch.manual_seed(0)
    cfg = OmegaConf.structured(Config)
    cfg.align.merge_with({**TINY_ALIGN, "token_prototypes": 8})
    tok = StellarTokenizer(**{**TINY_MODEL, "decoder_input": "dense"})
    obj = TokenizerWithHeads(tok, cfg.align).train()
    views = make_views(images, cfg.views, torch.Generator().manual_seed(0), TINY_MODEL["patch_size"])
    out = obj(views)
    (out["align_loss"] + (out["recon"] - views["main"]).abs().mean()).backward()
    missing = [k for k, p in tok.named_parameters() if p.grad is None]
    assert not missing, missing


def test_compile_blocks_keeps_outputs_and_weights(tiny_tokenizer, images, tmp_path):
    """`train.compile=true`: the blocks go through torch.compile (the dynamo front end here, backend "eager",
    to stay fast); outputs, state-dict keys and the saved folder do not change."""
    import copy

    eager = tiny_tokenizer.eval()
    compiled = copy.deepcopy(eager).compile_blocks(backend="eager")
    assert all(b._compiled_call_impl is not None for b in [*compiled.blocks, *compiled.decoder_blocks])
    assert list(compiled.state_dict()) == list(eager.state_dict())
    with torch.no_grad():
        a, b = eager(images), compiled(images)
    torch.testing.assert_close(b["recon"], a["recon"], rtol=1e-5, atol=1e-5)
    compiled.save_pretrained(tmp_path / "tok")
    again = type(eager).from_pretrained(tmp_path / "tok").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(images)["recon"], a["recon"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blocks", [1, -1])
def test_activation_checkpointing_is_exact_and_keeps_less(blocks, images):
    """train.activation_checkpointing: the same loss and gradients, fewer tensors kept for the backward; no effect
    where autograd does not record (encode)."""
    torch.manual_seed(0)
    plain = StellarTokenizer(**TINY_MODEL)
    ckpt = StellarTokenizer(**TINY_MODEL).set_activation_checkpointing(blocks)
    ckpt.load_state_dict(plain.state_dict())

    def loss_grads_kept(tok):
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
            out = tok(images)
            loss = out["recon"].square().mean() + out["log_loc"].exp().square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in tok.named_parameters() if p.grad is not None}, sum(kept)

    l0, g0, kept0 = loss_grads_kept(plain)
    l1, g1, kept1 = loss_grads_kept(ckpt)
    assert torch.equal(l0, l1) and g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-5, msg=name)
    assert kept1 < kept0
    assert ckpt.checkpoint_blocks == (len(ckpt.blocks) if blocks == -1 else blocks)
    assert torch.equal(ckpt.encode(images).z, plain.encode(images).z)
    with pytest.raises(ValueError, match="activation checkpointing"):
        ckpt.set_activation_checkpointing(len(ckpt.blocks) + 1)
    # the diffusers switch turns on every block
    plain.enable_gradient_checkpointing()
    assert plain.checkpoint_blocks == len(plain.blocks) and plain.is_gradient_checkpointing
