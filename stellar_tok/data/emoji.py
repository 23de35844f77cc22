"""A real image set built offline: Noto Color Emoji drawings, one class per Unicode emoji group.

Both sources are Debian packages (``apt-get install fonts-noto-color-emoji unicode-data libfribidi0``):

- ``NotoColorEmoji.ttf`` (fonts-noto-color-emoji): Google's colour emoji, drawn by people, not by this project
  (font under the SIL Open Font License 1.1, artwork under Apache-2.0);
- ``emoji-test.txt`` (unicode-data): every emoji sequence with its group ("Smileys & Emotion", "Animals & Nature",
  "Food & Drink", ...) and status.

`build_emoji_shards` draws every fully-qualified sequence with Pillow (libraqm shapes the multi-code-point
sequences: flags, families, professions), crops it to its visible pixels, pads it to a centred square, resizes it
to ``size`` px (Lanczos) and lays it on a white background. The label is the emoji's group; the "Component" group
(bare skin tones and hair styles) is left out, and so, by default, are the skin-tone variants, which would give
"People & Body" 59% of the images as near-copies of each other. The train/val split is a hash of the sequence
without its skin tones, so a split never depends on the order or on the other images, and variants of one emoji
(with ``tones=True``) stay in the same split. The samples are shuffled with a fixed seed before they are written,
so a shard mixes the classes; the tar members carry no time stamps, so a rebuild is byte-identical.

With Debian 12's packages (font 2.042, Unicode 15.0) this gives 1,870 images in 9 classes (1,491 train, 379
val) as ``train-000000.tar`` and ``val-000000.tar`` (PNG + ``.cls``), ``classes.json`` and ``dataset.json``,
about 15 MB, in about 20 s; the trainer reads them with ``data.name=wds data.path=DIR``.
"""
from __future__ import annotations

import glob
import hashlib
import io
import os
import random
import re
from dataclasses import dataclass
from typing import Iterable, Iterator

import webdataset as wds
from PIL import Image, ImageDraw, ImageFont, features

from stellar_tok.files import atomic_write_json

from .settings import DataError

FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST_PATH = "/usr/share/unicode/emoji/emoji-test.txt"
APT_HINT = "apt-get install fonts-noto-color-emoji unicode-data libfribidi0"
NOTO_BITMAP_SIZE = 109  # the only size of Noto Color Emoji's bitmap strikes
DROPPED_GROUPS = ("Component",)
SKIN_TONES = re.compile("[\U0001F3FB-\U0001F3FF]")
VARIATION_SELECTOR = "\ufe0f"


@dataclass(frozen=True)
class Emoji:
    group: str  # the Unicode emoji group: the class
    subgroup: str
    sequence: str  # the code points, as a string
    name: str  # the CLDR short name, e.g. "grinning face"

    @property
    def key(self) -> str:
        """A file-name-safe key: the code points in hex without variation selectors, e.g. ``1f600`` or ``1f1eb-1f1f7``."""
        return "-".join(f"{ord(c):x}" for c in self.sequence if c != VARIATION_SELECTOR)

    @property
    def base(self) -> str:
        """The sequence without skin tones and variation selectors: what variants of one emoji share."""
        return SKIN_TONES.sub("", self.sequence).replace(VARIATION_SELECTOR, "")

    @property
    def toned(self) -> bool:
        """Whether this is a skin-tone variant of another emoji."""
        return SKIN_TONES.search(self.sequence) is not None


def parse_emoji_test(text: str) -> list[Emoji]:
    """The fully-qualified sequences of an ``emoji-test.txt``, in file order, with their group and subgroup."""
    group = subgroup = ""
    found = []
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line.strip() and not line.startswith("#"):
            points, _, rest = line.partition(";")
            status, _, comment = rest.partition("#")
            if status.strip() != "fully-qualified":
                continue
            # comment: "<emoji> E<version> <name>"
            name = comment.strip().split(" ", 2)[-1]
            found.append(Emoji(group, subgroup, "".join(chr(int(p, 16)) for p in points.split()), name))
    return found


def split_of(emoji: Emoji, val_percent: int) -> str:
    """``"val"`` for about ``val_percent``% of emoji, chosen by a hash of `Emoji.base` (so order-free and stable)."""
    digest = int(hashlib.sha1(emoji.base.encode("utf-8")).hexdigest()[:8], 16)
    return "val" if digest % 100 < val_percent else "train"


def render_emoji(font: ImageFont.FreeTypeFont, sequence: str, size: int, margin: float = 0.04) -> Image.Image | None:
    """One sequence drawn with ``font``, cropped to its visible pixels, padded to a centred square with ``margin``
    of its side on each edge, resized to ``size`` x ``size`` and laid on white (RGB); None when nothing is drawn."""
    em = font.size
    canvas = Image.new("RGBA", (3 * em, 2 * em), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((em // 4, em // 4), sequence, font=font, embedded_color=True, fill=(0, 0, 0, 255))
    box = canvas.getchannel("A").getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    side = round(max(glyph.size) * (1 + 2 * margin))
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    square = square.resize((size, size), Image.LANCZOS)
    out = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    out.alpha_composite(square)
    return out.convert("RGB")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _samples(emoji: Iterable[Emoji], font, size: int, classes: list[str], val_percent: int, skipped: dict) -> Iterator[tuple]:
    for item in emoji:
        if font.getlength(item.sequence) > 1.5 * font.size:  # the font drew several glyphs: a sequence it lacks
            skipped["not_in_font"] += 1
            continue
        image = render_emoji(font, item.sequence, size)
        if image is None:
            skipped["empty"] += 1
            continue
        yield split_of(item, val_percent), item, image, classes.index(item.group)


def build_emoji_shards(out_dir: str, font_path: str = FONT_PATH, emoji_test_path: str = EMOJI_TEST_PATH, size: int = 64,
                       val_percent: int = 20, tones: bool = False, font_size: int = NOTO_BITMAP_SIZE, seed: int = 0,
                       overwrite: bool = False, require_layout: bool = True) -> dict:
    """Write ``train-*.tar``, ``val-*.tar``, ``classes.json`` and ``dataset.json`` to ``out_dir`` (see the module
    docstring); returns the summary written to ``dataset.json``. ``require_layout``: stop unless Pillow can shape
    multi-code-point sequences (libraqm with libfribidi), which most flags, families and professions need."""
    for path in (font_path, emoji_test_path):
        if not os.path.isfile(path):
            raise DataError(f"{path} not found: {APT_HINT}")
    if require_layout and not features.check("raqm"):
        raise DataError(f"Pillow cannot shape emoji sequences (no libraqm/libfribidi): {APT_HINT}")
    if not 0 <= val_percent <= 100:
        raise DataError(f"val_percent must be in 0..100 (got {val_percent})")
    existing = sorted(glob.glob(os.path.join(glob.escape(out_dir), "*.tar")))
    if existing and not overwrite:
        raise DataError(f"{out_dir!r} already holds {len(existing)} shards; remove them or pass overwrite=true")
    with open(emoji_test_path, encoding="utf-8") as f:
        text = f.read()
    emoji = [e for e in parse_emoji_test(text) if e.group not in DROPPED_GROUPS]
    kept = [e for e in emoji if tones or not e.toned]
    skipped = {"tone_variant": len(emoji) - len(kept), "not_in_font": 0, "empty": 0}
    emoji = kept
    classes = list(dict.fromkeys(e.group for e in emoji))
    if not classes:
        raise DataError(f"{emoji_test_path} lists no fully-qualified emoji outside {', '.join(DROPPED_GROUPS)}")
    try:
        font = ImageFont.truetype(font_path, font_size)
    except OSError as exn:
        raise DataError(f"cannot load the font {font_path} at size {font_size}: {exn}") from None

    drawn = list(_samples(emoji, font, size, classes, val_percent, skipped))
    random.Random(seed).shuffle(drawn)
    os.makedirs(out_dir, exist_ok=True)
    for path in existing:
        os.remove(path)
    counts = {split: [0] * len(classes) for split in ("train", "val")}
    for split in ("train", "val"):
        rows = [row for row in drawn if row[0] == split]
        if not rows:
            continue
        with wds.ShardWriter(os.path.join(out_dir, f"{split}-%06d.tar"), maxcount=100_000, verbose=0, mtime=0.0, mode=0o644) as writer:
            for _, item, image, label in rows:
                writer.write({"__key__": f"emoji_{item.key}", "png": _png(image), "cls": str(label).encode()})
                counts[split][label] += 1
    shards = sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(out_dir), "*.tar")))
    atomic_write_json(os.path.join(out_dir, "classes.json"), classes)
    summary = {
        "source": {"font": os.path.basename(font_path), "emoji_test": os.path.basename(emoji_test_path),
                   "emoji_test_version": _emoji_version(text)},
        "size": size, "val_percent": val_percent, "tones": tones, "seed": seed,
        "classes": classes, "counts": counts,
        "train": sum(counts["train"]), "val": sum(counts["val"]), "skipped": skipped,
        "shards": shards, "bytes": sum(os.path.getsize(os.path.join(out_dir, s)) for s in shards),
    }
    atomic_write_json(os.path.join(out_dir, "dataset.json"), summary)
    return summary


def _emoji_version(text: str) -> str | None:
    """The ``# Version:`` of an emoji-test.txt's header."""
    for line in text.splitlines():
        if line.startswith("# Version:"):
            return line.split(":", 1)[1].strip()
        if not line.startswith("#"):
            break
    return None


def count_summary(summary: dict) -> str:
    """One line for the command: images per split and class."""
    per_class = ", ".join(f"{c} {t}+{v}" for c, t, v in zip(summary["classes"], summary["counts"]["train"], summary["counts"]["val"]))
    return (f"{summary['train']} train + {summary['val']} val images at {summary['size']} px in {len(summary['classes'])} "
            f"classes ({per_class}); {summary['bytes'] / 1e6:.1f} MB")


__all__ = ["APT_HINT", "EMOJI_TEST_PATH", "FONT_PATH", "Emoji", "build_emoji_shards", "count_summary", "parse_emoji_test",
           "render_emoji", "split_of"]
