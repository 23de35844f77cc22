"""A set of generated samples, read batch by batch: an ADM-style samples.npz or a folder of images.

    NpzSamples    `arr_0` (uint8 N,H,W,3) of a .npz read once in order, straight from the file (a stored member at its
                  offset, a compressed one through the zip stream): never whole in memory; `arr_1`: the labels
    FolderSamples a folder of images (searched recursively), centre-cropped to one resolution
    open_samples  the one or the other, from a path

Scored by `generators.scoring` (the command: `python -m generators.evaluate`).
"""
from __future__ import annotations

import os
import struct
import zipfile
from typing import Iterator

import numpy as np
import torch

from stellar_tok.data import is_image_file, load_rgb, resize_and_crop
from stellar_tok.errors import UserError


def _npy_member_offset(path: str, info: zipfile.ZipInfo) -> int:
    """Where a stored (uncompressed) member's bytes start in the zip file: after its local header, whose extra
    field (zip64) may differ from the central directory's."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
    if head[:4] != b"PK\x03\x04":
        raise UserError(f"{path}: corrupt zip (no local header for {info.filename})")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len


class NpzSamples:
    """`arr_0` (uint8 N,H,W,3) of an ADM-style .npz, read once in order by `batches`, never whole."""

    def __init__(self, path: str):
        self.path = path
        try:
            zf = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as e:
            raise UserError(f"samples={path} is not a readable .npz ({type(e).__name__})") from None
        with zf:
            if "arr_0.npy" not in zf.namelist():
                raise UserError(f"{path}: no arr_0 (uint8 images N,H,W,3); members: {', '.join(zf.namelist())}")
            self.info = zf.getinfo("arr_0.npy")
            with zf.open(self.info) as f:
                version = np.lib.format.read_magic(f)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is None:
                    raise UserError(f"{path}: arr_0 has .npy format version {version}; expected 1.0 or 2.0 (np.save, np.savez)")
                shape, fortran, dtype = read_header(f)
                header = f.tell()
            self.labels = None
            if "arr_1.npy" in zf.namelist():
                with zf.open("arr_1.npy") as f:
                    self.labels = np.lib.format.read_array(f, allow_pickle=False)
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise UserError(f"{path}: arr_0 must be uint8 images of shape (N,H,W,3) (got {dtype} {shape})")
        if fortran:
            raise UserError(f"{path}: arr_0 is stored in Fortran order; write it C-contiguous (np.ascontiguousarray)")
        self.shape = tuple(int(d) for d in shape)
        self.stored = self.info.compress_type == zipfile.ZIP_STORED
        self.offset = _npy_member_offset(path, self.info) + header if self.stored else None
        self.header = header

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


def open_samples(path: str, resolution: int = 0):
    """NpzSamples or FolderSamples."""
    if path and os.path.isdir(path):
        return FolderSamples(path, resolution)
    if not path or not path.endswith(".npz") or not os.path.isfile(path):
        raise UserError(f"samples= must be a .npz file (ADM layout, arr_0 uint8 NHWC) or a folder of images (got {path!r})")
    return NpzSamples(path)
