"""Shared helpers for the benchmarks: machine description, `key=value` arguments, running a command as a logged
child process, and writing a section of a page under docs/."""
from __future__ import annotations

import contextlib
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "BENCHMARKS.md")
HEADER = "# Benchmarks\n\nEvery table is written by the command above it; times are medians of alternating runs in one process.\n"


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    threads = torch.get_num_threads()
    return (f"{platform.processor() or platform.machine()}, {threads} thread{'s' if threads != 1 else ''}, {gpu}; "
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


def fmt(x, digits: int = 2) -> str:
    """A table cell: ``x`` with ``digits`` decimals, or an en dash when there is no value."""
    return "–" if x is None else f"{x:.{digits}f}"


def write_section(name: str, body: str, doc: str = DOC) -> None:
    """Replace (or append) the section `## name` of `doc` (docs/BENCHMARKS.md) with `body`."""
    os.makedirs(os.path.dirname(doc), exist_ok=True)
    text = open(doc).read() if os.path.exists(doc) else HEADER
    section = f"## {name}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    with open(doc, "w") as f:
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


def child_env(threads: int | None = 1) -> dict:
    """The environment of a benchmark's child process: this checkout importable, unbuffered output, `threads` threads
    (None: as this process)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_logged(cmd: list[str], log: str, threads: int | None = 1) -> dict:
    """Run cmd (`child_env(threads)`) with its output appended to `log`; returns wall and CPU seconds (user + system)
    of the child; a failure raises RuntimeError naming the log."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        t = time.time()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=child_env(threads))
        _, status, usage = os.wait4(p.pid, 0)  # this child's own resource usage (others may run beside it)
        p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[2]} failed (exit {p.returncode}); see {log}")
    return {"wall_s": round(time.time() - t, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}
