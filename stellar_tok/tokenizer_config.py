"""The tokenizer's settings: the typed schema of `configs/tokenizer/*.yaml` (every key with its default and meaning),
the checks a loaded config must pass, and the settings a chosen mode leaves without effect.

    cfg = stellar_tok.config.load_config(["config=tiny", "train.steps=500"])   # merges and checks with this schema

Unknown keys, wrong types and impossible values stop the run before any work, with one line naming the key.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import OmegaConf

from .errors import require


@dataclass
class ModelConfig:
    image_size: int = 32
    patch_size: int = 4
    width: int = 192
    depth: int = 6
    heads: int = 3
    mlp_ratio: float = 4.0
    num_tokens: int = 16  # r
    latent_channels: int = 16  # c
    tau: float = 0.06
    decoder_width: int = 192
    decoder_depth: int = 3
    decoder_heads: int = 3
    decoder_mlp_ratio: float = 4.0
    loc_floor: float = 1e-4
    imagenet_norm: bool = True
    stem: str = "patch"  # patch (ViT) | conv (stride-2 3x3 convolutions: learns faster on small data)
    decoder_input: str = "lowrank"  # lowrank: the decoder reads F = L·S (STELLAR) | dense: every patch feature (ablation)
    norm_eps: float = 1e-6  # the encoder's LayerNorm eps; 1e-12 to start from a Hugging Face ViT-MAE (its layer_norm_eps)
    # a local Hugging Face ViT-MAE folder (config.json + model.safetensors) to initialise the encoder from
    # (stellar_tok.model.mae_init); not a tokenizer argument: build the tokenizer with tokenizer_kwargs(cfg.model)
    init_from: Optional[str] = None


@dataclass
class DataConfig:
    name: str = "shapes"  # shapes | digits | folder | wds
    path: Optional[str] = None
    # folder, wds: the held-out split (latent statistics, evaluation): a folder, or shards given like `path`;
    # null: `{split}` in path, a directory's val-*.tar, or path/val (see stellar_tok.data)
    val_path: Optional[str] = None
    resolution: int = 32  # images are loaded at this square size; views are cut from them
    train_size: int = 20000  # shapes only
    val_size: int = 2000  # shapes only
    seed: int = 0
    num_workers: int = 0
    epoch_size: int = 10000  # wds: samples per "epoch" (ResampledShards are infinite)


@dataclass
class ViewsConfig:
    global_size: int = 32
    global_scale: List[float] = field(default_factory=lambda: [0.36, 1.0])
    global_crops: int = 2  # masked global views, the first a masked copy of the main crop
    local_crops: int = 4
    local_size: int = 16
    local_scale: List[float] = field(default_factory=lambda: [0.06, 0.36])
    rotation: float = 0.0  # degrees, for every view but the main one
    mask_ratio: float = 0.75
    focal_p: float = 0.5
    focal_sigma: List[float] = field(default_factory=lambda: [0.1, 0.5])
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1  # fraction of a full turn, as torchvision
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: List[float] = field(default_factory=lambda: [0.1, 2.0])
    blur_kernel: int = 9
    noise_p: float = 0.0
    noise_std: float = 0.1


@dataclass
class AlignWeights:
    token_self: float = 1.0
    cls_self: float = 1.0
    token_masked: float = 1.0
    cls_masked: float = 1.0
    cls_local: float = 1.0
    koleo: float = 0.1
    koleo_masked: float = 0.1


@dataclass
class AlignConfig:
    enabled: bool = True
    weight: float = 1.0  # multiplies the whole alignment objective
    head_hidden: int = 2048
    head_bottleneck: int = 256
    token_prototypes: int = 16384
    cls_prototypes: int = 16384
    prototype_std: float = 0.0  # init std of the prototype vectors; 0: head_bottleneck^-0.5 (rows of norm ~1); the reference: 1.0
    sinkhorn_temp: float = 0.06
    sinkhorn_iters: int = 3
    student_temp: float = 0.12
    token_balance: str = "all"  # all: Sinkhorn over all B*r tokens (reference) | slot: over the images, per token slot
    image_loss: str = "clustering"  # clustering: CLS terms as Sinkhorn clustering (reference) | contrastive: InfoNCE
    image_feature: str = "cls"  # the image-level feature of those terms: cls | tokens (the mean of S)
    contrastive_temp: float = 0.2
    match: str = "hungarian"  # hungarian (one-to-one) | argmax (the reference code's per-row arg-max)
    ot_eps: float = 0.1
    ot_iters: int = 5
    teacher_momentum: float = 0.0  # 0 = no EMA teacher (targets from the student itself, as the reference)
    weights: AlignWeights = field(default_factory=AlignWeights)


@dataclass
class ReconConfig:
    enabled: bool = True
    weight: float = 1.0  # multiplies the whole reconstruction objective
    pixel: str = "l1"  # l1 | l2
    pixel_weight: float = 1.0
    lpips_weight: float = 1.0
    lpips_net: str = "vgg"  # vgg (standard) | alex (cheaper)
    lpips_random_backbone: bool = False  # true: random backbone (offline tests and tiny CPU runs only)
    gan_weight: float = 0.1
    gan_start: float = 0.2  # [0, 1): a fraction of the run, resolved at start and printed on its first line; >= 1: a step
    gan_max_adaptive: float = 1e4
    disc_channels: int = 64
    disc_layers: int = 3
    disc_lr: float = 1e-4


@dataclass
class OptimConfig:
    lr: float = 1.5e-4
    weight_decay: float = 0.04
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.01
    grad_clip: float = 3.0
    batch_size: int = 128  # per process


@dataclass
class TrainConfig:
    steps: int = 100000
    # >0: the run's length in passes over the data (data.epoch_size for wds, the train split's size otherwise) at the
    # launch's global batch (optim.batch_size x processes); replaces `steps`, so a config holds one number for any GPU count
    epochs: float = 0.0
    max_minutes: float = 0.0  # >0: stop (checkpoint + export) after this wall time; the cosine then follows time
    max_cpu_minutes: float = 0.0  # >0: the same with the process's CPU time (all threads): fair budgets on a shared machine
    stop_after: int = 0  # >0: stop (checkpoint + export) after this many steps of this invocation; resume later
    mixed_precision: str = "no"  # no | bf16 | fp16
    compile: bool = False  # torch.compile the transformer blocks (see docs/BENCHMARKS.md for when it helps)
    # encoder blocks (from the first) whose activations are recomputed in the backward instead of kept: exact, less
    # memory, one more forward of those blocks per step (docs/RECIPE.md "memory"); 0: none; -1: all
    activation_checkpointing: int = 0
    # an exported tokenizer: train a fresh decoder on its frozen encoder (the paper's reconstruction protocol);
    # encoder keys come from its config.json, decoder keys from model.*; alignment is off
    decoder_from: Optional[str] = None
    freeze: str = "none"  # none | encoder: encoder, S, L's projections kept as model.init_from's; bottleneck + decoder train
    seed: int = 0
    output_dir: str = "runs/tokenizer"
    resume: Optional[str] = None  # None | auto | path to a checkpoint folder
    log_every: int = 20
    image_every: int = 1000
    ckpt_every: int = 5000
    keep_ckpts: int = 3
    stats_batches: int = 20  # batches used for the exported latent statistics
    max_nonfinite: int = 20  # consecutive non-finite losses before the run stops
    # seconds a collective waits for a lost process (killed, its machine gone) before the others stop with one line
    # naming it (stellar_tok.training.lost_process); resume with train.resume=auto
    collective_timeout: float = 600.0
    progress: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    recon: ReconConfig = field(default_factory=ReconConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def tokenizer_kwargs(model_cfg) -> dict:
    """StellarTokenizer's keyword arguments from `cfg.model`: every key but `init_from` (a run option, not a weight shape)."""
    kwargs = OmegaConf.to_container(model_cfg) if OmegaConf.is_config(model_cfg) else dict(model_cfg)
    kwargs.pop("init_from", None)
    return kwargs


def check_precision(t, key: str = "train.mixed_precision") -> None:
    """`t.mixed_precision`: no | bf16 | fp16. YAML reads a bare `no` as false, so `mixed_precision=no` arrives as
    "False": that means no. `key` names the setting in the error."""
    if str(t.mixed_precision) in ("False", "false"):
        t.mixed_precision = "no"
    require(t.mixed_precision in ("no", "bf16", "fp16"), key, "no, bf16 or fp16", t.mixed_precision)


def validate(cfg) -> None:
    require(cfg.model.init_from is None or cfg.train.decoder_from is None, "model.init_from", "null with train.decoder_from (the encoder comes from that tokenizer)", cfg.model.init_from)
    if cfg.train.decoder_from is not None:
        use_decoder_source(cfg)
    require(cfg.train.freeze in ("none", "encoder"), "train.freeze", "none or encoder", cfg.train.freeze)
    require(cfg.train.freeze == "none" or not (cfg.align.enabled or cfg.train.decoder_from), "train.freeze", "none with align.enabled=true or train.decoder_from (they train or fix the rest)", cfg.train.freeze)
    m, v, d, a, r, o, t = cfg.model, cfg.views, cfg.data, cfg.align, cfg.recon, cfg.optim, cfg.train
    require(m.num_tokens >= 1, "model.num_tokens", "a positive integer", m.num_tokens)
    require(m.latent_channels >= 1, "model.latent_channels", "a positive integer", m.latent_channels)
    require(m.patch_size >= 1, "model.patch_size", "a positive integer", m.patch_size)
    require(m.image_size % m.patch_size == 0, "model.image_size", f"divisible by model.patch_size={m.patch_size}", m.image_size)
    require(m.width % m.heads == 0 and m.width % 4 == 0, "model.width", f"divisible by 4 and model.heads={m.heads}", m.width)
    require(m.decoder_width % m.decoder_heads == 0 and m.decoder_width % 2 == 0, "model.decoder_width", f"even and divisible by model.decoder_heads={m.decoder_heads}", m.decoder_width)
    require(m.tau > 0, "model.tau", "> 0", m.tau)
    require(m.stem in ("patch", "conv"), "model.stem", "patch or conv", m.stem)
    require(m.stem == "patch" or (m.patch_size >= 2 and m.patch_size & (m.patch_size - 1) == 0), "model.patch_size", "a power of two >= 2 with model.stem=conv", m.patch_size)
    require(m.decoder_input in ("lowrank", "dense"), "model.decoder_input", "lowrank or dense", m.decoder_input)
    require(0 < m.loc_floor < 1, "model.loc_floor", "in (0, 1)", m.loc_floor)
    require(m.norm_eps > 0, "model.norm_eps", "> 0", m.norm_eps)
    require(d.name in ("shapes", "digits", "folder", "wds"), "data.name", "one of shapes, digits, folder, wds", d.name)
    require(d.name not in ("folder", "wds") or bool(d.path), "data.path", f"set for data.name={d.name}", d.path)
    require(d.val_path is None or d.name in ("folder", "wds"), "data.val_path", f"null for data.name={d.name} (it has its own val split)", d.val_path)
    require(d.resolution >= 8, "data.resolution", ">= 8", d.resolution)
    for key, size in (("views.global_size", v.global_size), ("views.local_size", v.local_size)):
        require(size % m.patch_size == 0 and size > 0, key, f"a positive multiple of model.patch_size={m.patch_size}", size)
    require(v.global_size == m.image_size, "views.global_size", f"equal to model.image_size={m.image_size}", v.global_size)
    require(0 <= v.mask_ratio < 1, "views.mask_ratio", "in [0, 1)", v.mask_ratio)
    for key, rng in (("views.global_scale", v.global_scale), ("views.local_scale", v.local_scale), ("views.focal_sigma", v.focal_sigma), ("views.blur_sigma", v.blur_sigma)):
        require(len(rng) == 2 and 0 < rng[0] <= rng[1], key, "[lo, hi] with 0 < lo <= hi", list(rng))
    require(v.global_scale[1] <= 1 and v.local_scale[1] <= 1, "views.global_scale", "within (0, 1]", list(v.global_scale))
    require(v.global_crops >= 0 and v.local_crops >= 0, "views.global_crops", ">= 0 (and local_crops >= 0)", v.global_crops)
    require(v.blur_kernel % 2 == 1 and v.blur_kernel < v.local_size * 2, "views.blur_kernel", "odd and smaller than twice views.local_size", v.blur_kernel)
    for key in ("jitter_p", "grayscale_p", "blur_p", "noise_p", "focal_p"):
        require(0 <= v[key] <= 1, f"views.{key}", "a probability in [0, 1]", v[key])
    require(a.match in ("hungarian", "argmax"), "align.match", "hungarian or argmax", a.match)
    require(a.token_balance in ("all", "slot"), "align.token_balance", "all or slot", a.token_balance)
    require(a.image_loss in ("clustering", "contrastive"), "align.image_loss", "clustering or contrastive", a.image_loss)
    require(a.image_feature in ("cls", "tokens"), "align.image_feature", "cls or tokens", a.image_feature)
    require(a.prototype_std >= 0, "align.prototype_std", ">= 0 (0: head_bottleneck^-0.5)", a.prototype_std)
    require(a.contrastive_temp > 0, "align.contrastive_temp", "> 0", a.contrastive_temp)
    require(0 <= a.teacher_momentum < 1, "align.teacher_momentum", "in [0, 1)", a.teacher_momentum)
    require(a.token_prototypes >= 2 and a.cls_prototypes >= 2, "align.token_prototypes", ">= 2 (and cls_prototypes)", a.token_prototypes)
    require(a.enabled or r.enabled, "align.enabled", "true when recon.enabled is false (nothing to train)", a.enabled)
    require(r.pixel in ("l1", "l2"), "recon.pixel", "l1 or l2", r.pixel)
    require(r.lpips_net in ("vgg", "alex"), "recon.lpips_net", "vgg or alex", r.lpips_net)
    # the GAN's start: a fraction of the run in [0, 1), or a whole step the run reaches (with train.epochs the run's
    # length is known at start only: stellar_tok.training.tokenizer_trainer.run_length checks it there)
    gan_on, fraction = r.enabled and r.gan_weight > 0, 0 <= r.gan_start < 1
    reached = r.gan_start == int(r.gan_start) and (t.epochs > 0 or not gan_on or r.gan_start < t.steps)
    require(fraction or (r.gan_start >= 1 and reached), "recon.gan_start",
            f"a fraction of the run in [0, 1) or a whole step it reaches (< train.steps={t.steps}; with train.epochs checked at start)", r.gan_start)
    require(o.lr > 0, "optim.lr", "> 0", o.lr)
    require(o.batch_size >= 2, "optim.batch_size", ">= 2", o.batch_size)
    require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "two numbers in [0, 1)", list(o.betas))
    require(t.steps >= 1, "train.steps", ">= 1", t.steps)
    require(t.epochs >= 0, "train.epochs", ">= 0 (0: train.steps counts the run)", t.epochs)
    check_precision(t)
    require(t.resume in (None, "auto") or os.path.isdir(t.resume), "train.resume", "null, auto, or an existing checkpoint folder", t.resume)
    require(t.keep_ckpts >= 1, "train.keep_ckpts", ">= 1", t.keep_ckpts)
    require(t.collective_timeout > 0, "train.collective_timeout", "> 0 seconds", t.collective_timeout)
    require(-1 <= t.activation_checkpointing <= m.depth, "train.activation_checkpointing", f"-1 (all), 0 (none) or a block count up to model.depth={m.depth}", t.activation_checkpointing)


def cls_is_trained(cfg) -> bool:
    """Whether a loss reaches the CLS token: the alignment's image-level terms on CLS (align.image_feature=cls)."""
    return bool(cfg.align.enabled and cfg.align.image_feature == "cls")


def inert_settings(cfg) -> list[str]:
    """One line per setting that has no effect in the chosen mode: keys changed from their default that the run will
    not read, and a CLS token that no loss reaches."""
    default = OmegaConf.structured(Config)
    a, r = cfg.align, cfg.recon
    unused = {}
    if a.enabled and a.image_loss == "contrastive":
        unused["align.cls_prototypes"] = "align.image_loss=contrastive uses a projection head, no CLS prototypes"
    if a.enabled and a.image_loss == "clustering":
        unused["align.contrastive_temp"] = "align.image_loss=clustering"
    if not (r.enabled and r.gan_weight > 0):
        for k in ("gan_start", "gan_max_adaptive", "disc_channels", "disc_layers", "disc_lr"):
            unused[f"recon.{k}"] = "the GAN is off (recon.gan_weight=0)"
    if not (r.enabled and r.lpips_weight > 0):
        for k in ("lpips_net", "lpips_random_backbone"):
            unused[f"recon.{k}"] = "LPIPS is off (recon.lpips_weight=0)"
    lines = [f"config key '{key}' has no effect: {why}" for key, why in unused.items()
             if OmegaConf.select(cfg, key) != OmegaConf.select(default, key)]
    if a.enabled and not cls_is_trained(cfg):
        lines.append(f"no loss reaches the CLS token (align.image_feature=tokens, align.image_loss={a.image_loss}): "
                     "CLS features of this run are untrained")
    return lines


DECODER_KEYS = ("decoder_width", "decoder_depth", "decoder_heads", "decoder_mlp_ratio")


def use_decoder_source(cfg) -> None:
    """train.decoder_from=DIR: the encoder's model keys from DIR/config.json (the run's decoder keys stay), no alignment."""
    config_json = os.path.join(str(cfg.train.decoder_from), "config.json")
    require(os.path.isfile(config_json), "train.decoder_from", "an exported tokenizer folder with config.json", cfg.train.decoder_from)
    require(cfg.recon.enabled, "recon.enabled", "true with train.decoder_from (the decoder learns from the reconstruction losses)", cfg.recon.enabled)
    with open(config_json) as f:
        source = json.load(f)
    for key in cfg.model:
        if key not in DECODER_KEYS and key in source:
            cfg.model[key] = source[key]
    cfg.align.enabled = False
    cfg.views.global_size = cfg.model.image_size
