"""ImageNet-like class folders made offline, for `benchmarks/imagenet_rehearsal.sh` (`python -m benchmarks.imagenet_like
stage=images`): OUT/train/<class>/*.jpg and OUT/val/<class>/*.jpg of ImageNet-like files (JPEG quality 75-95,
shorter side 300-500 px, aspect 3:4..4:3, about 3% with a shorter side of 1000-1400 px, about 2% greyscale JPEGs, a
few CMYK JPEGs, RGB/palette/RGBA PNGs, and two truncated JPEGs in train that `make_shards` must skip).

Each class is one of the 8 `stellar_tok.data.shapes` outlines drawn once, three times or twice (8 x 3 = up to 24
classes), in any hue, size, position and rotation, on a low-frequency colour field with optional stripes and
noise: the class is the shape and the count, nothing else.
"""
from __future__ import annotations

import colorsys
import io
import json
import math
import multiprocessing
import os
import time

import numpy as np
from PIL import Image

from stellar_tok.data.shapes import shape_mask
from stellar_tok.errors import UserError
from stellar_tok.files import atomic_write_json

SHAPES = ["circle", "ring", "square", "triangle", "plus", "star", "crescent", "bar"]
VARIANTS = ["one", "three", "two"]  # copies of the shape


def class_names(k: int) -> list[str]:
    """The names of the first k classes: circle_one, ring_one, ..., bar_one, circle_three, ..."""
    if not 1 <= k <= len(SHAPES) * len(VARIANTS):
        raise UserError(f"classes must be 1..{len(SHAPES) * len(VARIANTS)} (got {k})")
    return [f"{SHAPES[c % 8]}_{VARIANTS[c // 8]}" for c in range(k)]


# ----------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def render(cls: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """One image of class `cls` as float32 (H, W, 3) in [0, 1]."""
    f32 = np.float32
    # background: a low-frequency colour field (a g x g grid of colours, bicubic), stripes half of the time
    g = int(rng.integers(3, 7))
    base = _hsv(rng.uniform(), rng.uniform(0, 0.8), rng.uniform(0.15, 0.95))
    grid = np.clip(base + rng.uniform(0.05, 0.35) * rng.standard_normal((g, g, 3)), 0, 1)
    bg = np.asarray(Image.fromarray((grid * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC), dtype=f32) / 255
    if rng.uniform() < 0.5:
        phi, freq = rng.uniform(0, np.pi), rng.uniform(3, 14) * 2 * np.pi
        ys = (np.arange(height, dtype=f32) / max(height, width))[:, None]
        xs = (np.arange(width, dtype=f32) / max(height, width))[None, :]
        wave = np.clip(rng.uniform(1, 4) * np.sin(freq * (np.cos(phi) * xs + np.sin(phi) * ys) + rng.uniform(0, 6.3)), -1, 1)
        bg += (wave[..., None] * rng.uniform(0.1, 0.3) * _hsv(rng.uniform(), rng.uniform(), 1.0) * rng.choice([-1, 1])).astype(f32)
    img = bg
    # the shapes: 1, 3 or 2 copies of one outline, each its own colour, size, place and rotation
    copies = (1, 3, 2)[cls // 8]
    short = min(height, width)
    for _ in range(copies):
        radius = short * rng.uniform(0.22, 0.4) / math.sqrt(copies)
        cy, cx = rng.uniform(radius, height - radius), rng.uniform(radius, width - radius)
        theta = rng.uniform(0, 2 * np.pi)
        rgb = _hsv(rng.uniform(), rng.uniform(0.35, 1.0), rng.uniform(0.35, 1.0))
        if np.linalg.norm(rgb - bg.mean((0, 1))) < 0.35:
            rgb = _hsv(rng.uniform(), rng.uniform(0.35, 1.0), 1.0 if bg.mean() < 0.5 else 0.12)
        r = int(radius * 1.25) + 2
        y0, y1, x0, x1 = max(0, int(cy) - r), min(height, int(cy) + r), max(0, int(cx) - r), min(width, int(cx) + r)
        ss = 2  # 2 x 2 samples per pixel: anti-aliased edges
        py = (np.arange(y0 * ss, y1 * ss, dtype=f32) + 0.5) / ss - f32(cy)
        px = (np.arange(x0 * ss, x1 * ss, dtype=f32) + 0.5) / ss - f32(cx)
        c, s = f32(np.cos(theta) / radius), f32(np.sin(theta) / radius)
        u = c * px[None, :] + s * py[:, None]
        v = c * py[:, None] - s * px[None, :]
        inside = shape_mask(cls % 8, u, v).astype(f32)
        cov = inside.reshape(y1 - y0, ss, x1 - x0, ss).mean((1, 3))[..., None]
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - cov) + rgb * cov
    if rng.uniform() < 0.8:
        img += f32(rng.uniform(0, 0.06)) * rng.standard_normal(img.shape, dtype=f32)
    return np.clip(img, 0, 1)


def _size(rng: np.random.Generator, large: bool) -> tuple[int, int]:
    short = int(rng.integers(1000, 1401) if large else rng.integers(300, 501))
    long = int(short * rng.uniform(1.0, 4 / 3))
    return (short, long) if rng.uniform() < 0.3 else (long, short)  # (height, width): 70% landscape


def _render_job(job: tuple) -> dict:
    """Render and write one file; returns what was written (path, kind, size, bytes)."""
    path, cls, seed, kind = job
    rng = np.random.default_rng(seed)
    h, w = _size(rng, kind == "large")
    pil = Image.fromarray(np.rint(render(cls, h, w, rng) * 255).astype(np.uint8))
    buf = io.BytesIO()
    quality = int(rng.integers(75, 96))
    if kind == "grey":
        pil.convert("L").save(buf, format="JPEG", quality=quality)
    elif kind == "cmyk":
        pil.convert("CMYK").save(buf, format="JPEG", quality=quality)
    elif kind == "png":
        pil.save(buf, format="PNG")
    elif kind == "png_palette":
        pil.convert("P", palette=Image.ADAPTIVE).save(buf, format="PNG")
    elif kind == "png_rgba":
        rgba = pil.convert("RGBA")
        rgba.putalpha(Image.new("L", pil.size, 200))
        rgba.save(buf, format="PNG")
    else:  # plain, large, truncated
        pil.save(buf, format="JPEG", quality=quality, subsampling=int(rng.integers(0, 3)))
    data = buf.getvalue()
    if kind == "truncated":
        data = data[: len(data) // 3]
    if kind.startswith("png"):
        path = path[:-4] + ".png"
    with open(path, "wb") as f:
        f.write(data)
    return {"kind": kind, "h": h, "w": w, "bytes": len(data)}


def _kinds(n: int, rng: np.random.Generator, split: str) -> list[str]:
    """Which files are odd: at least one of each kind when n allows, else the shares in the module doc."""
    special = {"large": max(1, round(0.03 * n)), "grey": max(1, round(0.02 * n)), "cmyk": max(1, round(0.005 * n)),
               "png": max(1, round(0.005 * n)), "png_palette": 1, "png_rgba": 1}
    if split == "train":
        special["truncated"] = 2
    kinds = [k for k, c in special.items() for _ in range(c)][: max(0, n // 2)]
    kinds += ["plain"] * (n - len(kinds))
    rng.shuffle(kinds)
    return kinds


def render_images(out: str, train: int, val: int, classes: int, workers: int, seed: int = 0, json_path: str | None = None) -> dict:
    """OUT/train/<class>/*.jpg and OUT/val/<class>/*.jpg (`train` and `val` files over `classes` classes), rendered by
    `workers` processes; prints and returns (and writes to `json_path`) a summary: counts, speed, kinds, sizes."""
    names = class_names(classes)
    jobs, seeds = [], np.random.SeedSequence(seed)
    for split, n in (("train", train), ("val", val)):
        rng = np.random.default_rng(seeds.spawn(1)[0])
        for name in names:
            os.makedirs(os.path.join(out, split, name), exist_ok=True)
        kinds = _kinds(n, rng, split)
        labels = rng.permutation(np.arange(n) % len(names))
        file_seeds = rng.integers(0, 2**63 - 1, n)
        jobs += [(os.path.join(out, split, names[c], f"{split}_{i:07d}.jpg"), int(c), int(s), k)
                 for i, (c, s, k) in enumerate(zip(labels, file_seeds, kinds))]
    t0 = time.time()
    with multiprocessing.get_context("fork").Pool(workers) as pool:  # PIL and stellar_tok are imported: the workers share them
        done = pool.map(_render_job, jobs, chunksize=8)
    seconds = time.time() - t0
    shorts = np.array([min(d["h"], d["w"]) for d in done])
    kinds: dict[str, int] = {}
    for d in done:
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    summary = {"train": train, "val": val, "classes": len(names), "seconds": round(seconds, 1),
               "images_per_s": round(len(jobs) / seconds, 1), "workers": workers, "kinds": kinds,
               "short_side": {"min": int(shorts.min()), "median": int(np.median(shorts)), "max": int(shorts.max())},
               "mean_kb": round(float(np.mean([d["bytes"] for d in done])) / 1024, 1),
               "total_mb": round(sum(d["bytes"] for d in done) / 2**20, 1)}
    print(json.dumps(summary))
    if json_path:
        atomic_write_json(json_path, summary)
    return summary
