"""Evaluate a tokenizer: reconstruction (PSNR, SSIM, LPIPS, rFID, rKID) and semantics (linear probe, kNN).

    python -m stellar_tok.evaluate tokenizer=runs/tiny/tokenizer data.name=shapes tasks=recon,linear,knn out=runs/tiny/eval

Protocol (written to metrics.json with the numbers):
- Held-out images: `n_eval` images of the val split (0: all), a subset drawn with `seed` and spread over the
  classes (stellar_tok.data.reference.spread_subset), centre-cropped to the tokenizer's resolution
  (`stellar_tok.data.reference.ReferenceImages`: every image read once, WebDataset shards too).
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
  Their probes hold every image's pixels (3*R*R floats: 786 KB at 256 px), so where the probes read more than
  `baseline_n` images of a split (n_eval=0 or n_train=0 on ImageNet), the baselines' probes read their own seeded
  subset of `baseline_n` spread over the classes (stated in metrics.json: probe_n_train / probe_n_eval). Probe
  features that would not fit in the memory available are refused in one line before any work.

Writes `out/metrics.json`, `out/metrics.md` (a Markdown table) and `out/reconstructions.png`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from stellar_tok.evaluation.fid_reference import FIDConfig
from stellar_tok.evaluation.report import markdown_table
from stellar_tok.evaluation.tokenizer_eval import evaluate

from .config import DataConfig, load_tokenizer_command_config, parse_overrides
from .errors import cli_entry


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
    baseline_n: int = 5000  # at most this many images per split in the pixel baselines' probes (a seeded class-spread subset)
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
