"""Build the emoji image set: 64 px Noto Color Emoji drawings, 9 classes, as WebDataset shards (offline).

    apt-get install fonts-noto-color-emoji unicode-data libfribidi0   # once (Debian/Ubuntu)
    python -m stellar_tok.make_emoji out=data/emoji64

writes ``data/emoji64/{train,val}-000000.tar``, ``classes.json`` and ``dataset.json`` (1,870 images, 1,491 train
and 379 val, about 15 MB, about 20 s with Debian 12's packages; the same bytes on every rebuild). Train on it with
``data.name=wds data.path=data/emoji64``, e.g. ``configs/tokenizer/emoji64_cpu.yaml``. How the images are drawn,
labelled and split: `stellar_tok.data.emoji`.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from stellar_tok.data.emoji import EMOJI_TEST_PATH, FONT_PATH, build_emoji_shards, count_summary

from .config import parse_command
from .errors import UserError, cli_entry


@dataclass
class MakeEmojiConfig:
    out: Optional[str] = None  # OUT_DIR: where the shards, classes.json and dataset.json go
    size: int = 64  # image side in pixels
    val_percent: int = 20  # share of emoji (by a hash of the sequence) in the val split
    tones: bool = False  # also the skin-tone variants (3,655 images; People & Body becomes 59% of them)
    seed: int = 0  # seed of the shuffle before writing
    font: str = FONT_PATH  # Noto Color Emoji (fonts-noto-color-emoji)
    emoji_test: str = EMOJI_TEST_PATH  # the Unicode emoji list with groups (unicode-data)
    overwrite: bool = False  # replace the shards already in OUT_DIR


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_command("python -m stellar_tok.make_emoji", __doc__, MakeEmojiConfig, argv, "out=data/emoji64")
    if not cfg.out:
        raise UserError("out= is required (see --help)")
    if cfg.size < 8:
        raise UserError(f"size must be >= 8 (got {cfg.size})")
    start = time.perf_counter()
    summary = build_emoji_shards(cfg.out, font_path=cfg.font, emoji_test_path=cfg.emoji_test, size=cfg.size,
                                 val_percent=cfg.val_percent, tones=cfg.tones, seed=cfg.seed, overwrite=cfg.overwrite)
    print(f"wrote {count_summary(summary)} to {cfg.out} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
