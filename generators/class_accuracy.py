"""Does a class-conditional sample show the requested class? A classifier trained on real images decides.

    python -m generators.class_accuracy samples=samples/tiny/samples.npz data.name=shapes [epochs=3] [cache=runs/classifiers]
    python -m generators.class_accuracy tokenizer=runs/tiny/tokenizer data.name=digits [n=400]   # the ceiling (below)

A small CNN (4 conv blocks, batch norm, global average pooling) is trained with labels on the real train
split (random translations; flips and 90-degree rotations too for shapes), checked on the real val split, cached by data set
under `cache`, then applied to the samples (`arr_0` uint8 NHWC, `arr_1` requested labels, ADM layout).
Reports the real-val accuracy (how far the judge can be trusted) and the fraction of samples classified
as their requested class, overall and per class.

With `tokenizer=DIR` instead of `samples=`, the same judge measures what a generator over that tokenizer's
latent can reach at best: its accuracy on `n` real val images, on their reconstructions decode(encode(x)),
and on two swaps that show which part of the latent carries the class: each image's own L with the tokens S
of another (random) image, and its own S with another image's L, each scored against both images' labels.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from omegaconf import OmegaConf

from stellar_tok.config import parse_command, require_tokenizer_dir
from stellar_tok.errors import UserError, cli_entry
from stellar_tok.files import atomic_write_json

from .judge import ceiling, class_accuracy, judge


@dataclass
class JudgeData:
    """The embedded data set the judge learns from; null keys keep the data set's defaults (and the cache key)."""
    name: str = "shapes"  # shapes | digits
    resolution: int = 32
    train_size: Optional[int] = None  # shapes only
    val_size: Optional[int] = None  # shapes only
    seed: Optional[int] = None


@dataclass
class ClassAccuracyConfig:
    samples: Optional[str] = None  # a samples.npz of generators.sample (arr_0 uint8 NHWC, arr_1 requested labels)
    tokenizer: Optional[str] = None  # instead of samples: the ceiling of a generator over this exported tokenizer
    n: int = 400  # tokenizer=: real val images measured
    data: JudgeData = field(default_factory=JudgeData)
    epochs: int = 3  # the judge's training epochs (part of its cache key)
    cache: Optional[str] = "runs/classifiers"  # where trained judges are kept; null: no cache
    out: Optional[str] = None  # also write the result to this JSON file


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    cfg = parse_command("python -m generators.class_accuracy", __doc__, ClassAccuracyConfig, argv,
                        "samples=NPZ data.name=shapes | tokenizer=DIR data.name=digits n=400")
    if cfg.tokenizer is not None:
        require_tokenizer_dir(cfg.tokenizer)
    elif cfg.samples is None or not os.path.isfile(cfg.samples):
        raise UserError(f"samples=PATH must name a samples.npz (from python -m generators.sample); got {cfg.samples!r}")
    data_cfg = {k: v for k, v in OmegaConf.to_container(cfg.data).items() if v is not None}  # unset keys: the data set's defaults
    npz = None if cfg.tokenizer is not None else np.load(cfg.samples)
    if npz is not None and "arr_1" not in npz:
        raise UserError(f"{cfg.samples} has no labels (arr_1): sample with python -m generators.sample")
    t = time.time()
    model, val_acc, classes = judge(data_cfg, cfg.cache, cfg.epochs)
    found = ceiling(cfg.tokenizer, data_cfg, model, classes, cfg.n) if npz is None else \
        class_accuracy(npz["arr_0"], npz["arr_1"], model, classes)
    res = {"judge_val_accuracy": round(val_acc, 2), **found, "seconds": round(time.time() - t, 1)}
    print(json.dumps(res))
    if cfg.out:
        atomic_write_json(cfg.out, res)
    return res


if __name__ == "__main__":
    main()
