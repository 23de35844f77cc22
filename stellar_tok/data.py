"""Data sets and loaders for tokenizer training and evaluation.

`build_dataset(data_cfg, split)` returns a data set whose items are ``(image, label)`` tuples
(`ImageSample`): ``image`` a uint8 tensor ``(3, R, R)`` with ``R = data_cfg.resolution``, ``label`` an int
(-1 for unlabelled data). `build_loader` wraps it in a `DataLoader` that yields ``(images, labels)``:
uint8 ``(B, 3, R, R)`` and int64 ``(B,)``. Four sources (``data_cfg.name``):

``shapes``
    The procedural 8-class set of `stellar_tok.shapes` (no download). ``train_size`` / ``val_size``
    images; the val split is rendered from a seed disjoint from the train seed.
``digits``
    scikit-learn's bundled ``load_digits`` (1,797 8 x 8 grey digits, 10 classes): a fixed permutation,
    the first 1,500 for train and the other 297 for val, scaled to 0..255, bilinearly upsampled to ``R``,
    replicated to 3 channels.
``folder``
    A folder of images, with class sub-folders (sorted names -> labels 0..C-1, like torchvision's
    ``ImageFolder``) or flat (label -1). If ``path/train`` and ``path/val`` both exist they are the two
    splits, otherwise the whole folder serves both. Images are converted to RGB, resized so the shorter
    side is ``R`` and cropped to ``R x R``: randomly for train, centrally for val.
``wds``
    WebDataset tar shards (``<key>.jpg|jpeg|png|webp|...`` plus optional ``<key>.cls``), as written by
    ``python -m stellar_tok.make_shards``. ``path`` is a brace pattern (``/data/train-{000000..000099}.tar``,
    ``{split}`` is replaced by the split name), a list of shards, or a directory holding
    ``train-*.tar`` / ``val-*.tar`` (or only other ``*.tar``, used for both splits). Train streams forever
    from `webdataset.ResampledShards` through a shuffle buffer, cut into epochs of
    ``data_cfg.epoch_size // world_size`` samples per process; val reads every shard once, split by node
    and worker.

For folder and wds data, ``val_path`` (optional) names the held-out ("val") split itself: a folder, or shards
given like ``path`` (a pattern, a list, or a directory whose ``val-*.tar`` are used); unset, the split logic
above applies, and `heldout_is_train` says whether it fell back to training images.

Bad samples (undecodable bytes, images smaller than 8 px on a side, samples without an image, unreadable
shards) are skipped and counted by reason, never fatal. The counts live in shared memory, so samples
skipped inside DataLoader worker processes are counted too; `skipped_samples()` returns them.
"""
from __future__ import annotations

import functools
import glob
import io
import json
import os
import warnings
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .shapes import SHAPE_CLASSES, render_shapes

try:  # one-line errors in the command-line tools
    from .errors import UserError as _UserError
except ImportError:  # pragma: no cover - the package always ships errors.py
    _UserError = Exception

__all__ = [
    "DATA_NAMES",
    "DataError",
    "ImageSample",
    "SkipCounter",
    "build_dataset",
    "build_loader",
    "collate_samples",
    "decode_shard_samples",
    "decode_wds_sample",
    "is_image_file",
    "skip_counter",
    "tar_samples",
    "find_images",
    "heldout_is_train",
    "load_rgb",
    "resize_and_crop",
    "reset_skipped_samples",
    "skipped_samples",
    "skipped_summary",
    "wds_shards",
]

DATA_NAMES = ("shapes", "digits", "folder", "wds")
SPLITS = ("train", "val")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
WDS_IMAGE_KEYS = tuple(ext[1:] for ext in IMAGE_EXTENSIONS)  # member suffixes accepted as the image
MIN_IMAGE_SIDE = 8  # images smaller than this on either side are skipped
# Why a sample was skipped. "bad_shard" counts shard-level read errors (a missing or truncated tar,
# duplicate members), each of which may lose several samples; the other reasons count samples.
SKIP_REASONS = ("decode_error", "too_small", "missing_image", "bad_label", "bad_shard")
DIGITS_TRAIN_SIZE = 1500
_DIGITS_PERMUTATION_SEED = 0  # fixed, so the digits val split never depends on the run's seed
_VAL_SEED_OFFSET = 1 << 40  # shapes val seed = seed + this: far from any seed a user picks for train


class DataError(_UserError, ValueError):
    """A data configuration the user can fix (unknown name, missing path, empty folder, ...)."""


class ImageSample(NamedTuple):
    """One item of every data set here: a uint8 image ``(3, R, R)`` and an int label (-1: unlabelled)."""

    image: torch.Tensor
    label: int


class BadSample(Exception):
    """Raised by the decoders for a sample to skip; ``reason`` is one of `SKIP_REASONS`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------------------------
# Counting skipped samples
# ----------------------------------------------------------------------------------------------


class SkipCounter:
    """Counts skipped bad samples by reason (one of `SKIP_REASONS`), across DataLoader workers.

    The counts are a small int64 tensor in shared memory with one row per process slot (slot 0: the
    process that made the loader, slot 1 + i: DataLoader worker i). Workers, forked or spawned, receive
    the same shared tensor with the data set and each writes only its own row, so there are no lost
    updates within a loader, and `counts()` in the main process sums what every worker skipped.
    (Two loaders whose workers run at the same time share worker slots; a simultaneous increment in
    both could in principle be lost. It does not matter for a diagnostic count.)
    """

    _SLOTS = 257

    def __init__(self) -> None:
        counts = torch.zeros(self._SLOTS, len(SKIP_REASONS), dtype=torch.int64)
        try:
            counts.share_memory_()
        except Exception:  # pragma: no cover - no shared memory: counts from workers stay in the workers
            warnings.warn("SkipCounter: shared memory unavailable; samples skipped in DataLoader workers are not counted")
        self._counts = counts
        self._warned: set[str] = set()

    def add(self, reason: str, detail: str = "", n: int = 1, warn: bool = True) -> None:
        """Count ``n`` skipped samples for ``reason``; warn once per reason and process (if ``warn``)."""
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {', '.join(SKIP_REASONS)}")
        info = get_worker_info()
        slot = 0 if info is None else 1 + info.id % (self._SLOTS - 1)
        self._counts[slot, SKIP_REASONS.index(reason)] += n
        if warn and reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(
                f"skipping a bad sample ({reason}{': ' + detail if detail else ''}); further skips are counted "
                "silently, see stellar_tok.data.skipped_samples()",
                stacklevel=2,
            )

    def counts(self) -> dict[str, int]:
        """Skipped samples per reason, summed over all process slots; reasons with no skips are left out."""
        totals = self._counts.sum(0).tolist()
        return {reason: int(c) for reason, c in zip(SKIP_REASONS, totals) if c}

    def total(self) -> int:
        """Total number of skipped samples."""
        return int(self._counts.sum())

    def reset(self) -> None:
        """Zero all counts."""
        self._counts.zero_()

    def __getstate__(self) -> dict:
        return {"_counts": self._counts}  # the once-per-reason warning state stays per process

    def __setstate__(self, state: dict) -> None:
        self._counts = state["_counts"]
        self._warned = set()


_SKIPS: SkipCounter | None = None


def skip_counter() -> SkipCounter:
    """The process-wide counter every data set here reports to (created on first use)."""
    global _SKIPS
    if _SKIPS is None:
        _SKIPS = SkipCounter()
    return _SKIPS


def skipped_samples() -> dict[str, int]:
    """Bad samples skipped so far in this process and its DataLoader workers, by reason (non-zero only)."""
    return skip_counter().counts()


def reset_skipped_samples() -> None:
    """Zero the process-wide skip counts."""
    skip_counter().reset()


def skipped_summary() -> str:
    """A one-line report such as ``"skipped 3 bad samples (decode_error=2, too_small=1)"``."""
    counts = skipped_samples()
    if not counts:
        return "skipped 0 bad samples"
    detail = ", ".join(f"{k}={v}" for k, v in counts.items())
    return f"skipped {sum(counts.values())} bad samples ({detail})"


# ----------------------------------------------------------------------------------------------
# Decoding and resizing
# ----------------------------------------------------------------------------------------------


def _to_8bit_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB. Transparent images are composited on white."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            arr = arr * 255.0 if np.nanmax(arr) <= 1.0 else arr
        elif mode.startswith("I;16") or arr.max() > 255:
            arr = arr.astype(np.float64) / 257.0  # 16-bit range -> 8-bit
        arr = np.nan_to_num(np.clip(np.rint(arr), 0, 255)).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "PA", "RGBa", "La") or (mode in ("L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, HSV, ...


def load_rgb(source: str | os.PathLike | bytes, min_side: int = MIN_IMAGE_SIDE, target: int | None = None) -> Image.Image:
    """Decode an image file or encoded bytes into an 8-bit RGB PIL image.

    Handles grayscale, palette, CMYK, 16-bit and alpha images (alpha composited on white) and applies
    the EXIF orientation. With ``target``, large JPEGs are decoded at a reduced scale whose shorter side
    is still at least ``target`` (much faster for big photos). Raises `BadSample` with reason
    ``decode_error`` (unreadable, truncated, unsupported) or ``too_small`` (a side under ``min_side``).
    """
    img = None
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source)
        width, height = img.size
        if min(width, height) < min_side:
            raise BadSample("too_small", f"{width}x{height} px, need at least {min_side} px on each side")
        if target is not None and img.format == "JPEG":
            short = min(width, height)
            img.draft(None, (max(1, width * target // short), max(1, height * target // short)))
        img.load()
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # a broken EXIF block is no reason to drop the pixels
            pass
        return _to_8bit_rgb(img)  # load() has read the pixels and closed a file that PIL opened itself
    except Exception as exn:  # PIL raises many types: OSError, SyntaxError, ValueError, DecompressionBomb...
        if img is not None:
            img.close()
        if isinstance(exn, BadSample):
            raise
        raise BadSample("decode_error", f"{type(exn).__name__}: {exn}") from exn


def resize_and_crop(img: Image.Image, resolution: int, random_crop: bool) -> torch.Tensor:
    """Resize so the shorter side is ``resolution`` (bicubic, antialiased) and crop a square.

    The crop is central, or uniformly random along the longer side when ``random_crop`` (drawn from
    torch's RNG, which DataLoader seeds per worker). Returns a uint8 tensor ``(3, resolution, resolution)``.
    """
    width, height = img.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    extra_x, extra_y = new_w - resolution, new_h - resolution
    if random_crop:
        left = int(torch.randint(0, extra_x + 1, ()).item()) if extra_x else 0
        top = int(torch.randint(0, extra_y + 1, ()).item()) if extra_y else 0
    else:
        left, top = extra_x // 2, extra_y // 2
    arr = np.asarray(img.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def collate_samples(batch: Sequence[tuple[Any, int]]) -> tuple[Any, torch.Tensor]:
    """Stack ``(image, label)`` items into uint8 ``(B, 3, R, R)`` images and int64 ``(B,)`` labels; items whose
    image is a dict of views (`stellar_tok.crops`) give a dict of stacked views."""
    first = batch[0][0]
    if isinstance(first, dict):
        images = {k: torch.stack([item[0][k] for item in batch]) for k in first}
    else:
        images = torch.stack([item[0] for item in batch])
    labels = torch.tensor([int(item[1]) for item in batch], dtype=torch.int64)
    return images, labels


# ----------------------------------------------------------------------------------------------
# In-memory data sets: shapes, digits
# ----------------------------------------------------------------------------------------------


class ArrayDataset(Dataset):
    """A map-style data set over in-memory uint8 images ``(N, R, R, 3)`` and int labels ``(N,)``.

    ``images``, ``labels`` and ``classes`` are public, for code that wants the whole array at once.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str]):
        assert images.ndim == 4 and images.shape[-1] == 3 and images.dtype == np.uint8, images.shape
        assert len(images) == len(labels)
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> ImageSample:
        image = torch.from_numpy(np.ascontiguousarray(self.images[index].transpose(2, 0, 1)))
        return ImageSample(image, int(self.labels[index]))


@functools.lru_cache(maxsize=4)
def _digits_arrays(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits (fixed permutation) as uint8 ``(N, R, R, 3)`` plus labels; read-only, cached."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(_DIGITS_PERMUTATION_SEED).permutation(len(digits.target))
    pixels = torch.from_numpy(digits.images[order].astype(np.float32) * (255.0 / 16.0))[:, None]  # (N, 1, 8, 8)
    if pixels.shape[-1] != resolution:
        pixels = torch.nn.functional.interpolate(pixels, size=(resolution, resolution), mode="bilinear", align_corners=False)
    images = pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).repeat(1, 1, 1, 3).numpy()
    labels = digits.target[order].astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _build_digits(resolution: int, split: str) -> ArrayDataset:
    images, labels = _digits_arrays(resolution)
    part = slice(0, DIGITS_TRAIN_SIZE) if split == "train" else slice(DIGITS_TRAIN_SIZE, None)
    return ArrayDataset(images[part], labels[part], [str(d) for d in range(10)])


def _build_shapes(data_cfg: Any, resolution: int, split: str) -> ArrayDataset:
    seed = _positive_int(_cfg_get(data_cfg, "seed", 0), "data.seed", minimum=0)
    if split == "train":
        n = _positive_int(_cfg_get(data_cfg, "train_size", 20000), "data.train_size")
    else:
        n = _positive_int(_cfg_get(data_cfg, "val_size", 2000), "data.val_size")
        seed += _VAL_SEED_OFFSET
    images, labels = render_shapes(n, resolution, seed)
    return ArrayDataset(images, labels, SHAPE_CLASSES)


# ----------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _class_dirs(root: str) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``root`` that hold at least one image (recursively)."""
    names = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        for _, _, files in os.walk(entry.path, followlinks=True):
            if any(is_image_file(f) for f in files):
                names.append(entry.name)
                break
    return names


def find_images(root: str, classes: Sequence[str] | None = None, what: str = "data.path") -> tuple[list[str], list[int], list[str]]:
    """List the images of a folder: ``(paths, labels, classes)``.

    With class sub-folders, every image below sub-folder ``c`` gets label ``classes.index(c)``
    (``classes`` defaults to the sorted sub-folder names; images loose in ``root`` are then ignored,
    as torchvision's ImageFolder does). Without sub-folders, the images directly in ``root`` get
    label -1 and ``classes`` is empty. Raises `DataError` when no image is found or a sub-folder is
    not in a given ``classes``; ``what`` names the folder in those messages.
    """
    root = os.path.expanduser(str(root))
    if not os.path.isdir(root):
        raise DataError(f"{what} {root!r} does not exist or is not a directory")
    found = _class_dirs(root)
    paths: list[str] = []
    labels: list[int] = []
    if found:
        classes = list(found) if classes is None else list(classes)
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise DataError(f"class folders {unknown} in {root!r} are not among the {len(classes)} known classes")
        index = {c: i for i, c in enumerate(classes)}
        for name in found:
            for dirpath, dirnames, files in os.walk(os.path.join(root, name), followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for f in sorted(files):
                    if is_image_file(f):
                        paths.append(os.path.join(dirpath, f))
                        labels.append(index[name])
        loose = [f for f in os.listdir(root) if is_image_file(f) and os.path.isfile(os.path.join(root, f))]
        if loose:
            warnings.warn(f"{len(loose)} images directly in {root!r} are ignored because it has class sub-folders")
    else:
        classes = []
        for f in sorted(os.listdir(root)):
            if is_image_file(f) and os.path.isfile(os.path.join(root, f)):
                paths.append(os.path.join(root, f))
                labels.append(-1)
    if not paths:
        raise DataError(
            f"{what} {root!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} files "
            "in class sub-folders or directly inside)"
        )
    return paths, labels, list(classes)


class FolderDataset(Dataset):
    """Images listed by `find_images`, decoded with `load_rgb` and cut to ``resolution`` squares.

    A bad file (unreadable, or under 8 px on a side) is replaced by the next good image, and counted
    once each time its own index is requested (so once per pass over the data set), never as a
    neighbour. Bad indices are remembered per process, so they are not decoded again.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int], classes: Sequence[str], resolution: int,
                 random_crop: bool, skips: SkipCounter | None = None, cropper=None):
        # Paths relative to a common root, as one numpy bytes array: compact (ImageNet: ~40 MB) and, unlike
        # a list of str, not copied page by page into forked workers as reference counts change.
        self.root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
        self._relpaths = np.array([os.fsencode(os.path.relpath(p, self.root)) for p in paths])
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.resolution = int(resolution)
        self.random_crop = bool(random_crop)
        self.cropper = cropper  # stellar_tok.crops.ViewCropper: items are training views cut from the original
        self.skips = skips if skips is not None else skip_counter()
        self._bad: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._relpaths)

    def path(self, index: int) -> str:
        """The file of item ``index``."""
        return os.path.join(self.root, os.fsdecode(self._relpaths[index]))

    @property
    def paths(self) -> list[str]:
        """All files, in item order."""
        return [self.path(i) for i in range(len(self))]

    def load(self, index: int) -> ImageSample:
        """Decode item ``index``; raises `BadSample` if it is bad."""
        if self.cropper is not None:
            return ImageSample(self.cropper(self.path(index)), int(self.labels[index]))
        img = load_rgb(self.path(index), target=self.resolution)
        return ImageSample(resize_and_crop(img, self.resolution, self.random_crop), int(self.labels[index]))

    def __getitem__(self, index: int) -> ImageSample:
        n = len(self)
        index = int(index) + (n if int(index) < 0 else 0)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        for step in range(n):
            j = (index + step) % n
            if j in self._bad:
                if step == 0:
                    self.skips.add(self._bad[j], self.path(j))
                continue
            try:
                return self.load(j)
            except BadSample as bad:
                self._bad[j] = bad.reason
                if step == 0:
                    self.skips.add(bad.reason, f"{self.path(j)}: {bad}")
        raise RuntimeError(f"none of the {n} images in the data set could be read (first: {self.path(0)})")


def _build_folder(data_cfg: Any, resolution: int, split: str) -> FolderDataset:
    root = _require_path(data_cfg, "folder", "a folder of images, with class sub-folders or flat")
    if not os.path.isdir(root):
        raise DataError(f"data.path {root!r} does not exist or is not a directory (data.name='folder')")
    split_dirs = {s: os.path.join(root, s) for s in SPLITS}
    val_root = _val_path(data_cfg, split)
    if val_root is not None:  # data.val_path: the held-out images, labelled with the classes of both folders
        if not os.path.isdir(val_root):
            raise DataError(f"data.val_path {val_root!r} does not exist or is not a directory (data.name='folder')")
        train_root = split_dirs["train"] if all(os.path.isdir(d) for d in split_dirs.values()) else root
        classes = sorted(set(_class_dirs(train_root)) | set(_class_dirs(val_root)))
        paths, labels, classes = find_images(val_root, classes or None, what="data.val_path")
    elif all(os.path.isdir(d) for d in split_dirs.values()):
        classes = sorted(set(_class_dirs(split_dirs["train"])) | set(_class_dirs(split_dirs["val"])))
        paths, labels, classes = find_images(split_dirs[split], classes or None)
    else:
        paths, labels, classes = find_images(root)
    return FolderDataset(paths, labels, classes, resolution, random_crop=(split == "train"))


# ----------------------------------------------------------------------------------------------
# WebDataset shards
# ----------------------------------------------------------------------------------------------


class ShardPipeline(wds.DataPipeline):
    """A webdataset `DataPipeline` with the class names of its shards and, for train, a length.

    ``len()`` is the number of samples one epoch yields in this process (all workers together); it is
    only defined for the train pipeline, whose epochs are cut by ``with_epoch``.
    """

    size: int | None = None
    classes: list[str] = []

    def __len__(self) -> int:
        if self.size is None:
            raise TypeError("this shard pipeline has no length: it reads its shards to the end")
        return self.size


class _ShardErrorHandler:
    """webdataset exception handler: skip a shard (or the rest of it) that cannot be read, with a warning."""

    def __init__(self, skips: SkipCounter):
        self.skips = skips
        self.url: str | None = None  # the shard being read, set by _tar_samples

    def __call__(self, exn: Exception) -> bool:
        # a shard that cannot be opened: webdataset appends its URL to exn.args
        where = self.url or next((a for a in reversed(exn.args) if isinstance(a, str)), "?")
        if isinstance(exn, OSError) and exn.strerror:
            message = exn.strerror
        else:
            message = str(exn.args[0]) if exn.args else ""
        self.skips.add("bad_shard", warn=False)
        warnings.warn(f"skipping unreadable shard {where} (or the rest of it): {type(exn).__name__}: {message}")
        return True


def _tar_samples(shards: Iterable[dict], handler: _ShardErrorHandler) -> Iterator[dict]:
    """``webdataset.tarfile_to_samples`` that also closes each shard's file once it has been read."""
    from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

    def expand() -> Iterator[dict]:
        for source in url_opener(shards, handler=handler):
            handler.url = source["url"]
            try:
                yield from tar_file_expander([source], handler=handler)
            finally:
                handler.url = None
                stream = source.get("stream")
                if stream is not None:
                    stream.close()

    return group_by_keys(expand(), handler=handler)


def tar_samples(shards: Iterable[dict], skips: SkipCounter | None = None) -> Iterator[dict]:
    """Pipeline stage: raw webdataset samples of `shards` (``{"url": ...}`` dicts), each shard read once, in order; a
    shard that cannot be read (or the rest of it) is skipped with a warning and counted as ``bad_shard``."""
    return _tar_samples(shards, _ShardErrorHandler(skips if skips is not None else skip_counter()))


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
    ``with_keys``), skipping and counting bad ones; with a `stellar_tok.crops.ViewCropper`, the image of each
    sample is its training views."""
    make = cropper or (lambda data: resize_and_crop(load_rgb(data, target=resolution), resolution, random_crop))
    for sample in samples:
        decoded = decode_wds_sample(sample, make, skips, f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}")
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


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def _build_wds(data_cfg: Any, resolution: int, split: str, shuffle: bool | None = None, num_workers: int = 0,
               cropper=None) -> ShardPipeline:
    """The webdataset pipeline; ``num_workers`` only sets how the epoch is divided between workers."""
    path = _require_path(data_cfg, "wds", "a shard pattern like /data/train-{000000..000099}.tar, a list of .tar files or a directory of shards")
    val_path = _val_path(data_cfg, split)
    urls = _shard_urls(path, split) if val_path is None else _shard_urls(val_path, split, key="data.val_path")
    skips = skip_counter()
    handler = _ShardErrorHandler(skips)
    train = split == "train"
    shuffle = train if shuffle is None else shuffle
    decode = functools.partial(decode_shard_samples, resolution=resolution, random_crop=train, skips=skips, cropper=cropper)
    if train:
        source = [wds.ResampledShards(urls, seed=int(_cfg_get(data_cfg, "seed", 0)))]
    else:
        if len(urls) < _world_size():
            warnings.warn(f"only {len(urls)} val shards for {_world_size()} processes: some processes get no val data")
        source = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker]
    stages = [*source, functools.partial(_tar_samples, handler=handler)]
    if shuffle:
        buffer = int(_cfg_get(data_cfg, "shuffle_buffer", 1000))
        stages.append(wds.shuffle(buffer, initial=min(buffer, 100)))
    stages.append(decode)
    pipeline = ShardPipeline(*stages)
    pipeline.classes = _shard_classes(urls)
    if train:
        # with_epoch counts per worker: give each worker its share of the process's epoch
        per_process = max(1, _positive_int(_cfg_get(data_cfg, "epoch_size", 10000), "data.epoch_size") // _world_size())
        per_worker = max(1, per_process // max(1, num_workers))
        pipeline.with_epoch(per_worker)
        pipeline.size = per_worker * max(1, num_workers)
    return pipeline


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


def wds_shards(data_cfg: Any, split: str = "train") -> tuple[list[str], list[str]]:
    """The shard URLs the ``split`` of wds data reads (``data.val_path`` for val when set, as `build_dataset`)
    and their class names (``classes.json`` beside local shards, else [])."""
    path = _require_path(data_cfg, "wds", "a shard pattern like /data/train-{000000..000099}.tar, a list of .tar files or a directory of shards")
    val_path = _val_path(data_cfg, split)
    urls = _shard_urls(path, split) if val_path is None else _shard_urls(val_path, split, key="data.val_path")
    return urls, _shard_classes(urls)


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg[key]`` for a DictConfig, a dict or any object with attributes; ``default`` if absent."""
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    getter = getattr(cfg, "get", None)
    if callable(getter):
        try:
            return getter(key, default)
        except Exception:
            pass
    try:
        return getattr(cfg, key, default)
    except Exception:
        return default


def _positive_int(value: Any, key: str, minimum: int = 1) -> int:
    try:
        number = int(value)
        ok = number == value and number >= minimum
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DataError(f"{key} must be an integer >= {minimum} (got {value!r})")
    return number


def _require_path(data_cfg: Any, name: str, what: str) -> Any:
    path = _cfg_get(data_cfg, "path")
    if path is None or (isinstance(path, str) and not path.strip()):
        raise DataError(f"data.path is required for data.name='{name}': {what}")
    if hasattr(path, "__iter__") and not isinstance(path, (str, os.PathLike)):
        return [str(p) for p in path]  # ListConfig and friends -> plain list
    return os.path.expanduser(str(path))


def _val_path(data_cfg: Any, split: str) -> Any:
    """``data.val_path`` (expanded) for the held-out split; None for train or when unset (then ``data.path``'s
    own split logic applies)."""
    path = _cfg_get(data_cfg, "val_path") if split == "val" else None
    if path is None or (isinstance(path, str) and not path.strip()):
        return None
    if hasattr(path, "__iter__") and not isinstance(path, (str, os.PathLike)):
        return [os.path.expanduser(str(p)) for p in path]
    return os.path.expanduser(str(path))


def heldout_is_train(data_cfg: Any) -> bool:
    """True when the held-out ("val") split of folder or wds data resolves to training images: shards shared with
    the train split (a pattern without ``{split}``, a directory without val-*.tar), or the same folder (no
    ``path/val``); ``data.val_path`` names a held-out split of its own. False for shapes and digits."""
    name = _cfg_get(data_cfg, "name")
    if name == "wds":
        path = _require_path(data_cfg, "wds", "a shard pattern, a list of .tar files or a directory of shards")
        val = _val_path(data_cfg, "val")
        held_out = _shard_urls(path, "val") if val is None else _shard_urls(val, "val", key="data.val_path")
        return bool(set(_shard_urls(path, "train")) & set(held_out))
    if name == "folder":
        root = _require_path(data_cfg, "folder", "a folder of images")
        split_dirs = [os.path.join(root, s) for s in SPLITS]
        train_root = split_dirs[0] if all(os.path.isdir(d) for d in split_dirs) else root
        val_root = _val_path(data_cfg, "val") or (split_dirs[1] if all(os.path.isdir(d) for d in split_dirs) else root)
        return os.path.realpath(train_root) == os.path.realpath(val_root)
    return False


def _check_name_split(data_cfg: Any, split: str) -> tuple[str, int]:
    name = _cfg_get(data_cfg, "name")
    if name not in DATA_NAMES:
        raise DataError(f"data.name must be one of {', '.join(DATA_NAMES)} (got {name!r})")
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)} (got {split!r})")
    resolution = _positive_int(_cfg_get(data_cfg, "resolution", 32), "data.resolution", minimum=MIN_IMAGE_SIDE)
    return name, resolution


def build_dataset(data_cfg: Any, split: str = "train"):
    """Build the ``split`` ("train" or "val") of the data set described by ``data_cfg``.

    ``data_cfg`` (an OmegaConf DictConfig, a dict or any object with attributes) has keys ``name``
    (shapes | digits | folder | wds), ``resolution``, ``path`` (folder, wds), ``train_size`` /
    ``val_size`` (shapes), ``seed``, and for wds optionally ``epoch_size`` (default 10000) and
    ``shuffle_buffer`` (default 1000). Returns a map-style `Dataset` for shapes, digits and folder, an
    `IterableDataset` (webdataset pipeline) for wds; items are `ImageSample` ``(image, label)`` tuples.
    Raises `DataError` (a `ValueError`) with one line naming the problem for a bad configuration.
    """
    name, resolution = _check_name_split(data_cfg, split)
    if name == "shapes":
        return _build_shapes(data_cfg, resolution, split)
    if name == "digits":
        return _build_digits(resolution, split)
    if name == "folder":
        return _build_folder(data_cfg, resolution, split)
    return _build_wds(data_cfg, resolution, split)


def build_loader(data_cfg: Any, batch_size: int, split: str = "train", num_workers: int = 0,
                 shuffle: bool | None = None, drop_last: bool | None = None, seed: int = 0, views: Any = None) -> DataLoader:
    """A DataLoader over `build_dataset` yielding ``(images uint8 (B,3,R,R), labels int64 (B,))``.

    ``views`` (a views config) for the train split of file-backed data (folder, wds): the loader cuts the
    training views from each decoded original (`stellar_tok.crops.ViewCropper`) and yields
    ``({"main": (B,3,G,G), "global": (B,M-1,3,G,G), "local": (B,n,3,l,l)} uint8, labels)``; ``data.resolution``
    is then not used. In-memory data sets (shapes, digits) are their own originals and yield images as
    without ``views``: their views are cut from the batch on the device.

    ``shuffle`` and ``drop_last`` default to True for train and False for val. Map-style data sets are
    shuffled by a generator seeded with ``seed`` (reproducible order and worker seeds). For wds,
    ``shuffle`` switches the shuffle buffer, the shards are split by webdataset itself, and an epoch of
    the train loader is about ``epoch_size // world_size`` samples per process whatever ``num_workers``
    (each worker streams its share); its length is ``len(loader)`` batches. Train streaming order is not
    reproducible (webdataset reseeds from the clock).
    """
    name, resolution = _check_name_split(data_cfg, split)
    batch_size = _positive_int(batch_size, "batch_size")
    train = split == "train"
    shuffle = train if shuffle is None else bool(shuffle)
    drop_last = train if drop_last is None else bool(drop_last)
    num_workers = max(0, int(num_workers))
    common = dict(batch_size=batch_size, num_workers=num_workers, collate_fn=collate_samples,
                  drop_last=drop_last, persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())
    cropper = None
    if views is not None and train and name in ("folder", "wds"):
        from .crops import ViewCropper

        cropper = ViewCropper(views)
    if name == "wds":
        dataset = _build_wds(data_cfg, resolution, split, shuffle=shuffle, num_workers=num_workers, cropper=cropper)
        return DataLoader(dataset, **common)
    dataset = build_dataset(data_cfg, split)
    if cropper is not None:
        dataset.cropper = cropper
    if drop_last and len(dataset) < batch_size:
        warnings.warn(f"the {split} split has {len(dataset)} images, fewer than batch_size={batch_size}: with drop_last the loader is empty")
    generator = torch.Generator().manual_seed(int(seed))
    return DataLoader(dataset, shuffle=shuffle, generator=generator, **common)
