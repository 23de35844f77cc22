"""Convert an image folder into WebDataset tar shards.

    python -m stellar_tok.make_shards src=data/imagenet/train out=shards/ prefix=train shard_size=1000
    python -m stellar_tok.make_shards src=data/imagenet/val   out=shards/ prefix=val

writes ``shards/train-000000.tar, ...`` and ``shards/val-000000.tar, ...``, which the trainer reads with
``data.name=wds data.path=shards/`` (or a brace pattern such as ``shards/train-{000000..001281}.tar``).

``src`` (SRC_FOLDER) holds class sub-folders (sorted names -> labels 0..C-1) or, for unlabelled data, images
directly. Every sample is ``<key>.<ext>`` holding the original encoded bytes (``jpg``, ``png`` or
``webp``, named after the real format; other formats are re-encoded losslessly as PNG) plus ``<key>.cls``,
the label as text (absent for unlabelled data). Keys are unique (``<prefix>_<index>``) and the samples
are shuffled with ``seed`` before writing, so each shard mixes all classes. Every image is decoded
first: unreadable files and images under 8 px on a side are skipped and counted. ``resize=N`` stores
JPEG (quality 95) re-encodings whose shorter side is at most N (smaller images keep their size).

The class list goes to ``OUT_DIR/classes.json``. If that file already exists (say from the train
conversion) it is reused, so val labels match train labels even when val lacks some classes.

The older flag form still works and means the same: ``SRC_FOLDER OUT_DIR`` as the first two arguments, and
``--shard-size N``, ``--prefix P``, ``--max-size B``, ``--seed S``, ``--resize N``, ``--classes JSON``,
``--workers W``, ``--overwrite``, ``--no-progress`` for the keys of the same names.
"""
from __future__ import annotations

import glob
import io
import json
import os
import random
import re
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from PIL import Image

from .config import parse_command
from .data import BadSample, DataError, find_images, load_rgb
from .errors import UserError, cli_entry
from .files import atomic_write_json

_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def parse_size(text: str) -> float:
    """Parse a byte count such as ``0``, ``3e9``, ``500M`` or ``2G`` (0: no limit)."""
    units = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
    text = text.strip().lower().removesuffix("b")
    factor = units.get(text[-1:], 1.0)
    try:
        value = float(text[:-1] if text[-1:] in units else text) * factor
    except ValueError:
        raise UserError(f"max_size: not a size in bytes: {text!r} (examples: 0, 3e9, 500M, 2G)") from None
    if value < 0:
        raise UserError(f"max_size must be >= 0 (got {text!r})")
    return value


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


def _progress(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of the package
        return None
    return tqdm(total=total, unit="img", desc="shards", disable=not enabled, dynamic_ncols=True)


def _load_classes(path: str) -> list[str]:
    try:
        with open(path) as f:
            classes = json.load(f)
    except (OSError, ValueError) as exn:
        raise DataError(f"cannot read the class list {path!r}: {exn}") from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{path!r} must hold a JSON list of class names")
    return classes


def make_shards(src: str, out_dir: str, shard_size: int = 1000, prefix: str = "train", max_size: float = 0,
                seed: int = 0, resize: int | None = None, classes_file: str | None = None,
                workers: int = 1, overwrite: bool = False, progress: bool = True) -> dict:
    """Write the shards; returns a summary dict (written, skipped by reason, shards, paths)."""
    import webdataset as wds

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
    skipped: dict[str, int] = {}
    written = 0
    pattern = os.path.join(out_dir, f"{prefix}-%06d.tar")
    bar = _progress(len(jobs), progress)
    pool = None
    if workers > 1:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(workers)
        results = pool.imap(_encode_job, jobs, chunksize=16)
    else:
        results = map(_encode_job, jobs)
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
            if bar is not None:
                bar.update(1)
    finally:
        writer.close()
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    shards = sorted(glob.glob(os.path.join(glob.escape(out_dir), f"{prefix}-*.tar")))
    if written == 0:  # ShardWriter opens its first shard eagerly: do not leave an empty one behind
        for path in shards:
            os.remove(path)
        shards = []
    if classes and (known is None or classes_file):
        atomic_write_json(classes_path, classes)
    return {"written": written, "skipped": skipped, "shards": shards, "classes": classes, "classes_path": classes_path}


@dataclass
class MakeShardsConfig:
    src: Optional[str] = None  # SRC_FOLDER: one sub-folder of images per class (or images directly)
    out: Optional[str] = None  # OUT_DIR: where the shards and classes.json go
    prefix: str = "train"  # shard name prefix, e.g. train or val
    shard_size: int = 1000  # images per shard
    max_size: str = "0"  # also start a new shard once one reaches this many bytes, e.g. 3e9 or 500M (0: no limit)
    seed: int = 0  # seed of the sample shuffle
    resize: Optional[int] = None  # re-encode as JPEG quality 95 with the shorter side at most N (null: original bytes)
    classes: Optional[str] = None  # class list (JSON) to label with (null: OUT_DIR/classes.json if it exists, else the sub-folders)
    workers: int = 1  # processes that decode and check images
    overwrite: bool = False  # replace existing PREFIX-*.tar shards and classes.json in OUT_DIR
    progress: bool = True


_FLAGS = {"--shard-size": "shard_size", "--prefix": "prefix", "--max-size": "max_size", "--seed": "seed", "--resize": "resize",
          "--classes": "classes", "--workers": "workers"}
_SWITCHES = {"--overwrite": "overwrite=true", "--no-progress": "progress=false"}
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")


def from_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """The older flag form -> (`key=value` arguments, positional SRC_FOLDER / OUT_DIR). `key=value` arguments and
    --help pass through unchanged."""
    args, positional = [], []
    it = iter(argv)
    for a in it:
        flag, eq, value = a.partition("=")
        if a in ("-h", "--help") or _KEY.match(a):
            args.append(a)
        elif a in _SWITCHES:
            args.append(_SWITCHES[a])
        elif flag in _FLAGS:
            value = value if eq else next(it, None)
            if value is None:
                raise UserError(f"{flag} needs a value (see --help)")
            args.append(f"{_FLAGS[flag]}={value}")
        elif a.startswith("-"):
            raise UserError(f"unknown option {a!r} (see --help)")
        else:
            positional.append(a)
    if len(positional) > 2:
        raise UserError(f"argument {positional[2]!r}: expected at most SRC_FOLDER and OUT_DIR (see --help)")
    return args, positional


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args, positional = from_flags(sys.argv[1:] if argv is None else list(argv))
    cfg = parse_command("python -m stellar_tok.make_shards", __doc__, MakeShardsConfig, args,
                        "src=SRC_FOLDER out=OUT_DIR prefix=val shard_size=1250")
    for key, value in zip(("src", "out"), positional):  # set as given: a path is not parsed as a value
        if cfg[key] is not None:
            raise UserError(f"{key} is given twice (as {key}= and as an argument)")
        cfg[key] = value
    for key in ("src", "out"):
        if not cfg[key]:
            raise UserError(f"{key}= is required (see --help)")
    if cfg.resize is not None and cfg.resize < 1:
        raise UserError(f"resize must be >= 1 (got {cfg.resize})")
    try:
        max_size = parse_size(str(cfg.max_size))
        summary = make_shards(cfg.src, cfg.out, shard_size=cfg.shard_size, prefix=cfg.prefix, max_size=max_size,
                              seed=cfg.seed, resize=cfg.resize, classes_file=cfg.classes, workers=cfg.workers,
                              overwrite=cfg.overwrite, progress=cfg.progress)
    except DataError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    skipped = summary["skipped"]
    detail = f" ({', '.join(f'{k}={v}' for k, v in sorted(skipped.items()))})" if skipped else ""
    shards = summary["shards"]
    names = [os.path.basename(p) for p in shards]
    where = "nothing written" if not shards else f"{names[0]}{' .. ' + names[-1] if len(names) > 1 else ''} in {cfg.out}"
    print(f"wrote {summary['written']} images, skipped {sum(skipped.values())}{detail}, {len(shards)} shards: {where}; "
          f"{len(summary['classes'])} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
