"""Train the latent diffusion transformer on latent shards.

    accelerate launch -m generators.train config=configs/generator/tiny.yaml data.latents=latents/shapes [key=value ...]
    python -m generators.train config=configs/generator/tiny.yaml data.latents=DIR train.steps=500

Writes to train.output_dir:
    checkpoints/step-XXXXXXX/   accelerate state (model, EMA, optimizer, scheduler, RNG, step) for resume
    generator/                  the exported EMA generator: config.json + safetensors (+ latent statistics)
    pipeline/                   a `StellarDiTPipeline` (tokenizer + generator + scheduler), when a tokenizer is known
    images/step-XXXXXXX.png     class-conditional samples from the EMA weights (one row per class)
    logs/, metrics.jsonl, config.yaml, summary.json

The step (`GeneratorStep`), the run, the EMA, the sample grids and the exports are `generators.trainer`'s; the
loop around the step, checkpoints, budgets, metrics and the summary are `stellar_tok.training.engine`'s, shared
with the tokenizer's trainer.
"""
from __future__ import annotations

from stellar_tok.config import parse_overrides
from stellar_tok.errors import cli_entry

from .config import GenConfig, load_config
from .trainer import train


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    overrides = parse_overrides("python -m generators.train", __doc__, GenConfig, argv, "config=tiny data.latents=DIR")
    return train(load_config(overrides))


if __name__ == "__main__":
    main()
