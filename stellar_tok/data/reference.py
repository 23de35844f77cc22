"""The fixed images every evaluation reads: which held-out (or train) images, in which order, cropped how.

    ReferenceImages  every image of a split once, or n of them drawn with a seed and spread over the classes;
                     centre crops at data.resolution; WebDataset shards read once each, in order
    image_batches    those images in batches: uint8 (B,3,R,R) centre crops, labels
    spread_subset    n indices drawn with a seed and spread over the classes in proportion to their sizes (the
                     subsets of the probes, of stellar_tok.evaluate and of the FID references)
    data_identity    what names a set of images, for a cache key (`ReferenceImages.identity` adds the file list)
    auto_workers     the DataLoader processes that decode them (num_workers=-1)

FID statistics of these images: `stellar_tok.evaluation.fid_reference`; the probes: `stellar_tok.evaluation.probing`.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import os
import tarfile
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Subset
from webdataset.tariterators import base_plus_ext

from stellar_tok.data import build_dataset
from stellar_tok.errors import UserError

from .folder import FolderDataset
from .images import collate_samples
from .shards import WDS_IMAGE_KEYS, decode_shard_samples, tar_samples, wds_shards
from .skips import skip_counter

CROP = "centre"  # shorter side resized to data.resolution (bicubic, antialiased), then the central square


def data_identity(data_cfg, split: str, n: int, seed: int = 0) -> dict:
    """What names a set of images (paths made absolute), without listing files; `ReferenceImages.identity` adds the
    file list."""
    d = {"name": data_cfg.name, "split": split, "resolution": int(data_cfg.resolution), "n": int(n), "crop": CROP}
    if n:
        d["seed"] = int(seed)  # the subset (spread over the classes)
    if data_cfg.name in ("folder", "wds"):
        for key in ("path", "val_path"):
            v = data_cfg.get(key) if hasattr(data_cfg, "get") else getattr(data_cfg, key, None)
            if v is None:
                continue
            if not isinstance(v, str) and hasattr(v, "__iter__"):
                d[key] = [str(p) for p in v]
            else:
                d[key] = os.path.abspath(os.path.expanduser(str(v))) if "://" not in str(v) and not str(v).startswith("pipe:") else str(v)
    if data_cfg.name == "shapes":
        d.update(train_size=int(data_cfg.train_size), val_size=int(data_cfg.val_size), seed_data=int(data_cfg.seed))
    return d


def auto_workers(data_cfg, num_workers: int) -> int:
    """-1: data.num_workers when set (> 0), else min(8, CPUs) for image files (folder, wds) and 0 for the in-memory
    sets; otherwise as given."""
    if num_workers is None or int(num_workers) < 0:
        given = int((data_cfg.get("num_workers") if hasattr(data_cfg, "get") else getattr(data_cfg, "num_workers", 0)) or 0)
        if given > 0:
            return given
        return min(8, os.cpu_count() or 1) if data_cfg.name in ("folder", "wds") else 0
    return int(num_workers)


# ----------------------------------------------------------------------------------------------
# the shard listing
# ----------------------------------------------------------------------------------------------


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _split_urls(data_cfg, split: str) -> list[str]:
    """The shards of `split` as `stellar_tok.data` resolves them (data.val_path for val when set)."""
    return wds_shards(data_cfg, split)[0]


def _shard_labels(url: str) -> list[tuple[str, int]]:
    """(key, label) of the samples of one shard that have an image, in order, label -1 without .cls; samples with
    a bad .cls are left out (the decoder would skip them). Local shards: tar headers and .cls members only."""
    members: dict[str, dict] = {}
    if _is_local(url):
        try:
            with tarfile.open(url, "r:*") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, ext = base_plus_ext(m.name)
                    if key is None:
                        continue
                    e = members.setdefault(key, {})
                    ext = ext.lower()
                    if ext in WDS_IMAGE_KEYS:
                        e["image"] = True
                    elif ext == "cls":
                        e["cls"] = tar.extractfile(m).read()
        except (OSError, tarfile.TarError):
            return []  # the decoding pass skips and counts it
    else:  # remote: read the stream (labels are not separable from the images there)
        for sample in tar_samples([{"url": url}]):
            e = members.setdefault(sample["__key__"], {})
            e["image"] = any(k in sample for k in WDS_IMAGE_KEYS)
            if "cls" in sample:
                e["cls"] = bytes(sample["cls"])
    out = []
    for key, e in members.items():
        if not e.get("image"):
            continue
        try:
            out.append((key, int(e["cls"].decode("utf-8").strip()) if "cls" in e else -1))
        except (ValueError, UnicodeDecodeError):
            continue
    return out


def _keep_samples(samples, keep: frozenset):
    """Pipeline stage: only the samples whose (shard, key) is in `keep` (before decoding)."""
    for s in samples:
        if (s.get("__url__"), s.get("__key__")) in keep:
            yield s


# ----------------------------------------------------------------------------------------------
# the images
# ----------------------------------------------------------------------------------------------


class ReferenceImages:
    """The images that FID statistics (and the probes of `stellar_tok.evaluate`) are computed from: every image of
    `split` once, or `n` > 0 of them drawn with `seed` and spread over the classes; centre crops at
    data.resolution. `loader(batch_size, num_workers)` yields `(uint8 (B,3,R,R), labels)`; `identity` names them
    for a cache (file list included). `dataset`: the split's map-style data set if already built (shapes renders
    its images when built); a folder set is copied, with centre crops, and left as it was."""

    def __init__(self, data_cfg, split: str, n: int = 0, seed: int = 0, dataset=None):
        if split not in ("train", "val"):
            raise UserError(f"split must be train or val (got {split!r})")
        if n < 0:
            raise UserError(f"the number of reference images must be >= 0 (got {n})")
        self.data_cfg, self.split, self.n, self.seed = data_cfg, split, int(n), int(seed)
        self.resolution = int(data_cfg.resolution)
        self._dataset, self._indices, self._keep = dataset, None, None
        self._urls = _split_urls(data_cfg, split) if data_cfg.name == "wds" else None
        self._identity = None

    # -- map-style data (shapes, digits, folder) --------------------------------------------
    @property
    def dataset(self):
        """The whole split as a map-style data set with centre crops (built once)."""
        ds = build_dataset(self.data_cfg, self.split) if self._dataset is None else self._dataset
        if isinstance(ds, FolderDataset) and (ds.random_crop or ds.cropper is not None):
            ds = copy.copy(ds)  # the train split crops randomly for training
            ds.random_crop, ds.cropper = False, None
        self._dataset = ds
        return ds

    def indices(self) -> list[int] | None:
        """Map-style data: the chosen indices (None: all)."""
        if self._indices is None and self.n and self._urls is None:
            labels = np.asarray(self.dataset.labels)
            self._indices = spread_subset(labels, self.n, self.seed) if self.n < len(labels) else list(range(len(labels)))
        return self._indices

    # -- shards ----------------------------------------------------------------------------------
    def keep(self) -> frozenset | None:
        """wds with n > 0: the (shard, key) pairs of the subset (labels read from the shards first)."""
        if self._keep is None and self.n and self._urls is not None:
            listing = [(url, key, label) for url in self._urls for key, label in _shard_labels(url)]
            if not listing:
                raise UserError(f"the {self.split} shards hold no readable samples ({self._urls[0]}, ...)")
            chosen = spread_subset([lab for _, _, lab in listing], self.n, self.seed)
            self._keep = frozenset((listing[i][0], listing[i][1]) for i in chosen)
        return self._keep

    def _pipeline(self):
        skips = skip_counter()
        stages = [wds.SimpleShardList(self._urls), wds.split_by_worker, functools.partial(tar_samples, skips=skips)]
        if self.n:
            stages.append(functools.partial(_keep_samples, keep=self.keep()))
        stages.append(functools.partial(decode_shard_samples, resolution=self.resolution, random_crop=False, skips=skips))
        return wds.DataPipeline(*stages)

    # -- common --------------------------------------------------------------------------------
    def __bool__(self) -> bool:  # a set of images is never "false", even when its length is not known yet
        return True

    def __len__(self) -> int:
        """Images to read (for wds without n: unknown until read, TypeError)."""
        if self._urls is not None:
            if not self.n:
                raise TypeError("the number of images in the shards is not known before reading them")
            return len(self.keep())
        idx = self.indices()
        return len(idx) if idx is not None else len(self.dataset)

    def size_hint(self) -> int | None:
        try:
            return len(self)
        except TypeError:
            return None

    @property
    def identity(self) -> dict:
        """data_identity plus the file list: folder, the sha256 of the image names (relative to the folder) and labels;
        wds, of the shard names, sizes and modification times."""
        if self._identity is None:
            d = data_identity(self.data_cfg, self.split, self.n, self.seed)
            h = hashlib.sha256()
            if self._urls is not None:
                for u in self._urls:
                    st = os.stat(u) if _is_local(u) and os.path.exists(u) else None
                    h.update(f"{u}\0{st.st_size if st else '?'}\0{st.st_mtime_ns if st else '?'}\n".encode())
                d["files"] = {"shards": len(self._urls), "sha256": h.hexdigest()[:16]}
            elif self.data_cfg.name == "folder":
                ds = self.dataset
                names = getattr(ds, "_relpaths", None)
                names = list(names) if names is not None else [os.fsencode(p) for p in ds.paths]
                h.update(os.fsencode(getattr(ds, "root", "")) + b"\n")
                for name, label in zip(names, np.asarray(ds.labels).tolist()):
                    h.update(bytes(name) + b"\0" + str(label).encode() + b"\n")
                d["files"] = {"images": len(names), "sha256": h.hexdigest()[:16]}
            self._identity = d
        return self._identity

    def loader(self, batch_size: int, num_workers: int = 0):
        """A DataLoader of `(uint8 (B,3,R,R), int64 labels)` over the chosen images, in order, each once."""
        workers = auto_workers(self.data_cfg, num_workers)
        if self._urls is not None:
            workers = min(workers, len(self._urls))  # split by worker: a shard goes to one worker
            return DataLoader(self._pipeline(), batch_size=batch_size, num_workers=workers, collate_fn=collate_samples)
        ds = self.dataset
        idx = self.indices()
        if idx is not None and len(idx) < len(ds):
            ds = Subset(ds, idx)
        return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_samples)

    def describe(self) -> str:
        total = self.size_hint()
        what = "all" if not self.n else f"{total if total is not None else self.n} (seeded subset spread over the classes, seed {self.seed})"
        return f"{what} images of the {self.split} split, {CROP} crops at {self.resolution} px"


def image_batches(data_cfg, split: str, n: int, batch_size: int, seed: int = 0, num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The images of `ReferenceImages(data_cfg, split, n, seed)` in batches: uint8 (B,3,R,R) centre crops, labels."""
    yield from ReferenceImages(data_cfg, split, n, seed).loader(batch_size, num_workers)


# ----------------------------------------------------------------------------------------------
# subsets
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
