"""WebDataset tar shards as a streaming data set: finding the shards, reading them, decoding their samples.

A shard holds ``<key>.jpg|jpeg|png|webp|...`` images with an optional ``<key>.cls`` label, as written by
``python -m stellar_tok.make_shards``; ``data.path`` (and ``data.val_path``) name them as a brace pattern
(``{split}`` replaced by the split name), a list, or a directory of ``train-*.tar`` / ``val-*.tar`` (or only
other ``*.tar``, for both splits); `wds_shards` resolves them. `shard_pipeline` reads them with webdataset's
own tar reader (`webdataset.tarfile_samples`, one shard at a time, closed once read): train resamples shards
forever (`webdataset.ResampledShards`) through a shuffle buffer and is cut into epochs of ``data.epoch_size //
world_size`` samples per process; val reads every shard once, split by node and worker. Decoding is ours
(`decode_wds_sample`, with `load_rgb`), not webdataset's, so every bad sample is skipped and counted under
its own reason, and an unreadable shard (or the rest of it) under ``bad_shard``, with a warning naming it.
"""
from __future__ import annotations

import functools
import glob
import json
import os
import warnings
from typing import Any, Iterable, Iterator, Sequence

import torch
import webdataset as wds

from stellar_tok.config import DataConfig

from .images import IMAGE_EXTENSIONS, ImageSample, load_rgb, resize_and_crop
from .settings import SPLITS, DataError, as_data_config, held_out_path, positive_int, require_path
from .skips import BadSample, SkipCounter, skip_counter

WDS_IMAGE_KEYS = tuple(ext[1:] for ext in IMAGE_EXTENSIONS)  # member suffixes accepted as the image
SHUFFLE_BUFFER = 1000  # samples in the train shuffle buffer
SHARD_PATH_HINT = "a shard pattern like /data/train-{000000..000099}.tar, a list of .tar files or a directory of shards"


class ShardPipeline(wds.DataPipeline):
    """A webdataset `DataPipeline` with the class names of its shards and, for train, a length.

    ``len()`` is the number of samples one epoch yields in this process (all workers together); it is
    only defined for the train pipeline, whose epochs are cut by ``with_epoch``.
    """

    size: int | None = None
    classes: list[str] = []
    cropper = None  # the train views' `stellar_tok.data.crops.ViewCropper`, if the loader cuts them

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose views the cropper draws (a sample's views are seeded by run seed, epoch, shard and key)."""
        if self.cropper is not None:
            self.cropper.set_epoch(epoch)

    def __len__(self) -> int:
        if self.size is None:
            raise TypeError("this shard pipeline has no length: it reads its shards to the end")
        return self.size


def read_error_message(exn: Exception) -> str:
    """The message of a read error: an OSError's strerror, else its first argument (webdataset appends the
    stream and URL to the arguments after it)."""
    if isinstance(exn, OSError) and exn.strerror:
        return exn.strerror
    return str(exn.args[0]) if exn.args else ""


class _ShardErrorHandler:
    """webdataset exception handler: skip a shard (or the rest of it) that cannot be read, with a warning; counted
    once per read of the shard (webdataset reports a tar cut inside a member twice: at the member, then at the
    next header)."""

    def __init__(self, skips: SkipCounter):
        self.skips = skips
        self.url: str | None = None  # the shard being read, set by tar_samples
        self.failed = False  # this read of the shard has been counted

    def __call__(self, exn: Exception) -> bool:
        if self.url is not None and self.failed:
            return True
        self.failed = self.url is not None
        # a shard that cannot be opened: webdataset appends its URL to exn.args
        where = self.url or next((a for a in reversed(exn.args) if isinstance(a, str)), "?")
        self.skips.add("bad_shard", warn=False)
        warnings.warn(f"skipping unreadable shard {where} (or the rest of it): {type(exn).__name__}: {read_error_message(exn)}")
        return True


def tar_samples(shards: Iterable[dict], skips: SkipCounter | None = None) -> Iterator[dict]:
    """Pipeline stage: raw webdataset samples of `shards` (``{"url": ...}`` dicts), each shard read once, in order; a
    shard that cannot be read (or the rest of it) is skipped with a warning and counted as ``bad_shard``."""
    handler = _ShardErrorHandler(skips if skips is not None else skip_counter())
    for shard in shards:
        source = dict(shard)  # webdataset's opener adds the open "stream" to it: closed here once the shard is read
        handler.url, handler.failed = source.get("url"), False
        try:
            yield from wds.tarfile_samples([source], handler=handler)
        finally:
            handler.url = None
            stream = source.get("stream")
            if stream is not None:
                stream.close()


def decode_wds_sample(sample: dict, make_image, skips: SkipCounter, where: str) -> tuple[Any, int] | None:
    """One raw webdataset sample -> ``(make_image(image bytes), label)`` (label -1 without a ``.cls``), or None once
    the reason it is bad (no image member, a label that is not an integer, undecodable bytes) has been counted."""
    data = next((sample[k] for k in WDS_IMAGE_KEYS if k in sample), None)
    if data is None:
        skips.add("missing_image", f"{where} has members {sorted(k for k in sample if not k.startswith('__'))}")
        return None
    label = -1
    if "cls" in sample:
        try:
            label = int(bytes(sample["cls"]).decode("utf-8").strip())
        except (ValueError, UnicodeDecodeError):
            skips.add("bad_label", f"{where}: .cls is not an integer")
            return None
    try:
        return make_image(bytes(data)), label
    except BadSample as bad:
        skips.add(bad.reason, f"{where}: {bad}")
        return None


def decode_shard_samples(samples: Iterable[dict], resolution: int, random_crop: bool, skips: SkipCounter,
                         with_keys: bool = False, cropper=None) -> Iterator[ImageSample]:
    """Pipeline stage: raw webdataset samples -> `ImageSample`s (or ``(ImageSample, __key__)`` pairs when
    ``with_keys``), skipping and counting bad ones; with a `stellar_tok.data.crops.ViewCropper`, the image of each
    sample is its training views, seeded by the run's seed, the epoch and the sample's shard file name and key."""
    make = cropper or (lambda data: resize_and_crop(load_rgb(data, target=resolution), resolution, random_crop))
    for sample in samples:
        url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
        if cropper is not None:
            make = functools.partial(cropper, sample=f"{os.path.basename(str(url))}:{key}")
        decoded = decode_wds_sample(sample, make, skips, f"{url}:{key}")
        if decoded is not None:
            item = ImageSample(*decoded)
            yield (item, str(sample.get("__key__", "?"))) if with_keys else item


def _shard_urls(path: Any, split: str, key: str = "data.path") -> list[str]:
    """Expand ``data.path`` (or ``key``, named in errors) for wds into a list of shard URLs (see the module docstring)."""
    if isinstance(path, (list, tuple)) or (not isinstance(path, (str, os.PathLike)) and hasattr(path, "__iter__")):
        urls = [os.path.expanduser(str(p)) for p in path]
    else:
        spec = os.path.expanduser(str(path)).replace("{split}", split)
        if os.path.isdir(spec):
            split_shards = {s: sorted(glob.glob(os.path.join(glob.escape(spec), f"{s}-*.tar"))) for s in SPLITS}
            if any(split_shards.values()):
                urls = split_shards[split]
                if not urls:
                    raise DataError(f"{key} {spec!r} holds {SPLITS[1 - SPLITS.index(split)]}-*.tar shards but no {split}-*.tar")
            else:
                urls = sorted(glob.glob(os.path.join(glob.escape(spec), "*.tar")))
                if not urls:
                    raise DataError(f"{key} {spec!r} is a directory without .tar shards")
        else:
            urls = list(wds.shardlists.expand_urls(spec))
    if not urls:
        raise DataError(f"{key} {path!r} names no shards (data.name='wds')")
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    if local and len(local) == len(urls) and not any(os.path.exists(u) for u in local):
        raise DataError(f"none of the {len(urls)} shards of {key} {path!r} exists (first: {urls[0]!r})")
    return urls


def _split_urls(data: DataConfig, split: str) -> list[str]:
    """The shard URLs of ``split``: ``data.val_path`` for val when set, else ``data.path`` for the split."""
    path = require_path(data, SHARD_PATH_HINT)
    val_path = held_out_path(data, split)
    return _shard_urls(path, split) if val_path is None else _shard_urls(val_path, split, key="data.val_path")


def _shard_classes(urls: Sequence[str]) -> list[str]:
    """Class names from a ``classes.json`` beside local shards (written by make_shards), else []."""
    folder = os.path.dirname(urls[0]) if urls else ""
    candidate = os.path.join(folder, "classes.json")
    if "://" in candidate or not os.path.isfile(candidate):
        return []
    try:
        with open(candidate) as f:
            classes = json.load(f)
        return [str(c) for c in classes] if isinstance(classes, list) else []
    except (OSError, ValueError):
        return []


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def wds_shards(data_cfg: Any, split: str = "train") -> tuple[list[str], list[str]]:
    """The shard URLs the ``split`` of wds data reads (``data.val_path`` for val when set, as `build_dataset`)
    and their class names (``classes.json`` beside local shards, else []). ``data_cfg``: as `as_data_config`."""
    urls = _split_urls(as_data_config(data_cfg), split)
    return urls, _shard_classes(urls)


def shards_heldout_is_train(data: DataConfig) -> bool:
    """Whether the val split of wds data shares shards with the train split (a pattern without ``{split}``, a
    directory without val-*.tar, and no ``data.val_path``)."""
    return bool(set(_split_urls(data, "train")) & set(_split_urls(data, "val")))


def shard_pipeline(data: DataConfig, resolution: int, split: str, shuffle: bool | None = None, num_workers: int = 0,
                   cropper=None, shuffle_buffer: int = SHUFFLE_BUFFER) -> ShardPipeline:
    """The webdataset pipeline of ``split`` (see the module docstring); ``shuffle`` (default: train) switches the
    shuffle buffer, and ``num_workers`` only sets how the train epoch is divided between DataLoader workers."""
    urls = _split_urls(data, split)
    skips = skip_counter()
    train = split == "train"
    shuffle = train if shuffle is None else shuffle
    if train:
        source = [wds.ResampledShards(urls, seed=int(data.seed))]
    else:
        if len(urls) < _world_size():
            warnings.warn(f"only {len(urls)} val shards for {_world_size()} processes: some processes get no val data")
        source = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker]
    stages = [*source, functools.partial(tar_samples, skips=skips)]
    if shuffle:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100)))
    stages.append(functools.partial(decode_shard_samples, resolution=resolution, random_crop=train, skips=skips, cropper=cropper))
    pipeline = ShardPipeline(*stages)
    pipeline.classes = _shard_classes(urls)
    pipeline.cropper = cropper
    if train:
        # with_epoch counts per worker: give each worker its share of the process's epoch
        per_process = max(1, positive_int(data.epoch_size, "data.epoch_size") // _world_size())
        per_worker = max(1, per_process // max(1, num_workers))
        pipeline.with_epoch(per_worker)
        pipeline.size = per_worker * max(1, num_workers)
    return pipeline
