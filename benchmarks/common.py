"""Shared helpers for the benchmarks: machine description, typed `key=value` arguments, timing and FLOP counting,
running a command as a logged child process, and writing a section of a page under docs/."""
from __future__ import annotations

import contextlib
import os
import platform
import re
import statistics
import subprocess
import time

import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from stellar_tok.config import config_file, parse_command

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


def parse_args(prog: str, doc: str, schema, argv: list[str] | None, example: str):
    """A benchmark's `key=value` arguments as an instance of the dataclass `schema` (typed values), read by the
    commands' own parser (`stellar_tok.config.parse_command`): `--help` prints `doc` and every key with its default;
    an unknown key or a wrong type raises a UserError naming it (one line and exit status 2 under
    `stellar_tok.errors.cli_entry`). `argv` None reads sys.argv. A benchmark's `config=NAME` is a key of `schema`
    (a packaged config's name), not a file to merge."""
    return OmegaConf.to_object(parse_command(prog, doc, schema, argv, example))


def arg_text(value) -> str:
    """A typed argument as written on a command line: true/false, 20 for 20.0, nothing for None."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value)


def changed_args(args, keys: list[str] | None = None) -> list[str]:
    """`key=value` for every key of the dataclass instance `args` (`keys`: only these; dotted for nested keys)
    whose value differs from the schema's default, in the schema's order."""
    ours, default = OmegaConf.structured(args), OmegaConf.structured(type(args))
    keys = keys if keys is not None else _leaf_keys(default)
    return [f"{k}={arg_text(OmegaConf.select(ours, k))}" for k in keys if OmegaConf.select(ours, k) != OmegaConf.select(default, k)]


def _leaf_keys(cfg, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        keys += _leaf_keys(v, f"{prefix}{k}.") if OmegaConf.is_dict(v) else [f"{prefix}{k}"]
    return keys


def count_flops(fn) -> int:
    """Forward (and backward, when `fn` runs one) FLOPs of one call of fn(), by torch.utils.flop_counter."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def sd_vae():
    """The Stable Diffusion VAE architecture at random weights (`diffusers` AutoencoderKL, 128/256/512/512), in eval mode."""
    from diffusers import AutoencoderKL  # heavy: diffusers, only for the reference models

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256).eval()


def model_config(name: str, kind: str = "tokenizer") -> dict:
    """The `model:` section of a packaged config (`configs/<kind>/<name>.yaml`) as a plain dict."""
    return OmegaConf.to_container(OmegaConf.load(config_file(name, kind)).model)


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
