"""Shared helpers for the benchmarks: machine description and writing a section of docs/BENCHMARKS.md."""
from __future__ import annotations

import contextlib
import os
import platform
import re
import statistics
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


def parse_kv(argv: list[str], defaults: dict, doc: str) -> dict:
    """`key=value` arguments over `defaults` (strings); `--help` prints `doc`; an unknown key exits with one line."""
    import sys

    args = dict(defaults)
    for a in argv:
        if a in ("-h", "--help"):
            print(doc)
            sys.exit(0)
        key, sep, value = a.partition("=")
        if not sep or key not in defaults:
            sys.exit(f"unknown argument {a!r}; keys: {', '.join(defaults)}")
        args[key] = value
    return args
