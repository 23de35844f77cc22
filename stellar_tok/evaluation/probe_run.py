"""One probe run as `python -m stellar_tok.probe` makes it: the tokenizer (trained, or its architecture with fresh
weights), the protocol (`probing.run_probes`, cached, or `augmented_probe.augmented_probe`), and the result with the
settings it was measured under. The protocols in words: `python -m stellar_tok.probe --help`.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable

import torch

from stellar_tok.data import heldout_is_train
from stellar_tok.errors import UserError
from stellar_tok.model.tokenizer import StellarTokenizer

from .augmented_probe import augmented_probe
from .probe_images import CROP_SCALE
from .probing import cls_trained, run_probes


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when available, else the CPU; otherwise the device named (a UserError when it cannot be used)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"device must be auto, cpu or cuda[:i] (got {name!r})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but CUDA is not available (use device=cpu or auto)")
    return device


def load_probe_tokenizer(cfg, kinds, device: torch.device, resolution_given: bool):
    """The tokenizer the probes read (None when every feature kind is pixels), on `device`; `random_init`: its
    architecture with fresh weights seeded by `seed`. Without a given data.resolution, the augmented protocol reads
    the images at the tokenizer's image size (cfg.data.resolution is set to it); the cached one warns."""
    if not any(k != "pixels" for k in kinds):
        return None
    if not cfg.tokenizer:
        raise UserError("tokenizer=DIR is required (an exported tokenizer folder)")
    tok = StellarTokenizer.from_pretrained(cfg.tokenizer).eval()
    if cfg.random_init:  # same architecture, fresh weights
        torch.manual_seed(cfg.seed)
        tok = StellarTokenizer(**{k: v for k, v in tok.config.items() if not k.startswith("_")}).eval()
    tok = tok.to(device)
    if not resolution_given and int(tok.config.image_size) != int(cfg.data.resolution):
        if cfg.protocol == "augmented":
            cfg.data.resolution = int(tok.config.image_size)
        else:
            warnings.warn(f"protocol=cached reads the images at data.resolution={cfg.data.resolution}, not at the tokenizer's "
                          f"image_size={tok.config.image_size}; pass data.resolution={tok.config.image_size} to probe at its size")
    return tok


def probe_run(cfg, tok, kinds, device: torch.device, log: Callable[[str], None]) -> dict:
    """The protocol of `cfg` on `tok`'s features; the result with n_eval, the protocol, its settings and the seconds.
    `log` receives the one-line summary before the work and any note on the result."""
    size = int(tok.config.image_size) if tok is not None else int(cfg.data.resolution)
    if heldout_is_train(cfg.data):
        warnings.warn("the held-out (val) split resolves to training images (no val folder or val shards; data.val_path "
                      "names one): the probes' top-1 is then measured on images they were trained on")
    t = time.time()
    common = dict(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay, n_train=cfg.n_train,
                  n_eval=cfg.n_eval, seed=cfg.seed, device=device, progress=cfg.progress, log=log)
    if cfg.protocol == "cached":
        res = run_probes(tok, cfg.data, kinds, **common)
    else:
        res = augmented_probe(tok, cfg.data, kinds, knn=cfg.knn, amp=cfg.amp, **common)
    res["n_eval"] = res["n_val"]
    res["protocol"] = cfg.protocol
    res["settings"] = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
                       "schedule": "cosine", "seed": cfg.seed, "head": "LayerNorm+Linear"}
    if cfg.protocol == "augmented":
        res["settings"].update(crop_scale=list(CROP_SCALE), flip=True, image_size=size, data_resolution=int(cfg.data.resolution),
                               amp=bool(cfg.amp and device.type == "cuda"))
    if "cls" in kinds and not cfg.random_init and cls_trained(cfg.tokenizer) is False:
        res["cls_untrained"] = True  # its numbers describe a feature no loss reached
        log("note: no loss reached this tokenizer's CLS token in training (training.json): its 'cls' numbers are an untrained CLS")
    res["seconds"] = round(time.time() - t, 1)
    return res
