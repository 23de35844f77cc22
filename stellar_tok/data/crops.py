"""Training views cut from the decoded original, in the data loader (file-backed data: folder, wds).

A random-resized crop must come from the image itself, not from a smaller copy of it: a 96-px local crop
of a 500-px photo holds the photo's own pixels, and the 256-px main view (the reconstruction target) is
never an upsampled patch when the photo has the pixels. So, per sample and in the loader's workers:

    1. read the image's size (header only) and draw every view's box in it, by torchvision's
       RandomResizedCrop rule (area fraction in `scale`, log-uniform aspect ratio in [3/4, 4/3],
       10 tries, then a centre crop of the nearest allowed aspect);
    2. decode at the smallest JPEG reduction (1, 1/2, 1/4, 1/8: PIL's `draft`) that still gives every
       box at least its view's size in pixels;
    3. cut each box and resize it down to its view size (PIL bicubic, antialiased), flip half of them,
       rotate the non-main views by up to `views.rotation` degrees when asked.

    ViewCropper(views_cfg)(path or encoded bytes) -> dict of uint8 tensors
        main    (3,G,G)      the main view: crop + flip only
        global  (M-1,3,G,G)  the further global crops (the first masked view is a copy of main)
        local   (n,3,l,l)    the local crops

Every box, flip and angle of a sample is drawn from a generator seeded with (run seed, epoch, sample id)
(`sample_generator`): the sample's dataset index for folder data, its shard and key for wds. The views of a sample
are then the same whichever loader worker cuts them and wherever a run was resumed; the epoch is set in the main
process (`ViewCropper.set_epoch`, called through the data set's ``set_epoch``) and read by the workers from shared
memory.

Colour, blur, noise and masks are drawn per image on the training device (`stellar_tok.data.views.make_views`).
In-memory data sets (shapes, digits) are their own originals: their views are cut on the device from the
whole batch, with the same rule.
"""
from __future__ import annotations

import hashlib
import io
import math
import warnings
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from .images import load_rgb
from .skips import BadSample

RATIO = (3 / 4, 4 / 3)
_ORIENTATION_SWAPS = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees (width and height swap)


class Box(NamedTuple):
    """A crop box as fractions of the image's width and height, and the view size it is resized to."""

    left: float
    top: float
    width: float
    height: float
    size: int
    flip: bool


def sample_generator(seed: int, epoch: int, sample: int | str) -> torch.Generator:
    """A CPU generator seeded from (run seed, epoch, sample id), the same in every process and loader worker."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(epoch)}:{sample}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def random_resized_box(width: int, height: int, scale, size: int, flip: bool = True, ratio=RATIO,
                       generator: torch.Generator | None = None) -> Box:
    """torchvision RandomResizedCrop's box for a `width` x `height` image, drawn from `generator` (default: torch's
    global RNG), as fractions of the image; `flip`: mirror it with probability 1/2."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        area_frac, log_aspect, x, y = torch.rand(4, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * area_frac)
        aspect = math.exp(log_lo + (log_hi - log_lo) * log_aspect)
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = x * (width - w), y * (height - h)
            break
    else:  # no fit in 10 tries: the largest centred box of the nearest allowed aspect ratio
        aspect = width / height
        if aspect < ratio[0]:
            w, h = width, round(width / ratio[0])
        elif aspect > ratio[1]:
            w, h = round(height * ratio[1]), height
        else:
            w, h = width, height
        left, top = (width - w) / 2, (height - h) / 2
    return Box(left / width, top / height, w / width, h / height, size, flip and torch.rand((), generator=generator).item() < 0.5)


class ViewCropper:
    """Cuts the training views of one image (see the module docstring). Picklable, for DataLoader workers: the
    epoch (`set_epoch`) lives in shared memory, so workers started before it changes see the new one."""

    def __init__(self, views_cfg: Any, seed: int = 0):
        self.global_size = int(views_cfg.global_size)
        self.local_size = int(views_cfg.local_size)
        self.global_scale = tuple(float(s) for s in views_cfg.global_scale)
        self.local_scale = tuple(float(s) for s in views_cfg.local_scale)
        self.extra_globals = max(0, int(views_cfg.global_crops) - 1)
        self.locals = int(views_cfg.local_crops)
        self.rotation = float(views_cfg.rotation)
        self.seed = int(seed)
        self._epoch = torch.zeros(1, dtype=torch.int64)
        try:
            self._epoch.share_memory_()
        except Exception:  # pragma: no cover - no shared memory: workers started earlier keep the epoch they had
            warnings.warn("ViewCropper: shared memory unavailable; persistent loader workers do not see a new epoch")

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next views are drawn for (main process; loader workers read it from shared memory)."""
        self._epoch[0] = int(epoch)

    def generator(self, sample: int | str) -> torch.Generator:
        """The generator of `sample`'s views in the current epoch (`sample_generator`)."""
        return sample_generator(self.seed, self.epoch, sample)

    def boxes(self, width: int, height: int, generator: torch.Generator | None = None) -> list[Box]:
        """The main box, then the further global boxes, then the local boxes, for an image of this size."""
        sizes = [(self.global_scale, self.global_size)] * (1 + self.extra_globals) + [(self.local_scale, self.local_size)] * self.locals
        return [random_resized_box(width, height, scale, size, generator=generator) for scale, size in sizes]

    @staticmethod
    def needed_short_side(width: int, height: int, boxes: list[Box]) -> int:
        """The shorter side to decode at so that every box keeps at least its view size in pixels (capped at the
        image's own: a small image is upsampled because it has no more pixels)."""
        factor = max(b.size / min(b.width * width, b.height * height) for b in boxes)  # decode scale needed
        return min(min(width, height), math.ceil(min(width, height) * min(1.0, factor)))

    def decode(self, source, generator: torch.Generator | None = None) -> tuple[Image.Image, list[Box]]:
        """The image, decoded no larger than its boxes need (raises `BadSample`), and the boxes of its views."""
        width, height = _oriented_size(source)
        boxes = self.boxes(width, height, generator)
        return load_rgb(source, target=self.needed_short_side(width, height, boxes)), boxes

    def __call__(self, source, sample: int | str | None = None) -> dict[str, torch.Tensor]:
        """The views of `source` (a path or encoded bytes); `sample` (its id in the data) seeds them with the run's
        seed and the epoch, else they come from torch's global RNG."""
        g = None if sample is None else self.generator(sample)
        img, boxes = self.decode(source, g)
        crops = [self.cut(img, b, rotate=i > 0, generator=g) for i, b in enumerate(boxes)]
        g, n = 1 + self.extra_globals, self.locals
        empty = lambda s: torch.empty(0, 3, s, s, dtype=torch.uint8)  # noqa: E731
        return {
            "main": crops[0],
            "global": torch.stack(crops[1:g]) if g > 1 else empty(self.global_size),
            "local": torch.stack(crops[g:g + n]) if n else empty(self.local_size),
        }

    def cut(self, img: Image.Image, box: Box, rotate: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """One box of `img`, resized (antialiased bicubic) to its view size, flipped if drawn: uint8 (3,s,s)."""
        w, h = img.size
        region = (box.left * w, box.top * h, (box.left + box.width) * w, (box.top + box.height) * h)
        view = img.resize((box.size, box.size), Image.BICUBIC, box=region)
        if box.flip:
            view = view.transpose(Image.FLIP_LEFT_RIGHT)
        if rotate and self.rotation:
            angle = (2 * torch.rand((), generator=generator).item() - 1) * self.rotation
            view = view.rotate(angle, resample=Image.BILINEAR, fillcolor=(124, 116, 104))  # ImageNet mean outside
        return torch.from_numpy(np.ascontiguousarray(np.asarray(view, dtype=np.uint8).transpose(2, 0, 1)))


def _oriented_size(source) -> tuple[int, int]:
    """(width, height) as the image will be shown (after its EXIF orientation), from the header only."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source) as img:
            width, height = img.size
            try:
                orientation = img.getexif().get(0x0112, 1)
            except Exception:  # a broken EXIF block: load_rgb ignores it too
                orientation = 1
    except Exception as exn:
        raise BadSample("decode_error", f"{type(exn).__name__}: {exn}") from exn
    return (height, width) if orientation in _ORIENTATION_SWAPS else (width, height)


