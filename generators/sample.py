"""Sample class-conditional images from a trained latent generator.

    python -m generators.sample generator=runs/generator/tiny/generator tokenizer=runs/demo/tokenizer/tokenizer \\
        classes=0,1,2 n=8 cfg=3 steps=25 out=samples/tiny
    accelerate launch -m generators.sample generator=DIR tokenizer=DIR classes=all n=50 out=DIR   # FID-size sets

`n` samples per class (`classes`: ids, names, or `all`). Writes out/samples.npz (ADM layout: uint8 NHWC `arr_0`,
labels `arr_1`) for FID suites, out/grid.png (one row per class for up to 32 classes, first 16 samples of each)
and, with `png=true` (or `png=auto`, the default, when the whole set has at most 1000 images), one PNG per
sample, out/images/<class>_<i>.png: a 50k set writes no 50k PNGs unless asked.

Sample i of the whole set starts from noise drawn with a generator seeded from a hash of (seed, i): it depends
only on the seed and its index, so the result does not depend on the batch size or on how many processes share
the work (process p takes samples p, p+P, ...), and two seeds never share a sample.
Memory stays flat for FID-size sets: each process writes its images to a memory-mapped part file and its own
PNGs as it goes; the first process then streams samples.npz from the parts, in sample order.

Sampling knobs: `scheduler` euler | heun (heun: 2 * steps - 1 model evaluations), `shift` (the SD3 timestep
shift t = shift u / (1 + (shift - 1) u) of the step grid u; t = 1 is noise here, so shift > 1 spends more steps
near the noise; generators.flow), `cfg` (guidance on every latent channel, only for t in `interval`, e.g.
interval=0.1,0.7), `mixed_precision` (auto: bf16 autocast on GPUs, fp32 on the CPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from stellar_tok.config import load_config, parse_overrides
from stellar_tok.errors import cli_entry

from .sampling import sample


@dataclass
class SampleConfig:
    generator: Optional[str] = None  # exported generator folder
    tokenizer: Optional[str] = None  # exported tokenizer folder (its decoder paints the pixels)
    out: str = "samples"
    classes: str = "all"  # comma-separated ids or names, or all
    n: int = 8  # samples per class
    cfg: float = 4.0
    interval: str = "0,1"  # guidance only while t (1 = noise, 0 = data) is in [lo, hi]
    steps: int = 50
    scheduler: str = "euler"  # euler | heun (second order: 2 * steps - 1 model evaluations)
    shift: float = 1.0  # timestep shift t = shift u / (1 + (shift - 1) u); > 1: more steps near the noise (t = 1)
    seed: int = 0  # sample i's noise depends only on (seed, i)
    batch_size: int = 64
    mixed_precision: str = "auto"  # auto (bf16 on GPUs, fp32 on the CPU) | no | bf16 | fp16
    png: str = "auto"  # one PNG per sample: auto (only when the set has <= 1000 images) | true | false; grid.png always
    save_png: Optional[bool] = None  # deprecated: png=true / png=false
    progress: bool = True


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    overrides = parse_overrides("python -m generators.sample", __doc__, SampleConfig, argv, "generator=DIR tokenizer=DIR classes=0,1 n=8")
    return sample(load_config(overrides, schema=SampleConfig))


if __name__ == "__main__":
    main()
