"""Train the STELLAR tokenizer.

    accelerate launch -m stellar_tok.train config=configs/tokenizer/tiny.yaml [key=value ...]
    python -m stellar_tok.train config=configs/tokenizer/tiny.yaml train.steps=200

One process or many (accelerate: DDP/FSDP, CPU or GPU). Writes to train.output_dir:
    checkpoints/step-XXXXXXX/   everything a resume needs (stellar_tok.training.checkpoint: atomic, verified, last train.keep_ckpts)
    tokenizer/                  the exported tokenizer: config.json + safetensors (+ latent statistics)
    images/step-XXXXXXX.png     input | reconstruction | localization map, every train.image_every steps
    logs/                       TensorBoard
    metrics.jsonl               the logged scalars, one JSON line per train.log_every steps
    config.yaml                 the resolved configuration
    summary.json                steps, time, bad samples skipped, non-finite steps skipped, what stopped the run

`train.resume=auto` continues from the newest valid checkpoint: same step, LR, data position and random
streams. SIGTERM/SIGINT finish the current step, then checkpoint and export before exiting.
`train.decoder_from=DIR` trains a fresh decoder on the frozen encoder of an exported tokenizer (the paper's
reconstruction protocol): the latent stays DIR's, only the decoder learns, from the reconstruction losses.

This command parses and checks the configuration, then calls `stellar_tok.training.tokenizer_trainer.train`: the
tokenizer's step (`TokenizerStep`) and its set-up are there, the weights it starts from and its export in
`stellar_tok.training.tokenizer_weights`, the loop, checkpoints, budgets and metrics in `stellar_tok.training.engine`.
"""
from __future__ import annotations

import os
import sys

from stellar_tok.training.preflight import check_data_paths
from stellar_tok.training.tokenizer_trainer import train

from .config import Config, inert_settings, load_config, parse_overrides
from .errors import cli_entry

USAGE = __doc__


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    overrides = parse_overrides("python -m stellar_tok.train", USAGE, Config, argv, "config=configs/tokenizer/tiny.yaml train.steps=500")
    cfg = load_config(overrides)
    check_data_paths(cfg)
    if os.environ.get("RANK", "0") == "0":  # once per launch
        for line in inert_settings(cfg):
            print(f"warning: {line}", file=sys.stderr, flush=True)
    return train(cfg)


if __name__ == "__main__":
    main()
