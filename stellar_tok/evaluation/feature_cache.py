"""The probes' features in `stellar_tok.evaluate`: pooled tokenizer features (and the pixel baselines) of a batch, and
those of the n_train train images, extracted once and cached in `out/cache` under a key of everything that changes
them (tokenizer fingerprint, images, kinds, baselines)."""
from __future__ import annotations

import json
import math
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from stellar_tok.data.reference import ReferenceImages
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


def train_features(tok, cfg, kinds, k_down: int, fingerprint: str, device, images: ReferenceImages | None = None) -> dict:
    """Probe training features of n_train train images, a seeded subset spread over the classes, centre crops
    (cached in out/cache)."""
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
