"""model.init_from=DIR: the encoder from a Hugging Face ViT-MAE folder equals `transformers`' own encoder.

`transformers` is a dev dependency only (stellar_tok.model.mae_init reads the json and the tensors itself); here it
builds tiny random ViT-MAE folders (hidden 64, 2 layers, 4 heads, patch 4, 16 px) to compare against."""
import os
import shutil

import pytest
import torch
from einops import rearrange
from safetensors.torch import load_file

from stellar_tok import StellarTokenizer
from stellar_tok.errors import UserError
from stellar_tok.model.mae_init import load_mae_encoder
from stellar_tok.model.vit import interpolate_pos_embed

transformers = pytest.importorskip("transformers")

MAE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, image_size=16, patch_size=4,
           hidden_act="gelu", mask_ratio=0.0, decoder_hidden_size=32, decoder_num_hidden_layers=1,
           decoder_num_attention_heads=4, decoder_intermediate_size=128)  # layer_norm_eps: the default 1e-12
TOK = dict(image_size=16, patch_size=4, width=64, depth=2, heads=4, num_tokens=4, latent_channels=8,
           decoder_width=32, decoder_depth=1, decoder_heads=2, norm_eps=1e-12)


def _save(model_cls, path, seed: int):
    torch.manual_seed(seed)
    model = model_cls(transformers.ViTMAEConfig(**MAE)).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def mae_dirs(tmp_path_factory):
    """ViTMAEModel (keys `embeddings.*`) and ViTMAEForPreTraining (`vit.*` + `decoder.*`) folders, and the models."""
    root = tmp_path_factory.mktemp("mae")
    base = _save(transformers.ViTMAEModel, root / "model", seed=0)
    pre = _save(transformers.ViTMAEForPreTraining, root / "pretraining", seed=1)
    return {"model": (str(root / "model"), base), "pretraining": (str(root / "pretraining"), pre.vit)}


def _ours_without_sparse_tokens(tok, images):
    """Our encoder over [CLS] + N patches only (no sparse tokens, no mask): what a ViT-MAE encoder computes. (B, 1+N, d)"""
    x = ((images + 1) / 2 - tok.pixel_mean) / tok.pixel_std  # [-1,1] -> ImageNet-normalised, as encode_features
    x = rearrange(tok.patch_embed(x), "b d h w -> b (h w) d") + tok.pos_embed  # (B, N, d)
    x = torch.cat([(tok.cls_token + tok.cls_pos).expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, d)
    for blk in tok.blocks:
        x = blk(x)
    return tok.norm(x)


def _mae(model, images, tok):
    pixels = ((images + 1) / 2 - tok.pixel_mean) / tok.pixel_std  # MAE reads ImageNet-normalised pixels
    b, n = images.shape[0], (images.shape[-1] // MAE["patch_size"]) ** 2
    return model(pixel_values=pixels, noise=torch.arange(n).expand(b, n)).last_hidden_state  # noise: keep patch order


@pytest.mark.parametrize("layout", ["model", "pretraining"])
@torch.no_grad()
def test_encoder_equals_the_transformers_encoder(mae_dirs, layout):
    path, model = mae_dirs[layout]
    torch.manual_seed(0)
    tok = StellarTokenizer(**TOK).eval()
    sparse_before, decoder_before = tok.sparse_tokens.clone(), tok.to_pixels.weight.clone()
    report = load_mae_encoder(tok, path)
    assert report["layout"] == ("ViTMAEModel" if layout == "model" else "ViTMAEForPreTraining")
    assert report["file"] == "model.safetensors" and report["pos_grid"] == (4, 4)
    assert len(report["loaded"]) == 5 + 2 * 12 + 2 and "sparse_tokens" in report["kept"]  # embeddings, 2 blocks, final norm
    assert report["summary"].count("\n") == 0
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    ours, ref = _ours_without_sparse_tokens(tok, images), _mae(model, images, tok)
    assert ours.shape == ref.shape == (3, 17, 64)
    diff = (ours - ref).abs().max().item()
    assert diff < 1e-5, diff  # measured: 0.0 (bit-identical on this CPU)
    assert torch.equal(tok.sparse_tokens, sparse_before) and torch.equal(tok.to_pixels.weight, decoder_before)  # untouched
    cls, dense, sparse = tok.encode_features(images)  # the full encoder still runs, now with the r sparse tokens
    assert dense.shape == (3, 16, 64) and sparse.shape == (3, 4, 64)


@torch.no_grad()
def test_pytorch_model_bin_and_a_larger_grid(mae_dirs, tmp_path):
    """pytorch_model.bin (read with weights_only=True), and 16 px MAE -> 32 px tokenizer: 4x4 -> 8x8 positions, cls as is."""
    src, model = mae_dirs["pretraining"]
    path = tmp_path / "bin"
    path.mkdir()
    shutil.copy(os.path.join(src, "config.json"), path)
    torch.save(load_file(os.path.join(src, "model.safetensors")), path / "pytorch_model.bin")
    tok = StellarTokenizer(**{**TOK, "image_size": 32}).eval()
    report = load_mae_encoder(tok, str(path))
    assert report["file"] == "pytorch_model.bin" and report["pos_grid"] == (4, 8) and "4x4 -> 8x8" in report["summary"]
    pos = model.embeddings.position_embeddings  # (1, 1+16, d)
    assert torch.equal(tok.cls_pos, pos[:, :1]) and torch.equal(tok.cls_token, model.embeddings.cls_token)
    assert tok.pos_embed.shape == (1, 64, 64) and torch.allclose(tok.pos_embed, interpolate_pos_embed(pos[:, 1:], 8))
    out = tok(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert out["recon"].shape == (2, 3, 32, 32) and torch.isfinite(out["recon"]).all()


def test_conv_stem_keeps_its_own_patch_embedding(mae_dirs):
    path, _ = mae_dirs["model"]
    tok = StellarTokenizer(**{**TOK, "stem": "conv"})
    report = load_mae_encoder(tok, path)
    assert not any(k.startswith("patch_embed") for k in report["loaded"]) and "model.stem=conv" in report["summary"]


@pytest.mark.parametrize("change,words", [
    ({"width": 32, "heads": 4, "decoder_width": 32}, "its hidden_size 64 != model.width 32"),
    ({"depth": 3}, "its num_hidden_layers 2 != model.depth 3"),
    ({"heads": 2}, "its num_attention_heads 4 != model.heads 2"),
    ({"patch_size": 8}, "its patch_size 4 != model.patch_size 8"),
    ({"mlp_ratio": 2.0}, "its intermediate_size 256 != model.width * model.mlp_ratio 128"),
    ({"norm_eps": 1e-6}, "its layer_norm_eps 1e-12 != model.norm_eps 1e-06 (set model.norm_eps=1e-12)"),
])
def test_a_mismatch_is_one_line_naming_it(mae_dirs, change, words):
    path, _ = mae_dirs["model"]
    tok = StellarTokenizer(**{**TOK, **change})
    with pytest.raises(UserError) as e:
        load_mae_encoder(tok, path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"model.init_from={path}: ") and words in msg, msg


def test_a_missing_folder_or_file_says_where_to_get_one(mae_dirs, tmp_path):
    tok = StellarTokenizer(**TOK)
    empty = tmp_path / "empty"
    empty.mkdir()
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    shutil.copy(os.path.join(mae_dirs["model"][0], "config.json"), only_config)
    for path, words in ((tmp_path / "nowhere", "no such folder"), (empty, "no config.json"), (only_config, "neither model.safetensors")):
        with pytest.raises(UserError) as e:
            load_mae_encoder(tok, str(path))
        msg = str(e.value)
        assert "\n" not in msg and words in msg and "hf download facebook/vit-mae-base --local-dir" in msg, msg


def test_config_checks_init_from_before_any_work(mae_dirs, tmp_path):
    from stellar_tok.config import load_config, tokenizer_kwargs
    from stellar_tok.training.preflight import check_data_paths

    path, _ = mae_dirs["model"]
    base = ["config=configs/tokenizer/tiny.yaml", "model.width=64", "model.heads=4", "model.depth=2", "model.stem=patch", "model.norm_eps=1e-12"]
    cfg = load_config(base + [f"model.init_from={path}"])
    assert "init_from" not in tokenizer_kwargs(cfg.model) and tokenizer_kwargs(cfg.model)["norm_eps"] == 1e-12
    for bad, words in (
        ([f"model.init_from={tmp_path / 'nowhere'}"], "config key 'model.init_from' must be a Hugging Face ViT-MAE folder"),
        ([f"model.init_from={path}", "model.depth=3"], "its num_hidden_layers 2 != model.depth 3"),
        ([f"model.init_from={path}", f"train.decoder_from={path}"], "config key 'model.init_from' must be null with train.decoder_from"),
    ):
        with pytest.raises(UserError) as e:  # the config alone (any command), or the files a training run reads
            check_data_paths(load_config(base + bad))
        assert "\n" not in str(e.value) and words in str(e.value), str(e.value)


def test_a_training_run_starts_from_the_mae(mae_dirs, tmp_path, capsys):
    from stellar_tok.train import main

    path, _ = mae_dirs["model"]
    out = str(tmp_path / "run")
    main([
        "config=configs/tokenizer/tiny.yaml", f"model.init_from={path}", "model.stem=patch", "model.width=64", "model.depth=2",
        "model.heads=4", "model.norm_eps=1e-12", "model.decoder_width=32", "model.decoder_depth=1", "model.decoder_heads=2",
        "data.train_size=64", "data.val_size=16", "optim.batch_size=8", "train.steps=2", "train.log_every=1",
        "train.image_every=1000", "train.ckpt_every=1000", "train.progress=false", "train.stats_batches=1", f"train.output_dir={out}",
    ])
    assert f"model.init_from={path}: 31 encoder tensors from model.safetensors (ViTMAEModel), pos-embed 4x4 -> 8x8" in capsys.readouterr().out
    tok = StellarTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    assert tok.config.norm_eps == 1e-12 and "init_from" not in tok.config
