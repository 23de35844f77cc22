"""The probes' features in `stellar_tok.evaluate`: pooled tokenizer features (and the pixel baselines) of a batch, and
those of the n_train train images, extracted once and cached in `out/cache` under a key of everything that changes
them (tokenizer fingerprint, images, kinds, baselines).

The pixel baselines' features are large (raw pixels: 3·R² floats an image, 786 KB at 256 px): where the probes read
more than `baseline_n` images of a split, the baselines read their own seeded subset of `baseline_n` spread over the
classes (`pixel_features`), and `check_probe_memory` refuses, before any work, features that would not fit in memory."""
from __future__ import annotations

import json
import math
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from stellar_tok.data.reference import ReferenceImages
from stellar_tok.errors import UserError
from stellar_tok.files import atomic_path

from .recon_meter import pixel_baseline


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
    if not os.path.exists(path):
        return None
    with safe_open(path, "pt") as f:
        if json.loads((f.metadata() or {}).get("key", "null")) != key:
            return None
    return load_file(path)


def _save_cached(path: str, key: dict, tensors: dict) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"key": json.dumps(key, sort_keys=True)})


def train_features(tok, cfg, kinds, k_down: int, fingerprint: str, device, images: ReferenceImages | None = None,
                   baselines: bool | None = None) -> dict:
    """Probe training features of n_train train images, a seeded subset spread over the classes, centre crops
    (cached in out/cache). `baselines`: with the pixel baselines' features (None: cfg.baselines)."""
    if images is None:
        images = ReferenceImages(cfg.data, "train", cfg.n_train, cfg.seed)
    baselines = bool(cfg.baselines if baselines is None else baselines)
    key = {"tokenizer": fingerprint, "data": images.identity, "kinds": list(kinds),
           "baselines": baselines, "k_down": k_down}
    path = os.path.join(cfg.out, "cache", "features-train.safetensors")
    cached = _load_cached(path, key)
    if cached is not None:
        return cached
    acc: dict[str, list] = {}
    total = images.size_hint()
    for batch, labels in tqdm(images.loader(cfg.batch_size, cfg.num_workers), total=total and math.ceil(total / cfg.batch_size),
                              desc="train features", disable=not cfg.progress):
        x = batch.to(device).float() / 127.5 - 1
        for k, v in probe_features(tok, x, labels, kinds, baselines, k_down).items():
            acc.setdefault(k, []).append(v)
    out = {k: torch.cat(v) for k, v in acc.items()}
    _save_cached(path, key, out)
    return out


def pixel_subset(cfg, split: str, own: ReferenceImages) -> ReferenceImages | None:
    """The images the pixel baselines' probes read on `split`: None when they are the probes' own images `own` (no
    more than cfg.baseline_n of them), else a seeded subset of cfg.baseline_n spread over the classes."""
    n = own.size_hint()  # None: shards read whole, their count unknown before reading
    return None if n is not None and n <= cfg.baseline_n else ReferenceImages(cfg.data, split, cfg.baseline_n, cfg.seed)


@torch.no_grad()
def pixel_features(cfg, images: ReferenceImages, k_down: int, device) -> dict:
    """The baselines' features (`pixels`, `pixels_down`) and `labels` of `images`, written batch by batch into
    tensors of the final size (no second copy); cached in out/cache/pixels-<split>.safetensors."""
    key = {"data": images.identity, "k_down": k_down}
    path = os.path.join(cfg.out, "cache", f"pixels-{images.split}.safetensors")
    cached = _load_cached(path, key)
    if cached is not None:
        return cached
    n, res = len(images), images.resolution
    out = {"pixels": torch.empty(n, 3 * res * res), "pixels_down": torch.empty(n, 3 * k_down * k_down),
           "labels": torch.empty(n, dtype=torch.long)}
    i = 0
    for batch, labels in tqdm(images.loader(cfg.batch_size, cfg.num_workers), total=math.ceil(n / cfg.batch_size),
                              desc=f"pixel baselines ({images.split})", disable=not cfg.progress):
        x = batch.to(device).float() / 127.5 - 1  # (B,3,R,R)
        b = len(labels)
        out["pixels"][i : i + b] = x.flatten(1).cpu()
        out["pixels_down"][i : i + b] = pixel_baseline(x, k_down)[0].flatten(1).cpu()
        out["labels"][i : i + b] = labels.long()
        i += b
    out = {k: v[:i] for k, v in out.items()}  # images the decoder skipped leave the tail unwritten
    _save_cached(path, key, out)
    return out


def available_memory() -> int | None:
    """Bytes of memory available now (MemAvailable of /proc/meminfo, else the free physical pages); None: unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_probe_memory(counts: dict[str, int | None], dims: dict[str, int], hint: str) -> int:
    """Refuses (one line, before any work) probe features that would not fit in memory: `counts` images per set
    (None: not known before reading, left out), `dims` float32 values per image of each set; twice their bytes
    (the batches and the whole, normalised copies in kNN) against the memory available now. Returns the bytes."""
    need = 2 * sum(4 * n * dims[k] for k, n in counts.items() if n)
    have = available_memory()
    if have is not None and need > have:
        detail = ", ".join(f"{k} {n:,} x {dims[k]:,}" for k, n in counts.items() if n)
        raise UserError(f"the probes' features need about {_bytes(need)} of memory ({detail} float32 values, twice) and "
                        f"{_bytes(have)} is available: {hint}")
    return need


def _bytes(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
