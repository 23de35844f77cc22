"""stellar_tok.convert_reference: a reference STELLAR checkpoint -> a tokenizer whose S and L are the reference's.

The reference model is restated here on top of a tiny random `transformers.ViTModel` (width 32, 2 layers, 4 heads,
patch 8, 32 px, r = 4; decoder 16 wide, 1 layer, 2 heads): ViT embeddings (interpolate_pos_encoding off the native
size), the sparse tokens appended without position, the layers, the final LayerNorm, and
L = softmax_r(cos(dense_proj(dense), sparse_proj(S)) / 0.06) with eps 1e-7, on ImageNet-normalised [0, 1] images.
Its state dict is saved with transformers 4.x names (the reference's), whatever transformers is installed."""
import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from stellar_tok import StellarTokenizer
from stellar_tok.convert_reference import main
from stellar_tok.model.convert_reference import convert_reference

transformers = pytest.importorskip("transformers")

D, E, R, HEADS = 32, 16, 4, 4
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
V4 = [("attention.q_proj", "attention.attention.query"), ("attention.k_proj", "attention.attention.key"),
      ("attention.v_proj", "attention.attention.value"), ("attention.o_proj", "attention.output.dense"),
      ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")]


def v4_names(sd: dict) -> dict:
    """A ViTModel state dict with transformers 4.x names (`encoder.layer.N.attention.attention.query`, ...)."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"^layers\.(\d+)\.(.*)$", k)
        if m:
            rest = m.group(2)
            for new, old in V4:
                rest = old + rest[len(new):] if rest.startswith(new + ".") else rest
            k = f"encoder.layer.{m.group(1)}.{rest}"
        out[k] = v
    return out


class Reference(nn.Module):
    """The reference STELLARModel's tensors and forward (restated), tiny."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        cfg = transformers.ViTConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=2 * D,
                                     image_size=32, patch_size=8)
        self.encoder = transformers.ViTModel(cfg).eval()
        self.decoder = transformers.ViTModel(transformers.ViTConfig(hidden_size=E, num_hidden_layers=1, num_attention_heads=2,
                                                                    intermediate_size=4 * E, image_size=32, patch_size=8)).eval()
        with torch.no_grad():  # HF initialises LayerNorms to 1/0 and position embeddings to ~0: make them count
            for vit in (self.encoder, self.decoder):
                for name, p in vit.named_parameters():
                    if "layernorm" in name:
                        p.add_(torch.randn_like(p) * 0.2)
                    elif "position_embeddings" in name or "cls_token" in name:
                        p.normal_(0, 0.5)
        self.sparse_tokens = nn.Parameter(torch.randn(R, D) * D**-0.5)
        self.dense_proj, self.sparse_proj, self.decoder_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, E)
        self.register_buffer("gaussian", torch.randn(2, E // 2))  # PositionEmbeddingRandom's matrix
        self.reconstruction_head = nn.Linear(E, 1024)
        self.heads = nn.ModuleDict({name: nn.ModuleDict({"mlp": nn.Sequential(nn.Linear(D, 64), nn.GELU(), nn.Linear(64, 8)),
                                                         "layer": nn.Linear(8, 20, bias=False)})
                                    for name in ("clustering_head", "cls_cluster_head")})

    @staticmethod
    def run(vit, h):
        for layer in (vit.layers if hasattr(vit, "layers") else vit.encoder.layer):  # transformers 5.x | 4.x
            h = layer(h)
            h = h[0] if isinstance(h, tuple) else h
        return vit.layernorm(h)

    @torch.no_grad()
    def forward(self, image01):
        x = (image01 - MEAN) / STD
        h = self.encoder.embeddings(x, interpolate_pos_encoding=x.shape[-1] != 32)  # (B, 1+N, d)
        n = h.shape[1]
        h = self.run(self.encoder, torch.cat([h, self.sparse_tokens[None].expand(h.shape[0], -1, -1)], 1))
        dense, sparse = h[:, 1:n], h[:, n:]
        dn = F.normalize(self.dense_proj(dense), dim=-1, eps=1e-7)
        sn = F.normalize(self.sparse_proj(sparse), dim=-1, eps=1e-7)
        spatial = (torch.bmm(dn, sn.transpose(1, 2)) / 0.06).softmax(-1)  # (B, N, r)
        return sparse, spatial

    @torch.no_grad()
    def decode_features(self, sparse, spatial):
        """The reference decoder over decoder_proj(L·S) + random Fourier positions with sin, cos alternating. (B, N, e)"""
        emb = self.decoder_proj(torch.bmm(spatial, sparse))
        g = int(emb.shape[1] ** 0.5)
        c = (torch.arange(g) + 0.5) / g
        yy, xx = torch.meshgrid(c, c, indexing="ij")
        proj = 2 * torch.pi * ((torch.stack([xx, yy], -1).reshape(-1, 2) * 2 - 1) @ self.gaussian)  # (N, e/2)
        pe = torch.stack([proj.sin(), proj.cos()], -1).reshape(g * g, E)
        return self.run(self.decoder, emb + pe)

    def reference_state_dict(self) -> dict:
        sd = {f"encoder.{k}": v for k, v in v4_names(self.encoder.state_dict()).items()}
        sd.update({f"decoder.{k}": v for k, v in v4_names(self.decoder.state_dict()).items()})
        sd["sparse_tokens"] = self.sparse_tokens.data
        for name in ("dense_proj", "sparse_proj", "decoder_proj", "reconstruction_head"):
            sd.update({f"{name}.{k}": v for k, v in getattr(self, name).state_dict().items()})
        sd["position_embedding.positional_encoding_gaussian_matrix"] = self.gaussian
        for name, head in self.heads.items():
            sd.update({f"{name}.predictor.layers.0.{k}": v for k, v in head["mlp"][0].state_dict().items()})
            sd.update({f"{name}.predictor.layers.2.{k}": v for k, v in head["mlp"][2].state_dict().items()})
            sd[f"{name}.layer.weight"] = head["layer"].weight.data
        return {k: v.detach().clone().contiguous() for k, v in sd.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    ref = Reference()
    sd = ref.reference_state_dict()
    assert "encoder.encoder.layer.1.attention.attention.query.weight" in sd and "encoder.pooler.dense.weight" in sd
    save_file(sd, root / "stellar.safetensors")
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3, "global_step": 10}, root / "stellar.ckpt")
    return ref, root


def convert(path, **kw):
    return convert_reference(str(path), heads=HEADS, latent_channels=E, decoder_heads=2, **kw)


@pytest.mark.parametrize("file", ["stellar.safetensors", "stellar.ckpt"])
@pytest.mark.parametrize("size", [32, 48])  # native, and 6x6 patches from the 4x4 position grid
def test_sparse_tokens_and_localization_equal_the_reference(reference, file, size):
    ref, root = reference
    tok = convert(root / file).tokenizer
    assert tok.config.norm_eps == 1e-12 and tok.config.image_size == 32 and tok.config.num_tokens == R
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size)) * 2 - 1
    sparse, spatial = ref((images + 1) / 2)
    feats = tok.features(images)
    assert feats["sparse"].shape == sparse.shape == (2, R, D) and feats["loc"].shape == spatial.shape == (2, (size // 8) ** 2, R)
    # the bound is 1e-4; measured 0 and 6e-8 on CPU. 1e-5 also catches a LayerNorm eps of 1e-6 (diff 5e-5)
    assert (feats["sparse"] - sparse).abs().max() <= 1e-5
    assert (feats["loc"] - spatial).abs().max() <= 1e-5
    assert spatial.max() > 0.5  # L is not near-uniform: the comparison has teeth


@torch.no_grad()
def test_the_decoder_starts_as_the_reference_decoder(reference):
    """Blocks, positions and the bottleneck (c = e: decoder_proj's SVD is exact) give the reference decoder's
    features, channels in our order (all sines, then all cosines)."""
    ref, root = reference
    converted = convert(root / "stellar.safetensors")
    tok, report = converted.tokenizer, converted.report
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    feats = tok.features(images)
    s = tok.from_latent(tok.to_latent(feats["sparse"]))  # (B, r, e)
    f = torch.einsum("bnr,bre->bne", feats["loc"], s) + tok.decoder_pos(4)
    for blk in tok.decoder_blocks:
        f = blk(f)
    ours = tok.decoder_norm(f)
    theirs = ref.decode_features(*ref((images + 1) / 2))
    theirs = torch.cat([theirs[..., 0::2], theirs[..., 1::2]], -1)  # sin_0, cos_0, sin_1, ... -> sin_0, sin_1, ..., cos_0, ...
    assert (ours - theirs).abs().max() <= 1e-4
    assert report["decoder"].startswith("from the reference decoder") and "reconstruction_head" in report["left"]


def test_command_writes_a_folder_from_pretrained_loads(reference, tmp_path, capsys):
    ref, root = reference
    out = tmp_path / "converted"
    main([f"src={root / 'stellar.ckpt'}", f"out={out}", f"heads={HEADS}", f"latent_channels={E}", "decoder_heads=2"])
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and line.startswith("converted stellar.ckpt (Lightning checkpoint, keys under model.)")
    assert "r=4 sparse tokens" in line and "clustering heads mapped" in line and "encoder.pooler" in line
    assert sorted(os.listdir(out)) == ["align_heads.safetensors", "config.json", "conversion.json", "diffusion_pytorch_model.safetensors", "training.json"]
    tok = StellarTokenizer.from_pretrained(str(out)).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    direct = convert(root / "stellar.ckpt").tokenizer
    assert torch.equal(tok.features(images)["loc"], direct.features(images)["loc"])
    heads = load_file(out / "align_heads.safetensors")
    assert torch.equal(heads["token_head.prototypes.weight"], ref.heads["clustering_head"]["layer"].weight)
    assert torch.equal(heads["cls_head.mlp.2.bias"], ref.heads["cls_cluster_head"]["mlp"][2].bias)
    assert [n for n in os.listdir(tmp_path) if n != "converted"] == []  # no temporary folder left


def test_wrong_or_truncated_files_are_one_line_and_leave_no_folder(reference, tmp_path, capsys):
    _, root = reference
    data = (root / "stellar.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    vit_only = {k: v for k, v in load_file(root / "stellar.safetensors").items() if k.startswith("encoder.")}
    save_file(vit_only, tmp_path / "vit.safetensors")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    for src, words in (("truncated.safetensors", "cannot be read as safetensors"), ("junk.ckpt", "cannot be read"),
                       ("vit.safetensors", "is not a STELLAR checkpoint: it lacks sparse_tokens, dense_proj.weight, sparse_proj.weight"),
                       ("nowhere.safetensors", "no such file")):
        with pytest.raises(SystemExit) as e:
            main([f"src={tmp_path / src}", f"out={tmp_path / 'out'}", f"heads={HEADS}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and words in err[0], err
        assert not (tmp_path / "out").exists() and not [n for n in os.listdir(tmp_path) if n.startswith("out")]
    with pytest.raises(SystemExit):  # an unknown width needs heads=
        main([f"src={root / 'stellar.safetensors'}", f"out={tmp_path / 'out'}"])
    assert "give heads=" in capsys.readouterr().err


def test_transformers_5_names_and_a_fresh_decoder(reference, tmp_path):
    ref, root = reference
    sd = load_file(root / "stellar.safetensors")
    v5 = {"encoder." + k: v for k, v in ref.encoder.state_dict().items()} if hasattr(ref.encoder, "layers") else None
    if v5 is None:
        pytest.skip("the installed transformers is 4.x")
    save_file({**{k: v for k, v in sd.items() if not k.startswith("encoder.")}, **{k: v.contiguous() for k, v in v5.items()}}, tmp_path / "v5.safetensors")
    a, b = convert(tmp_path / "v5.safetensors", decoder="fresh"), convert(root / "stellar.safetensors")
    assert "transformers 5.x ViT names" in a.report["layout"] and a.report["decoder"].startswith("fresh")
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(a.tokenizer.features(images)["sparse"], b.tokenizer.features(images)["sparse"])
    assert not torch.equal(a.tokenizer.decoder_blocks[0].mlp.fc1.weight, b.tokenizer.decoder_blocks[0].mlp.fc1.weight)


# ----------------------------------------------------------------------------------------------
# train only what the published weights lack: train.freeze=encoder from the converted folder
# ----------------------------------------------------------------------------------------------

FROM_REFERENCE = [  # the converted tiny reference's model keys (what vit_b16_from_reference.yaml is for ViT-B/16)
    "config=configs/tokenizer/tiny.yaml", "model.image_size=32", "model.patch_size=8", "model.stem=patch", f"model.width={D}",
    "model.depth=2", f"model.heads={HEADS}", "model.mlp_ratio=2.0", f"model.num_tokens={R}", f"model.latent_channels={E}",
    f"model.decoder_width={E}", "model.decoder_depth=1", "model.decoder_heads=2", "model.norm_eps=1e-12",
    "align.enabled=false", "train.freeze=encoder", "data.train_size=64", "data.val_size=16", "optim.batch_size=8",
    "optim.warmup_steps=1", "optim.lr=2e-3", "train.log_every=1", "train.image_every=1000", "train.ckpt_every=1000",
    "train.progress=false", "train.stats_batches=1",
]
ENCODER = ("patch_embed.", "cls_token", "cls_pos", "pos_embed", "sparse_tokens", "blocks.", "norm.", "loc_dense.", "loc_sparse.")


@pytest.fixture(scope="module")
def converted_dir(reference, tmp_path_factory):
    _, root = reference
    out = tmp_path_factory.mktemp("conv") / "tok"
    main([f"src={root / 'stellar.safetensors'}", f"out={out}", f"heads={HEADS}", f"latent_channels={E}", "decoder_heads=2"])
    return str(out)


def test_frozen_encoder_gets_no_gradient_and_builds_no_graph(converted_dir):
    from omegaconf import OmegaConf

    from stellar_tok.config import load_config
    from stellar_tok.training.objective import TokenizerWithHeads
    from stellar_tok.training.tokenizer_weights import build_tokenizer

    cfg = load_config(FROM_REFERENCE + [f"model.init_from={converted_dir}"])
    tok = build_tokenizer(cfg, OmegaConf.create({"is_main_process": False}))
    objective = TokenizerWithHeads(tok, cfg.align).train()
    assert objective.align is None  # alignment: not built, not computed
    trainable = {n.split(".")[0] for n, p in tok.named_parameters() if p.requires_grad}
    assert trainable == {"to_latent", "from_latent", "decoder_blocks", "decoder_norm", "to_pixels"}
    out = objective({"main": torch.rand(2, 3, 32, 32) * 2 - 1})
    assert out["sparse"].grad_fn is None and out["dense"].grad_fn is None and out["log_loc"].grad_fn is None  # no autograd graph
    assert out["align_loss"] == 0
    out["recon"].abs().mean().backward()
    assert all(p.grad is None for n, p in tok.named_parameters() if n.startswith(ENCODER))
    assert tok.to_latent.weight.grad is not None and tok.decoder_blocks[0].mlp.fc1.weight.grad.abs().sum() > 0


def test_published_weights_to_generated_samples(converted_dir, tmp_path, capsys):
    """The tiny path end to end: converted reference -> decoder-only training (5 steps, the encoder bit-identical)
    -> latents -> generator -> samples."""
    from generators.sample import main as sample_main
    from generators.train import main as gen_train_main
    from stellar_tok.tokenize import main as tokenize_main
    from stellar_tok.train import main as train_main

    run = tmp_path / "run"
    train_main(FROM_REFERENCE + [f"model.init_from={converted_dir}", "train.steps=5", f"train.output_dir={run}"])
    assert f"model.init_from={converted_dir}: " in capsys.readouterr().out
    before = StellarTokenizer.from_pretrained(converted_dir).state_dict()
    after = StellarTokenizer.from_pretrained(str(run / "tokenizer")).state_dict()
    encoder = [k for k in before if k.startswith(ENCODER)]
    assert len(encoder) == 5 + 2 * 12 + 2 + 1 + 4 and all(torch.equal(before[k], after[k]) for k in encoder)
    assert not torch.equal(before["to_latent.weight"], after["to_latent.weight"])  # the bottleneck learned
    metrics = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert all(m["align"] == 0.0 for m in metrics) and len(metrics) == 5
    record = json.load(open(run / "tokenizer" / "training.json"))
    assert record["freeze"] == "encoder" and record["cls_trained"] is True  # the reference trained its CLS

    tokenize_main([f"tokenizer={run / 'tokenizer'}", f"out={tmp_path / 'lat'}", "data.name=shapes", "data.train_size=48",
                   "batch_size=16", "progress=false"])
    gen = tmp_path / "gen"
    gen_train_main(["config=configs/generator/tiny.yaml", f"data.latents={tmp_path / 'lat'}", "model.width=32", "model.depth=1",
                    "model.heads=2", "optim.batch_size=16", "optim.warmup_steps=1", "train.steps=3", "train.log_every=1",
                    "train.progress=false", "train.sample_every=1000", "train.ckpt_every=1000", f"train.output_dir={gen}"])
    sample_main([f"generator={gen / 'generator'}", f"tokenizer={run / 'tokenizer'}", "classes=0", "n=2", "steps=2",
                 f"out={tmp_path / 'samples'}", "progress=false"])
    samples = np.load(tmp_path / "samples" / "samples.npz")["arr_0"]
    assert samples.shape == (2, 32, 32, 3) and samples.dtype == np.uint8


def test_a_start_that_does_not_fit_is_one_line(converted_dir, tmp_path, capsys):
    from stellar_tok.train import main as train_main

    for bad, words in ((["model.depth=3"], "its depth 2 != model.depth 3"),
                       (["align.enabled=true"], "config key 'train.freeze' must be none with align.enabled=true"),
                       (["train.freeze=decoder"], "config key 'train.freeze' must be none or encoder")):
        with pytest.raises(SystemExit):
            train_main(FROM_REFERENCE + [f"model.init_from={converted_dir}", "train.steps=1", f"train.output_dir={tmp_path / 'x'}"] + bad)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "x").exists()


def test_continued_pretraining_starts_the_clustering_heads_from_the_published_ones(converted_dir, tmp_path, capsys):
    from stellar_tok.train import main as train_main

    args = [a for a in FROM_REFERENCE if a not in ("align.enabled=false", "train.freeze=encoder")] + [
        f"model.init_from={converted_dir}", "align.image_loss=clustering", "align.image_feature=cls", "align.head_hidden=64",
        "align.head_bottleneck=8", "views.local_size=16", "train.steps=1"]
    heads = ["align.token_prototypes=20", "align.cls_prototypes=20"]
    train_main(args + heads + [f"train.output_dir={tmp_path / 'a'}"])
    assert f"model.init_from={converted_dir}: clustering heads from align_heads.safetensors" in capsys.readouterr().out
    train_main(args + ["align.token_prototypes=16", "align.cls_prototypes=20", f"train.output_dir={tmp_path / 'b'}"])
    assert "clustering heads not loaded (token_head.prototypes.weight is (16, 8) here, (20, 8) in" in capsys.readouterr().out
