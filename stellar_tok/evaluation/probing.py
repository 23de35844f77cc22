"""Semantic probes of frozen features: a linear probe (LayerNorm + Linear) and weighted kNN, and the cached protocol.

    run_probes                  the cached protocol: features once per split, no augmentation, heads trained on them
    linear_probe, knn_classify  top-1 (%) from given train and held-out features
    extract_features            the features of a loader's images (tokens: mean of S, cls, lowrank: mean of L·S, pixels)

The augmented protocol (the reference's: features recomputed at every step from random resized crops + flips) is
`stellar_tok.evaluation.augmented_probe`; the images both read, `stellar_tok.evaluation.probe_images`; the seeded
subsets spread over the classes, `stellar_tok.data.reference.spread_subset`. The protocols in words, and the command
that runs them: `python -m stellar_tok.probe --help`.
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from stellar_tok.errors import UserError

from .feature_cache import check_probe_memory
from .probe_images import describe_images, split_batches

PROTOCOLS = ("cached", "augmented")
FEATURE_KINDS = ("tokens", "cls", "lowrank", "pixels")



# ----------------------------------------------------------------------------------------------
# features
# ----------------------------------------------------------------------------------------------


def batch_features(tokenizer, x: torch.Tensor, kinds: Sequence[str]) -> dict:
    """x (B,3,H,W) in [-1,1] -> dict kind -> (B, D) float32 features, on x's device."""
    f = None
    if tokenizer is not None and any(k != "pixels" for k in kinds):
        f = tokenizer.features(x)
    out = {}
    for k in kinds:
        if k == "tokens":
            out[k] = f["sparse"].float().mean(1)
        elif k == "cls":
            out[k] = f["cls"].float()
        elif k == "lowrank":
            out[k] = f["lowrank"].float().mean(1)
        elif k == "pixels":
            out[k] = x.flatten(1).float()
        else:
            raise UserError(f"unknown feature kind {k!r}; use tokens, cls, lowrank or pixels")
    return out


def to_input(images: torch.Tensor, device) -> torch.Tensor:
    """uint8 (B,3,H,W) -> float in [-1, 1] on `device`."""
    return images.to(device).float() / 127.5 - 1


@torch.no_grad()
def extract_features(tokenizer, loader, kinds=("tokens", "cls"), device="cpu", max_images: int | None = None,
                     size: int | None = None, amp: bool = False, progress: bool = False, desc: str = "features"):
    """-> dict kind -> (n, D) float tensor on the CPU, plus "labels" (n,). Images resized to `size` if given
    and different; at most `max_images` images (exactly that many when the loader has more)."""
    feats = {k: [] for k in kinds}
    labels = []
    n = 0
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        images, y = batch[0], batch[1]
        if max_images and n + len(y) > max_images:
            images, y = images[: max_images - n], y[: max_images - n]
        images = _resize(images, size)
        with feature_autocast(device, amp):
            f = batch_features(tokenizer, to_input(images, device), kinds)
        for k in kinds:
            feats[k].append(f[k].cpu())
        labels.append(torch.as_tensor(y))
        n += len(y)
        if max_images and n >= max_images:
            break
    out = {k: torch.cat(v) for k, v in feats.items()}
    out["labels"] = torch.cat(labels).long()
    return out


def feature_autocast(device, amp: bool):
    device = torch.device(device)
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def _resize(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """uint8 (B,3,H,W) -> (B,3,size,size), bilinear antialiased; unchanged if already that size or size None."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    return TF.resize(images, [size, size], antialias=True)


# ----------------------------------------------------------------------------------------------
# heads
# ----------------------------------------------------------------------------------------------


def make_head(dim: int, classes: int, seed: int = 0) -> nn.Module:
    """LayerNorm + Linear; its initialisation depends on the seed only, not on earlier draws."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, classes))


def cosine_schedule(opt, steps: int):
    steps = max(1, steps)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def linear_probe(xtr, ytr, xva, yva, epochs: int = 30, lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 256, seed: int = 0) -> float:
    """LayerNorm + Linear on frozen features; returns top-1 (%) on the val features."""
    g = torch.Generator().manual_seed(seed)
    classes = int(max(ytr.max(), yva.max())) + 1
    head = make_head(xtr.shape[1], classes, seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = cosine_schedule(opt, epochs * math.ceil(len(xtr) / batch_size))
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(head(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return float((head(xva).argmax(-1) == yva).float().mean() * 100)


@torch.no_grad()
def knn_classify(xtr, ytr, xva, yva, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Weighted kNN top-1 (%): cosine similarity, k neighbours, votes weighted by exp(sim / T)."""
    xtr, xva = F.normalize(xtr.float(), dim=1), F.normalize(xva.float(), dim=1)
    classes = int(max(ytr.max(), yva.max())) + 1
    k = min(k, len(xtr))
    correct = 0
    for i in range(0, len(xva), chunk):
        sim, idx = (xva[i : i + chunk] @ xtr.T).topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], classes).scatter_add_(1, ytr[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == yva[i : i + chunk]).sum().item()
    return 100.0 * correct / len(xva)



# ----------------------------------------------------------------------------------------------
# protocols
# ----------------------------------------------------------------------------------------------


def check_labels(labels: torch.Tensor, split: str) -> None:
    if len(labels) == 0:
        raise UserError(f"the {split} split gave no images")
    if int(labels.min()) < 0:
        raise UserError(f"the {split} split has unlabelled images (label -1): probes need class labels (class sub-folders, or .cls in shards)")


def probe_summary(protocol: str, train: str, val: str, **settings) -> str:
    return f"probe: protocol={protocol} n_train={train} n_eval={val} " + " ".join(f"{k}={v}" for k, v in settings.items())


def run_probes(tokenizer, data_cfg, kinds=("tokens", "cls"), epochs: int = 30, batch_size: int = 256, device="cpu",
               max_train: int | None = None, n_train: int = 0, n_eval: int = 0, lr: float = 1e-3,
               weight_decay: float = 1e-4, seed: int = 0, progress: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """The cached protocol: features once per split (no augmentation), linear probe and kNN on them.
    `max_train` is the old name of `n_train`; `log` receives a one-line summary before the work."""
    n_train = n_train or max_train or 0
    num_workers = int(data_cfg.get("num_workers", 0) or 0)
    train_loader = split_batches(data_cfg, "train", n_train, batch_size, seed, num_workers)
    val_loader = split_batches(data_cfg, "val", n_eval, batch_size, seed, num_workers)
    if log is not None:
        log(probe_summary("cached", describe_images(data_cfg, "train", n_train, train_loader.dataset),
                          describe_images(data_cfg, "val", n_eval, val_loader.dataset), features=",".join(kinds), epochs=epochs,
                          batch_size=batch_size, lr=f"{lr:g}", weight_decay=f"{weight_decay:g}", device=device))
    _check_memory(tokenizer, data_cfg, kinds, {"train": train_loader, "val": val_loader})
    tr = extract_features(tokenizer, train_loader, kinds, device, n_train or None, progress=progress, desc="train features")
    va = extract_features(tokenizer, val_loader, kinds, device, n_eval or None, progress=progress, desc="val features")
    check_labels(tr["labels"], "train")
    check_labels(va["labels"], "val")
    res = {}
    for k in kinds:
        res[f"linear_{k}"] = round(linear_probe(tr[k], tr["labels"], va[k], va["labels"], epochs=epochs, lr=lr,
                                                weight_decay=weight_decay, batch_size=batch_size, seed=seed), 2)
        res[f"knn_{k}"] = round(knn_classify(tr[k], tr["labels"], va[k], va["labels"]), 2)
    res["n_train"], res["n_val"] = len(tr["labels"]), len(va["labels"])
    return res


def _check_memory(tokenizer, data_cfg, kinds, loaders: dict) -> None:
    """Refuses, before extraction, features that would not fit in memory: every image's features are held (raw
    pixels: 3·R² floats an image, 786 KB at 256 px). Shards read whole have no count before reading: left out."""
    res, width = int(data_cfg.resolution), int(tokenizer.config.width) if tokenizer is not None else 0
    dim = sum(3 * res * res if k == "pixels" else width for k in kinds)
    counts = {}
    for split, loader in loaders.items():
        try:
            counts[split] = len(loader.dataset)
        except TypeError:
            counts[split] = None
    check_probe_memory(counts, {s: dim for s in counts}, "lower n_train / n_eval, or leave pixels out of features")


def cls_trained(tokenizer_dir: str) -> bool | None:
    """Whether a loss reached the CLS token when the tokenizer at `tokenizer_dir` was trained (its training.json,
    written at export); None when the folder does not say."""
    path = os.path.join(str(tokenizer_dir), "training.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("cls_trained")
