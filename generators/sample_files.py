"""A set of generated samples, read batch by batch: an ADM-style samples.npz or a folder of images.

    NpzSamples    `arr_0` (uint8 N,H,W,3) of a .npz read once in order, straight from the file (a stored member at its
                  offset, a compressed one through the zip stream): never whole in memory; `arr_1`: the labels
    FolderSamples a folder of images (searched recursively), centre-cropped to one resolution
    ResizedSamples either, resized to another side as it is read (bicubic, as LlamaGen does for ADM's evaluator)
    open_samples  the one or the other, from a path

Scored by `generators.scoring` (the command: `python -m generators.evaluate`).
"""
from __future__ import annotations

import os
import zipfile
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from stellar_tok.data import is_image_file, load_rgb, resize_and_crop
from stellar_tok.errors import UserError
from stellar_tok.evaluation.fid_reference import npy_member


class NpzSamples:
    """`arr_0` (uint8 N,H,W,3) of an ADM-style .npz, read once in order by `batches`, never whole."""

    def __init__(self, path: str):
        self.path = path
        try:
            member = npy_member(path)
        except (OSError, zipfile.BadZipFile) as e:
            raise UserError(f"samples={path} is not a readable .npz ({type(e).__name__})") from None
        if member is None:
            with zipfile.ZipFile(path) as zf:
                raise UserError(f"{path}: no arr_0 (uint8 images N,H,W,3); members: {', '.join(zf.namelist())}")
        self.labels = None
        with np.load(path, allow_pickle=False) as z:
            if "arr_1" in z.files:
                self.labels = z["arr_1"]
        shape, dtype = member.shape, member.dtype
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise UserError(f"{path}: arr_0 must be uint8 images of shape (N,H,W,3) (got {dtype} {shape})")
        if member.fortran:
            raise UserError(f"{path}: arr_0 is stored in Fortran order; write it C-contiguous (np.ascontiguousarray)")
        self.shape, self.info, self.header = shape, member.info, member.header
        self.stored = member.data_offset is not None
        self.offset = member.data_offset

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        return self.shape[1], self.shape[2]

    def _reader(self):
        if self.stored:
            f = open(self.path, "rb")
            f.seek(self.offset)
            return f
        zf = zipfile.ZipFile(self.path)
        f = zf.open(self.info)
        f.read(self.header)
        return f

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """uint8 (B,3,H,W) batches in order; one buffer of batch_size images is reused."""
        n, h, w, c = self.shape
        row = h * w * c
        buf = np.empty((batch_size, h, w, c), np.uint8)
        with self._reader() as f:
            for a in range(0, n, batch_size):
                k = min(batch_size, n - a)
                view = memoryview(buf[:k].reshape(-1))
                got = 0
                while got < k * row:
                    r = f.readinto(view[got:])
                    if not r:
                        raise UserError(f"{self.path}: arr_0 ends after {a + got // row} of {n} images (truncated file)")
                    got += r
                yield torch.from_numpy(buf[:k]).permute(0, 3, 1, 2)

    def array(self) -> np.ndarray:
        """The whole arr_0 (N,H,W,3): memory-mapped when stored, loaded when compressed (small sets only)."""
        if self.stored:
            return np.memmap(self.path, np.uint8, "r", offset=self.offset, shape=self.shape)
        with np.load(self.path, allow_pickle=False) as z:
            return z["arr_0"]


class FolderSamples:
    """A folder of images (searched recursively), decoded batch by batch, centre-cropped to `resolution`
    (0: the shorter side of the first image)."""

    def __init__(self, path: str, resolution: int = 0):
        self.path = path
        self.files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if is_image_file(f))
        if not self.files:
            raise UserError(f"samples={path} holds no images")
        with load_rgb(self.files[0]) as im:
            first = min(im.size)
        self.resolution = int(resolution) or first
        self.first_side = first
        self.labels = None

    def __len__(self) -> int:
        return len(self.files)

    @property
    def size(self) -> tuple[int, int]:
        return self.first_side, self.first_side

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for a in range(0, len(self.files), batch_size):
            yield torch.stack([resize_and_crop(load_rgb(f), self.resolution, False) for f in self.files[a : a + batch_size]])

    def array(self) -> np.ndarray:
        return torch.cat(list(self.batches(256))).permute(0, 2, 3, 1).numpy()


class ResizedSamples:
    """Samples resized to side x side as they are read (`resize=bicubic` of `generators.evaluate`): bicubic
    interpolation (torch, align_corners=False, no antialiasing) of the uint8 values, rounded back to uint8. This is
    how LlamaGen's sampler brings 384-px samples to ADM's 256-px evaluator (F.interpolate(mode="bicubic") before
    writing the .npz); here it runs on the stored uint8 samples."""

    def __init__(self, samples, side: int):
        self.samples, self.side, self.labels = samples, side, samples.labels

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def size(self) -> tuple[int, int]:
        return self.side, self.side

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for x in self.samples.batches(batch_size):  # uint8 (B,3,h,w) -> uint8 (B,3,side,side)
            y = F.interpolate(x.float(), size=(self.side, self.side), mode="bicubic", align_corners=False)
            yield y.round_().clamp_(0, 255).to(torch.uint8)

    def array(self) -> np.ndarray:
        return torch.cat(list(self.batches(256))).permute(0, 2, 3, 1).numpy()


def open_samples(path: str, resolution: int = 0):
    """NpzSamples or FolderSamples."""
    if path and os.path.isdir(path):
        return FolderSamples(path, resolution)
    if not path or not path.endswith(".npz") or not os.path.isfile(path):
        raise UserError(f"samples= must be a .npz file (ADM layout, arr_0 uint8 NHWC) or a folder of images (got {path!r})")
    return NpzSamples(path)
