"""Shared helpers for the benchmarks: machine description and writing a section of docs/BENCHMARKS.md."""
from __future__ import annotations

import contextlib
import os
import platform
import re
import statistics
import sys
import time

import torch

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "BENCHMARKS.md")
HEADER = "# Benchmarks\n\nEvery table is written by the command above it; times are medians of alternating runs in one process.\n"


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {gpu}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def device_setup(device: str, precision: str):
    """(on a GPU?, a factory of the autocast context for `precision`: bf16 autocast, or nothing); TF32 matmuls on GPUs."""
    cuda = device == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    return cuda, cast


def timed(fn, cuda: bool = False, cast=contextlib.nullcontext) -> float:
    """Seconds for one call of fn() inside `cast()` (an autocast context); synchronised when on a GPU."""
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with cast():
        fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def median(xs) -> float:
    return statistics.median(xs)


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section `## name` of docs/BENCHMARKS.md with `body`."""
    os.makedirs(os.path.dirname(DOC), exist_ok=True)
    text = open(DOC).read() if os.path.exists(DOC) else HEADER
    section = f"## {name}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    with open(DOC, "w") as f:
        f.write(text.rstrip() + "\n")


def parse_kv(argv: list[str], defaults: dict, doc: str, prog: str | None = None) -> dict:
    """`key=value` arguments over `defaults` (strings; a key may hold dots, e.g. batch.tiny) through the commands'
    own loader (`stellar_tok.config.parse_command`): `--help` prints `doc` and every key; an unknown key exits with
    one line (status 2). Returns {key: value as text} for every key of `defaults`."""
    from omegaconf import OmegaConf

    from stellar_tok.config import parse_command
    from stellar_tok.errors import UserError

    schema: dict = {}
    for key, value in defaults.items():  # dotted keys -> nested sections, values kept as given
        *parents, leaf = key.split(".")
        node = schema
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    example = " ".join(f"{k}={v}" for k, v in list(defaults.items())[:2])
    try:
        cfg = parse_command(prog, doc, schema, argv, example)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return {k: _text(OmegaConf.select(cfg, k)) for k in defaults}


def _text(value) -> str:
    """A parsed `key=value` value back to the text the benchmarks read (true/false lower case, null empty)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)
