"""Where a tokenizer run's weights come from and where they go, as library functions (the trainer, tests and tools
call them).

At the start, the tokenizer to train:

    tokenizer = build_tokenizer(cfg, accelerator)                 # fresh, a ViT-MAE encoder, or an export's frozen encoder
    load_frozen_encoder(tokenizer, "runs/align_only/tokenizer")   # train.decoder_from: its encoder, frozen; a fresh decoder

At the end, the export (train.output_dir/tokenizer):

    stats = compute_latent_stats(tokenizer, loader, device, 20)   # what an export ships: LatentStats of held-out images
    export_tokenizer(cfg, accelerator, objective, heldout_loader(cfg, accelerator), step)   # + training.json
"""
from __future__ import annotations

import json
import os
import warnings

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from stellar_tok.config import cls_is_trained, tokenizer_kwargs
from stellar_tok.data import build_loader, heldout_is_train
from stellar_tok.data.views import to_unit_range
from stellar_tok.errors import UserError
from stellar_tok.latents.dataset import StatsAccumulator
from stellar_tok.model.convert_reference import ALIGN_HEADS_FILE
from stellar_tok.model.mae_init import check_tokenizer_fits, is_tokenizer_folder, load_mae_encoder
from stellar_tok.model.vit import interpolate_pos_embed
from stellar_tok.model.tokenizer import StellarTokenizer

from .checkpoint import export_pretrained


# ----------------------------------------------------------------------------------------------
# the start
# ----------------------------------------------------------------------------------------------

def build_tokenizer(cfg, accelerator):
    """The tokenizer to train: fresh, its encoder from a Hugging Face ViT-MAE (model.init_from, the reference recipe,
    stellar_tok.model.mae_init), or a fresh decoder on the frozen encoder of an export (train.decoder_from, the paper's
    reconstruction protocol)."""
    tokenizer = StellarTokenizer(**tokenizer_kwargs(cfg.model))
    if cfg.model.init_from:
        path = os.path.expanduser(cfg.model.init_from)
        report = (load_tokenizer_start if is_tokenizer_folder(path) else load_mae_encoder)(tokenizer, path)
        if accelerator.is_main_process:
            print(report["summary"], flush=True)
    if cfg.train.decoder_from:
        load_frozen_encoder(tokenizer, cfg.train.decoder_from)
    if cfg.train.freeze == "encoder":
        freeze_encoder(tokenizer)
    return tokenizer


TRAINED_WITH_FROZEN_ENCODER = ("to_latent",) + StellarTokenizer.DECODER_MODULES  # train.freeze=encoder: what learns


def freeze_encoder(tokenizer) -> None:
    """train.freeze=encoder: no gradient for the encoder, sparse tokens and localization projections (they run without
    autograd: frozen weights and inputs that need no gradient build no graph); the bottleneck and decoder train."""
    tokenizer.requires_grad_(False)
    for name in TRAINED_WITH_FROZEN_ENCODER:
        getattr(tokenizer, name).requires_grad_(True)


@torch.no_grad()
def load_tokenizer_start(tokenizer, path: str) -> dict:
    """model.init_from=DIR, a tokenizer folder (an export, or stellar_tok.convert_reference's output): every tensor whose
    shape fits (the position embeddings resized bicubically to this model.image_size), the rest as initialised. Its
    encoder keys must be the run's (check_tokenizer_fits). Returns a report with `summary`, one line."""
    check_tokenizer_fits(path, tokenizer.config)
    source = StellarTokenizer.from_pretrained(path).state_dict()
    ours = tokenizer.state_dict()
    loaded, fresh = [], []
    for key, value in ours.items():
        theirs = source.get(key)
        if key == "pos_embed" and theirs is not None:
            theirs = interpolate_pos_embed(theirs.float(), tokenizer.grid)
        if theirs is None or key.startswith("latent_") or tuple(theirs.shape) != tuple(value.shape):
            fresh.append(key)  # latent statistics: re-measured at export
            continue
        value.copy_(theirs.to(value.dtype))
        loaded.append(key)
    kept = sorted({k.split(".")[0] for k in fresh if not k.startswith("latent_")})
    summary = (f"model.init_from={path}: {len(loaded)} tensors from its tokenizer"
               + (f"; as initialised (shapes differ): {', '.join(kept)}" if kept else ""))
    return {"path": path, "loaded": loaded, "kept": fresh, "summary": summary}


def load_align_heads(objective, cfg) -> str | None:
    """model.init_from=DIR with DIR/align_heads.safetensors (a converted published checkpoint's clustering heads) and
    alignment on: the heads start from it, where every shape agrees. Returns a line for the log, or None."""
    path = os.path.expanduser(cfg.model.init_from or "")
    file = os.path.join(path, ALIGN_HEADS_FILE)
    if objective.align is None or not cfg.model.init_from or not os.path.isfile(file):
        return None
    heads = load_file(file)
    ours = objective.align.state_dict()
    wrong = [k for k in ours if k not in heads or tuple(heads[k].shape) != tuple(ours[k].shape)]
    if wrong:
        return (f"model.init_from={path}: clustering heads not loaded ({wrong[0]} is {tuple(ours[wrong[0]].shape)} here, "
                f"{tuple(heads[wrong[0]].shape) if wrong[0] in heads else 'absent'} in {ALIGN_HEADS_FILE}; see its conversion.json)")
    objective.align.load_state_dict({k: heads[k] for k in ours})
    if objective.teacher is not None:
        objective.teacher["align"].load_state_dict(objective.align.state_dict())
    return f"model.init_from={path}: clustering heads from {ALIGN_HEADS_FILE}"


def load_frozen_encoder(tokenizer, path: str) -> None:
    """Everything but the decoder from the tokenizer exported at `path`; then a fresh, trainable decoder, the rest frozen."""
    source = StellarTokenizer.from_pretrained(path)
    encoder = {k: v for k, v in source.state_dict().items() if not k.startswith(StellarTokenizer.DECODER_PREFIXES)}
    missing, unexpected = tokenizer.load_state_dict(encoder, strict=False)
    if unexpected or any(not k.startswith(StellarTokenizer.DECODER_PREFIXES) for k in missing):
        raise UserError(f"train.decoder_from={path}: its weights do not fit the encoder (missing {missing[:3]}, unexpected {unexpected[:3]})")
    tokenizer.fresh_decoder_on_frozen_encoder()


# ----------------------------------------------------------------------------------------------
# the end
# ----------------------------------------------------------------------------------------------

def heldout_loader(cfg, accelerator):
    """The images of the exported latent statistics: held-out ones, centre crops at the model's size (data.resolution
    is what training decodes to); without a held-out split, training images and a warning."""
    stats_data = OmegaConf.merge(cfg.data, {"resolution": cfg.model.image_size})
    loader = build_loader(stats_data, cfg.optim.batch_size, "val", num_workers=0, seed=cfg.data.seed)
    if accelerator.is_main_process and heldout_is_train(cfg.data):
        warnings.warn(f"data.path {cfg.data.path!r} has no held-out split: the exported latent statistics come from training images (set data.val_path)")
    return loader


@torch.no_grad()
def compute_latent_stats(tokenizer, loader, device, batches: int):
    """Per-channel mean/std of z and scalar mean/std of log L over `batches` clean batches of `loader` (the same
    float64 sums as a tokenized latent set's statistics, `stellar_tok.latents.dataset.StatsAccumulator`)."""
    acc = StatsAccumulator(tokenizer.config.latent_channels)
    for i, (images, _) in enumerate(loader):
        if i >= batches:
            break
        lat = tokenizer.encode(to_unit_range(images, device))
        acc.add(lat.z, lat.log_loc)
    return acc.stats()


def gathered_tokenizer(accelerator, objective, model_cfg):
    """The trained tokenizer as a plain, unsharded `StellarTokenizer` (eval mode) on the main process; None on the others.

    Every process must call it: the full state dict comes from accelerate's `get_state_dict`, which under FSDP
    gathers the shards collectively (onto the main process, in CPU memory). Under DDP it is the weights as they are."""
    full = accelerator.get_state_dict(objective)
    if not accelerator.is_main_process:
        return None
    prefix = "tokenizer."
    tok = StellarTokenizer(**tokenizer_kwargs(model_cfg))  # without model.init_from (a run option)
    tok.load_state_dict({k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)})
    return tok.to(accelerator.device).eval()


def training_record(cfg, step: int) -> dict:
    """What readers of an export need to know of its training (tokenizer/training.json): the steps, and whether any loss
    reached the CLS token (probes label an untrained CLS). A fresh decoder keeps its encoder's record."""
    cls_trained = cls_is_trained(cfg)
    frozen_start = cfg.train.freeze == "encoder" and cfg.model.init_from  # the encoder is the start's
    if cfg.train.decoder_from or frozen_start:
        source = os.path.join(os.path.expanduser(cfg.train.decoder_from or cfg.model.init_from), "training.json")
        cls_trained = json.load(open(source)).get("cls_trained") if os.path.isfile(source) else None
    return {"steps": step, "cls_trained": cls_trained, "align": {k: cfg.align[k] for k in ("enabled", "image_loss", "image_feature")},
            "decoder_from": cfg.train.decoder_from, "init_from": cfg.model.init_from, "freeze": cfg.train.freeze}


def export_tokenizer(cfg, accelerator, objective, stats_loader, step: int) -> str | None:
    """train.output_dir/tokenizer: the whole tokenizer with its latent statistics and training record (the main
    process; None on the others). Every process must call it (FSDP: the shards are gathered)."""
    tok = gathered_tokenizer(accelerator, objective, cfg.model)
    if tok is None:
        return None
    tok.set_latent_stats(compute_latent_stats(tok, stats_loader, accelerator.device, cfg.train.stats_batches))
    return export_pretrained(tok, cfg.train.output_dir, "tokenizer", {"training.json": training_record(cfg, step)})
