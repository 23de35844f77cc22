"""What `make demo` made, and where to look: the closing lines of the demo.

    python -m stellar_tok.demo_report run=runs/demo

Reads the files the demo's commands wrote under `run` (the class accuracy of the samples, the tokenizer's
evaluation table) and prints the figures with the pictures that show them. Reads only; a missing file is
said in one line.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .config import parse_command
from .errors import UserError, cli_entry


@dataclass
class DemoReportConfig:
    run: str = "runs/demo"  # the demo's output folder (the Makefile's OUT)


def read_output(path: str) -> str:
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: run `make demo` (or its commands) first")
    with open(path) as f:
        return f.read()


def report(run: str) -> str:
    """The closing text for the demo folder `run`."""
    table_path = os.path.join(run, "eval", "metrics.md")
    acc = json.loads(read_output(os.path.join(run, "samples", "class_accuracy.json")))
    table = read_output(table_path).strip()
    classes = len(acc.get("per_class", {})) or 10
    lines = [
        "",
        f"Samples labelled as their requested class: {acc['accuracy']:.1f}% of {acc['n']} "
        f"(chance {100 / classes:.0f}%; the judge scores {acc['judge_val_accuracy']:.1f}% on real held-out digits).",
        "",
        "Where to look:",
        f"  {os.path.join(run, 'samples', 'grid.png')}: generated samples, one row per requested class",
        f"  {os.path.join(run, 'pictures', 'token_swap.png')}: S (what) of one image decoded with L (where) of another",
        f"  {os.path.join(run, 'pictures', 'reconstructions.png')}: input | reconstruction | which token owns each patch",
        f"  {os.path.join(run, 'pictures', 'token_heatmaps.png')}: each column of L as a heat map",
        f"  {os.path.join(run, 'tokenizer', 'images')}/ and `tensorboard --logdir {run}`: training pictures and curves",
        f"  {table_path}: the tokenizer's evaluation, against raw and downsampled pixels:",
        "",
        table,
    ]
    return "\n".join(lines)


@cli_entry
def main(argv: list[str] | None = None) -> str:
    text = report(parse_command("python -m stellar_tok.demo_report", __doc__, DemoReportConfig, argv, "run=runs/demo").run)
    print(text)
    return text


if __name__ == "__main__":
    main()
