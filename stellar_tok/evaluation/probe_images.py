"""The images the probes read: held-out style loaders (centre crops, each image once) and the augmented protocol's
train batches (a fresh random resized crop + flip of every image at every access).

    split_batches            a split, or a seeded subset spread over the classes, as `ReferenceImages` reads it
    augmented_train_batches  one epoch of augmented train batches per call, with the indices of their images
    describe_images          how many images of which split, in words, for the printed summary

The probes themselves: `stellar_tok.evaluation.probing` (cached protocol) and `stellar_tok.evaluation.augmented_probe`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from stellar_tok.data import FolderDataset, ImageSample, build_dataset, build_loader, load_rgb
from stellar_tok.data.reference import ReferenceImages, spread_subset

CROP_SCALE = (0.2, 1.0)  # RandomResizedCrop area range of the augmented protocol (the reference's)


def _dataset_labels(dataset):
    labels = getattr(dataset, "labels", None)
    if labels is None:
        raise TypeError(f"{type(dataset).__name__} has no labels attribute")
    return labels


def is_stream(data_cfg) -> bool:
    return data_cfg.name == "wds"


def split_batches(data_cfg, split: str, n: int, batch_size: int, seed: int = 0, num_workers: int = 0, dataset=None):
    """A loader of `(images uint8 (B,3,R,R), labels)` over the `split`, each image once, in a fixed order, centre crops:
    `stellar_tok.data.reference.ReferenceImages`, the images `stellar_tok.evaluate` probes too. `n` images (0: all): a
    seeded subset spread over the classes, for wds shards as well (their labels are read first). Never the training
    stream: no random crops, and no shards resampled with replacement. `dataset`: the split's map-style data set if
    already built (shapes renders its images when built)."""
    return ReferenceImages(data_cfg, split, n, seed, dataset=dataset).loader(batch_size, num_workers)


def describe_images(data_cfg, split: str, n: int, dataset) -> str:
    """How many images of which split, in words, for the printed summary (`dataset`: what the loader reads)."""
    if is_stream(data_cfg):
        return f"{n} (the {split} shards, seeded subset spread over the classes)" if n else f"all (the {split} shards)"
    inner = getattr(dataset, "dataset", None)
    if isinstance(dataset, (Subset, AugmentedImages)) and len(dataset) < len(inner):
        return f"{len(dataset)} of {len(inner)} ({split} split, seeded subset spread over the classes)"
    return f"{len(dataset)} ({split} split, all)"


def random_resized_crop_flip(size: int, scale=CROP_SCALE):
    """The augmented protocol's transform: PIL image or uint8 tensor (3,H,W) -> uint8 tensor (3,size,size)."""
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
    if is_stream(data_cfg):
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
    return AugmentedBatches(lambda: iter(loader), len(images), len(loader), classes, describe_images(data_cfg, "train", n, images))
