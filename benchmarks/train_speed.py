"""Training throughput and memory on CPU: the tiny and ViT-B/16 configs, with and without torch.compile.

    python -m benchmarks.train_speed [configs=tiny,vit_b16] [rounds=2] [threads=2] [batch.tiny=64] [batch.vit_b16=2]
                                     [warmup.tiny=5] [steps.tiny=20] [warmup.vit_b16=3] [steps.vit_b16=5]

One measurement = one fresh process (so peak RSS is that configuration's own) that builds the model, losses and
AdamW exactly as `stellar_tok.train` does and runs the trainer's step on random images of the config's data
resolution: views (crops, masks, photometric augmentation), the objective (encoder over every view, alignment
heads and losses, decoder), L1 + LPIPS (random backbone, `recon.lpips_random_backbone=true`: nothing
downloads), backward, gradient clipping, AdamW. fp32, GAN inactive (the configs start it later), data
loading excluded. `warmup` steps first (with compile: the compilation), then the median of `steps` timed
steps. Eager and compiled processes alternate, `rounds` times each; each compiled process starts with an
empty inductor cache, so every compile time is a cold one.

torch.compile is applied to the transformer blocks of the encoder and decoder (regional compilation:
`Block.compile()`), where nearly all the FLOPs are; the rest (views, Sinkhorn, the Hungarian matcher in
scipy, losses) stays eager. Attention already goes through `F.scaled_dot_product_attention` (SDPA,
`stellar_tok/vit.py`) in both modes. Writes a table to docs/BENCHMARKS.md.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.common import parse_kv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = {"configs": "tiny,vit_b16", "rounds": "2", "threads": "2",
            "batch.tiny": "64", "warmup.tiny": "5", "steps.tiny": "20",
            "batch.vit_b16": "2", "warmup.vit_b16": "3", "steps.vit_b16": "5"}
LABELS = {"tiny": "`tiny.yaml` (ViT 4x96, patch 4, conv stem, decoder 2x96), 32 px",
          "vit_b16": "`vit_b16.yaml` (ViT-B/16, decoder 6x512), 256 px"}


def parse_args(argv: list[str]) -> dict:
    args = parse_kv(argv, DEFAULTS, __doc__)
    for name in args["configs"].split(","):
        if f"batch.{name}" not in args:
            sys.exit(f"configs: unknown {name!r}; choose from tiny, vit_b16")
    return args


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------------------------
# one measurement (runs in its own process)
# ----------------------------------------------------------------------------------------------


def worker(name: str, mode: str, batch: int, warmup: int, steps: int, threads: int) -> dict:
    import torch
    from omegaconf import OmegaConf

    torch.set_num_threads(threads)
    from stellar_tok.config import load_config
    from stellar_tok.objective import StellarObjective
    from stellar_tok.reconstruction import PatchDiscriminator, ReconstructionLoss
    from stellar_tok.tokenizer import StellarTokenizer
    from stellar_tok.train import param_groups
    from stellar_tok.views import make_views

    rss_start = max_rss_mib()
    cfg = load_config([f"config=configs/tokenizer/{name}.yaml", "recon.lpips_random_backbone=true", f"optim.batch_size={batch}"])  # no autocast: fp32
    torch.manual_seed(0)
    tok = StellarTokenizer(**OmegaConf.to_container(cfg.model))
    objective = StellarObjective(tok, cfg.align).train()
    recon_loss = ReconstructionLoss(cfg.recon) if cfg.recon.enabled else None
    disc = PatchDiscriminator(cfg.recon.disc_channels, cfg.recon.disc_layers) if cfg.recon.enabled and cfg.recon.gan_weight > 0 else None
    opt = torch.optim.AdamW(param_groups(objective, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    if mode == "compile":
        for blk in [*tok.blocks, *tok.decoder_blocks]:
            blk.compile()
    gen = torch.Generator().manual_seed(0)
    res = cfg.data.resolution
    images = torch.randint(0, 256, (batch, 3, res, res), generator=gen, dtype=torch.uint8)

    phases: dict[str, list[float]] = {k: [] for k in ("views", "objective", "recon_loss", "backward", "optimizer")}

    def step(i: int) -> float:
        t = [time.perf_counter()]
        x = images.float() / 127.5 - 1
        with torch.no_grad():
            views = make_views(x, cfg.views, gen, cfg.model.patch_size)
        t.append(time.perf_counter())
        out = objective(views)  # encoder over every view, alignment heads and losses, decoder
        loss = cfg.align.weight * out["align_loss"]
        t.append(time.perf_counter())
        if recon_loss is not None:
            rl, _ = recon_loss.generator_loss(out["recon"], views["main"], i, disc, tok.last_layer)
            loss = loss + cfg.recon.weight * rl
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        for k, a, b in zip(phases, t[:-1], t[1:]):
            phases[k].append(b - a)
        return t[-1] - t[0]

    from torch._dynamo.utils import counters

    warm = [step(i) for i in range(warmup)]
    graphs_before = counters["stats"]["unique_graphs"]
    for v in phases.values():
        v.clear()
    timed = [step(warmup + i) for i in range(steps)]
    graphs_after = counters["stats"]["unique_graphs"]
    med = statistics.median(timed)
    return {"config": name, "mode": mode, "batch": batch, "threads": threads, "warmup_s": round(sum(warm), 2),
            "first_step_s": round(warm[0], 2) if warm else None, "step_s": med, "steps": steps,
            "dynamo_events_while_timed": graphs_after - graphs_before, "phases_s": {k: statistics.median(v) for k, v in phases.items()},
            "params_m": round(sum(p.numel() for p in tok.parameters()) / 1e6, 1),
            "rss_start_mib": round(rss_start), "peak_rss_mib": round(max_rss_mib())}


def run_worker(name: str, mode: str, args: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=args["threads"], PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryDirectory() as cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache  # a cold compile every time
        cmd = [sys.executable, "-m", "benchmarks.train_speed", "--worker", name, mode, args[f"batch.{name}"],
               args[f"warmup.{name}"], args[f"steps.{name}"], args["threads"]]
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        return {"config": name, "mode": mode, "error": (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def summarise(results: list[dict], name: str, mode: str) -> dict | None:
    from benchmarks.common import median

    rs = [r for r in results if r["config"] == name and r["mode"] == mode]
    ok = [r for r in rs if "error" not in r]
    if not ok:
        return {"error": rs[0]["error"]} if rs else None
    step = median([r["step_s"] for r in ok])
    return {"step_s": step, "steps_per_s": 1 / step, "images_per_s": ok[0]["batch"] / step, "batch": ok[0]["batch"],
            "warmup_s": median([r["warmup_s"] for r in ok]), "peak_rss_mib": max(r["peak_rss_mib"] for r in ok),
            "rss_start_mib": median([r["rss_start_mib"] for r in ok]), "runs": [r["step_s"] for r in ok],
            "events": sum(r["dynamo_events_while_timed"] for r in ok), "params_m": ok[0]["params_m"], "steps": ok[0]["steps"],
            "phases_s": {k: median([r["phases_s"][k] for r in ok]) for k in ok[0]["phases_s"]}}


def table(results: list[dict], args: dict) -> str:
    lines = ["| config | batch | torch.compile | warm-up s (steps) | s / step (median) | steps/s | images/s | peak RSS (GiB) | step time per process |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for name in args["configs"].split(","):
        rows = {m: summarise(results, name, m) for m in ("eager", "compile")}
        for mode, s in rows.items():
            label = "no" if mode == "eager" else "yes (blocks)"
            if s is None:
                continue
            if "error" in s:
                lines.append(f"| {LABELS[name]} | {args[f'batch.{name}']} | {label} | failed: {s['error'][:160]} | | | | | |")
                continue
            lines.append(f"| {LABELS[name]} | {s['batch']} | {label} | {s['warmup_s']:.1f} ({args[f'warmup.{name}']}) | {s['step_s']:.3f} | "
                         f"{s['steps_per_s']:.3g} | {s['images_per_s']:.3g} | {s['peak_rss_mib'] / 1024:.2f} | "
                         f"{', '.join(f'{x:.3f}' for x in s['runs'])} |")
        e, c = rows["eager"], rows["compile"]
        if e and c and "error" not in e and "error" not in c:
            lines.append(f"| ratio compiled / eager | | | +{c['warmup_s'] - e['warmup_s']:.1f} s compile | {c['step_s'] / e['step_s']:.2f}x | "
                         f"**{e['step_s'] / c['step_s']:.2f}x** | | {c['peak_rss_mib'] / e['peak_rss_mib']:.2f}x | |")
    return "\n".join(lines)


PHASES = {"views": "views", "objective": "forward (encoder on every view, alignment, decoder)", "recon_loss": "L1 + LPIPS",
          "backward": "backward", "optimizer": "clip + AdamW"}


def breakdown(results: list[dict], args: dict) -> str:
    """Where a step's time goes (medians of the phases over the timed steps), eager and compiled."""
    lines = ["| config | torch.compile | " + " | ".join(PHASES.values()) + " |", "|---|---|" + "---:|" * len(PHASES)]
    for name in args["configs"].split(","):
        for mode in ("eager", "compile"):
            s = summarise(results, name, mode)
            if s and "error" not in s:
                total = sum(s["phases_s"].values())
                lines.append(f"| {name} | {'no' if mode == 'eager' else 'yes (blocks)'} | "
                             + " | ".join(f"{s['phases_s'][k]:.3f} s ({100 * s['phases_s'][k] / total:.0f}%)" for k in PHASES) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        name, mode, batch, warmup, steps, threads = argv[1:7]
        print(json.dumps(worker(name, mode, int(batch), int(warmup), int(steps), int(threads))))
        return []
    args = parse_args(argv)
    import torch

    from benchmarks.common import machine, write_section

    torch.set_num_threads(int(args["threads"]))
    results = []
    for name in args["configs"].split(","):
        for rnd in range(int(args["rounds"])):
            for mode in (("eager", "compile") if rnd % 2 == 0 else ("compile", "eager")):  # alternate the order
                r = run_worker(name, mode, args)
                print(json.dumps(r), flush=True)
                results.append(r)
    events = {n: {m: (summarise(results, n, m) or {}).get("events") for m in ("eager", "compile")} for n in args["configs"].split(",")}
    cmd = "python -m benchmarks.train_speed" + "".join(f" {k}={v}" for k, v in args.items() if v != DEFAULTS[k])
    rss0 = sorted({round(r["rss_start_mib"]) for r in results if "error" not in r})
    body = f"""```bash
{cmd}
```

{machine()}. One fresh process per measurement (peak RSS = that process's `ru_maxrss`, after
{' to '.join(f"{x}" for x in rss0[:: max(1, len(rss0) - 1)])} MiB right after the imports), eager and compiled processes
alternating, {args['rounds']} of each; s / step is the median over processes of each process's median of its timed steps
(tiny {args['steps.tiny']}, B/16 {args['steps.vit_b16']}) after its warm-up steps. The step is the trainer's:
views, the objective (encoder over the main, masked and local views, alignment heads and losses, decoder),
L1 + LPIPS (random backbone), backward, gradient clipping, AdamW; fp32, GAN not yet active, random images of
the config's data resolution, data loading excluded. The B/16 config runs at batch {args['batch.vit_b16']} here (128 per GPU in
the config). Attention uses `F.scaled_dot_product_attention` (SDPA) in every row. torch.compile = `Block.compile()`
on every encoder and decoder block (inductor, default mode), each process with an empty inductor cache: the
warm-up column of a compiled row includes a cold compile. Graph recompilations counted by dynamo during the
timed steps: {', '.join(f"{n} {e['compile']}" for n, e in events.items())}.

{table(results, args)}

Where the time of a step goes (median of each phase over the timed steps, median over processes):

{breakdown(results, args)}
"""
    write_section("Training throughput and memory (CPU)", body)
    print(table(results, args))
    print(breakdown(results, args))
    return results


if __name__ == "__main__":
    main()
