"""FID reference statistics of a data set: computed once, saved as `.npz` (mu, sigma, n, features), reused.

    python -m stellar_tok.fid_stats data.name=shapes split=val n=1000 [out=ref.npz] [fid.weights=PATH] [num_workers=8]

The images (`stellar_tok.data.reference.ReferenceImages`): every image of the split, read once and in order, or
with `n` > 0 a subset of n drawn with `seed` and spread over the classes in proportion to their sizes
(`stellar_tok.data.reference.spread_subset`; never the first n of a class-sorted listing). Each is resized so that its
shorter side is `data.resolution` (bicubic, antialiased) and centre-cropped, for the train split too (never the
random crops of training).
WebDataset shards are read once each, in order (the held-out style pipeline; never the resampled,
shuffled training stream); a subset of shards first reads their labels (tar headers and .cls members only)
and then decodes only the chosen samples. `num_workers` DataLoader processes decode the images (-1:
data.num_workers when set, else up to 8 for image files and none for the in-memory sets).

The statistics are of the 2048-d pool features of the FID Inception-v3 (torch-fidelity's, resized to 299
inside) fed uint8 images, accumulated batch by batch (float64 mean and covariance; memory does not grow with
the number of images). Without `out=`, the file goes to the cache (`$STELLAR_TOK_CACHE/fid_refs`, default
`~/.cache/stellar_tok/fid_refs`) under a name hashed from everything that changes the numbers: data set, path
and file list (names; for shards also sizes and times), split, resolution, crop, n, seed and the extractor's
weights (sha1); `stellar_tok.evaluate` / `generators.evaluate` find it there. The features themselves are
kept in the file up to `keep_features` images (KID needs them).

For the standard ImageNet 256 gFID, do not compute a reference: pass ADM's reference batch
`VIRTUAL_imagenet256_labeled.npz` to `generators.evaluate` as `fid.ref=` (its mu/sigma are used, its images never read).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from stellar_tok.evaluation.fid_reference import FIDConfig, reference_stats

from .config import DataConfig, load_config, parse_overrides
from .errors import UserError, cli_entry
from .evaluation import fid


@dataclass
class FIDStatsConfig:
    data: DataConfig = field(default_factory=DataConfig)
    split: str = "val"  # train | val
    n: int = 0  # images (0: the whole split); n > 0: a seeded subset spread over the classes
    seed: int = 0  # the subset's seed (n > 0)
    num_workers: int = -1  # DataLoader processes decoding the images; -1: data.num_workers if > 0, else min(8, CPUs) for folder/wds, 0 for shapes/digits
    out: Optional[str] = None  # .npz path; default: the cache
    keep_features: int = 20000  # store the features (for KID) when there are at most this many images
    fid: FIDConfig = field(default_factory=FIDConfig)
    progress: bool = True


@cli_entry
def main(argv: list[str] | None = None) -> str:
    overrides = parse_overrides("python -m stellar_tok.fid_stats", __doc__, FIDStatsConfig, argv, "data.name=shapes split=val n=1000")
    cfg = load_config(overrides, schema=FIDStatsConfig)
    if cfg.split not in ("train", "val"):
        raise UserError(f"split must be train or val (got {cfg.split!r})")
    if cfg.out and os.path.exists(cfg.out):
        raise UserError(f"{cfg.out} exists; delete it or choose another out=")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    extractor = fid.build_inception(cfg.fid.weights, device=device)
    stats, path = reference_stats(extractor, cfg.data, cfg.split, cfg.n, cfg.out, cfg.fid.batch_size, cfg.keep_features, cfg.progress,
                                  seed=cfg.seed, num_workers=cfg.num_workers)
    print(f"{stats['n']} images ({stats['meta'].get('images', '')}) -> {path}")
    return path


if __name__ == "__main__":
    main()
