"""The augmented linear-probe protocol (the reference's): a LayerNorm + Linear head per feature kind, trained on the
frozen tokenizer with features recomputed at every step from random resized crops + flips (scale 0.2-1) at the
tokenizer's image size, cosine LR without warm-up; top-1 on the held-out split as loaded (centre crops). kNN on
un-augmented features of as many train images.

Its images: `stellar_tok.evaluation.probe_images`; the features, heads and the cached protocol:
`stellar_tok.evaluation.probing`. The protocol in words, and the command that runs it: `python -m stellar_tok.probe --help`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from stellar_tok.data import build_dataset
from stellar_tok.errors import UserError

from .probe_images import (
    CROP_SCALE,
    AugmentedBatches,
    augmented_train_batches,
    describe_images,
    is_stream,
    split_batches,
)
from .probing import (
    batch_features,
    check_labels,
    cosine_schedule,
    extract_features,
    feature_autocast,
    knn_classify,
    make_head,
    probe_summary,
    to_input,
)


def augmented_probe(tokenizer, data_cfg, kinds=("tokens",), epochs: int = 30, batch_size: int = 256, lr: float = 1e-3,
                    weight_decay: float = 1e-4, n_train: int = 0, n_eval: int = 0, seed: int = 0, device="cpu",
                    knn: bool = True, amp: bool = True, progress: bool = False,
                    on_batch: Callable | None = None, log: Callable[[str], None] | None = None) -> dict:
    """The reference's linear-probe protocol (see the module docstring): a LayerNorm + Linear head per
    feature kind, trained on the frozen `tokenizer` with features recomputed every step from random resized
    crops + flips at the tokenizer's image size; top-1 on the held-out split as loaded (centre crops).
    `on_batch(epoch, features, labels, indices)` is called after every training step (features: dict kind ->
    (B, D), what the heads saw; indices into the train split, -1 for wds), for tests and diagnostics.
    `log` receives a one-line summary before the work."""
    device = torch.device(device)
    size = int(tokenizer.config.image_size) if tokenizer is not None else int(data_cfg.resolution)
    num_workers = int(data_cfg.get("num_workers", 0) or 0)
    train_set = None if is_stream(data_cfg) else build_dataset(data_cfg, "train")
    res: dict = {}
    with torch.random.fork_rng(devices=[]):  # crops in the main process draw from torch's RNG: seeded, and the caller's left alone
        torch.manual_seed(seed)
        train = augmented_train_batches(data_cfg, size, n_train, batch_size, seed, num_workers, pin_memory=device.type == "cuda", dataset=train_set)
        val_loader = split_batches(data_cfg, "val", n_eval, batch_size, seed, num_workers)
        if log is not None:
            log(probe_summary("augmented", train.description, describe_images(data_cfg, "val", n_eval, val_loader.dataset), features=",".join(kinds),
                              epochs=epochs, batch_size=batch_size, lr=f"{lr:g}", weight_decay=f"{weight_decay:g}", schedule="cosine",
                              crops=f"{size}px,scale={CROP_SCALE[0]:g}-{CROP_SCALE[1]:g},flip", device=device))
        va = extract_features(tokenizer, val_loader, kinds, device, n_eval or None, size=size, amp=amp, progress=progress, desc="val features")
        check_labels(va["labels"], "val")
        classes = max(train.classes, int(va["labels"].max()) + 1)
        heads = nn.ModuleDict({k: make_head(va[k].shape[1], classes, seed) for k in kinds}).to(device)
        seen = _train_heads(heads, tokenizer, train, kinds, classes, epochs, lr, weight_decay, device, amp, progress, on_batch)
        heads.eval()
        with torch.no_grad():
            for k in kinds:
                pred = torch.cat([heads[k](va[k][i : i + 4096].to(device)).argmax(-1).cpu() for i in range(0, len(va[k]), 4096)])
                res[f"linear_{k}"] = round(float((pred == va["labels"]).float().mean() * 100), 2)
        if knn:  # un-augmented features of as many train images (map-style: the same subset; wds: spread over the classes)
            tr = extract_features(tokenizer, split_batches(data_cfg, "train", n_train or train.n_images, batch_size, seed, num_workers, dataset=train_set),
                                  kinds, device, size=size, amp=amp, progress=progress, desc="kNN train features")
            for k in kinds:
                res[f"knn_{k}"] = round(knn_classify(tr[k], tr["labels"], va[k], va["labels"]), 2)
    res["n_train"], res["n_val"] = seen or train.n_images, len(va["labels"])
    return res


def _train_heads(heads: nn.ModuleDict, tokenizer, train: AugmentedBatches, kinds, classes: int, epochs: int, lr: float,
                 weight_decay: float, device: torch.device, amp: bool, progress: bool, on_batch: Callable | None) -> int:
    """`epochs` epochs of AdamW steps (cosine LR over all steps) on features of augmented batches; returns the
    images seen in the last epoch."""
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=weight_decay)  # per-parameter: the same as one optimiser per head
    steps = epochs * train.batches
    sched = cosine_schedule(opt, steps)
    bar = tqdm(total=steps, desc="augmented probe", unit="step", disable=not progress, dynamic_ncols=True)
    seen = 0
    for epoch in range(epochs):
        seen = 0
        for images, labels, indices in train.epoch():
            check_labels(labels, "train")
            if int(labels.max()) >= classes:
                raise UserError(f"train label {int(labels.max())} but only {classes} classes known from the val split; "
                                "give wds shards a classes.json (make_shards writes one)")
            with torch.no_grad(), feature_autocast(device, amp):
                f = batch_features(tokenizer, to_input(images, device), kinds)
            y = labels.to(device)
            loss = sum(F.cross_entropy(heads[k](f[k]), y) for k in kinds)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(labels)
            if on_batch is not None:
                on_batch(epoch, {k: v.detach() for k, v in f.items()}, labels, indices)
            bar.update(1)
            if bar.n % 10 == 1 or bar.n == steps:
                bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{loss.item() / len(kinds):.3f}")
    bar.close()
    return seen
