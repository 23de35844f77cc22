"""Semantic probes of a tokenizer's features: linear probe and weighted kNN, on a held-out split.

    python -m stellar_tok.probe tokenizer=runs/tiny/tokenizer data.name=shapes [features=tokens,cls] [random_init=true]
    python -m stellar_tok.probe tokenizer=DIR data.name=folder data.path=/data/imagenet protocol=augmented batch_size=2048 data.num_workers=16

Features: `tokens` is the mean of the r sparse tokens S, `cls` the CLS token, `lowrank` the mean of L·S,
`pixels` the raw image. The linear probe is LayerNorm + Linear, AdamW (lr 1e-3, weight decay 1e-4 by
default), cross-entropy, top-1 on the held-out (val) split. kNN: cosine similarity, k = 20, votes weighted
by exp(sim / 0.07) (the DINO protocol). Two protocols, `protocol=`:

cached (the default; quick)
    Features are extracted once per split, without augmentation: each image once, shorter side resized to
    data.resolution and centre-cropped square (the images `stellar_tok.evaluate` probes; never the training
    stream's random crops or resampled shards); the head is trained on those cached features for `epochs`
    epochs of mini-batches (cosine LR).

augmented (the reference's linear-probe protocol; slow: the tokenizer runs at every step)
    The head is trained on the frozen tokenizer with features recomputed at every step from augmented
    images: RandomResizedCrop (scale 0.2-1, aspect 3/4-4/3, bilinear, antialiased) + horizontal flip,
    drawn per image, output at the tokenizer's image size, over the whole train split (or `n_train`
    images) for `epochs` epochs. Where the crops are cut from: folder data, the decoded original image
    (like torchvision's ImageFolder + RandomResizedCrop); shapes and digits, the in-memory image at
    data.resolution; wds, the image as the train loader gives it (shorter side resized to data.resolution,
    random square crop: a data.resolution above the tokenizer's size gives sharper crops). data.resolution
    defaults to the tokenizer's image size in this protocol. Evaluation: the held-out split as the val
    loader gives it (shorter side resized to data.resolution, centre square crop), resized to the
    tokenizer's image size if that differs; deterministic. The LR follows a cosine from `lr` to 0 over all
    steps, without warm-up: the same schedule as the cached protocol, so the two differ only in the
    features the head sees, and the decay averages out the step-to-step noise of augmented features so the
    final head does not depend on the last few batches (a constant LR would leave it at the noise level
    of lr). The reference used batch 2048; the default here stays 256 (`batch_size=`). kNN (`knn=true`)
    uses un-augmented features of the same train images (one extra pass). On CUDA the frozen tokenizer runs
    under bf16 autocast (`amp=false` for float32); the head always trains in float32. A progress bar with
    ETA follows the training steps (`progress=false` hides it).

Subsets (both protocols): `n_train` / `n_eval` = 0 use the whole split. Otherwise a subset drawn with `seed`
and spread over the classes in proportion to their sizes (not the first n of a listing that may be sorted by
class), for wds shards too (their labels are read from the tars first). The augmented protocol's training
stream on wds is the exception: `n_train` (or data.epoch_size) images of the shuffled train stream per epoch;
its kNN then reads that many train images, spread over the classes, once each.

Other keys: `device=auto` runs on CUDA when available (`device=cpu` for the CPU's numbers bit for bit);
`random_init=true` probes the same architecture with fresh weights (the baseline); `seed` seeds that
initialisation, the heads, the batch order, the subsets and the crops. Unknown keys are rejected.

The protocol, n_train and n_eval (with their splits) are printed on stderr before the work; the result is
one JSON line on stdout: `linear_<feature>`, `knn_<feature>` (top-1 %), the protocol and its settings,
n_train, n_eval (also as n_val), seconds.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Optional

from stellar_tok.evaluation.probe_run import load_probe_tokenizer, probe_run, resolve_device
from stellar_tok.evaluation.probing import FEATURE_KINDS, PROTOCOLS

from .config import DataConfig, load_config, parse_overrides
from .errors import UserError, cli_entry


@dataclass
class ProbeConfig:
    tokenizer: Optional[str] = None  # an exported tokenizer folder (not needed for features=pixels)
    data: DataConfig = field(default_factory=DataConfig)  # augmented: data.resolution defaults to the tokenizer's image_size
    protocol: str = "cached"  # cached (features once, no augmentation) | augmented (the reference's: crops + flips every step)
    features: str = "tokens,cls"  # tokens (mean of S), cls, lowrank (mean of L·S), pixels
    epochs: int = 30
    batch_size: int = 256  # for feature extraction and the head's mini-batches (the reference: 2048)
    lr: float = 1.0e-3
    weight_decay: float = 1.0e-4
    n_train: int = 0  # train images (0: the whole split); a seeded subset spread over the classes
    n_eval: int = 0  # held-out (val) images (0: the whole split); likewise
    knn: bool = True  # augmented: also kNN, on un-augmented train features (one extra pass)
    random_init: bool = False  # the tokenizer's architecture with fresh weights (seeded by seed)
    seed: int = 0  # head initialisation, batch order, subsets, crops
    device: str = "auto"  # auto (cuda when available) | cpu | cuda[:i]
    amp: bool = True  # augmented on CUDA: the frozen tokenizer under bf16 autocast
    progress: bool = True


@cli_entry
def main(argv=None):
    overrides = parse_overrides("python -m stellar_tok.probe", __doc__, ProbeConfig, argv,
                                "tokenizer=DIR data.name=shapes protocol=augmented epochs=30")
    cfg = load_config(overrides, schema=ProbeConfig)
    if cfg.protocol not in PROTOCOLS:
        raise UserError(f"protocol must be one of {', '.join(PROTOCOLS)} (got {cfg.protocol!r})")
    kinds = tuple(k.strip() for k in str(cfg.features).split(",") if k.strip())
    if not kinds or any(k not in FEATURE_KINDS for k in kinds):
        raise UserError(f"features must be a comma list of {', '.join(FEATURE_KINDS)} (got {cfg.features!r})")
    for key, lo in (("epochs", 1), ("batch_size", 1), ("n_train", 0), ("n_eval", 0)):
        if cfg[key] < lo:
            raise UserError(f"{key} must be an integer >= {lo} (got {cfg[key]})")
    if cfg.lr <= 0 or cfg.weight_decay < 0:
        raise UserError(f"lr must be > 0 and weight_decay >= 0 (got lr={cfg.lr}, weight_decay={cfg.weight_decay})")
    device = resolve_device(str(cfg.device))
    tok = load_probe_tokenizer(cfg, kinds, device, resolution_given=any(a.startswith("data.resolution=") for a in overrides))
    res = probe_run(cfg, tok, kinds, device, log=lambda line: print(line, file=sys.stderr))
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
