"""The embedded data sets, held in memory and needing no download: procedural shapes and scikit-learn's digits.

Both are `ArrayDataset`s over uint8 ``(N, R, R, 3)`` arrays with int labels. `shapes_dataset` renders the
8-class set of `stellar_tok.data.shapes` (``data.train_size`` / ``data.val_size`` images; val from a seed far from
any train seed); `digits_dataset` takes the 1,797 8 x 8 grey digits of ``load_digits`` in a fixed permutation,
the first 1,500 for train and the other 297 for val, scaled to 0..255, bilinearly upsampled to ``R`` and
replicated to 3 channels. The arrays are public (``images``, ``labels``, ``classes``) for code that wants
them whole.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from stellar_tok.config import DataConfig

from .images import ImageSample
from .settings import positive_int
from .shapes import SHAPE_CLASSES, render_shapes

DIGITS_TRAIN_SIZE = 1500
_DIGITS_PERMUTATION_SEED = 0  # fixed, so the digits val split never depends on the run's seed
_VAL_SEED_OFFSET = 1 << 40  # shapes val seed = seed + this: far from any seed a user picks for train


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
    from sklearn.datasets import load_digits  # optional (scikit-learn): only for data.name=digits

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


def digits_dataset(resolution: int, split: str) -> ArrayDataset:
    """The ``split`` of the digits at ``resolution``: the first 1,500 of the fixed permutation, or the other 297."""
    images, labels = _digits_arrays(resolution)
    part = slice(0, DIGITS_TRAIN_SIZE) if split == "train" else slice(DIGITS_TRAIN_SIZE, None)
    return ArrayDataset(images[part], labels[part], [str(d) for d in range(10)])


def shapes_dataset(data: DataConfig, resolution: int, split: str) -> ArrayDataset:
    """The ``split`` of the procedural shapes: ``data.train_size`` or ``data.val_size`` images from ``data.seed``."""
    seed = positive_int(data.seed, "data.seed", minimum=0)
    if split == "train":
        n = positive_int(data.train_size, "data.train_size")
    else:
        n = positive_int(data.val_size, "data.val_size")
        seed += _VAL_SEED_OFFSET
    images, labels = render_shapes(n, resolution, seed)
    return ArrayDataset(images, labels, SHAPE_CLASSES)
