"""Images: recognising image files, decoding them to 8-bit RGB, cutting squares, and stacking batches.

`load_rgb` decodes a file or encoded bytes with PIL whatever its mode (grey, palette, CMYK, 16-bit, alpha
composited on white), applies the EXIF orientation, and raises `BadSample` for bytes it cannot use;
`resize_and_crop` brings the result to a uint8 ``(3, R, R)`` tensor; `collate_samples` stacks `ImageSample`
items into the ``(images, labels)`` batches every loader of `stellar_tok.data` yields.
"""
from __future__ import annotations

import io
import os
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .skips import BadSample

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
MIN_IMAGE_SIDE = 8  # images smaller than this on either side are skipped


class ImageSample(NamedTuple):
    """One item of every data set here: a uint8 image ``(3, R, R)`` and an int label (-1: unlabelled)."""

    image: torch.Tensor
    label: int


def is_image_file(name: str) -> bool:
    """Whether a file name is a (non-hidden) image by its extension, one of `IMAGE_EXTENSIONS`."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _to_8bit_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB. Transparent images are composited on white."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            arr = arr * 255.0 if np.nanmax(arr) <= 1.0 else arr
        elif mode.startswith("I;16") or arr.max() > 255:
            arr = arr.astype(np.float64) / 257.0  # 16-bit range -> 8-bit
        arr = np.nan_to_num(np.clip(np.rint(arr), 0, 255)).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "PA", "RGBa", "La") or (mode in ("L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, HSV, ...


def load_rgb(source: str | os.PathLike | bytes, min_side: int = MIN_IMAGE_SIDE, target: int | None = None) -> Image.Image:
    """Decode an image file or encoded bytes into an 8-bit RGB PIL image.

    Handles grayscale, palette, CMYK, 16-bit and alpha images (alpha composited on white) and applies
    the EXIF orientation. With ``target``, large JPEGs are decoded at a reduced scale whose shorter side
    is still at least ``target`` (much faster for big photos). Raises `BadSample` with reason
    ``decode_error`` (unreadable, truncated, unsupported) or ``too_small`` (a side under ``min_side``).
    """
    img = None
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source)
        width, height = img.size
        if min(width, height) < min_side:
            raise BadSample("too_small", f"{width}x{height} px, need at least {min_side} px on each side")
        if target is not None and img.format == "JPEG":
            short = min(width, height)
            img.draft(None, (max(1, width * target // short), max(1, height * target // short)))
        img.load()
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # a broken EXIF block is no reason to drop the pixels
            pass
        return _to_8bit_rgb(img)  # load() has read the pixels and closed a file that PIL opened itself
    except Exception as exn:  # PIL raises many types: OSError, SyntaxError, ValueError, DecompressionBomb...
        if img is not None:
            img.close()
        if isinstance(exn, BadSample):
            raise
        raise BadSample("decode_error", f"{type(exn).__name__}: {exn}") from exn


def resize_and_crop(img: Image.Image, resolution: int, random_crop: bool) -> torch.Tensor:
    """Resize so the shorter side is ``resolution`` (bicubic, antialiased) and crop a square.

    The crop is central, or uniformly random along the longer side when ``random_crop`` (drawn from
    torch's RNG, which DataLoader seeds per worker). Returns a uint8 tensor ``(3, resolution, resolution)``.
    """
    width, height = img.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    extra_x, extra_y = new_w - resolution, new_h - resolution
    if random_crop:
        left = int(torch.randint(0, extra_x + 1, ()).item()) if extra_x else 0
        top = int(torch.randint(0, extra_y + 1, ()).item()) if extra_y else 0
    else:
        left, top = extra_x // 2, extra_y // 2
    arr = np.asarray(img.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def collate_samples(batch: Sequence[tuple[Any, int]]) -> tuple[Any, torch.Tensor]:
    """Stack ``(image, label)`` items into uint8 ``(B, 3, R, R)`` images and int64 ``(B,)`` labels; items whose
    image is a dict of views (`stellar_tok.data.crops`) give a dict of stacked views."""
    first = batch[0][0]
    if isinstance(first, dict):
        images = {k: torch.stack([item[0][k] for item in batch]) for k in first}
    else:
        images = torch.stack([item[0] for item in batch])
    labels = torch.tensor([int(item[1]) for item in batch], dtype=torch.int64)
    return images, labels
