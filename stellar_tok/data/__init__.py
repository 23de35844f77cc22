"""Data sets and loaders for tokenizer training and evaluation.

`build_dataset(data_cfg, split)` returns a data set whose items are ``(image, label)`` tuples
(`ImageSample`): ``image`` a uint8 tensor ``(3, R, R)`` with ``R = data_cfg.resolution``, ``label`` an int
(-1 for unlabelled data). `build_loader` wraps it in a `DataLoader` that yields ``(images, labels)``:
uint8 ``(B, 3, R, R)`` and int64 ``(B,)``. ``data_cfg`` is a `stellar_tok.config.DataConfig`, a DictConfig, a
dict or an object with its attributes, read once into a DataConfig (`as_data_config`, in ``settings.py``).
Four sources (``data_cfg.name``):

``shapes``
    The procedural 8-class set of `stellar_tok.data.shapes` (no download). ``train_size`` / ``val_size``
    images; the val split is rendered from a seed disjoint from the train seed (``embedded.py``).
``digits``
    scikit-learn's bundled ``load_digits`` (1,797 8 x 8 grey digits, 10 classes): a fixed permutation,
    the first 1,500 for train and the other 297 for val, scaled to 0..255, bilinearly upsampled to ``R``,
    replicated to 3 channels (``embedded.py``).
``folder``
    A folder of images, with class sub-folders (sorted names -> labels 0..C-1, like torchvision's
    ``ImageFolder``) or flat (label -1). If ``path/train`` and ``path/val`` both exist they are the two
    splits, otherwise the whole folder serves both. Images are converted to RGB, resized so the shorter
    side is ``R`` and cropped to ``R x R``: randomly for train, centrally for val (``folder.py``).
``wds``
    WebDataset tar shards (``<key>.jpg|jpeg|png|webp|...`` plus optional ``<key>.cls``), as written by
    ``python -m stellar_tok.make_shards`` (``shard_writer.py``). ``path`` is a brace pattern
    (``/data/train-{000000..000099}.tar``, ``{split}`` is replaced by the split name), a list of shards, or a directory holding
    ``train-*.tar`` / ``val-*.tar`` (or only other ``*.tar``, used for both splits). Train streams forever
    from `webdataset.ResampledShards` through a shuffle buffer, cut into epochs of
    ``data_cfg.epoch_size // world_size`` samples per process; val reads every shard once, split by node
    and worker (``shards.py``).

For folder and wds data, ``val_path`` (optional) names the held-out ("val") split itself: a folder, or shards
given like ``path`` (a pattern, a list, or a directory whose ``val-*.tar`` are used); unset, the split logic
above applies, and `heldout_is_train` says whether it fell back to training images.

Bad samples (undecodable bytes, images smaller than 8 px on a side, samples without an image, unreadable
shards) are skipped and counted by reason, never fatal. The counts live in shared memory, so samples
skipped inside DataLoader worker processes are counted too; `skipped_samples()` returns them (``skips.py``).
Decoding and cropping are in ``images.py``.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.utils.data import DataLoader

from .crops import ViewCropper
from .embedded import DIGITS_TRAIN_SIZE, ArrayDataset, digits_dataset, shapes_dataset
from .folder import FolderDataset, find_images, folder_dataset, folder_heldout_is_train
from .images import (
    IMAGE_EXTENSIONS,
    MIN_IMAGE_SIDE,
    ImageSample,
    collate_samples,
    is_image_file,
    load_rgb,
    resize_and_crop,
)
from .settings import DATA_NAMES, SPLITS, DataError, as_data_config, check_name_split, positive_int
from .shards import (
    WDS_IMAGE_KEYS,
    ShardPipeline,
    decode_shard_samples,
    decode_wds_sample,
    shard_pipeline,
    shards_heldout_is_train,
    tar_samples,
    wds_shards,
)
from .stop_signals import STOP_SIGNALS, IgnoreStopSignals, StopSignals, worker_options
from .skips import (
    SKIP_REASONS,
    BadSample,
    SkipCounter,
    reset_skipped_samples,
    skip_counter,
    skipped_samples,
    skipped_summary,
)

__all__ = [
    "DATA_NAMES",
    "DIGITS_TRAIN_SIZE",
    "IMAGE_EXTENSIONS",
    "MIN_IMAGE_SIDE",
    "SKIP_REASONS",
    "SPLITS",
    "STOP_SIGNALS",
    "WDS_IMAGE_KEYS",
    "ArrayDataset",
    "BadSample",
    "DataError",
    "FolderDataset",
    "IgnoreStopSignals",
    "ImageSample",
    "ShardPipeline",
    "SkipCounter",
    "StopSignals",
    "as_data_config",
    "build_dataset",
    "build_loader",
    "collate_samples",
    "decode_shard_samples",
    "decode_wds_sample",
    "find_images",
    "heldout_is_train",
    "is_image_file",
    "load_rgb",
    "reset_skipped_samples",
    "resize_and_crop",
    "skip_counter",
    "skipped_samples",
    "skipped_summary",
    "tar_samples",
    "wds_shards",
    "worker_options",
]


def heldout_is_train(data_cfg: Any) -> bool:
    """True when the held-out ("val") split of folder or wds data resolves to training images: shards shared with
    the train split (a pattern without ``{split}``, a directory without val-*.tar), or the same folder (no
    ``path/val``); ``data.val_path`` names a held-out split of its own. False for shapes and digits."""
    data = as_data_config(data_cfg)
    if data.name == "wds":
        return shards_heldout_is_train(data)
    if data.name == "folder":
        return folder_heldout_is_train(data)
    return False


def build_dataset(data_cfg: Any, split: str = "train"):
    """Build the ``split`` ("train" or "val") of the data set described by ``data_cfg``.

    ``data_cfg`` (a DataConfig, an OmegaConf DictConfig, a dict or any object with DataConfig's attributes) has
    keys ``name`` (shapes | digits | folder | wds), ``resolution``, ``path`` (folder, wds), ``val_path``,
    ``train_size`` / ``val_size`` (shapes), ``seed``, and for wds ``epoch_size``; keys it does not give take
    DataConfig's defaults. Returns a map-style `Dataset` for shapes, digits and folder, an `IterableDataset`
    (webdataset pipeline) for wds; items are `ImageSample` ``(image, label)`` tuples. Raises `DataError` (a
    `ValueError`) with one line naming the problem for a bad configuration.
    """
    data = as_data_config(data_cfg)
    name, resolution = check_name_split(data, split)
    if name == "shapes":
        return shapes_dataset(data, resolution, split)
    if name == "digits":
        return digits_dataset(resolution, split)
    if name == "folder":
        return folder_dataset(data, resolution, split)
    return shard_pipeline(data, resolution, split)


def build_loader(data_cfg: Any, batch_size: int, split: str = "train", num_workers: int = 0,
                 shuffle: bool | None = None, drop_last: bool | None = None, seed: int = 0, views: Any = None) -> DataLoader:
    """A DataLoader over `build_dataset` yielding ``(images uint8 (B,3,R,R), labels int64 (B,))``.

    ``views`` (a views config) for the train split of file-backed data (folder, wds): the loader cuts the
    training views from each decoded original (`stellar_tok.data.crops.ViewCropper`) and yields
    ``({"main": (B,3,G,G), "global": (B,M-1,3,G,G), "local": (B,n,3,l,l)} uint8, labels)``; ``data.resolution``
    is then not used. In-memory data sets (shapes, digits) are their own originals and yield images as
    without ``views``: their views are cut from the batch on the device.

    ``shuffle`` and ``drop_last`` default to True for train and False for val. Map-style data sets are
    shuffled by a generator seeded with ``seed`` (reproducible order and worker seeds). For wds,
    ``shuffle`` switches the shuffle buffer, the shards are split by webdataset itself, and an epoch of
    the train loader is about ``epoch_size // world_size`` samples per process whatever ``num_workers``
    (each worker streams its share); its length is ``len(loader)`` batches. Train streaming order is not
    reproducible (webdataset reseeds from the clock). The loader's workers ignore SIGTERM/SIGINT from their
    start (`stop_signals.py`): a stop signal sent to the whole process group leaves them to the main process.
    """
    data = as_data_config(data_cfg)
    name, resolution = check_name_split(data, split)
    batch_size = positive_int(batch_size, "batch_size")
    train = split == "train"
    shuffle = train if shuffle is None else bool(shuffle)
    drop_last = train if drop_last is None else bool(drop_last)
    num_workers = max(0, int(num_workers))
    common = dict(batch_size=batch_size, num_workers=num_workers, collate_fn=collate_samples,
                  drop_last=drop_last, persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
                  **worker_options(num_workers))  # a stop signal to the process group: the main process decides
    cropper = None
    if views is not None and train and name in ("folder", "wds"):
        cropper = ViewCropper(views, seed=seed)  # each sample's views: seeded by (seed, epoch, sample)
    if name == "wds":
        dataset = shard_pipeline(data, resolution, split, shuffle=shuffle, num_workers=num_workers, cropper=cropper)
        return DataLoader(dataset, **common)
    dataset = build_dataset(data, split)
    if cropper is not None:
        dataset.cropper = cropper
    if drop_last and len(dataset) < batch_size:
        warnings.warn(f"the {split} split has {len(dataset)} images, fewer than batch_size={batch_size}: with drop_last the loader is empty")
    generator = torch.Generator().manual_seed(int(seed))
    return DataLoader(dataset, shuffle=shuffle, generator=generator, **common)
