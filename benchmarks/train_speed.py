"""Training throughput and memory (CPU), or throughput and MFU (GPU): the tiny and ViT-B/16 configs, with and
without torch.compile.

    python -m benchmarks.train_speed [configs=tiny,vit_b16] [rounds=2] [threads=2] [batch.tiny=64] [batch.vit_b16=2]
                                     [warmup.tiny=5] [steps.tiny=20] [warmup.vit_b16=3] [steps.vit_b16=5]
                                     [device=cpu|cuda] [precision=fp32|bf16] [timeout=SECONDS] [overrides='k=v;k=v']
    python -m benchmarks.train_speed worker=true configs=tiny mode=compile [profile=FILE] ...   # one measurement

device=cuda precision=bf16 is the GPU measurement (benchmarks/gpu.sh runs it): autocast bf16, synchronised
timing, FLOPs per step counted by torch.utils.flop_counter over one eager step, MFU against the GPU's dense
bf16 peak. `overrides` are extra config keys for every process (e.g. 'align.match=argmax;recon.lpips_net=alex');
`timeout` bounds each process.

One measurement = one fresh process (so peak RSS is that configuration's own) that builds the model, losses and
AdamW exactly as `stellar_tok.train` does and runs the trainer's step on random images of the config's data
resolution: views (crops, masks, photometric augmentation), the objective (encoder over every view, alignment
heads and losses, decoder), L1 + LPIPS (random backbone, `recon.lpips_random_backbone=true`: nothing
downloads), backward, gradient clipping, AdamW. fp32, GAN inactive (the configs start it later), data
loading excluded. `warmup` steps first (with compile: the compilation), then the median of `steps` timed
steps. Eager and compiled processes alternate, `rounds` times each; each compiled process starts with an
empty inductor cache, so every compile time is a cold one. The benchmark launches each measurement as
`python -m benchmarks.train_speed worker=true configs=NAME mode=eager|compile ...` (the same keys), which prints
its result as one JSON line; `profile=FILE` there also writes a torch.profiler table of 2 more steps.

torch.compile is applied to the transformer blocks of the encoder and decoder (regional compilation:
`Block.compile()`), where nearly all the FLOPs are; the rest (views, Sinkhorn, the Hungarian matcher in
scipy, losses) stays eager. Attention already goes through `F.scaled_dot_product_attention` (SDPA,
`stellar_tok/model/vit.py`) in both modes. Writes a table to docs/BENCHMARKS.md.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import torch

from benchmarks.common import ROOT, changed_args, child_env, machine, median, parse_args, write_section
from benchmarks.train_step import measure_rows, peak_bf16, worker
from stellar_tok.config import load_config
from stellar_tok.errors import UserError, cli_entry

LABELS = {"tiny": "`tiny.yaml` (ViT 4x96, patch 4, conv stem, decoder 2x96), 32 px",
          "vit_b16": "`vit_b16.yaml` (ViT-B/16, decoder 6x512), 256 px",
          "vit_l16": "`vit_l16.yaml` (ViT-L/16, decoder 6x512), 256 px",
          "vit_h14": "`vit_h14.yaml` (ViT-H/14, decoder 6x512), 252 px"}


@dataclass
class PerConfig:
    """One number for each config the benchmark knows (`batch.tiny=64 batch.vit_b16=2`)."""

    tiny: int  # configs/tokenizer/tiny.yaml
    vit_b16: int  # configs/tokenizer/vit_b16.yaml
    vit_l16: int = 0  # configs/tokenizer/vit_l16.yaml (0: its config's optim.batch_size)
    vit_h14: int = 0  # configs/tokenizer/vit_h14.yaml (0: its config's optim.batch_size)


@dataclass
class TrainSpeedArgs:
    configs: str = "tiny,vit_b16"  # comma-separated, of tiny and vit_b16
    rounds: int = 2  # eager and compiled processes per config, alternating
    threads: int = 2  # torch threads of every process
    device: str = "cpu"  # cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    timeout: float = 0  # seconds each process may take; 0: no limit
    overrides: Optional[str] = None  # extra config keys for every process, ';'-separated: 'align.match=argmax;recon.pixel=l2'
    batch: PerConfig = field(default_factory=lambda: PerConfig(tiny=64, vit_b16=2))  # images per step
    warmup: PerConfig = field(default_factory=lambda: PerConfig(tiny=5, vit_b16=3, vit_l16=3, vit_h14=3))  # untimed steps first (and the compilation)
    steps: PerConfig = field(default_factory=lambda: PerConfig(tiny=20, vit_b16=5, vit_l16=5, vit_h14=5))  # timed steps
    worker: bool = False  # one measurement in this process (one name in configs), printed as a JSON line
    mode: str = "eager"  # with worker=true: eager | compile
    profile: Optional[str] = None  # with worker=true: a file for a torch.profiler table of 2 more steps
    # with worker=true: ';'-separated settings measured one after another in this process, each printed as a JSON
    # line when done (benchmarks/train_step.py: base, ckpt=N, fused, channels_last, batch=N, compile; '+' joins)
    rows: Optional[str] = None


def read_args(argv: list[str] | None) -> TrainSpeedArgs:
    args = parse_args("python -m benchmarks.train_speed", __doc__, TrainSpeedArgs, argv, "configs=tiny rounds=1")
    for name in args.configs.split(","):
        if name not in LABELS:
            raise UserError(f"configs: unknown {name!r}; choose from {', '.join(LABELS)}")
    if args.device not in ("cpu", "cuda") or args.precision not in ("fp32", "bf16"):
        raise UserError("device must be cpu or cuda, precision fp32 or bf16")
    if args.mode not in ("eager", "compile") or (args.worker and "," in args.configs):
        raise UserError(f"mode must be eager or compile (got {args.mode!r}), and worker=true measures one of configs")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda: no CUDA GPU is visible to torch")
    return args


def run_worker(name: str, mode: str, args: TrainSpeedArgs) -> dict:
    """One measurement in a fresh process (`worker=true`): its result, or {"error": the last line it wrote}."""
    env = child_env(args.threads)
    per_config = [f"{key}.{name}={getattr(getattr(args, key), name)}" for key in ("batch", "warmup", "steps")]
    cmd = [sys.executable, "-m", "benchmarks.train_speed", "worker=true", f"configs={name}", f"mode={mode}", *per_config,
           f"threads={args.threads}", f"device={args.device}", f"precision={args.precision}",
           *([f"overrides={args.overrides}"] if args.overrides else [])]
    with tempfile.TemporaryDirectory() as cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache  # a cold compile every time
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout or None)
        except subprocess.TimeoutExpired:
            return {"config": name, "mode": mode, "error": f"over the {args.timeout:g} s timeout"}
    if p.returncode != 0:
        return {"config": name, "mode": mode, "error": (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def summarise(results: list[dict], name: str, mode: str) -> dict | None:
    rs = [r for r in results if r["config"] == name and r["mode"] == mode]
    ok = [r for r in rs if "error" not in r]
    if not ok:
        return {"error": rs[0]["error"]} if rs else None
    step = median([r["step_s"] for r in ok])
    return {"step_s": step, "steps_per_s": 1 / step, "images_per_s": ok[0]["batch"] / step, "batch": ok[0]["batch"],
            "warmup_s": median([r["warmup_s"] for r in ok]), "peak_rss_mib": max(r["peak_rss_mib"] for r in ok),
            "rss_start_mib": median([r["rss_start_mib"] for r in ok]), "runs": [r["step_s"] for r in ok],
            "events": sum(r["dynamo_events_while_timed"] for r in ok), "params_m": ok[0]["params_m"], "steps": ok[0]["steps"],
            "phases_s": {k: median([r["phases_s"][k] for r in ok]) for k in ok[0]["phases_s"]},
            "step_tflop": ok[0]["step_tflop"], "lpips_tflop": ok[0]["lpips_tflop"], "achieved_tflops": ok[0]["step_tflop"] / step,
            "mfu": (ok[0]["step_tflop"] / step * 1e12 / peak_bf16(ok[0]["gpu"])) if ok[0].get("mfu") is not None else None,
            "peak_gpu_mem_gib": max((r.get("peak_gpu_mem_gib") or 0) for r in ok), "gpu": ok[0].get("gpu")}


def _table(results: list[dict], args: TrainSpeedArgs, header: list[str], row, ratio) -> str:
    """One row per config and mode (`row(s)` -> the cells after config | batch | compile), then `ratio(eager, compiled)`."""
    lines = ["| config | batch | torch.compile | " + " | ".join(header) + " |", "|---|---:|---|" + "---:|" * len(header)]
    for name in args.configs.split(","):
        rows = {m: summarise(results, name, m) for m in ("eager", "compile")}
        for mode, s in rows.items():
            label = "no" if mode == "eager" else "yes (blocks)"
            if s is None:
                continue
            cells = [f"failed: {s['error'][:160]}"] + [""] * (len(header) - 1) if "error" in s else \
                [f"{s['warmup_s']:.1f} ({getattr(args.warmup, name)})", *row(s)]
            lines.append(f"| {LABELS[name]} | {s.get('batch', getattr(args.batch, name))} | {label} | " + " | ".join(cells) + " |")
        e, c = rows["eager"], rows["compile"]
        if e and c and "error" not in e and "error" not in c:
            lines.append("| ratio compiled / eager | | | " + " | ".join([f"+{c['warmup_s'] - e['warmup_s']:.1f} s compile", *ratio(e, c)]) + " |")
    return "\n".join(lines)


def table(results: list[dict], args: TrainSpeedArgs) -> str:
    return _table(results, args, ["warm-up s (steps)", "s / step (median)", "steps/s", "images/s", "peak RSS (GiB)", "step time per process"],
                  lambda s: [f"{s['step_s']:.3f}", f"{s['steps_per_s']:.3g}", f"{s['images_per_s']:.3g}", f"{s['peak_rss_mib'] / 1024:.2f}",
                             ", ".join(f"{x:.3f}" for x in s["runs"])],
                  lambda e, c: [f"{c['step_s'] / e['step_s']:.2f}x", f"**{e['step_s'] / c['step_s']:.2f}x**", "",
                                f"{c['peak_rss_mib'] / e['peak_rss_mib']:.2f}x", ""])


def gpu_table(results: list[dict], args: TrainSpeedArgs) -> str:
    return _table(results, args, ["warm-up s (steps)", "s / step (median)", "images/s", "TFLOP / step (of which LPIPS)", "TFLOP/s", "MFU",
                                  "peak GPU memory (GiB)"],
                  lambda s: [f"{s['step_s']:.4f}", f"{s['images_per_s']:.1f}", f"{s['step_tflop']:.2f} ({s['lpips_tflop']:.2f})",
                             f"{s['achieved_tflops']:.1f}", f"**{100 * s['mfu']:.1f}%**" if s["mfu"] is not None else "n/a",
                             f"{s['peak_gpu_mem_gib']:.1f}"],
                  lambda e, c: [f"{c['step_s'] / e['step_s']:.2f}x", f"**{e['step_s'] / c['step_s']:.2f}x**", "", "", "",
                                f"{c['peak_gpu_mem_gib'] / e['peak_gpu_mem_gib']:.2f}x"])


PHASES = {"views": "views", "objective": "forward (encoder on every view, alignment, decoder)", "recon_loss": "L1 + LPIPS",
          "backward": "backward", "optimizer": "clip + AdamW"}


def breakdown(results: list[dict], args: TrainSpeedArgs) -> str:
    """Where a step's time goes (medians of the phases over the timed steps), eager and compiled."""
    lines = ["| config | torch.compile | " + " | ".join(PHASES.values()) + " |", "|---|---|" + "---:|" * len(PHASES)]
    for name in args.configs.split(","):
        for mode in ("eager", "compile"):
            s = summarise(results, name, mode)
            if s and "error" not in s:
                total = sum(s["phases_s"].values())
                lines.append(f"| {name} | {'no' if mode == 'eager' else 'yes (blocks)'} | "
                             + " | ".join(f"{s['phases_s'][k]:.3f} s ({100 * s['phases_s'][k] / total:.0f}%)" for k in PHASES) + " |")
    return "\n".join(lines)



def measure_all(args: TrainSpeedArgs) -> list[dict]:
    """Every measurement: per config, `rounds` eager and compiled processes, their order alternating."""
    results = []
    for name in args.configs.split(","):
        for rnd in range(args.rounds):
            for mode in (("eager", "compile") if rnd % 2 == 0 else ("compile", "eager")):  # alternate the order
                r = run_worker(name, mode, args)
                print(json.dumps(r), flush=True)
                results.append(r)
    return results


def recompilations(results: list[dict], args: TrainSpeedArgs) -> str:
    """Graph recompilations dynamo counted during the timed steps of the compiled processes, per config."""
    events = {n: (summarise(results, n, "compile") or {}).get("events") for n in args.configs.split(",")}
    return ", ".join(f"{n} {e}" for n, e in events.items())


def cpu_body(results: list[dict], args: TrainSpeedArgs, cmd: str) -> str:
    rss0 = sorted({round(r["rss_start_mib"]) for r in results if "error" not in r})
    return f"""```bash
{cmd}
```

{machine()}. One fresh process per measurement (peak RSS = that process's `ru_maxrss`, after
{' to '.join(f"{x}" for x in rss0[:: max(1, len(rss0) - 1)])} MiB right after the imports), eager and compiled processes
alternating, {args.rounds} of each; s / step is the median over processes of each process's median of its timed steps
(tiny {args.steps.tiny}, B/16 {args.steps.vit_b16}) after its warm-up steps. The step is the trainer's:
views, the objective (encoder over the main, masked and local views, alignment heads and losses, decoder),
L1 + LPIPS (random backbone), backward, gradient clipping, AdamW; fp32, GAN not yet active, random images of
the config's data resolution, data loading excluded. The B/16 config runs at batch {args.batch.vit_b16} here (128 per GPU in
the config). Attention uses `F.scaled_dot_product_attention` (SDPA) in every row. torch.compile = `Block.compile()`
on every encoder and decoder block (inductor, default mode), each process with an empty inductor cache: the
warm-up column of a compiled row includes a cold compile. Graph recompilations counted by dynamo during the
timed steps: {recompilations(results, args)}.

{table(results, args)}

Where the time of a step goes (median of each phase over the timed steps, median over processes):

{breakdown(results, args)}
"""


def gpu_body(results: list[dict], args: TrainSpeedArgs, cmd: str) -> str:
    gpu = next((r["gpu"] for r in results if "gpu" in r), "GPU")
    return f"""```bash
{cmd}
```

{machine()}. The same step as the CPU table below (views, objective over every view, L1 + LPIPS with a random
VGG backbone, backward, clipping, AdamW; GAN not yet active; data loading excluded), on the GPU with
`torch.autocast(bfloat16)` around the forward passes and losses (as `train.mixed_precision=bf16`), TF32 matmuls
elsewhere. One fresh process per measurement, eager and compiled alternating, {args.rounds} of each; s / step is
the median over processes of each process's median of its timed steps, with `torch.cuda.synchronize()` at every
phase boundary. FLOPs per step are counted by `torch.utils.flop_counter.FlopCounterMode` over one eager step
(forward and backward: matmuls, convolutions, attention; the LPIPS network's share in brackets). MFU = counted
FLOPs per step / s per step / the {gpu}'s dense bf16 peak ({(peak_bf16(gpu) or 0) / 1e12:.0f} TFLOP/s from the
data sheet). torch.compile = `StellarTokenizer.compile_blocks()` (`train.compile=true`), inductor default mode,
cold cache. Graph recompilations during the timed steps: {recompilations(results, args)}.

{gpu_table(results, args)}

Where the time of a step goes (median of each phase over the timed steps):

{breakdown(results, args)}
"""


@cli_entry
def main(argv: list[str] | None = None) -> list[dict]:
    args = read_args(argv)
    if args.worker:
        overrides = tuple(o for o in (args.overrides or "").split(";") if o)
        batch = getattr(args.batch, args.configs) or load_config([f"config={args.configs}"]).optim.batch_size
        if args.rows:
            measure_rows(args.configs, args.rows.split(";"), batch, getattr(args.warmup, args.configs), getattr(args.steps, args.configs),
                         args.threads, args.device, args.precision, overrides, emit=lambda r: print(json.dumps(r), flush=True))
            return []
        print(json.dumps(worker(args.configs, args.mode, batch, getattr(args.warmup, args.configs),
                                getattr(args.steps, args.configs), args.threads, args.device, args.precision, overrides, args.profile)))
        return []
    torch.set_num_threads(args.threads)
    results = measure_all(args)
    cmd = "python -m benchmarks.train_speed" + "".join(f" {a}" for a in changed_args(args))
    if args.device == "cuda":
        write_section("Training throughput and MFU (GPU, bf16)", gpu_body(results, args, cmd))
        print(gpu_table(results, args))
    else:
        write_section("Training throughput and memory (CPU)", cpu_body(results, args, cmd))
        print(table(results, args))
    print(breakdown(results, args))
    return results


if __name__ == "__main__":
    main()
