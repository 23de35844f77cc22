"""The tokenizer's training step as `stellar_tok.train` builds it, on random images, timed and counted: what
`benchmarks.train_speed` and `benchmarks.gpu_check` measure.

    TrainStep(name, batch, device, precision, overrides)   one step = views, objective, L1 + LPIPS, backward, AdamW
    worker(...)                                            one measurement (eager or compiled blocks) as a dict
    measure_rows(...)                                      several settings ("rows") of one config in one process

A row is `base` or `+`-joined options applied to the config as it is (not to the previous row):
    ckpt=N          activation checkpointing of the first N encoder blocks (-1: all; `train.activation_checkpointing`)
    fused           AdamW with `fused=True` (one kernel for all parameters; the default is the foreach implementation)
    channels_last   the LPIPS network in channels-last memory format (cuDNN's NHWC convolutions, no transposes)
    batch=N         N images per step instead of the process's batch
    compile         `StellarTokenizer.compile_blocks()` (regional torch.compile); irreversible, so only in the last row
Each row runs its warm-up steps, then its timed steps; its peak GPU memory is the allocator's peak over those.
"""
from __future__ import annotations

import resource
import statistics
import time

import torch
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import device_setup
from stellar_tok.config import load_config, tokenizer_kwargs
from stellar_tok.data.views import make_views
from stellar_tok.errors import UserError
from stellar_tok.losses.reconstruction import PatchDiscriminator, ReconstructionLoss
from stellar_tok.model.tokenizer import StellarTokenizer
from stellar_tok.training.engine import param_groups
from stellar_tok.training.objective import TokenizerWithHeads

# bf16 dense tensor-core peak (no sparsity) of the GPUs MFU is reported for, FLOP/s
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362.05e12, "A10G": 70e12}
ROW_OPTIONS = ("ckpt", "fused", "channels_last", "batch", "compile")


def peak_bf16(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def parse_row(spec: str) -> dict:
    """'ckpt=6+fused' -> {'ckpt': 6, 'fused': True}; 'base' -> {}. An unknown option is refused in one line."""
    opts: dict = {}
    for part in [p for p in spec.strip().split("+") if p and p != "base"]:
        key, _, value = part.partition("=")
        if key not in ROW_OPTIONS or (key in ("ckpt", "batch")) != bool(value):
            raise UserError(f"row option {part!r} in {spec!r}: choose from ckpt=N, fused, channels_last, batch=N, compile")
        opts[key] = int(value) if value else True
    return opts


class TrainStep:
    """The trainer's step, built as `stellar_tok.train` builds it, on `batch` random images of the config's data
    resolution. `step(i)` runs step i and returns its seconds; each phase's seconds go to `phases`."""

    def __init__(self, name: str, batch: int, device: str, precision: str, overrides: tuple[str, ...] = ()):
        self.cuda, self.autocast = device_setup(device, precision)
        cfg = load_config([f"config=configs/tokenizer/{name}.yaml", "recon.lpips_random_backbone=true", f"optim.batch_size={batch}", *overrides])
        torch.manual_seed(0)
        self.cfg, self.device, self.tok = cfg, device, StellarTokenizer(**tokenizer_kwargs(cfg.model))
        self.tok.set_activation_checkpointing(cfg.train.activation_checkpointing)
        self.objective = TokenizerWithHeads(self.tok, cfg.align).train().to(device)
        self.recon_loss = ReconstructionLoss(cfg.recon).to(device) if cfg.recon.enabled else None
        gan = cfg.recon.enabled and cfg.recon.gan_weight > 0
        self.disc = PatchDiscriminator(cfg.recon.disc_channels, cfg.recon.disc_layers).to(device) if gan else None
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.set_optimizer(fused=False)
        self.set_batch(batch)
        self.phases: dict[str, list[float]] = {k: [] for k in ("views", "objective", "recon_loss", "backward", "optimizer")}

    def set_optimizer(self, fused: bool) -> None:
        o = self.cfg.optim
        self.opt = torch.optim.AdamW(param_groups(self.objective, o.weight_decay), lr=o.lr, betas=tuple(o.betas),
                                     **({"fused": True} if fused else {}))

    def set_batch(self, batch: int) -> None:
        res = self.cfg.data.resolution
        self.batch = batch
        self.images = torch.randint(0, 256, (batch, 3, res, res), generator=self.gen, dtype=torch.uint8, device=self.device)

    def configure(self, opts: dict, batch: int) -> None:
        """The settings of one row (`parse_row`), from the config's own: checkpointing, optimizer, LPIPS layout, batch."""
        self.tok.set_activation_checkpointing(opts.get("ckpt", self.cfg.train.activation_checkpointing))
        self.set_optimizer(bool(opts.get("fused")))
        if self.recon_loss is not None and self.recon_loss.lpips is not None:
            fmt = torch.channels_last if opts.get("channels_last") else torch.contiguous_format
            self.recon_loss.lpips.to(memory_format=fmt)
        if opts.get("batch", batch) != self.batch:
            self.set_batch(opts.get("batch", batch))
        if opts.get("compile"):
            self.tok.compile_blocks()

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def step(self, i: int) -> float:
        cfg = self.cfg
        t = [self.now()]
        x = self.images.float() / 127.5 - 1
        with torch.no_grad():
            views = make_views(x, cfg.views, self.gen, cfg.model.patch_size)
        t.append(self.now())
        with self.autocast():
            out = self.objective(views)  # encoder over every view, alignment heads and losses, decoder
            loss = cfg.align.weight * out["align_loss"]
        t.append(self.now())
        if self.recon_loss is not None:
            with self.autocast():
                rl, _ = self.recon_loss.generator_loss(out["recon"], views["main"], i, self.disc, self.tok.last_layer)
            loss = loss + cfg.recon.weight * rl
        t.append(self.now())
        loss.backward()
        t.append(self.now())
        torch.nn.utils.clip_grad_norm_(self.objective.parameters(), cfg.optim.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t.append(self.now())
        for k, a, b in zip(self.phases, t[:-1], t[1:]):
            self.phases[k].append(b - a)
        return t[-1] - t[0]

    def count_flops(self) -> tuple[int, dict]:
        """FLOPs of one training step (forward + backward: matmuls, convolutions, attention), counted eagerly, and the
        counts per module (outermost names). The model's FLOPs: without activation checkpointing, whose recomputed
        forward is work the step adds, not work it needs (MFU counts the latter)."""
        blocks, self.tok.checkpoint_blocks = self.tok.checkpoint_blocks, 0
        try:
            with FlopCounterMode(display=False) as fc:
                self.step(0)
        finally:
            self.tok.checkpoint_blocks = blocks
        return fc.get_total_flops(), fc.get_flop_counts()

    def profile(self, first: int, path: str) -> None:
        """A torch.profiler table (self time, top 40) of steps first, first + 1, written to `path`."""
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with torch_profile(activities=acts) as prof:
            for i in range(2):
                self.step(first + i)
        key = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        with open(path, "w") as f:
            f.write(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=60))


def timed_steps(run: TrainStep, first: int, warmup: int, steps: int) -> dict:
    """`warmup` untimed steps, then `steps` timed ones: median s/step, phases, dynamo events, peak GPU memory."""
    warm = [run.step(first + i) for i in range(warmup)]
    if run.cuda:
        torch.cuda.reset_peak_memory_stats()
    graphs_before = counters["stats"]["unique_graphs"]
    for v in run.phases.values():
        v.clear()
    timed = [run.step(first + warmup + i) for i in range(steps)]
    r = {"warmup_s": round(sum(warm), 2), "first_step_s": round(warm[0], 2) if warm else None, "step_s": statistics.median(timed),
         "steps": steps, "dynamo_events_while_timed": counters["stats"]["unique_graphs"] - graphs_before,
         "phases_s": {k: statistics.median(v) for k, v in run.phases.items()}}
    if run.cuda:
        r["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return r


def rates(r: dict, step_flops: float, batch: int, run: TrainStep, precision: str) -> dict:
    """images/s, TFLOP/s and (bf16 on a known GPU) MFU of a measurement `r`."""
    out = {"images_per_s": batch / r["step_s"], "step_tflop": step_flops / 1e12, "achieved_tflops": step_flops / r["step_s"] / 1e12}
    if run.cuda:
        out["gpu"] = torch.cuda.get_device_name(0)
        peak = peak_bf16(out["gpu"])
        out["mfu"] = step_flops / r["step_s"] / peak if peak and precision == "bf16" else None
    return out


def worker(name: str, mode: str, batch: int, warmup: int, steps: int, threads: int, device: str = "cpu", precision: str = "fp32",
           overrides: tuple[str, ...] = (), profile: str | None = None) -> dict:
    """One measurement; `overrides` are extra config `key=value`s, `profile` a file for a torch.profiler table of 2 steps."""
    torch.set_num_threads(threads)
    rss_start = max_rss_mib()
    run = TrainStep(name, batch, device, precision, overrides)
    step_flops, counts = run.count_flops()
    if mode == "compile":
        run.tok.compile_blocks()
    r = timed_steps(run, 1, warmup, steps)
    if profile:
        run.profile(1 + warmup + steps, profile)
    r.update(config=name, mode=mode, batch=batch, threads=threads, device=device, precision=precision,
             params_m=round(sum(p.numel() for p in run.tok.parameters()) / 1e6, 1),
             lpips_tflop=sum(counts.get("LPIPS", {}).values()) / 1e12, flop_modules=sorted(k for k in counts if "." not in k),
             rss_start_mib=round(rss_start), peak_rss_mib=round(max_rss_mib()), **rates(r, step_flops, batch, run, precision))
    return r


def measure_rows(name: str, rows: list[str], batch: int, warmup: int, steps: int, threads: int, device: str, precision: str,
                 overrides: tuple[str, ...] = (), emit=print) -> list[dict]:
    """Every row (`parse_row` specs) of config `name` in this process, each result passed to `emit` as it is done (a
    run cut short keeps the rows it finished). FLOPs are counted per batch size, eagerly, once."""
    parsed = [(spec, parse_row(spec)) for spec in rows]
    if any(o.get("compile") for _, o in parsed[:-1]):
        raise UserError("row option compile is irreversible: only the last row may have it")
    torch.set_num_threads(threads)
    run = TrainStep(name, batch, device, precision, overrides)
    flops: dict[int, int] = {}
    results, first = [], 1
    for spec, opts in parsed:
        try:
            run.configure(opts, batch)
            if run.batch not in flops:
                flops[run.batch] = run.count_flops()[0]
            r = timed_steps(run, first, warmup, steps)
            r.update(config=name, row=spec, batch=run.batch, precision=precision, **rates(r, flops[run.batch], run.batch, run, precision))
        except torch.OutOfMemoryError:
            r = {"config": name, "row": spec, "batch": run.batch, "error": "out of GPU memory"}
        run.opt.zero_grad(set_to_none=True)
        if run.cuda:
            torch.cuda.empty_cache()
        first += warmup + steps
        results.append(r)
        emit(r)
    return results
