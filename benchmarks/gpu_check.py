"""The report of `benchmarks/gpu_check.sh`: the machine, then one table per stage, rewritten after every stage.

    python -m benchmarks.gpu_check stage=env scale=gpu work=WORK_DIR
    python -m benchmarks.gpu_check stage=report work=WORK_DIR out=RESULTS_DIR [doc=true]

`env` writes WORK_DIR/env.json (GPU, memory, versions). `report` reads WORK_DIR/stages.jsonl, the rows the
`benchmarks.train_speed worker=true rows=...` processes printed into logs/b16.log and logs/h14.log (one JSON line per
row, benchmarks/train_step.py) and the chain's own report (WORK_DIR/chain/out, benchmarks/imagenet_rehearsal.sh), and
writes RESULTS_DIR/gpu_check.md, gpu_check.json and logs.tar.gz, with the chain's samples_grid.png and
b16_reconstruction.png: at most 8 files. `doc=true` also puts the tables into docs/BENCHMARKS.md.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import tarfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Optional

import torch

from benchmarks.common import parse_args, write_section
from stellar_tok.errors import UserError, cli_entry
from stellar_tok.files import atomic_write_json

PACKAGES = ("accelerate", "diffusers", "webdataset", "lpips", "torch-fidelity", "omegaconf", "safetensors")
OPTION_LABELS = {"fused": "fused AdamW", "channels_last": "channels-last LPIPS", "compile": "compiled blocks (cold compile)"}


def row_label(spec: str) -> str:
    """'ckpt=6+fused' -> '6 encoder blocks checkpointed + fused AdamW'; 'base' -> 'the config as it is'."""
    parts = []
    for part in spec.split("+"):
        key, _, value = part.partition("=")
        if key == "ckpt":
            parts.append({"0": "no activation checkpointing", "-1": "every encoder block checkpointed"}.get(value, f"{value} encoder blocks checkpointed"))
        elif key == "batch":
            parts.append(f"batch {value}")
        else:
            parts.append({"base": "the config as it is", **OPTION_LABELS}.get(key, part))
    return " + ".join(parts)


@dataclass
class GPUCheckArgs:
    stage: str = "report"  # env | report
    work: Optional[str] = None  # the script's WORK folder
    out: Optional[str] = None  # report: where the results go
    scale: str = "gpu"  # env: gpu | cpu
    doc: bool = False  # report: also write the tables into docs/BENCHMARKS.md


def write_env(work: str, scale: str) -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    mem = f", {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB" if torch.cuda.is_available() else ""
    vers = {}
    for name in PACKAGES:
        try:
            vers[name] = version(name)
        except PackageNotFoundError:
            vers[name] = "missing"
    env = {"scale": scale, "machine": f"{gpu}{mem}, {os.cpu_count()} cores; Python {platform.python_version()}, torch "
           f"{torch.__version__}; " + ", ".join(f"{k} {v}" for k, v in vers.items())}
    atomic_write_json(os.path.join(work, "env.json"), env)
    print(json.dumps(env))
    return env


def read_rows(log: str) -> list[dict]:
    """The JSON lines a rows process printed (its other output skipped)."""
    if not os.path.isfile(log):
        return []
    rows = []
    with open(log) as f:
        for line in f:
            if line.startswith("{"):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by the time limit
                    pass
    return rows


def rows_table(rows: list[dict]) -> str:
    if not rows:
        return "(no row finished)"
    base = next((r for r in rows if r.get("row") == "base" and "error" not in r), None)
    lines = ["| setting | batch | s / step | images/s | TFLOP / step | MFU | peak GPU memory (GiB) | vs the config as it is |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        label = row_label(r["row"])
        if "error" in r:
            lines.append(f"| {label} | {r['batch']} | {r['error']} | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        mem = f"{r['peak_gpu_mem_gib']:.1f}" if "peak_gpu_mem_gib" in r else "n/a"
        rel = ""
        if base is not None and r is not base and r["batch"] == base["batch"]:
            rel = f"{r['step_s'] / base['step_s']:.2f}x time"
            if "peak_gpu_mem_gib" in r:
                rel += f", {r['peak_gpu_mem_gib'] - base['peak_gpu_mem_gib']:+.1f} GiB"
        warm = f" (warm-up {r['warmup_s']:.0f} s)" if r["row"].endswith("compile") else ""
        lines.append(f"| {label}{warm} | {r['batch']} | {r['step_s']:.3f} | {r['images_per_s']:.1f} | {r['step_tflop']:.1f} | {mfu} | "
                     f"{mem} | {rel} |")
    return "\n".join(lines)


def stages_table(work: str) -> str:
    path = os.path.join(work, "stages.jsonl")
    stages = [json.loads(x) for x in open(path)] if os.path.isfile(path) else []
    return "\n".join(["| stage | exit | wall s |", "|---|---|---:|"] + [f"| {s['stage']} | {s['rc']} | {s['wall_s']} |" for s in stages])


def chain_section(work: str) -> str:
    path = os.path.join(work, "chain", "out", "summary.md")
    if not os.path.isfile(path):
        return "(the chain did not report)"
    text = open(path).read()
    return text.split("\n", 1)[1].strip() if text.startswith("#") else text.strip()


def body(work: str, rows: dict) -> str:
    """The report's text; `rows`: the b16 and h14 rows (`read_rows` of their logs)."""
    env_path = os.path.join(work, "env.json")
    env = json.load(open(env_path)) if os.path.isfile(env_path) else {"machine": "unknown", "scale": "?"}
    return f"""{env['machine']} (SCALE={env['scale']}).

Stages (`bash benchmarks/gpu_check.sh`; exit 124: stopped at its time limit):

{stages_table(work)}

### The B/16 training step: memory, MFU and its variants

`configs/tokenizer/vit_b16.yaml` (8 + 8 views, bf16 autocast, LPIPS with a random VGG, GAN not yet on), one process, one
row per setting on random images, median of the timed steps; TFLOP counted by `FlopCounterMode` over one eager step; MFU
against the dense bf16 peak; peak memory = `torch.cuda.max_memory_allocated` over the timed steps.

{rows_table(rows['b16'])}

### The generation chain

{chain_section(work)}

### ViT-H/14 on one GPU, without FSDP

`configs/tokenizer/vit_h14.yaml` (252 px, 8 + 8 views, bf16) in one process, no FSDP wrapping (parameters, gradients
and AdamW states whole on one GPU, about 11 GiB: 8-GPU FSDP2 holds an eighth of them per GPU).

{rows_table(rows['h14'])}
"""


def write_report(work: str, out: str, doc: bool) -> str:
    os.makedirs(out, exist_ok=True)
    rows = {name: read_rows(os.path.join(work, "logs", f"{name}.log")) for name in ("b16", "h14")}
    text = body(work, rows)
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write("# benchmarks/gpu_check.sh\n\n" + text)
    atomic_write_json(os.path.join(out, "gpu_check.json"), rows)
    for name in ("samples_grid.png", "b16_reconstruction.png"):
        src = os.path.join(work, "chain", "out", name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out, name))
    with tarfile.open(os.path.join(out, "logs.tar.gz.tmp"), "w:gz") as tar:
        for name in ("logs", "stages.jsonl", "env.json", os.path.join("chain", "logs"), os.path.join("chain", "stats"),
                     os.path.join("chain", "out", "summary.json")):
            if os.path.exists(os.path.join(work, name)):
                tar.add(os.path.join(work, name), arcname=name)
    os.replace(os.path.join(out, "logs.tar.gz.tmp"), os.path.join(out, "logs.tar.gz"))
    if doc:
        write_section("GPU check (benchmarks/gpu_check.sh)", "```bash\nSCALE=gpu bash benchmarks/gpu_check.sh\n```\n\n" + text)
    return text


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = parse_args("python -m benchmarks.gpu_check", __doc__, GPUCheckArgs, argv, "stage=report work=/tmp/gpu_check out=/tmp/out")
    if args.stage not in ("env", "report") or not args.work or (args.stage == "report" and not args.out):
        raise UserError("stage=env work=DIR, or stage=report work=DIR out=DIR")
    if args.stage == "env":
        write_env(args.work, args.scale)
    else:
        print(write_report(args.work, args.out, args.doc))


if __name__ == "__main__":
    main()
