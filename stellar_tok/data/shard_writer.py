"""Write an image folder as WebDataset tar shards (what `python -m stellar_tok.make_shards` runs).

    summary = make_shards("data/imagenet/train", "shards/", shard_size=1000, prefix="train")
    # shards/train-000000.tar, ... and shards/classes.json; summary: written, skipped by reason, shards, classes

``src`` holds class sub-folders (sorted names -> labels 0..C-1) or, for unlabelled data, images directly. Every
sample is ``<key>.<ext>`` holding the original encoded bytes (``jpg``, ``png`` or ``webp``, named after the real
format; other formats are re-encoded losslessly as PNG) plus ``<key>.cls``, the label as text (absent for
unlabelled data). Keys are unique (``<prefix>_<index>``) and the samples are shuffled with ``seed`` before
writing, so each shard mixes all classes. Every image is decoded first: unreadable files and images under 8 px
on a side are skipped and counted. ``resize=N`` stores JPEG (quality 95) re-encodings whose shorter side is at
most N. The class list goes to ``OUT_DIR/classes.json``; an existing one is reused, so val labels match train's.
"""
from __future__ import annotations

import glob
import io
import json
import multiprocessing
import os
import random

import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from stellar_tok.files import atomic_write_json

from .folder import find_images
from .images import load_rgb
from .settings import DataError
from .skips import BadSample

_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def encode_sample(path: str, resize: int | None = None) -> tuple[str, bytes]:
    """Validate one image and return ``(extension, bytes)`` to store; raises `BadSample` if it is bad.

    Without ``resize`` the original bytes are kept for JPEG, PNG and WebP files (other formats become
    PNG). With ``resize`` the image is converted to RGB, shrunk so its shorter side is at most
    ``resize`` and stored as JPEG quality 95.
    """
    with open(path, "rb") as f:
        data = f.read()
    img = load_rgb(data)  # full decode: catches truncated and corrupt files, tiny images
    if resize:
        short = min(img.size)
        if short > resize:
            img = img.resize((max(1, round(img.width * resize / short)), max(1, round(img.height * resize / short))), Image.BICUBIC)
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=95)
        return "jpg", out.getvalue()
    fmt = Image.open(io.BytesIO(data)).format
    if fmt in _KEEP_FORMATS:
        return _KEEP_FORMATS[fmt], data
    out = io.BytesIO()
    img.save(out, format="PNG")
    return "png", out.getvalue()


def _encode_job(job: tuple[int, str, int, int | None]) -> tuple[int, int, str, bytes | str]:
    """Worker: ``(index, path, label, resize)`` -> ``(index, label, ext or "", bytes or skip reason)``."""
    index, path, label, resize = job
    try:
        ext, data = encode_sample(path, resize)
        return index, label, ext, data
    except BadSample as bad:
        return index, label, "", bad.reason
    except OSError:
        return index, label, "", "decode_error"


def _load_classes(path: str) -> list[str]:
    try:
        with open(path) as f:
            classes = json.load(f)
    except (OSError, ValueError) as exn:
        raise DataError(f"cannot read the class list {path!r}: {exn}") from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{path!r} must hold a JSON list of class names")
    return classes


def _write(results, pattern: str, prefix: str, shard_size: int, max_size: float, bar) -> tuple[int, dict[str, int]]:
    """Write the encoded samples of `results` (`_encode_job`'s tuples) to shards named `pattern`; returns (written,
    skipped by reason)."""
    skipped: dict[str, int] = {}
    written = 0
    writer = wds.ShardWriter(pattern, maxcount=shard_size, maxsize=max_size or float("inf"), verbose=0,
                             encoder=False, mtime=0.0, mode=0o644)
    try:
        for index, label, ext, payload in results:
            if ext:
                sample = {"__key__": f"{prefix}_{index:08d}", ext: payload}
                if label >= 0:
                    sample["cls"] = str(label).encode()
                writer.write(sample)
                written += 1
            else:
                skipped[payload] = skipped.get(payload, 0) + 1
            bar.update(1)
    finally:
        writer.close()
    return written, skipped


def make_shards(src: str, out_dir: str, shard_size: int = 1000, prefix: str = "train", max_size: float = 0,
                seed: int = 0, resize: int | None = None, classes_file: str | None = None,
                workers: int = 1, overwrite: bool = False, progress: bool = True) -> dict:
    """Write the shards; returns a summary dict (written, skipped by reason, shards, paths)."""
    if shard_size < 1:
        raise DataError(f"shard_size must be >= 1 (got {shard_size})")
    if not prefix or any(c in prefix for c in "/.{}%"):
        raise DataError(f"prefix must be a plain name without / . {{ }} % (got {prefix!r})")
    os.makedirs(out_dir, exist_ok=True)
    existing = sorted(glob.glob(os.path.join(glob.escape(out_dir), f"{prefix}-*.tar")))
    if existing and not overwrite:
        raise DataError(f"{out_dir!r} already holds {len(existing)} {prefix}-*.tar shards; remove them or pass overwrite=true (--overwrite)")
    classes_path = os.path.join(out_dir, "classes.json")
    known = None
    if classes_file:
        known = _load_classes(classes_file)
    elif os.path.isfile(classes_path) and not overwrite:
        known = _load_classes(classes_path)
    paths, labels, classes = find_images(src, known, what="SRC_FOLDER")
    for path in existing:
        os.remove(path)

    order = list(range(len(paths)))
    random.Random(seed).shuffle(order)
    jobs = [(i, paths[j], labels[j], resize) for i, j in enumerate(order)]
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    results = pool.imap(_encode_job, jobs, chunksize=16) if pool is not None else map(_encode_job, jobs)
    bar = tqdm(total=len(jobs), unit="img", desc="shards", disable=not progress, dynamic_ncols=True)
    try:
        written, skipped = _write(results, os.path.join(out_dir, f"{prefix}-%06d.tar"), prefix, shard_size, max_size, bar)
    finally:
        if pool is not None:
            pool.terminate()
        bar.close()
    shards = sorted(glob.glob(os.path.join(glob.escape(out_dir), f"{prefix}-*.tar")))
    if written == 0:  # ShardWriter opens its first shard eagerly: do not leave an empty one behind
        for path in shards:
            os.remove(path)
        shards = []
    if classes and (known is None or classes_file):
        atomic_write_json(classes_path, classes)
    return {"written": written, "skipped": skipped, "shards": shards, "classes": classes, "classes_path": classes_path}
