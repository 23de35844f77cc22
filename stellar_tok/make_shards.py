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

The writer is `stellar_tok.data.shard_writer.make_shards`. The older flag form still works in this release and
means the same, with a FutureWarning naming its key=value equivalent (it stops working in the next release):
``SRC_FOLDER OUT_DIR`` as the first two arguments, and ``--shard-size N``, ``--prefix P``, ``--max-size B``,
``--seed S``, ``--resize N``, ``--classes JSON``, ``--workers W``, ``--overwrite``, ``--no-progress`` for the
keys of the same names.
"""
from __future__ import annotations

import os
import re
import shlex
import sys
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

from stellar_tok.data.shard_writer import make_shards

from .config import parse_command
from .data import DataError
from .errors import UserError, cli_entry


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
    """The older flag form (deprecated: `warn_flag_form`) -> (`key=value` arguments, positional SRC_FOLDER / OUT_DIR).
    `key=value` arguments and --help pass through unchanged."""
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


def warn_flag_form(argv: Sequence[str], args: list[str], positional: list[str]) -> None:
    """A FutureWarning naming the key=value form of `argv` when it uses the older flag form (`from_flags` gave
    `args` and `positional`); nothing for the key=value form."""
    if not positional and not any(a.startswith("--") and a != "--help" for a in argv):
        return
    same = [f"{key}={value}" for key, value in zip(("src", "out"), positional)] + args
    warnings.warn("the flag form of make_shards stops working in the next release; the same in key=value form: "
                  f"python -m stellar_tok.make_shards {shlex.join(same)}", FutureWarning, stacklevel=2)


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, positional = from_flags(argv)
    warn_flag_form(argv, args, positional)
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
