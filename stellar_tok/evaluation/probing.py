"""Semantic probes of frozen features: a linear probe (LayerNorm + Linear) and weighted kNN, and the two protocols.

    run_probes                  the cached protocol: features once per split, no augmentation, heads trained on them
    augmented_probe             the reference's: features recomputed at every step from random resized crops + flips
    linear_probe, knn_classify  top-1 (%) from given train and held-out features
    spread_subset               n indices drawn with a seed and spread over the classes in proportion to their sizes
                                (the subsets of the probes, of stellar_tok.evaluate and of the FID references)

The protocols in words, and the command that runs them: `python -m stellar_tok.probe --help`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from stellar_tok.data import FolderDataset, ImageSample, load_rgb
from stellar_tok.errors import UserError

PROTOCOLS = ("cached", "augmented")
FEATURE_KINDS = ("tokens", "cls", "lowrank", "pixels")
CROP_SCALE = (0.2, 1.0)  # RandomResizedCrop area range of the augmented protocol (the reference's)


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


def _to_input(images: torch.Tensor, device) -> torch.Tensor:
    """uint8 (B,3,H,W) -> float in [-1, 1] on `device`."""
    return images.to(device).float() / 127.5 - 1


@torch.no_grad()
def extract_features(tokenizer, loader, kinds=("tokens", "cls"), device="cpu", max_images: int | None = None,
                     size: int | None = None, amp: bool = False, progress: bool = False, desc: str = "features"):
    """-> dict kind -> (n, D) float tensor on the CPU, plus "labels" (n,). Images resized to `size` if given
    and different; at most `max_images` images (exactly that many when the loader has more)."""
    from tqdm.auto import tqdm

    feats = {k: [] for k in kinds}
    labels = []
    n = 0
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        images, y = batch[0], batch[1]
        if max_images and n + len(y) > max_images:
            images, y = images[: max_images - n], y[: max_images - n]
        images = _resize(images, size)
        with _autocast(device, amp):
            f = batch_features(tokenizer, _to_input(images, device), kinds)
        for k in kinds:
            feats[k].append(f[k].cpu())
        labels.append(torch.as_tensor(y))
        n += len(y)
        if max_images and n >= max_images:
            break
    out = {k: torch.cat(v) for k, v in feats.items()}
    out["labels"] = torch.cat(labels).long()
    return out


def _autocast(device, amp: bool):
    device = torch.device(device)
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def _resize(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """uint8 (B,3,H,W) -> (B,3,size,size), bilinear antialiased; unchanged if already that size or size None."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    from torchvision.transforms.v2 import functional as TF

    return TF.resize(images, [size, size], antialias=True)


# ----------------------------------------------------------------------------------------------
# heads
# ----------------------------------------------------------------------------------------------


def make_head(dim: int, classes: int, seed: int = 0) -> nn.Module:
    """LayerNorm + Linear; its initialisation depends on the seed only, not on earlier draws."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, classes))


def _cosine(opt, steps: int):
    steps = max(1, steps)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def linear_probe(xtr, ytr, xva, yva, epochs: int = 30, lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 256, seed: int = 0) -> float:
    """LayerNorm + Linear on frozen features; returns top-1 (%) on the val features."""
    g = torch.Generator().manual_seed(seed)
    classes = int(max(ytr.max(), yva.max())) + 1
    head = make_head(xtr.shape[1], classes, seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = _cosine(opt, epochs * math.ceil(len(xtr) / batch_size))
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
# subsets and loaders
# ----------------------------------------------------------------------------------------------


def spread_subset(labels, n: int, seed: int = 0) -> list[int]:
    """`n` indices into a listing with these `labels`, drawn with `seed` and spread over the classes in
    proportion to their sizes (each class gets n * its share, up to one image), in ascending order.
    All indices when n is 0 or not below the listing's length. Unlabelled items (-1) form one class."""
    labels = torch.from_numpy(np.array(labels, dtype=np.int64).reshape(-1))  # a copy: data sets keep read-only arrays
    total = len(labels)
    if not n or n >= total:
        return list(range(total))
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(total, generator=g)
    lab = labels[perm]
    order = torch.argsort(lab, stable=True)  # grouped by class, random order inside each class
    _, counts = torch.unique_consecutive(lab[order], return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    sizes = torch.repeat_interleave(counts, counts)
    rank = torch.arange(total) - starts  # position inside its class
    key = torch.empty(total)
    key[order] = (rank + torch.rand(total, generator=g)) / sizes  # class c fills [0, t) with about t * |c| items
    chosen = perm[torch.argsort(key)[:n]]
    return sorted(chosen.tolist())


def _dataset_labels(dataset):
    labels = getattr(dataset, "labels", None)
    if labels is None:
        raise TypeError(f"{type(dataset).__name__} has no labels attribute")
    return labels


def _is_stream(data_cfg) -> bool:
    return data_cfg.name == "wds"


def split_batches(data_cfg, split: str, n: int, batch_size: int, seed: int = 0, num_workers: int = 0, dataset=None):
    """A loader of `(images uint8 (B,3,R,R), labels)` over the `split`, each image once, in a fixed order, centre crops:
    `stellar_tok.evaluation.fid_reference.ReferenceImages`, the images `stellar_tok.evaluate` probes too. `n` images (0: all): a
    seeded subset spread over the classes, for wds shards as well (their labels are read first). Never the training
    stream: no random crops, and no shards resampled with replacement. `dataset`: the split's map-style data set if
    already built (shapes renders its images when built)."""
    from .fid_reference import ReferenceImages

    return ReferenceImages(data_cfg, split, n, seed, dataset=dataset).loader(batch_size, num_workers)


def _describe(data_cfg, split: str, n: int, dataset) -> str:
    """How many images of which split, in words, for the printed summary (`dataset`: what the loader reads)."""
    if _is_stream(data_cfg):
        return f"{n} (the {split} shards, seeded subset spread over the classes)" if n else f"all (the {split} shards)"
    inner = getattr(dataset, "dataset", None)
    if isinstance(dataset, (Subset, AugmentedImages)) and len(dataset) < len(inner):
        return f"{len(dataset)} of {len(inner)} ({split} split, seeded subset spread over the classes)"
    return f"{len(dataset)} ({split} split, all)"


def random_resized_crop_flip(size: int, scale=CROP_SCALE):
    """The augmented protocol's transform: PIL image or uint8 tensor (3,H,W) -> uint8 tensor (3,size,size)."""
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomResizedCrop((size, size), scale=tuple(scale), antialias=True),
                       v2.RandomHorizontalFlip(), v2.PILToTensor()])


class FullImageFolder(FolderDataset):
    """A copy of a `FolderDataset` whose items are `transform`ed from the decoded original image (large JPEGs
    decoded at a reduced scale only down to twice `size` on the shorter side, so that a crop of 20% of the
    area is still cut from at least `size` px). Bad files are skipped and counted as in FolderDataset."""

    def __init__(self, base: FolderDataset, transform, size: int):
        super().__init__(base.paths, base.labels, base.classes, size, random_crop=True, skips=base.skips)
        self.transform, self.decode_side = transform, 2 * int(size)

    def load(self, index: int) -> ImageSample:
        img = load_rgb(self.path(index), target=self.decode_side)
        return ImageSample(self.transform(img), int(self.labels[index]))


class AugmentedImages(Dataset):
    """Items `(image uint8 (3,S,S), label, index)`: a fresh random resized crop + flip of item `index` of a
    map-style data set at every access (`indices` picks a subset). Folder data is cropped from the
    decoded original image, other data sets from the image they give (already at data.resolution)."""

    def __init__(self, dataset, size: int, indices: Sequence[int] | None = None, scale=CROP_SCALE):
        self.transform = random_resized_crop_flip(size, scale)
        self.cropped_on_load = isinstance(dataset, FolderDataset)
        self.dataset = FullImageFolder(dataset, self.transform, size) if self.cropped_on_load else dataset
        self.indices = list(range(len(dataset))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        j = self.indices[i]
        image, label = self.dataset[j]
        return (image if self.cropped_on_load else self.transform(image)), int(label), j


def _collate_indexed(batch):
    return (torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch], dtype=torch.int64),
            torch.tensor([b[2] for b in batch], dtype=torch.int64))


@dataclass
class AugmentedBatches:
    """One epoch of augmented train batches per `epoch()` call; see `augmented_train_batches`."""

    epoch: Callable[[], Iterator]
    n_images: int  # per epoch
    batches: int  # per epoch (wds: an upper bound)
    classes: int  # labels are below this, as far as the data set says (0: unknown)
    description: str


def augmented_train_batches(data_cfg, size: int, n: int, batch_size: int, seed: int = 0, num_workers: int = 0,
                            pin_memory: bool = False, dataset=None) -> AugmentedBatches:
    """`epoch()` iterates one epoch of `(images uint8 (B,3,size,size), labels, indices)`, every image a fresh
    random resized crop + flip (indices into the train split; -1 for wds). Map-style data: the whole split
    or a seeded subset spread over the classes, reshuffled every epoch (seeded); wds: `n` (or
    data.epoch_size) images of the train stream per epoch, cropped in this process. `dataset`: the train
    split's map-style data set if already built."""
    from stellar_tok.data import build_dataset, build_loader

    if _is_stream(data_cfg):
        loader = build_loader(data_cfg, batch_size, "train", num_workers=num_workers, drop_last=False)
        transform = random_resized_crop_flip(size)
        per_epoch = min(n, len(loader.dataset)) if n else len(loader.dataset)

        def stream_epoch() -> Iterator:
            seen = 0
            for images, labels in loader:
                if seen + len(labels) > per_epoch:
                    images, labels = images[: per_epoch - seen], labels[: per_epoch - seen]
                yield torch.stack([transform(im) for im in images]), labels, torch.full((len(labels),), -1)
                seen += len(labels)
                if seen >= per_epoch:
                    return

        return AugmentedBatches(stream_epoch, per_epoch, math.ceil(per_epoch / batch_size), len(getattr(loader.dataset, "classes", []) or []),
                                f"{per_epoch} per epoch (the train stream)")
    dataset = build_dataset(data_cfg, "train") if dataset is None else dataset
    labels = _dataset_labels(dataset)
    indices = spread_subset(labels, n, seed) if n and n < len(dataset) else None
    images = AugmentedImages(dataset, size, indices)
    loader = DataLoader(images, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(int(seed)),
                        num_workers=num_workers, persistent_workers=num_workers > 0, collate_fn=_collate_indexed,
                        pin_memory=pin_memory, drop_last=False)
    classes = max(len(getattr(dataset, "classes", []) or []), int(max(labels)) + 1 if len(labels) else 0)
    return AugmentedBatches(lambda: iter(loader), len(images), len(loader), classes, _describe(data_cfg, "train", n, images))


# ----------------------------------------------------------------------------------------------
# protocols
# ----------------------------------------------------------------------------------------------


def _check_labels(labels: torch.Tensor, split: str) -> None:
    if len(labels) == 0:
        raise UserError(f"the {split} split gave no images")
    if int(labels.min()) < 0:
        raise UserError(f"the {split} split has unlabelled images (label -1): probes need class labels (class sub-folders, or .cls in shards)")


def _summary(protocol: str, train: str, val: str, **settings) -> str:
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
        log(_summary("cached", _describe(data_cfg, "train", n_train, train_loader.dataset), _describe(data_cfg, "val", n_eval, val_loader.dataset),
                     features=",".join(kinds), epochs=epochs, batch_size=batch_size, lr=f"{lr:g}", weight_decay=f"{weight_decay:g}", device=device))
    tr = extract_features(tokenizer, train_loader, kinds, device, n_train or None, progress=progress, desc="train features")
    va = extract_features(tokenizer, val_loader, kinds, device, n_eval or None, progress=progress, desc="val features")
    _check_labels(tr["labels"], "train")
    _check_labels(va["labels"], "val")
    res = {}
    for k in kinds:
        res[f"linear_{k}"] = round(linear_probe(tr[k], tr["labels"], va[k], va["labels"], epochs=epochs, lr=lr,
                                                weight_decay=weight_decay, batch_size=batch_size, seed=seed), 2)
        res[f"knn_{k}"] = round(knn_classify(tr[k], tr["labels"], va[k], va["labels"]), 2)
    res["n_train"], res["n_val"] = len(tr["labels"]), len(va["labels"])
    return res


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
    from tqdm.auto import tqdm

    from stellar_tok.data import build_dataset

    device = torch.device(device)
    size = int(tokenizer.config.image_size) if tokenizer is not None else int(data_cfg.resolution)
    num_workers = int(data_cfg.get("num_workers", 0) or 0)
    train_set = None if _is_stream(data_cfg) else build_dataset(data_cfg, "train")
    res: dict = {}
    with torch.random.fork_rng(devices=[]):  # crops in the main process draw from torch's RNG: seeded, and the caller's left alone
        torch.manual_seed(seed)
        train = augmented_train_batches(data_cfg, size, n_train, batch_size, seed, num_workers, pin_memory=device.type == "cuda", dataset=train_set)
        val_loader = split_batches(data_cfg, "val", n_eval, batch_size, seed, num_workers)
        if log is not None:
            log(_summary("augmented", train.description, _describe(data_cfg, "val", n_eval, val_loader.dataset), features=",".join(kinds),
                         epochs=epochs, batch_size=batch_size, lr=f"{lr:g}", weight_decay=f"{weight_decay:g}", schedule="cosine",
                         crops=f"{size}px,scale={CROP_SCALE[0]:g}-{CROP_SCALE[1]:g},flip", device=device))
        va = extract_features(tokenizer, val_loader, kinds, device, n_eval or None, size=size, amp=amp, progress=progress, desc="val features")
        _check_labels(va["labels"], "val")
        classes = max(train.classes, int(va["labels"].max()) + 1)
        heads = nn.ModuleDict({k: make_head(va[k].shape[1], classes, seed) for k in kinds}).to(device)
        opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=weight_decay)  # per-parameter: the same as one optimiser per head
        steps = epochs * train.batches
        sched = _cosine(opt, steps)
        bar = tqdm(total=steps, desc="augmented probe", unit="step", disable=not progress, dynamic_ncols=True)
        seen = 0
        for epoch in range(epochs):
            seen = 0
            for images, labels, indices in train.epoch():
                _check_labels(labels, "train")
                if int(labels.max()) >= classes:
                    raise UserError(f"train label {int(labels.max())} but only {classes} classes known from the val split; "
                                    "give wds shards a classes.json (make_shards writes one)")
                with torch.no_grad(), _autocast(device, amp):
                    f = batch_features(tokenizer, _to_input(images, device), kinds)
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


def cls_trained(tokenizer_dir: str) -> bool | None:
    """Whether a loss reached the CLS token when the tokenizer at `tokenizer_dir` was trained (its training.json,
    written at export); None when the folder does not say."""
    path = os.path.join(str(tokenizer_dir), "training.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("cls_trained")

