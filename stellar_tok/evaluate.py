"""Evaluate a tokenizer: reconstruction (PSNR, SSIM, LPIPS, rFID, rKID) and semantics (linear probe, kNN).

    python -m stellar_tok.evaluate tokenizer=runs/tiny/tokenizer data.name=shapes tasks=recon,linear,knn out=runs/tiny/eval

Protocol (written to metrics.json with the numbers):
- Held-out images: `n_eval` images of the val split (0: all), a subset drawn with `seed` and spread over the
  classes (stellar_tok.evaluation.probing.spread_subset), centre-cropped to the tokenizer's resolution
  (`stellar_tok.evaluation.fid_reference.ReferenceImages`: every image read once, WebDataset shards too).
- Reconstruction: encode -> decode through the public API (float32 latent), clamp to [-1,1], quantise to
  8 bits. PSNR and SSIM (stellar_tok.evaluation.metrics) per image, averaged. LPIPS (VGG, the `lpips` package) when
  its backbone weights are available; `lpips=auto` skips it with a warning when they are not. rFID: the
  Fréchet distance between Inception-v3 pool features of the reconstructions and the reference statistics of
  the same held-out images (computed once, cached; `fid.ref=` to give them); rKID likewise when the
  reference keeps its features. FID depends on the number of images: compare at equal `n_eval` only; every
  rFID / rKID is reported with its n_eval and split (`rfid_n_eval`, `rfid_split`, the table's header).
  The downsampled-pixel baseline's reconstruction metrics depend on the data only and are cached too.
- Semantics: features extracted once per split without augmentation and cached in `out/cache`: the mean of
  the r sparse tokens S (`tokens`) and the CLS token (`cls`). Linear probe: LayerNorm + Linear, AdamW
  (lr 1e-3, weight decay 1e-4, batch 256, cosine schedule, `probe_epochs` epochs) trained on `n_train` train
  images (a seeded subset spread over the classes, centre crops, as the held-out images); kNN: cosine
  similarity, k = 20, votes weighted by exp(sim / 0.07) (DINO). Top-1 on the held-out images.
- `num_workers` DataLoader processes decode the images (-1: data.num_workers if set, else up to 8 for image
  files, none for shapes/digits).
- Baselines (`baselines=true`): raw pixels (linear, kNN), and pixels area-downsampled to the largest square
  with no more values than the latent (r*c + N*r), upsampled bicubically: the same metrics at equal size.

Writes `out/metrics.json`, `out/metrics.md` (a Markdown table) and `out/reconstructions.png`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from .config import DataConfig, load_tokenizer_command_config, parse_overrides
from .errors import UserError, cli_entry
from .files import atomic_path, atomic_write_json, atomic_write_text
from stellar_tok.evaluation.fid_reference import (
    FIDConfig,
    ReferenceImages,
    cache_root,
    default_ref_path,
    reference_identity,
)

TASKS = ("recon", "linear", "knn")


@dataclass
class EvalConfig:
    tokenizer: Optional[str] = None  # an exported tokenizer folder (save_pretrained)
    out: Optional[str] = None  # folder for metrics.json, metrics.md, reconstructions.png
    data: DataConfig = field(default_factory=DataConfig)  # data.resolution defaults to the tokenizer's image_size
    tasks: str = "recon,linear,knn"
    n_eval: int = 1000  # held-out (val) images (0: the whole split); a seeded subset spread over the classes
    n_train: int = 5000  # train images the probes learn from (0: the whole split); likewise
    num_workers: int = -1  # processes decoding images; -1: data.num_workers if > 0, else min(8, CPUs) for folder/wds, 0 otherwise
    features: str = "tokens,cls"  # tokenizer features for the probes: tokens (mean of S), cls, lowrank (mean of L·S)
    baselines: bool = True  # raw-pixel and downsampled-pixel baselines
    probe_epochs: int = 30
    probe_lr: float = 1.0e-3
    probe_weight_decay: float = 1.0e-4
    knn_k: int = 20
    knn_temperature: float = 0.07
    lpips: str = "auto"  # auto (VGG when its weights are available, else skipped) | vgg | alex | none
    fid: FIDConfig = field(default_factory=FIDConfig)  # fid.batch_size 0: 10 on CPU (fastest there), 100 on GPU
    batch_size: int = 100
    grid: int = 8  # images in reconstructions.png (0: none)
    seed: int = 0  # the n_eval / n_train subsets, the probes
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True


# ----------------------------------------------------------------------------------------------
# pieces
# ----------------------------------------------------------------------------------------------


def downsample_size(tokenizer, resolution: int) -> int:
    """Largest k with 3*k*k <= the latent's number of values (r*c + N*r; dense decoder N*c), below the resolution."""
    values = tokenizer.latent_values((resolution // tokenizer.config.patch_size) ** 2)
    return max(1, min(resolution - 1, math.isqrt(values // 3)))


def pixel_baseline(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B,3,R,R) in [-1,1] -> (downsampled (B,3,k,k), bicubic reconstruction (B,3,R,R) in [-1,1])."""
    down = F.interpolate(x, size=(k, k), mode="area")
    return down, F.interpolate(down, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)


def build_eval_lpips(kind: str, device):
    """-> (module or None, note). `auto` uses VGG when its weights are cached or downloadable."""
    from stellar_tok.losses.reconstruction import build_lpips

    if kind == "none":
        return None, "not computed (lpips=none)"
    from stellar_tok.losses.reconstruction import backbone_weights_path

    try:
        return build_lpips(False, "vgg" if kind == "auto" else kind).to(device), "vgg" if kind == "auto" else kind
    except UserError:
        if kind != "auto":
            raise
        warnings.warn(f"LPIPS skipped: no VGG weights at {backbone_weights_path('vgg')} and no network to fetch them "
                      "(copy the file there, or pass lpips=none to silence this)")
        return None, "skipped (no VGG weights offline)"


class _ReconMeter:
    """Per-image PSNR/SSIM/LPIPS and Inception features of reconstructions."""

    def __init__(self, extractor, lpips_net, batch_size):
        self.extractor, self.lpips, self.batch_size = extractor, lpips_net, batch_size
        self.psnr, self.ssim, self.lp, self.feats = [], [], [], []

    def add(self, x: torch.Tensor, rec: torch.Tensor) -> None:  # both (B,3,R,R) in [-1,1]
        from stellar_tok.evaluation.fid import inception_features
        from stellar_tok.evaluation.metrics import psnr, ssim, to_uint8, to_unit

        a, b = to_unit(x.cpu()), to_unit(rec.cpu())
        self.psnr.append(psnr(a, b).clamp(max=100.0))
        self.ssim.append(ssim(a, b))
        if self.lpips is not None:
            with torch.no_grad():
                self.lp.append(self.lpips(x, b.to(x.device) * 2 - 1).flatten().float().cpu())
        if self.extractor is not None:
            self.feats.append(inception_features(self.extractor, to_uint8(rec).to(self.device), self.batch_size))

    @property
    def device(self):
        return next(self.extractor.parameters()).device

    def result(self, ref: dict | None) -> dict:
        from stellar_tok.evaluation.fid import feature_stats, fid_from_stats, kid_from_features

        out = {"psnr": float(torch.cat(self.psnr).mean()), "ssim": float(torch.cat(self.ssim).mean())}
        if self.lp:
            out["lpips"] = float(torch.cat(self.lp).mean())
        if self.feats and ref is not None:
            feats = np.concatenate(self.feats)
            out["rfid"] = float(fid_from_stats(feature_stats(feats), ref))
            if "features" in ref:
                kid, kid_std = kid_from_features(feats, ref["features"], subset_size=min(1000, len(feats), len(ref["features"])))
                out["rkid"], out["rkid_std"] = float(kid), float(kid_std)
        return out


def probe_features(tok, x: torch.Tensor, labels: torch.Tensor, kinds, baselines: bool, k_down: int, f: dict | None = None) -> dict:
    """x (B,3,R,R) in [-1,1] -> the probes' features of one batch on the CPU: the tokenizer's `kinds` (tokens: mean of
    S, cls, lowrank: mean of L·S), with baselines raw `pixels` and `pixels_down`, and `labels`.
    f: `tok.features(x)` when the caller already has it."""
    f = tok.features(x) if f is None else f
    pooled = {"tokens": lambda: f["sparse"].mean(1), "cls": lambda: f["cls"], "lowrank": lambda: f["lowrank"].mean(1)}
    out = {k: pooled[k]().float().cpu() for k in kinds}
    if baselines:
        out["pixels"] = x.flatten(1).cpu()
        out["pixels_down"] = pixel_baseline(x, k_down)[0].flatten(1).cpu()
    out["labels"] = labels.long()
    return out


def _load_cached(path: str, key: dict) -> dict | None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not os.path.exists(path):
        return None
    with safe_open(path, "pt") as f:
        if json.loads((f.metadata() or {}).get("key", "null")) != key:
            return None
    return load_file(path)


def _save_cached(path: str, key: dict, tensors: dict) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"key": json.dumps(key, sort_keys=True)})


def train_features(tok, cfg, kinds, k_down: int, fingerprint: str, device, images: ReferenceImages | None = None) -> dict:
    """Probe training features of n_train train images, a seeded subset spread over the classes, centre crops
    (cached in out/cache)."""
    from tqdm.auto import tqdm

    if images is None:
        images = ReferenceImages(cfg.data, "train", cfg.n_train, cfg.seed)
    key = {"tokenizer": fingerprint, "data": images.identity, "kinds": list(kinds),
           "baselines": bool(cfg.baselines), "k_down": k_down}
    path = os.path.join(cfg.out, "cache", "features-train.safetensors")
    cached = _load_cached(path, key)
    if cached is not None:
        return cached
    acc: dict[str, list] = {}
    total = images.size_hint()
    for batch, labels in tqdm(images.loader(cfg.batch_size, cfg.num_workers), total=total and math.ceil(total / cfg.batch_size),
                              desc="train features", disable=not cfg.progress):
        x = batch.to(device).float() / 127.5 - 1
        for k, v in probe_features(tok, x, labels, kinds, cfg.baselines, k_down).items():
            acc.setdefault(k, []).append(v)
    out = {k: torch.cat(v) for k, v in acc.items()}
    _save_cached(path, key, out)
    return out


# ----------------------------------------------------------------------------------------------
# the evaluation
# ----------------------------------------------------------------------------------------------


def evaluate(cfg) -> dict:
    from tqdm.auto import tqdm

    from stellar_tok.latents.dataset import tokenizer_fingerprint
    from stellar_tok.evaluation.probing import knn_classify, linear_probe
    from stellar_tok.model.tokenizer import StellarTokenizer
    from stellar_tok.evaluation.pictures import reconstruction_grid

    tasks = [t.strip() for t in str(cfg.tasks).split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise UserError(f"tasks must be a comma list of {', '.join(TASKS)} (got {cfg.tasks!r})")
    kinds = [k.strip() for k in str(cfg.features).split(",") if k.strip()]
    if not kinds or any(k not in ("tokens", "cls", "lowrank") for k in kinds):
        raise UserError(f"features must be a comma list of tokens, cls, lowrank (got {cfg.features!r})")
    if str(cfg.lpips).lower() in ("off", "false", "none"):  # YAML reads a bare off as false
        cfg.lpips = "none"
    if cfg.lpips not in ("auto", "vgg", "alex", "none"):
        raise UserError(f"lpips must be auto, vgg, alex or none (got {cfg.lpips!r})")
    if not cfg.out:
        raise UserError("out=DIR is required (where metrics.json and metrics.md go)")
    for key, lo in (("n_eval", 0), ("n_train", 0), ("probe_epochs", 1), ("knn_k", 1), ("batch_size", 1), ("grid", 0)):
        if cfg[key] < lo:
            raise UserError(f"{key} must be an integer >= {lo} (got {cfg[key]})")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device))
    os.makedirs(cfg.out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    times: dict[str, float] = {}
    t_start = time.time()

    tok = StellarTokenizer.from_pretrained(cfg.tokenizer).eval().to(device)
    fingerprint = tokenizer_fingerprint(tok)
    res = int(cfg.data.resolution)
    k_down = downsample_size(tok, res)
    semantics = [t for t in tasks if t in ("linear", "knn")]

    # --- one pass over the held-out images ---------------------------------------------------
    from .data import heldout_is_train

    held_out = ReferenceImages(cfg.data, "val", cfg.n_eval, cfg.seed)  # centre crops, a seeded subset spread over the classes
    split_label = "val (falls back to train images)" if heldout_is_train(cfg.data) else "val"
    extractor = ref = lpips_net = None
    lpips_note, ref_path, real_feats, ref_identity = "not computed", None, None, None
    if "recon" in tasks:
        from stellar_tok.evaluation.fid import build_inception, load_stats

        extractor = build_inception(cfg.fid.weights, device=device)
        ref_identity = reference_identity(held_out, extractor)
        ref_path = cfg.fid.ref or default_ref_path(ref_identity)
        if os.path.exists(ref_path):
            ref = load_stats(ref_path)
        elif cfg.fid.ref:
            raise UserError(f"fid.ref={cfg.fid.ref} does not exist (make it with python -m stellar_tok.fid_stats)")
        else:
            real_feats = []  # the reference is computed in the same pass and cached
        lpips_net, lpips_note = build_eval_lpips(cfg.lpips, device)
    fid_batch = cfg.fid.batch_size or (100 if device.type == "cuda" else 10)  # 10: fastest on CPU
    meters = {"stellar": _ReconMeter(extractor, lpips_net, fid_batch)}
    baseline_path, baseline_cached = None, None
    if cfg.baselines and "recon" in tasks:  # depends on the data only: computed once, cached beside the reference
        key = {"data": ref_identity, "k_down": k_down, "reference": os.path.abspath(ref_path), "lpips": lpips_note}
        baseline_path = os.path.join(cache_root(), "fid_refs", "baseline-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12] + ".json")
        if os.path.exists(baseline_path) and real_feats is None:
            with open(baseline_path) as f:
                baseline_cached = json.load(f)
        else:
            meters["pixels_down"] = _ReconMeter(extractor, lpips_net, fid_batch)
    val: dict[str, list] = {}
    grid_done = cfg.grid <= 0
    t = time.time()
    total = held_out.size_hint()
    for images, labels in tqdm(held_out.loader(cfg.batch_size, cfg.num_workers), total=total and math.ceil(total / cfg.batch_size),
                               desc="held-out images", disable=not cfg.progress):
        x = images.to(device).float() / 127.5 - 1  # (B,3,R,R) in [-1,1]
        f = tok.features(x, with_latent=True) if semantics else None  # one encoder pass for both tasks
        if "recon" in tasks:
            latent = f["latent"] if f is not None else tok.encode(x)  # tokens (B,r,c), log L (B,N,r)
            rec = tok.decode(latent)  # (B,3,R,R)
            meters["stellar"].add(x, rec)
            if "pixels_down" in meters:
                meters["pixels_down"].add(x, pixel_baseline(x, k_down)[1])
            if real_feats is not None:
                from stellar_tok.evaluation.fid import inception_features

                real_feats.append(inception_features(extractor, images.to(device), fid_batch))
            if not grid_done:
                reconstruction_grid(x, rec, latent.probs(), os.path.join(cfg.out, "reconstructions.png"), n=cfg.grid)
                grid_done = True
        if semantics:
            for k, v in probe_features(tok, x, labels, kinds, cfg.baselines, k_down, f).items():
                val.setdefault(k, []).append(v)
    times["held_out_pass"] = time.time() - t
    n_eval = sum(len(p) for p in meters["stellar"].psnr) if "recon" in tasks else sum(len(v) for v in val.get("labels", []))

    if real_feats is not None:
        from stellar_tok.evaluation.fid import feature_stats, load_stats, save_stats

        feats = np.concatenate(real_feats)
        stats = feature_stats(feats)
        stats["features"] = feats.astype(np.float32)
        save_stats(ref_path, stats, meta={"data": ref_identity, "extractor": extractor.weights_source, "images": held_out.describe()})
        ref = load_stats(ref_path)

    results: dict[str, dict] = {"stellar": {}}
    if cfg.baselines:
        results["pixels_down"], results["pixels"] = {}, {}
    if "recon" in tasks:
        for name, m in meters.items():
            results[name].update(m.result(ref))
        if baseline_cached is not None:
            results["pixels_down"].update(baseline_cached)
        elif baseline_path:
            atomic_write_json(baseline_path, results["pixels_down"], indent=None)
        for r in results.values():  # every rFID / rKID carries the number of images and the split it was measured on
            if "rfid" in r:
                r["rfid_n_eval"], r["rfid_split"] = n_eval, split_label

    # --- semantic probes -----------------------------------------------------------------------
    if semantics:
        t = time.time()
        train_images = ReferenceImages(cfg.data, "train", cfg.n_train, cfg.seed)
        tr = train_features(tok, cfg, kinds, k_down, fingerprint, device, train_images)
        times["train_features"] = time.time() - t
        va = {k: torch.cat(v) for k, v in val.items()}
        t = time.time()
        probes = [("stellar", k, k) for k in kinds] + ([("pixels", "pixels", "pixels"), ("pixels_down", "pixels_down", "pixels")] if cfg.baselines else [])
        for row, feat, col in probes:
            suffix = col if row == "stellar" else "pixels"
            if "linear" in semantics:
                results[row][f"linear_{suffix}"] = linear_probe(tr[feat].float(), tr["labels"], va[feat].float(), va["labels"], epochs=cfg.probe_epochs,
                                                                 lr=cfg.probe_lr, weight_decay=cfg.probe_weight_decay, seed=cfg.seed)
            if "knn" in semantics:
                results[row][f"knn_{suffix}"] = knn_classify(tr[feat], tr["labels"], va[feat], va["labels"], k=cfg.knn_k, temperature=cfg.knn_temperature)
        times["probes"] = time.time() - t
    times["total"] = time.time() - t_start

    tc = tok.config
    n_patches = (res // tc.patch_size) ** 2
    report = {
        "tokenizer": {"path": cfg.tokenizer, "fingerprint": fingerprint, "num_tokens": tc.num_tokens, "latent_channels": tc.latent_channels,
                      "patches": n_patches, "latent_values": tok.latent_values(n_patches),
                      "decoder_input": tc.decoder_input},
        "data": {"val": held_out.identity, "train": train_images.identity if semantics else None, "split": split_label,
                 "n_eval": n_eval, "n_train": int(len(tr["labels"])) if semantics else 0,
                 "held_out": held_out.describe(), "probe_train": train_images.describe() if semantics else None},
        "protocol": {"tasks": tasks, "features": kinds, "psnr_ssim": "8-bit images in [0,1]; SSIM 11x11 Gaussian sigma 1.5, valid, per channel",
                     "lpips": lpips_note, "fid_reference": ref_path, "fid_extractor": getattr(extractor, "weights_source", None),
                     "linear": {"epochs": cfg.probe_epochs, "lr": cfg.probe_lr, "weight_decay": cfg.probe_weight_decay, "batch_size": 256, "head": "LayerNorm+Linear"},
                     "knn": {"k": cfg.knn_k, "temperature": cfg.knn_temperature, "similarity": "cosine"},
                     "pixels_down": f"area-downsampled to {k_down}x{k_down} ({3 * k_down * k_down} values), bicubic back to {res}"},
        "results": {k: {m: round(v, 4) if isinstance(v, float) else v for m, v in r.items()} for k, r in results.items()},
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "config": OmegaConf.to_container(cfg) if OmegaConf.is_config(cfg) else None,
    }
    atomic_write_json(os.path.join(cfg.out, "metrics.json"), report, indent=2)
    atomic_write_text(os.path.join(cfg.out, "metrics.md"), markdown_table(report))
    return report


ROW_NAMES = {"stellar": "STELLAR tokenizer", "pixels_down": "pixels, downsampled to the latent's size", "pixels": "raw pixels"}
COLUMNS = [("psnr", "PSNR (dB)", 2), ("ssim", "SSIM", 4), ("lpips", "LPIPS", 4), ("rfid", "rFID", 2), ("rkid", "rKID", 4),
           ("linear_tokens", "linear S-mean", 2), ("linear_cls", "linear CLS", 2), ("linear_lowrank", "linear L·S", 2), ("linear_pixels", "linear pixels", 2),
           ("knn_tokens", "kNN S-mean", 2), ("knn_cls", "kNN CLS", 2), ("knn_lowrank", "kNN L·S", 2), ("knn_pixels", "kNN pixels", 2)]


def markdown_table(report: dict) -> str:
    """The results as a Markdown table (only the columns that have a value), with the protocol below."""
    res = report["results"]
    cols = [c for c in COLUMNS if any(c[0] in r for r in res.values())]

    def header(key: str, name: str) -> str:  # rFID / rKID with the images they were measured on
        if key in ("rfid", "rkid"):
            r = next(r for r in res.values() if key in r)
            return f"{name} ({r.get('rfid_split', 'val')}, n={r.get('rfid_n_eval', report['data']['n_eval'])})"
        return name

    lines = ["| | " + " | ".join(header(c[0], c[1]) for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, r in res.items():
        cells = [f"{r[c[0]]:.{c[2]}f}" if c[0] in r else "–" for c in cols]
        lines.append(f"| {ROW_NAMES.get(name, name)} | " + " | ".join(cells) + " |")
    p, d = report["protocol"], report["data"]
    train = f"{d['n_train']} train images" + (f" ({d['probe_train']})" if d.get("probe_train") else "")
    lines += ["", f"Held-out: {d['n_eval']} images, {d.get('held_out') or 'val split'} ({d['val']['name']}); probes trained on {train}. "
              f"Tokenizer {report['tokenizer']['fingerprint']}: r = {report['tokenizer']['num_tokens']}"
              f"{' (dense decoder: reads all N patch features)' if report['tokenizer'].get('decoder_input') == 'dense' else ''}, {report['tokenizer']['latent_values']} latent values; "
              f"baseline: {p['pixels_down']}. LPIPS: {p['lpips']}. FID extractor: {p['fid_extractor']}. {report['seconds'].get('total')} s.", ""]
    return "\n".join(lines)


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    overrides = parse_overrides("python -m stellar_tok.evaluate", __doc__, EvalConfig, argv, "tokenizer=DIR data.name=shapes tasks=recon,linear,knn out=DIR")
    cfg = load_tokenizer_command_config(overrides, EvalConfig)
    report = evaluate(cfg)
    print(markdown_table(report))
    print(f"-> {os.path.join(cfg.out, 'metrics.json')}")
    return report


if __name__ == "__main__":
    main()
