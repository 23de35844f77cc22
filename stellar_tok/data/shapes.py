"""Procedural "shapes": a small RGB data set whose class is the shape and nothing else.

Every image shows one filled shape of one of eight classes (`SHAPE_CLASSES`) on a textured background.
Everything except the class is random, so a model has to become invariant to it:

* shape: hue uniform over the colour wheel, saturation and value varied; size ("radius") 0.25-0.45 of the
  image side; position anywhere that keeps the shape mostly inside; rotation uniform in [0, 360).
* background: a random low-frequency colour field (a 4 x 4 grid of colours, bilinearly interpolated),
  with probability 1/2 sinusoidal stripes of random orientation, frequency, sharpness, colour and
  strength, and Gaussian pixel noise of random strength over the whole image.

The shape's colour is pushed away from the background's mean colour when the two are too close, so the
shape stays visible. Shapes are rasterised at 4x (2x above 48 px) and area-averaged down, which
anti-aliases their edges. Classes are exactly balanced (a seeded permutation of ``arange(n) % 8``).

The classes are chosen to stay distinguishable at 32 px and to be distinct from each other under any
rotation (a square rotated by 45 degrees is still a square, never another class). Because colour,
position and background vary so much, a linear classifier on raw pixels stays close to chance
(see ``tests/test_data.py``), while the shape is obvious to a person.

Rendering is vectorised over chunks of images (no per-pixel Python loops) and takes a few seconds for
20,000 images at 32 px on one core. Results are cached in-process per ``(n, resolution, seed)``.
"""
from __future__ import annotations

import functools

import numpy as np

__all__ = ["SHAPE_CLASSES", "render_shapes"]

SHAPE_CLASSES: list[str] = ["circle", "ring", "square", "triangle", "plus", "star", "crescent", "bar"]

_CHUNK = 256  # images rendered together (a chunk at 32 px / 4x uses ~100 MB of temporaries)
_GRID = 4  # control points per side of the low-frequency background colour field


def render_shapes(n: int, resolution: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Render ``n`` shapes images.

    Returns ``(images, labels)``: images uint8 ``(n, resolution, resolution, 3)`` and labels int64 ``(n,)``
    indexing `SHAPE_CLASSES`. The output is a deterministic function of ``(n, resolution, seed)`` and is
    cached in-process, so both arrays are returned read-only: copy them before modifying.
    """
    n, resolution, seed = int(n), int(resolution), int(seed)
    if n < 0:
        raise ValueError(f"render_shapes: n must be >= 0 (got {n})")
    if resolution < 4:
        raise ValueError(f"render_shapes: resolution must be >= 4 (got {resolution})")
    if seed < 0:
        raise ValueError(f"render_shapes: seed must be >= 0 (got {seed})")
    return _render_cached(n, resolution, seed)


@functools.lru_cache(maxsize=8)
def _render_cached(n: int, resolution: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    num_chunks = -(-n // _CHUNK)
    # Child 0 draws the labels, child k + 1 renders chunk k: independent, reproducible streams.
    streams = np.random.SeedSequence(seed).spawn(num_chunks + 1)
    labels = np.random.default_rng(streams[0]).permutation(np.arange(n) % len(SHAPE_CLASSES)).astype(np.int64)
    images = np.empty((n, resolution, resolution, 3), dtype=np.uint8)
    for k in range(num_chunks):
        lo, hi = k * _CHUNK, min(n, (k + 1) * _CHUNK)
        images[lo:hi] = _render_chunk(labels[lo:hi], resolution, np.random.default_rng(streams[k + 1]))
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB for arrays of equal shape with values in [0, 1]; returns shape + (3,)."""
    h6 = (h % 1.0) * 6.0
    c = v * s
    x = c * (1.0 - np.abs(h6 % 2.0 - 1.0))
    zero = np.zeros_like(c)
    sector = np.floor(h6).astype(np.int64) % 6
    table = np.stack(
        [
            np.stack([c, x, zero], -1),
            np.stack([x, c, zero], -1),
            np.stack([zero, c, x], -1),
            np.stack([zero, x, c], -1),
            np.stack([x, zero, c], -1),
            np.stack([c, zero, x], -1),
        ],
        0,
    )
    rgb = np.take_along_axis(table, sector[None, ..., None].repeat(3, -1), 0)[0]
    return rgb + (v - c)[..., None]


def _interp_matrix(out_size: int, grid: int) -> np.ndarray:
    """(out_size, grid) bilinear weights mapping ``grid`` control points (spanning the image) to pixels."""
    pos = (np.arange(out_size) + 0.5) / out_size * (grid - 1)
    left = np.clip(np.floor(pos).astype(np.int64), 0, grid - 2)
    frac = pos - left
    m = np.zeros((out_size, grid), dtype=np.float32)
    m[np.arange(out_size), left] = 1.0 - frac
    m[np.arange(out_size), left + 1] = frac
    return m


def shape_mask(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test of shape ``cls`` in its own frame (u, v in units of the radius, float32 arrays)."""
    name = SHAPE_CLASSES[cls]
    if name in ("circle", "ring", "crescent"):
        rr = u * u + v * v
        inside = rr <= 1.0
        if name == "ring":
            inside &= rr >= 0.55**2
        elif name == "crescent":
            du = u - 0.42
            inside &= du * du + v * v >= 0.8**2
        return inside
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if name == "triangle":
        # Equilateral, vertices at radius 1.15 (inradius 0.575), one vertex along +v.
        a, b = 0.5 * np.sqrt(3.0), 0.575
        return (v >= -b) & (a * u - 0.5 * v >= -b) & (-a * u - 0.5 * v >= -b)
    if name == "plus":
        au, av = np.abs(u), np.abs(v)
        return (np.minimum(au, av) <= 0.3) & (np.maximum(au, av) <= 1.0)
    if name == "star":
        # Five points at radius 1.15 (one along +v), inner vertices at radius 0.5. Fold the plane into
        # one half-spike with the star's mirror symmetries (no trigonometry per pixel), then test the
        # side of the edge from the tip (0, 1.15) to the inner vertex 0.5 * (sin 36, cos 36).
        c36, s36 = np.float32(np.cos(np.pi / 5)), np.float32(np.sin(np.pi / 5))
        x = np.abs(u)
        d = np.maximum(c36 * x - s36 * v, 0) * 2  # reflect across the mirror with normal (c36, -s36)
        x, y = x - d * c36, v + d * s36
        d = np.maximum(-c36 * x - s36 * y, 0) * 2  # ... and the mirror with normal (-c36, -s36)
        x, y = np.abs(x + d * c36), y + d * s36
        tip = 1.15
        edge_x, edge_y = 0.5 * s36, 0.5 * c36 - tip
        return (y - tip) * edge_x - x * edge_y <= 0
    if name == "bar":
        return (np.abs(u) <= 1.1) & (np.abs(v) <= 0.36)
    raise AssertionError(name)


def _render_chunk(labels: np.ndarray, res: int, rng: np.random.Generator) -> np.ndarray:
    """Render one chunk of images (labels given) as uint8 (B, res, res, 3)."""
    b = len(labels)
    f32 = np.float32

    # --- shape parameters (in output pixels) ---
    radius = rng.uniform(0.25, 0.45, b) * res
    margin = 0.75 * radius  # centre at least this far from the border: shape mostly inside
    cx = rng.uniform(margin, res - margin)
    cy = rng.uniform(margin, res - margin)
    theta = rng.uniform(0.0, 2.0 * np.pi, b)
    hue, sat, val = rng.uniform(0, 1, b), rng.uniform(0.35, 1.0, b), rng.uniform(0.35, 1.0, b)

    # --- background: low-frequency colour field ---
    base = _hsv_to_rgb(rng.uniform(0, 1, b), rng.uniform(0, 0.8, b), rng.uniform(0.15, 0.95, b))
    amp = rng.uniform(0.05, 0.35, (b, 1, 1, 1))
    grid = base[:, None, None, :] + amp * rng.standard_normal((b, _GRID, _GRID, 3))
    m = _interp_matrix(res, _GRID)
    grid = grid.astype(f32).transpose(0, 3, 1, 2)  # (b, 3, rows, cols)
    bg = (m @ grid @ m.T).transpose(0, 2, 3, 1)  # (b, res, res, 3), bilinear upsampling

    # --- background: stripes (half of the images) ---
    coords = (np.arange(res, dtype=f32) + 0.5) / res
    phi = rng.uniform(0.0, np.pi, b)
    freq = rng.uniform(1.5, 6.0, b) * 2.0 * np.pi  # cycles per image side
    phase = rng.uniform(0.0, 2.0 * np.pi, b)
    arg = (
        (freq * np.cos(phi)).astype(f32)[:, None, None] * coords[None, None, :]
        + (freq * np.sin(phi)).astype(f32)[:, None, None] * coords[None, :, None]
        + phase.astype(f32)[:, None, None]
    )
    sharp = rng.uniform(1.0, 4.0, (b, 1, 1)).astype(f32)  # 1: sine wave ... 4: nearly square wave
    wave = np.clip(sharp * np.sin(arg), -1.0, 1.0)
    stripe_rgb = _hsv_to_rgb(rng.uniform(0, 1, b), rng.uniform(0, 1, b), np.ones(b))
    stripe_rgb = stripe_rgb * rng.choice([-1.0, 1.0], (b, 1))
    strength = rng.uniform(0.1, 0.35, b) * (rng.uniform(0, 1, b) < 0.5)
    bg += (wave[..., None] * (strength[:, None] * stripe_rgb)[:, None, None, :]).astype(f32)

    # --- shape colour: keep it away from the background's mean colour ---
    rgb = _hsv_to_rgb(hue, sat, val)
    bg_mean = bg.mean(axis=(1, 2))
    too_close = np.linalg.norm(rgb - bg_mean, axis=1) < 0.35
    if too_close.any():
        luma = bg_mean @ np.array([0.299, 0.587, 0.114])
        val = np.where(too_close, np.where(luma < 0.5, rng.uniform(0.85, 1.0, b), rng.uniform(0.05, 0.25, b)), val)
        hue = np.where(too_close, (hue + 0.5) % 1.0, hue)
        rgb = _hsv_to_rgb(hue, sat, val)

    # --- rasterise the shapes at `ss`x and area-average down (anti-aliasing) ---
    ss = 4 if res <= 48 else 2
    big = res * ss
    pix = (np.arange(big, dtype=f32) + 0.5) / ss  # sample positions in output-pixel units
    coverage = np.empty((b, res, res), dtype=f32)
    for cls in np.unique(labels):
        idx = np.nonzero(labels == cls)[0]
        cos_t = (np.cos(theta[idx]) / radius[idx]).astype(f32)[:, None, None]
        sin_t = (np.sin(theta[idx]) / radius[idx]).astype(f32)[:, None, None]
        dx = pix[None, None, :] - cx[idx].astype(f32)[:, None, None]  # (k, 1, big)
        dy = pix[None, :, None] - cy[idx].astype(f32)[:, None, None]  # (k, big, 1)
        u = cos_t * dx + sin_t * dy
        v = cos_t * dy - sin_t * dx
        inside = shape_mask(int(cls), u, v).view(np.uint8).reshape(len(idx), res, ss, res * ss)
        rows = inside[:, :, 0].copy()  # area average: sum the ss x ss block (adds beat .mean here)
        for i in range(1, ss):
            rows += inside[:, :, i]
        rows = rows.reshape(len(idx), res, res, ss)
        count = rows[..., 0].copy()
        for i in range(1, ss):
            count += rows[..., i]
        coverage[idx] = count * f32(1.0 / (ss * ss))

    cov = coverage[..., None]
    img = bg * (1.0 - cov) + rgb.astype(f32)[:, None, None, :] * cov

    # --- pixel noise of random strength over the whole image ---
    sigma = (rng.uniform(0.0, 0.12, b) * (rng.uniform(0, 1, b) < 0.8)).astype(f32)
    img += sigma[:, None, None, None] * rng.standard_normal(img.shape, dtype=f32)

    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
