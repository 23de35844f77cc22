"""`model.init_from=DIR`: start the encoder from a local Hugging Face ViT-MAE folder (the reference recipe starts
ViT-B/16 from `facebook/vit-mae-base`, L and H from vit-mae-large / vit-mae-huge).

    hf download facebook/vit-mae-base --local-dir weights/vit-mae-base
    python -m stellar_tok.train config=configs/tokenizer/vit_b16.yaml model.init_from=weights/vit-mae-base \
        model.norm_eps=1e-12

DIR holds `config.json` and `model.safetensors` (or a sharded `model.safetensors.index.json`, or
`pytorch_model.bin`, read with `torch.load(weights_only=True)`). `transformers` is not imported: the json and
the tensors are read directly. Both key layouts are accepted: ViTMAEModel (`embeddings.*`, `encoder.layer.*`)
and ViTMAEForPreTraining (the same under `vit.`, plus a `decoder.*` that is ignored).

    MAE                                                    STELLAR (StellarTokenizer)
    embeddings.patch_embeddings.projection                 patch_embed          (model.stem=patch only)
    embeddings.cls_token                                   cls_token
    embeddings.position_embeddings[:, 0]                   cls_pos
    embeddings.position_embeddings[:, 1:]  (G0*G0)         pos_embed (G*G), bicubic when G0 != G
    encoder.layer.i.layernorm_before / _after              blocks.i.norm1 / norm2
    encoder.layer.i.attention.attention.{query,key,value}  blocks.i.attn.qkv   (concatenated q, k, v)
    encoder.layer.i.attention.output.dense                 blocks.i.attn.proj
    encoder.layer.i.intermediate.dense / output.dense      blocks.i.mlp.fc1 / fc2
    layernorm                                              norm

Each of q, k, v is laid out (heads, head_dim) along its output rows (HF views it as (..., H, D/H)), so the
concatenation is exactly the "(three h d)" our Attention splits. The sparse tokens, the localisation, the
bottleneck and the decoder keep their initialisation. LayerNorm eps: MAE's is `layer_norm_eps` (1e-12), the
tokenizer's `model.norm_eps` must equal it (default 1e-6: pass model.norm_eps=1e-12); see `load_mae_encoder`.

model.init_from may also name a tokenizer folder (an export, or `python -m stellar_tok.convert_reference`'s output):
`check_tokenizer_fits` checks its encoder keys here, stellar_tok.training.tokenizer_weights loads it.
"""
from __future__ import annotations

import json
import math
import os

import torch
from safetensors import safe_open

from stellar_tok.errors import UserError

from .vit import interpolate_pos_embed

GET_IT = "hf download facebook/vit-mae-base --local-dir DIR"  # (vit-mae-large / vit-mae-huge for L / H)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _fail(path: str, msg: str) -> UserError:
    return UserError(f"model.init_from={path}: {msg}")


def is_tokenizer_folder(path: str) -> bool:
    """Whether `path` is a StellarTokenizer folder (an export, or stellar_tok.convert_reference's output): model.init_from's
    other kind, read whole by stellar_tok.training.tokenizer_weights.load_tokenizer_start, not here."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f).get("_class_name") == "StellarTokenizer"
    except (OSError, ValueError, AttributeError):
        return False


ENCODER_KEYS = ("patch_size", "width", "depth", "heads", "mlp_ratio", "num_tokens", "stem", "decoder_input", "norm_eps",
                "imagenet_norm", "tau")  # what a tokenizer folder's encoder and latent are; image_size may differ (interpolated)


def check_tokenizer_fits(path: str, c) -> None:
    """A tokenizer folder's config.json against `c` (a ModelConfig or a tokenizer's config): every encoder key must
    agree (one line naming the first that does not); the decoder keys and latent_channels may differ."""
    with open(os.path.join(path, "config.json")) as f:
        theirs = json.load(f)
    for key in ENCODER_KEYS:
        ours = getattr(c, key)
        if key in theirs and theirs[key] != ours and not (isinstance(ours, float) and math.isclose(theirs[key], ours, rel_tol=1e-6)):
            raise _fail(path, f"its {key} {theirs[key]!r} != model.{key} {ours!r} (a tokenizer folder's encoder keys must be the run's)")


def mae_folder_problem(path: str) -> str | None:
    """None when `path` is a folder with config.json and a weight file (or a tokenizer folder), else what is wrong and
    how to get one (one line)."""
    if is_tokenizer_folder(path):
        return None
    if not os.path.isdir(path):
        return f"no such folder (get one with: {GET_IT})"
    if not os.path.isfile(os.path.join(path, "config.json")):
        return f"no config.json in it (a Hugging Face ViT-MAE folder is expected; get one with: {GET_IT})"
    if not any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES):
        return f"neither model.safetensors nor pytorch_model.bin in it (get them with: {GET_IT})"
    return None


def _read_tensors(path: str, wanted) -> tuple[dict, str]:
    """The tensors of DIR's weight file(s) whose names `wanted(name)` accepts, on the CPU; and the file read."""
    st = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(st) or os.path.isfile(index):
        if os.path.isfile(st):
            files, shown = [st], "model.safetensors"
        else:
            with open(index) as f:
                files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
            shown = "model.safetensors.index.json"
        out = {}
        for file in files:
            with safe_open(file, framework="pt", device="cpu") as f:  # reads only the tensors asked for
                out.update({k: f.get_tensor(k) for k in f.keys() if wanted(k)})
        return out, shown
    # pickle, but restricted to tensors and plain containers: never a full unpickle
    sd = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    return {k: v for k, v in sd.items() if wanted(k)}, "pytorch_model.bin"


def check_mae_fits(path: str, c) -> None:
    """DIR/config.json against `c` (a ModelConfig or a tokenizer's config): width, depth, heads, patch, MLP,
    activation, LayerNorm eps. Reads only the json, so a run can check before any work; one line naming the
    first mismatch."""
    problem = mae_folder_problem(path)
    if problem:
        raise _fail(path, problem)
    if is_tokenizer_folder(path):
        check_tokenizer_fits(path, c)
        return
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    if hf.get("model_type") != "vit_mae":
        raise _fail(path, f"config.json is model_type {hf.get('model_type')!r}, not 'vit_mae' (get a ViT-MAE with: {GET_IT})")
    mlp_hidden = int(c.width * c.mlp_ratio)  # as Block builds it
    eps = hf.get("layer_norm_eps", 1e-12)
    checks = [
        ("hidden_size", hf.get("hidden_size"), "model.width", c.width),
        ("num_hidden_layers", hf.get("num_hidden_layers"), "model.depth", c.depth),
        ("num_attention_heads", hf.get("num_attention_heads"), "model.heads", c.heads),
        ("patch_size", hf.get("patch_size"), "model.patch_size", c.patch_size),
        ("intermediate_size", hf.get("intermediate_size"), "model.width * model.mlp_ratio", mlp_hidden),
        ("num_channels", hf.get("num_channels", 3), "3 (RGB)", 3),
        ("hidden_act", hf.get("hidden_act", "gelu"), "'gelu' (our MLP's exact GELU)", "gelu"),
    ]
    for key, theirs, ours_name, ours in checks:
        if theirs != ours:
            raise _fail(path, f"its {key} {theirs!r} != {ours_name} {ours!r}")
    if not math.isclose(eps, c.norm_eps, rel_tol=1e-6):  # tiny activations make it matter (see load_mae_encoder)
        raise _fail(path, f"its layer_norm_eps {eps:g} != model.norm_eps {c.norm_eps:g} (set model.norm_eps={eps:g})")


@torch.no_grad()
def load_mae_encoder(tokenizer, path: str) -> dict:
    """Copy the encoder of the Hugging Face ViT-MAE folder `path` into `tokenizer` (in place; see the module doc).

    Returns a report: source layout, file, the tokenizer keys loaded, those kept as initialised, the
    position-embedding grid (from, to), the LayerNorm eps, and `summary`, one line for a log.

    LayerNorm eps: MAE normalises with `layer_norm_eps` (1e-12), our encoder with `model.norm_eps` (default
    1e-6). The tokenizer must be built with MAE's: a mismatch is refused (check_mae_fits), because on a small
    model's activations 1e-6 against 1e-12 moves the outputs by ~1e-2 (tests/test_mae_init.py)."""
    path = os.path.expanduser(str(path))
    check_mae_fits(path, tokenizer.config)
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)

    tensors, file = _read_tensors(path, lambda k: not k.startswith("decoder."))
    if "vit.embeddings.cls_token" in tensors:
        prefix, layout = "vit.", "ViTMAEForPreTraining"
    elif "embeddings.cls_token" in tensors:
        prefix, layout = "", "ViTMAEModel"
    else:
        raise _fail(path, f"{file} holds no ViT-MAE encoder (no embeddings.cls_token, with or without 'vit.')")

    def get(name: str, optional: bool = False):  # a tensor by its name under the ViT's root
        t = tensors.get(prefix + name)
        if t is None and not optional:
            raise _fail(path, f"{file} lacks {prefix + name} (a truncated or non-ViT-MAE file?)")
        return t

    ours = tokenizer.state_dict()
    try:
        new, old_grid = vit_encoder_tensors(get, len(tokenizer.blocks), tokenizer.grid, tokenizer.config.width,
                                            patch_stem=tokenizer.config.stem == "patch", qkv_bias=hf.get("qkv_bias", True))
    except ValueError as e:
        raise _fail(path, str(e)) from None
    for key, value in new.items():
        if tuple(value.shape) != tuple(ours[key].shape):
            raise _fail(path, f"{key} has shape {tuple(value.shape)} in {file}, the tokenizer's is {tuple(ours[key].shape)}")
    for key, value in new.items():  # in place: keeps parameters, devices and dtypes
        ours[key].copy_(value.to(ours[key].dtype))
    loaded = sorted(new)
    grid = (old_grid, tokenizer.grid)
    summary = (f"model.init_from={path}: {len(loaded)} encoder tensors from {file} ({layout}), "
               f"pos-embed {grid[0]}x{grid[0]} -> {grid[1]}x{grid[1]}"
               + ("" if tokenizer.config.stem == "patch" else ", patch embedding kept (model.stem=conv)"))
    return {
        "path": path,
        "file": file,
        "layout": layout,
        "loaded": loaded,
        "kept": sorted(k for k in ours if k not in new),
        "pos_grid": grid,
        "layer_norm_eps": tokenizer.norm.eps,
        "summary": summary,
    }


# ----------------------------------------------------------------------------------------------
# the transformers 4.x ViT layout (ViTModel, ViTMAEModel), shared with stellar_tok.model.convert_reference
# ----------------------------------------------------------------------------------------------

def vit_layer_tensors(get, theirs: str, ours: str, width: int, qkv_bias: bool = True) -> dict:
    """One transformers 4.x ViT layer (`theirs`, e.g. 'encoder.layer.3.') as our `Block`'s tensors (`ours`, e.g.
    'blocks.3.'). `get(name, optional=False)` returns a tensor by its full name (None for a missing optional one);
    qkv_bias=False: zero q, k, v biases (the file holds none)."""
    new = {}

    def linear(o: str, t: str) -> None:
        new[f"{ours}{o}.weight"], new[f"{ours}{o}.bias"] = get(f"{theirs}{t}.weight"), get(f"{theirs}{t}.bias")

    linear("norm1", "layernorm_before")
    linear("norm2", "layernorm_after")
    qkv = [f"{theirs}attention.attention.{n}" for n in ("query", "key", "value")]
    new[ours + "attn.qkv.weight"] = torch.cat([get(n + ".weight") for n in qkv])  # (3d, d): rows (three h d)
    biases = [get(n + ".bias", optional=not qkv_bias) for n in qkv]
    new[ours + "attn.qkv.bias"] = torch.cat([b if b is not None else torch.zeros(width) for b in biases])  # (3d,)
    linear("attn.proj", "attention.output.dense")
    linear("mlp.fc1", "intermediate.dense")
    linear("mlp.fc2", "output.dense")
    return new


def vit_encoder_tensors(get, depth: int, grid: int, width: int, patch_stem: bool = True, qkv_bias: bool = True) -> tuple[dict, int]:
    """A transformers 4.x ViT encoder (`embeddings.*`, `encoder.layer.N.*`, `layernorm.*`, names relative to `get`'s
    root, see `vit_layer_tensors`) as our tokenizer's encoder tensors (the table of the module doc), the patch position
    embeddings resized bicubically to `grid` x `grid`. Returns them and the file's own grid side; a ValueError when its
    position embeddings are not [CLS] + a square grid. patch_stem=False (model.stem=conv): no patch embedding."""
    new = {}
    if patch_stem:
        new["patch_embed.weight"] = get("embeddings.patch_embeddings.projection.weight")
        new["patch_embed.bias"] = get("embeddings.patch_embeddings.projection.bias")
    pos = get("embeddings.position_embeddings")  # (1, 1 + G0*G0, d)
    old_grid = math.isqrt(pos.shape[1] - 1)
    if old_grid * old_grid != pos.shape[1] - 1:
        raise ValueError(f"its position_embeddings have {pos.shape[1] - 1} patch rows, not a square grid")
    new["cls_token"] = get("embeddings.cls_token")  # (1, 1, d)
    new["cls_pos"] = pos[:, :1]  # (1, 1, d)
    new["pos_embed"] = interpolate_pos_embed(pos[:, 1:].float(), grid)  # (1, G*G, d)
    for i in range(depth):
        new.update(vit_layer_tensors(get, f"encoder.layer.{i}.", f"blocks.{i}.", width, qkv_bias))
    new["norm.weight"], new["norm.bias"] = get("layernorm.weight"), get("layernorm.bias")
    return new, old_grid
