"""A folder of image files as a data set: listing the images and their classes, and decoding them one by one.

`find_images` lists a folder with class sub-folders (sorted names -> labels 0..C-1, like torchvision's
``ImageFolder``) or a flat one (label -1). `folder_dataset` picks the folder of a split: ``data.val_path`` for
val when set, else ``path/train`` and ``path/val`` when both exist, else the whole folder for both splits
(`folder_heldout_is_train` says when val thus falls back to training images). `FolderDataset` decodes each
file with `load_rgb` and cuts an ``R x R`` square (random for train, central for val), or the training views
of a `stellar_tok.data.crops.ViewCropper`; a bad file is skipped and counted, and the next good image served.
"""
from __future__ import annotations

import os
import warnings
from typing import Sequence

import numpy as np
from torch.utils.data import Dataset

from stellar_tok.config import DataConfig

from .images import IMAGE_EXTENSIONS, ImageSample, is_image_file, load_rgb, resize_and_crop
from .settings import SPLITS, DataError, held_out_path, require_path
from .skips import BadSample, SkipCounter, skip_counter

FOLDER_PATH_HINT = "a folder of images, with class sub-folders or flat"


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
        self.cropper = cropper  # stellar_tok.data.crops.ViewCropper: items are training views cut from the original
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

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose views the cropper draws (an image's views are seeded by run seed, epoch and its index)."""
        if self.cropper is not None:
            self.cropper.set_epoch(epoch)

    def load(self, index: int) -> ImageSample:
        """Decode item ``index``; raises `BadSample` if it is bad."""
        if self.cropper is not None:
            return ImageSample(self.cropper(self.path(index), sample=index), int(self.labels[index]))
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


def _split_dirs(root: str) -> dict[str, str] | None:
    """``{"train": root/train, "val": root/val}`` when both folders exist, else None (the whole folder serves both)."""
    dirs = {s: os.path.join(root, s) for s in SPLITS}
    return dirs if all(os.path.isdir(d) for d in dirs.values()) else None


def folder_dataset(data: DataConfig, resolution: int, split: str) -> FolderDataset:
    """The ``split`` of folder data: ``data.val_path`` for val when set, else ``path/<split>`` when ``path`` holds
    both ``train`` and ``val``, else all of ``path``; classes are those of both splits, so labels agree."""
    root = require_path(data, FOLDER_PATH_HINT)
    if not os.path.isdir(root):
        raise DataError(f"data.path {root!r} does not exist or is not a directory (data.name='folder')")
    split_dirs = _split_dirs(root)
    val_root = held_out_path(data, split)
    if val_root is not None:  # data.val_path: the held-out images, labelled with the classes of both folders
        if not os.path.isdir(val_root):
            raise DataError(f"data.val_path {val_root!r} does not exist or is not a directory (data.name='folder')")
        train_root = split_dirs["train"] if split_dirs else root
        classes = sorted(set(_class_dirs(train_root)) | set(_class_dirs(val_root)))
        paths, labels, classes = find_images(val_root, classes or None, what="data.val_path")
    elif split_dirs:
        classes = sorted(set(_class_dirs(split_dirs["train"])) | set(_class_dirs(split_dirs["val"])))
        paths, labels, classes = find_images(split_dirs[split], classes or None)
    else:
        paths, labels, classes = find_images(root)
    return FolderDataset(paths, labels, classes, resolution, random_crop=(split == "train"))


def folder_heldout_is_train(data: DataConfig) -> bool:
    """Whether the val split of folder data is the train folder itself (no ``data.val_path``, no ``path/val``)."""
    root = require_path(data, FOLDER_PATH_HINT)
    split_dirs = _split_dirs(root)
    train_root = split_dirs["train"] if split_dirs else root
    val_root = held_out_path(data, "val") or (split_dirs["val"] if split_dirs else root)
    return os.path.realpath(train_root) == os.path.realpath(val_root)
