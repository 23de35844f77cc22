"""Generator configuration: typed defaults + YAML + `key=value` overrides (same loader as the tokenizer)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional

from stellar_tok.config import check_precision, require
from stellar_tok.config import load_config as _load


@dataclass
class GenModelConfig:
    width: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    loc_patch: int = 2  # the localization map is patchified p x p (16x16 grid, p 2 -> 64 positions)


@dataclass
class GenDataConfig:
    latents: Optional[str] = None  # a latent folder written by `python -m stellar_tok.tokenize`
    flip_p: Optional[float] = None  # None: 0.5 when the folder holds flipped latents, else 0
    in_memory: bool = True  # load every shard at start (small sets); false: memory-mapped reads
    num_workers: int = 0


@dataclass
class FlowConfig:
    t_sampling: str = "logit_normal"  # uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    class_dropout: float = 0.1  # labels replaced by the null class, for classifier-free guidance


@dataclass
class GenOptimConfig:
    lr: float = 1.0e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW, as DiT (tiny.yaml keeps its former 0.99)
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0  # 1: constant LR after warm-up (DiT); < 1: cosine decay to lr * ratio
    grad_clip: float = 1.0
    batch_size: int = 256  # per process


@dataclass
class GenTrainConfig:
    steps: int = 400000
    max_minutes: float = 0.0  # >0: stop (checkpoint + export) after this wall time
    max_cpu_minutes: float = 0.0  # >0: the same with the process's CPU time (all threads): fair budgets on a shared machine
    ema: float = 0.9999  # EMA decay of the exported weights: this value from the first update on (DiT), unless ema_warmup
    ema_warmup: bool = False  # true: diffusers' warm-up, decay 1 - (1 + step)^(-2/3) capped at `ema` (0.9999 only after 1e6 steps)
    mixed_precision: str = "no"  # no | bf16 | fp16
    compile: bool = False  # torch.compile each DiT block (regional compilation)
    seed: int = 0
    output_dir: str = "runs/generator"
    resume: Optional[str] = None  # None | auto | a checkpoint folder
    log_every: int = 50
    sample_every: int = 10000
    ckpt_every: int = 10000
    keep_ckpts: int = 3
    max_nonfinite: int = 20  # consecutive non-finite losses before the run stops (with a checkpoint)
    # seconds a collective waits for a lost process (killed, its machine gone) before the others stop with one line
    # naming it (stellar_tok.training.lost_process); resume with train.resume=auto
    collective_timeout: float = 600.0
    progress: bool = True


@dataclass
class GenSampleConfig:
    tokenizer: Optional[str] = None  # for sample grids during training (and the exported pipeline)
    steps: int = 50
    cfg: float = 4.0
    per_class: int = 8  # grid: this many samples for each of up to 10 classes


@dataclass
class GenConfig:
    model: GenModelConfig = field(default_factory=GenModelConfig)
    data: GenDataConfig = field(default_factory=GenDataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: GenOptimConfig = field(default_factory=GenOptimConfig)
    train: GenTrainConfig = field(default_factory=GenTrainConfig)
    sample: GenSampleConfig = field(default_factory=GenSampleConfig)


def load_config(args: list[str]):
    cfg = _load(args, schema=GenConfig, kind="generator")
    m, d, f, o, t = cfg.model, cfg.data, cfg.flow, cfg.optim, cfg.train
    require(bool(d.latents) and os.path.isdir(str(d.latents)), "data.latents", "a latent folder (python -m stellar_tok.tokenize)", d.latents)
    require(m.width % m.heads == 0 and m.width % 4 == 0, "model.width", f"divisible by 4 and model.heads={m.heads}", m.width)
    require(m.depth >= 1 and m.loc_patch >= 1, "model.depth", ">= 1 (and model.loc_patch >= 1)", m.depth)
    require(f.t_sampling in ("uniform", "logit_normal"), "flow.t_sampling", "uniform or logit_normal", f.t_sampling)
    require(0 <= f.class_dropout < 1, "flow.class_dropout", "in [0, 1)", f.class_dropout)
    require(o.lr > 0, "optim.lr", "> 0", o.lr)
    require(o.batch_size >= 1, "optim.batch_size", ">= 1", o.batch_size)
    require(0 <= t.ema < 1, "train.ema", "in [0, 1)", t.ema)
    require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "two numbers in [0, 1)", o.betas)
    require(t.steps >= 1, "train.steps", ">= 1", t.steps)
    require(t.collective_timeout > 0, "train.collective_timeout", "> 0 seconds", t.collective_timeout)
    check_precision(t)
    require(t.resume in (None, "auto") or os.path.isdir(t.resume), "train.resume", "null, auto, or an existing checkpoint folder", t.resume)
    require(cfg.sample.tokenizer is None or os.path.isdir(cfg.sample.tokenizer), "sample.tokenizer", "an exported tokenizer folder", cfg.sample.tokenizer)
    return cfg
