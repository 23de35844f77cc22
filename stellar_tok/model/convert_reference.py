"""A published STELLAR checkpoint (the reference code's `STELLARModel`) as a `StellarTokenizer` folder.

    converted = convert_reference("stellar-b16.safetensors")     # or a Lightning .ckpt (keys under `model.`)
    save_converted(converted, "weights/stellar-b16")              # config.json + safetensors + conversion.json
    tok = StellarTokenizer.from_pretrained("weights/stellar-b16")

The reference model (GitHub microsoft/STELLAR, src/models/stellar_model.py) holds a transformers `ViTModel` encoder
run over [CLS] + patches + r learned sparse tokens (appended after the position embeddings, none of their own), a
final LayerNorm, and L = softmax_r(cos(dense_proj(dense), sparse_proj(S)) / 0.06). That is our encoder exactly:

    reference (transformers 4.x names; 5.x's layers.N.* are read too)    StellarTokenizer
    encoder.embeddings.*, encoder.encoder.layer.N.*, encoder.layernorm    the encoder (table of stellar_tok.model.mae_init)
    sparse_tokens (r, d)                                                  sparse_tokens (1, r, d)
    dense_proj, sparse_proj                                               loc_dense, loc_sparse
    decoder.encoder.layer.N.*, decoder.layernorm                          decoder_blocks.N.*, decoder_norm  (see below)
    position_embedding.positional_encoding_gaussian_matrix                decoder_pos.gaussian
    decoder_proj (d -> e)                                                 to_latent, from_latent: its best rank-c split
    clustering_head, cls_cluster_head (OnlineClustering, 2-layer MLP)      align_heads.safetensors (token_head, cls_head)

Its LayerNorm eps is HF ViT's 1e-12 (model.norm_eps). Its decoder (6 x 512, 8 heads: the heads cannot be read from
the tensors) was trained to predict MaskGIT-VQGAN codes from decoder_proj(L·S) plus random Fourier positions whose
sin and cos alternate (ours: all sines, then all cosines); the blocks are mapped with the residual channels permuted
to our order, so given our positions they compute the reference decoder's features; `reconstruction_head` (the code
logits) is left and our pixel head starts fresh. The bottleneck starts as decoder_proj's truncated SVD
(from_latent(to_latent(x)) = its best rank-c approximation). `decoder=fresh` keeps all of them as initialised.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from stellar_tok.errors import UserError
from stellar_tok.files import atomic_write_json, fsync_dir, load_state_dict_file

from .mae_init import vit_encoder_tensors, vit_layer_tensors
from .tokenizer import StellarTokenizer

HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16}  # ViT-B, -L, -H
REQUIRED = ("encoder.embeddings.cls_token", "encoder.embeddings.position_embeddings",
            "encoder.embeddings.patch_embeddings.projection.weight", "encoder.encoder.layer.0.layernorm_before.weight",
            "encoder.layernorm.weight", "sparse_tokens", "dense_proj.weight", "sparse_proj.weight")
LEFT_WHY = {  # reference tensors that have no place in our tokenizer, and why
    "encoder.pooler.": "the ViT pooler, unused by the reference's forward",
    "encoder.embeddings.mask_token": "unused by the reference's forward",
    "decoder.embeddings.": "the decoder ViT's own embeddings, unused (it reads decoder_proj(L·S))",
    "decoder.pooler.": "the decoder ViT's pooler, unused",
    "reconstruction_head.": "the reference predicts MaskGIT-VQGAN codes; our pixel head starts fresh",
    "tokenizer.": "the frozen MaskGIT-VQGAN of the reference's loss",
    "teacher_": "the momentum teacher's copies (the student is converted)",
}
ALIGN_HEADS_FILE = "align_heads.safetensors"
REPORT_FILE = "conversion.json"


@dataclass
class ConvertedReference:
    tokenizer: StellarTokenizer
    report: dict  # what was mapped, what was left and why; report["summary"]: one line
    align_heads: dict | None  # our AlignmentLoss keys (token_head.*, cls_head.*), or None (report["align_heads"]: why)


def read_reference(src: str) -> tuple[dict, str]:
    """The state dict of a reference checkpoint (`.safetensors`, or a torch/Lightning file read with
    weights_only=True), `model.` stripped, 5.x ViT names renamed to 4.x; and its layout in words."""
    if not os.path.isfile(src):
        raise UserError(f"src={src}: no such file")
    try:
        sd = load_state_dict_file(src)
    except Exception as e:  # truncated, not a weight file, or a pickle weights_only refuses
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"src={src}: cannot be read as safetensors or a torch checkpoint with weights_only=True ({first})") from None
    layout = "safetensors" if src.endswith(".safetensors") else "torch file"
    if isinstance(sd.get("state_dict"), dict):  # a Lightning checkpoint
        sd, layout = sd["state_dict"], "Lightning checkpoint"
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("model.") for k in sd):
        sd, layout = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}, layout + ", keys under model."
    renamed = {rename_v5(k): v for k, v in sd.items()}
    if renamed.keys() != sd.keys():
        layout += ", transformers 5.x ViT names"
    return renamed, layout


V5_NAMES = [("attention.q_proj", "attention.attention.query"), ("attention.k_proj", "attention.attention.key"),
            ("attention.v_proj", "attention.attention.value"), ("attention.o_proj", "attention.output.dense"),
            ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")]


def rename_v5(key: str) -> str:
    """`encoder.layers.3.attention.q_proj.weight` (transformers 5.x) -> `encoder.encoder.layer.3.attention.attention.query.weight`."""
    m = re.match(r"^((?:teacher_)?(?:encoder|decoder))\.layers\.(\d+)\.(.*)$", key)
    if not m:
        return key
    rest = m.group(3)
    for new, old in V5_NAMES:
        if rest.startswith(new + "."):
            rest = old + rest[len(new):]
    return f"{m.group(1)}.encoder.layer.{m.group(2)}.{rest}"


def _count_layers(sd: dict, root: str) -> int:
    return len({int(m.group(1)) for k in sd for m in [re.match(rf"^{re.escape(root)}encoder\.layer\.(\d+)\.", k)] if m})


def infer_config(sd: dict, src: str, heads: int = 0, tau: float = 0.06, latent_channels: int = 32, norm_eps: float = 1e-12,
                 decoder_heads: int = 8, use_decoder: bool = True) -> dict:
    """StellarTokenizer's keyword arguments from the tensors: width, depth, patch, grid (image size), r, MLP ratio;
    heads from the width unless given (`heads` > 0); the decoder's shape from the reference decoder when used."""
    missing = [k for k in REQUIRED if k not in sd]
    if missing:
        seen = ", ".join(sorted({k.split(".")[0] for k in sd})[:8]) or "no tensors"
        raise UserError(f"src={src} is not a STELLAR checkpoint: it lacks {', '.join(missing)} (its top-level names: {seen})")
    d = sd["encoder.embeddings.cls_token"].shape[-1]
    patch = sd["encoder.embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = int((sd["encoder.embeddings.position_embeddings"].shape[1] - 1) ** 0.5)
    heads = heads or HEADS_BY_WIDTH.get(d, 0)
    if not heads or d % heads:
        raise UserError(f"src={src}: width {d} is not a known ViT's (768, 1024, 1280): give heads=, a divisor of {d}")
    kw = dict(image_size=grid * patch, patch_size=patch, width=d, depth=_count_layers(sd, "encoder."), heads=heads,
              mlp_ratio=sd["encoder.encoder.layer.0.intermediate.dense.weight"].shape[0] / d,
              num_tokens=sd["sparse_tokens"].reshape(-1, d).shape[0], latent_channels=latent_channels, tau=tau,
              norm_eps=norm_eps, imagenet_norm=True, stem="patch", decoder_input="lowrank")
    if use_decoder and "decoder.layernorm.weight" in sd:
        e = sd["decoder.layernorm.weight"].shape[0]
        kw.update(decoder_width=e, decoder_depth=_count_layers(sd, "decoder."), decoder_heads=decoder_heads,
                  decoder_mlp_ratio=sd["decoder.encoder.layer.0.intermediate.dense.weight"].shape[0] / e)
    return kw


def sincos_order(e: int) -> torch.Tensor:
    """Our Fourier channel j as the reference's: ours = [sin_0..sin_{k-1}, cos_0..cos_{k-1}], theirs alternates
    sin_i, cos_i; (e,) indices p with ours[..., j] = theirs[..., p[j]]."""
    k = torch.arange(e // 2)
    return torch.cat([2 * k, 2 * k + 1])


def getter(sd: dict, root: str, src: str):
    """`get(name, optional=False)`: the tensor `root + name`; a UserError naming it when it is missing (not optional)."""
    def get(name: str, optional: bool = False):
        t = sd.get(root + name)
        if t is None and not optional:
            raise UserError(f"src={src}: it lacks {root + name} (a truncated or non-STELLAR file?)")
        return t
    return get


def decoder_tensors(sd: dict, tok: StellarTokenizer, src: str) -> dict:
    """The reference decoder's blocks, final norm and Fourier matrix with the residual channels in our order, and the
    bottleneck from decoder_proj's truncated SVD (rows of L sum to 1, so L·(W x + b) = W (L·x) + b)."""
    c, e = tok.config.latent_channels, tok.config.decoder_width
    p = sincos_order(e)
    new = {"decoder_pos.gaussian": sd["position_embedding.positional_encoding_gaussian_matrix"]}  # (2, e/2)
    for i in range(tok.config.decoder_depth):
        for key, t in vit_layer_tensors(getter(sd, "", src), f"decoder.encoder.layer.{i}.", f"decoder_blocks.{i}.", e).items():
            if key.endswith(("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.proj.bias", "mlp.fc2.bias")):
                t = t[p]  # a residual-stream vector
            elif key.endswith(("attn.qkv.weight", "mlp.fc1.weight")):
                t = t[:, p]  # reads the residual stream
            elif key.endswith(("attn.proj.weight", "mlp.fc2.weight")):
                t = t[p]  # writes it
            new[key] = t
    new["decoder_norm.weight"], new["decoder_norm.bias"] = sd["decoder.layernorm.weight"][p], sd["decoder.layernorm.bias"][p]
    u, s, vh = torch.linalg.svd(sd["decoder_proj.weight"].double(), full_matrices=False)  # (e, d) = U diag(s) V^T
    root = s[:c].sqrt()
    new["to_latent.weight"] = (root[:, None] * vh[:c]).float()  # (c, d)
    new["to_latent.bias"] = torch.zeros(c)
    new["from_latent.weight"] = (u[:, :c] * root[None]).float()[p]  # (e, c), rows in our channel order
    new["from_latent.bias"] = sd["decoder_proj.bias"][p]
    return new


def align_head_tensors(sd: dict) -> tuple[dict | None, str]:
    """The two OnlineClustering heads as our AlignmentLoss's (token_head, cls_head), when they are the 2-layer MLP +
    bias-free prototypes ours are; else None and why."""
    out = {}
    for theirs, ours in (("clustering_head.", "token_head."), ("cls_cluster_head.", "cls_head.")):
        names = {k[len(theirs):] for k in sd if k.startswith(theirs)}
        if not names:
            return None, f"the file has no {theirs[:-1]}"
        want = {"predictor.layers.0.weight", "predictor.layers.0.bias", "predictor.layers.2.weight", "predictor.layers.2.bias", "layer.weight"}
        if names != want:
            return None, f"{theirs[:-1]} is not a 2-layer MLP + prototypes as ours (its tensors: {', '.join(sorted(names))})"
        for o, t in (("mlp.0", "predictor.layers.0"), ("mlp.2", "predictor.layers.2")):
            out[f"{ours}{o}.weight"], out[f"{ours}{o}.bias"] = sd[f"{theirs}{t}.weight"], sd[f"{theirs}{t}.bias"]
        out[f"{ours}prototypes.weight"] = sd[f"{theirs}layer.weight"]
    hidden, bottleneck = out["token_head.mlp.0.weight"].shape[0], out["token_head.mlp.2.weight"].shape[0]
    k, kc = out["token_head.prototypes.weight"].shape[0], out["cls_head.prototypes.weight"].shape[0]
    return out, (f"align.head_hidden={hidden} align.head_bottleneck={bottleneck} align.token_prototypes={k} "
                 f"align.cls_prototypes={kc} align.prototype_std=1.0")


def convert_reference(src: str, heads: int = 0, tau: float = 0.06, latent_channels: int = 32, norm_eps: float = 1e-12,
                      decoder: str = "reference", decoder_heads: int = 8) -> ConvertedReference:
    """Read the reference checkpoint `src` and build the tokenizer (see the module doc). decoder: reference (its
    decoder blocks, positions and a bottleneck from decoder_proj, where present) | fresh. A file that is not a STELLAR
    checkpoint: a UserError naming what it lacks."""
    if decoder not in ("reference", "fresh"):
        raise UserError(f"decoder must be reference or fresh (got {decoder!r})")
    sd, layout = read_reference(src)
    kw = infer_config(sd, src, heads, tau, latent_channels, norm_eps, decoder_heads, use_decoder=decoder == "reference")
    tok = StellarTokenizer(**kw).eval()

    qkv_bias = "encoder.encoder.layer.0.attention.attention.query.bias" in sd
    new, _ = vit_encoder_tensors(getter(sd, "encoder.", src), kw["depth"], tok.grid, kw["width"], qkv_bias=qkv_bias)
    new["sparse_tokens"] = sd["sparse_tokens"].reshape(1, kw["num_tokens"], kw["width"])
    for ours, theirs in (("loc_dense", "dense_proj"), ("loc_sparse", "sparse_proj")):
        new[f"{ours}.weight"], new[f"{ours}.bias"] = sd[f"{theirs}.weight"], sd[f"{theirs}.bias"]
    decoder_note = decoder_source(sd, decoder, kw)
    if decoder_note.startswith("from"):
        new.update(decoder_tensors(sd, tok, src))
    heads_sd, heads_note = align_head_tensors(sd)
    load_checked(tok, new, src)
    report = conversion_report(src, layout, sd, kw, new, decoder_note, heads_sd is not None, heads_note, tok)
    return ConvertedReference(tok, report, heads_sd)


def decoder_source(sd: dict, decoder: str, kw: dict) -> str:
    """Where our decoder starts, in words (starting with 'from' when the reference's is mapped)."""
    if decoder == "fresh":
        return "fresh (decoder=fresh)"
    needed = ("decoder.layernorm.weight", "decoder_proj.weight", "position_embedding.positional_encoding_gaussian_matrix")
    lacking = [k for k in needed if k not in sd]
    if lacking:
        return f"fresh (the file has no {', '.join(lacking)})"
    if kw["latent_channels"] > min(kw["width"], kw["decoder_width"]):
        return f"fresh (latent_channels {kw['latent_channels']} exceeds decoder_proj's rank)"
    return (f"from the reference decoder: {kw['decoder_depth']} blocks x {kw['decoder_width']} ({kw['decoder_heads']} heads, "
            f"assumed), its Fourier positions, bottleneck = rank-{kw['latent_channels']} SVD of decoder_proj; pixel head fresh")


def load_checked(tok: StellarTokenizer, new: dict, src: str) -> None:
    """Copy `new` into `tok` in place after checking every shape (one line naming the first mismatch)."""
    ours = tok.state_dict()
    for key, value in new.items():
        if key not in ours or tuple(value.shape) != tuple(ours[key].shape):
            have = tuple(ours[key].shape) if key in ours else "no such tensor"
            raise UserError(f"src={src}: {key} would be {tuple(value.shape)}, the tokenizer's is {have} (a truncated or unusual file?)")
    with torch.no_grad():
        for key, value in new.items():
            ours[key].copy_(value.to(ours[key].dtype))


def conversion_report(src, layout, sd, kw, new, decoder_note, heads_mapped, heads_note, tok) -> dict:
    """What was mapped, what was left (by prefix, with why), and one summary line."""
    used = {"encoder.", "sparse_tokens", "dense_proj.", "sparse_proj."}
    if decoder_note.startswith("from"):
        used |= {"decoder.encoder.", "decoder.layernorm.", "decoder_proj.", "position_embedding."}
    if heads_mapped:
        used |= {"clustering_head.", "cls_cluster_head."}
    left: dict[str, str] = {}
    for k in sd:
        why = next((w for p, w in LEFT_WHY.items() if k.startswith(p)), None)
        if why is None and any(k.startswith(u) for u in used):
            continue
        parts = k.split(".")
        prefix = next((p for p in LEFT_WHY if k.startswith(p)), ".".join(parts[:2]) if parts[0] in ("encoder", "decoder") else parts[0])
        prefix = prefix[:-1] if prefix.endswith(".") else prefix + "*" if prefix.endswith("_") else prefix
        left[prefix] = why or ("not mapped: " + (decoder_note if prefix.startswith(("decoder", "position_embedding"))
                                                 else heads_note if "cluster" in prefix else "no counterpart in the tokenizer"))
    fresh = sorted(k for k in tok.state_dict() if k not in new and not k.startswith(("latent_", "pixel_")))
    summary = (f"converted {os.path.basename(src)} ({layout}): encoder {kw['depth']}x{kw['width']} ({kw['heads']} heads, patch "
               f"{kw['patch_size']}, {tok.grid}x{tok.grid} positions), r={kw['num_tokens']} sparse tokens, loc projections; "
               f"decoder {decoder_note}; clustering heads {'mapped' if heads_mapped else 'not mapped: ' + heads_note}; "
               f"left: {'; '.join(f'{k} ({w})' for k, w in sorted(left.items())) or 'nothing'}")
    return {"src": os.path.abspath(src), "layout": layout, "config": kw, "mapped": len(new), "mapped_keys": sorted(new),
            "fresh_keys": fresh, "left": left, "decoder": decoder_note,
            "align_heads": (f"{ALIGN_HEADS_FILE}: {heads_note}" if heads_mapped else f"not mapped: {heads_note}"),
            "summary": summary}


def save_converted(converted: ConvertedReference, out: str) -> str:
    """Write the tokenizer folder `out` (config.json, safetensors, conversion.json, align_heads.safetensors when mapped)
    into a temporary folder beside it, then rename: `out` is whole or absent. An existing `out` is refused."""
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out):
        raise UserError(f"out={out} exists: remove it or choose another folder")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(out) + ".", suffix=".tmp")
    try:
        converted.tokenizer.save_pretrained(tmp, safe_serialization=True)
        if converted.align_heads is not None:
            save_file({k: v.contiguous() for k, v in converted.align_heads.items()}, os.path.join(tmp, ALIGN_HEADS_FILE))
        atomic_write_json(os.path.join(tmp, REPORT_FILE), converted.report)
        cls_trained = any(k.startswith("cls_cluster_head") for k in converted.report["left"]) or converted.align_heads is not None
        atomic_write_json(os.path.join(tmp, "training.json"), {"steps": None, "cls_trained": cls_trained,
                                                                "converted_from": converted.report["src"]})
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(parent)
    return out
