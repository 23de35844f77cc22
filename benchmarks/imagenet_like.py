"""Helpers of `benchmarks/imagenet_rehearsal.sh`: ImageNet-like data made offline, a random ViT-MAE folder, a
random FID Inception, a measuring wrapper around the project's commands, and the summary table.

    python -m benchmarks.imagenet_like images out=DIR train=6400 val=1000 classes=16 workers=16 [json=F]
    python -m benchmarks.imagenet_like mae out=DIR [width=768 depth=12 heads=12 patch=16 image_size=224] [json=F]
    python -m benchmarks.imagenet_like inception out=FILE.safetensors
    python -m benchmarks.imagenet_like run module=MODULE stats=F.json [split_at=N] -- key=value ...
    python -m benchmarks.imagenet_like report work=WORK_DIR out=RESULTS_DIR

`images` renders DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg: ImageNet-like files (JPEG quality 75-95,
shorter side 300-500 px, aspect 3:4..4:3, about 3% with a shorter side of 1000-1400 px, about 2% greyscale
JPEGs, a few CMYK JPEGs, RGB/palette/RGBA PNGs, and two truncated JPEGs in train that `make_shards` must skip).
Each class is one of the 8 `stellar_tok.data.shapes` outlines drawn once, three times or twice (8 x 3 = up to 24
classes), in any hue, size, position and rotation, on a low-frequency colour field with optional stripes and
noise: the class is the shape and the count, nothing else.

`mae` writes config.json + model.safetensors of a Hugging Face ViTMAEForPreTraining with random weights (keys
`vit.embeddings.*`, `vit.encoder.layer.*`, `vit.layernorm.*` and a few `decoder.*` that the loader ignores),
built with json and safetensors only: what `model.init_from` reads (stellar_tok.model.mae_init).

`inception` writes a random-weights state dict of torch-fidelity's Inception-v3 (classifier NaN, so FID/KID
only), for `fid.weights=`: the real weights cannot be fetched offline, so an FID with it tests the plumbing and
means nothing.

`run` calls `MODULE.main(argv)` in this process (also under `accelerate launch -m benchmarks.imagenet_like run
...`) and writes to `stats`: wall time, batches drawn, the time spent waiting for each batch (the trainers'
`epoch_batches` is wrapped), seconds per step (median, also before and after `split_at`, e.g. the GAN's start),
images per second, peak GPU memory (torch.cuda.max_memory_allocated / reserved) and peak RSS. Rewritten every
25 batches, so a killed stage still leaves figures.

`report` turns WORK_DIR/stages.jsonl and the files the stages wrote into RESULTS_DIR/summary.md and summary.json,
and packs the logs into RESULTS_DIR/logs.tar.gz (at most 8 files in RESULTS_DIR, as the device tool returns).
"""
from __future__ import annotations

import glob
import io
import json
import math
import os
import re
import statistics
import sys
import time
from types import SimpleNamespace

import numpy as np

from stellar_tok.files import atomic_path, atomic_write_json

SHAPES = ["circle", "ring", "square", "triangle", "plus", "star", "crescent", "bar"]
VARIANTS = ["one", "three", "two"]  # copies of the shape


def class_names(k: int) -> list[str]:
    if not 1 <= k <= len(SHAPES) * len(VARIANTS):
        raise SystemExit(f"--classes must be 1..{len(SHAPES) * len(VARIANTS)} (got {k})")
    return [f"{SHAPES[c % 8]}_{VARIANTS[c // 8]}" for c in range(k)]


# ----------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    import colorsys

    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def render(cls: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """One image of class `cls` as float32 (H, W, 3) in [0, 1]."""
    from PIL import Image

    from stellar_tok.data.shapes import shape_mask

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
    from PIL import Image

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


def cmd_images(a) -> None:
    import multiprocessing

    import PIL.Image  # noqa: F401  imported before the fork: the workers share it
    import stellar_tok.data.shapes  # noqa: F401  (and stellar_tok's import of torch, seconds per process otherwise)

    names = class_names(a.classes)
    jobs, seed = [], np.random.SeedSequence(a.seed)
    for split, n in (("train", a.train), ("val", a.val)):
        rng = np.random.default_rng(seed.spawn(1)[0])
        for name in names:
            os.makedirs(os.path.join(a.out, split, name), exist_ok=True)
        kinds = _kinds(n, rng, split)
        labels = rng.permutation(np.arange(n) % len(names))
        seeds = rng.integers(0, 2**63 - 1, n)
        jobs += [(os.path.join(a.out, split, names[c], f"{split}_{i:07d}.jpg"), int(c), int(s), k)
                 for i, (c, s, k) in enumerate(zip(labels, seeds, kinds))]
    t0 = time.time()
    with multiprocessing.get_context("fork").Pool(a.workers) as pool:
        done = pool.map(_render_job, jobs, chunksize=8)
    seconds = time.time() - t0
    shorts = np.array([min(d["h"], d["w"]) for d in done])
    kinds: dict[str, int] = {}
    for d in done:
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    summary = {"train": a.train, "val": a.val, "classes": len(names), "seconds": round(seconds, 1),
               "images_per_s": round(len(jobs) / seconds, 1), "workers": a.workers, "kinds": kinds,
               "short_side": {"min": int(shorts.min()), "median": int(np.median(shorts)), "max": int(shorts.max())},
               "mean_kb": round(float(np.mean([d["bytes"] for d in done])) / 1024, 1),
               "total_mb": round(sum(d["bytes"] for d in done) / 2**20, 1)}
    print(json.dumps(summary))
    if a.json:
        atomic_write_json(a.json, summary)


# ----------------------------------------------------------------------------------------------
# mae, inception
# ----------------------------------------------------------------------------------------------


def cmd_mae(a) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    d, mlp, grid = a.width, a.width * 4, a.image_size // a.patch

    def normal(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    sd = {"vit.embeddings.cls_token": normal(1, 1, d), "vit.embeddings.position_embeddings": normal(1, 1 + grid * grid, d),
          "vit.embeddings.patch_embeddings.projection.weight": normal(d, 3, a.patch, a.patch),
          "vit.embeddings.patch_embeddings.projection.bias": torch.zeros(d),
          "vit.layernorm.weight": torch.ones(d), "vit.layernorm.bias": torch.zeros(d),
          "decoder.decoder_embed.weight": normal(a.width // 2, d), "decoder.decoder_embed.bias": torch.zeros(a.width // 2),
          "decoder.mask_token": normal(1, 1, a.width // 2)}
    for i in range(a.depth):
        p = f"vit.encoder.layer.{i}."
        for name, (o, n) in {"attention.attention.query": (d, d), "attention.attention.key": (d, d),
                             "attention.attention.value": (d, d), "attention.output.dense": (d, d),
                             "intermediate.dense": (mlp, d), "output.dense": (d, mlp)}.items():
            sd[p + name + ".weight"], sd[p + name + ".bias"] = normal(o, n), torch.zeros(o)
        for name in ("layernorm_before", "layernorm_after"):
            sd[p + name + ".weight"], sd[p + name + ".bias"] = torch.ones(d), torch.zeros(d)
    config = {"architectures": ["ViTMAEForPreTraining"], "model_type": "vit_mae", "hidden_size": d,
              "num_hidden_layers": a.depth, "num_attention_heads": a.heads, "intermediate_size": mlp,
              "hidden_act": "gelu", "layer_norm_eps": 1e-12, "image_size": a.image_size, "patch_size": a.patch,
              "num_channels": 3, "qkv_bias": True, "decoder_hidden_size": a.width // 2, "mask_ratio": 0.75,
              "note": "random weights (benchmarks/imagenet_like.py mae): the layout of facebook/vit-mae-*, not its weights"}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    save_file(sd, os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
    size = os.path.getsize(os.path.join(a.out, "model.safetensors"))
    params = sum(v.numel() for v in sd.values())
    summary = {"tensors": len(sd), "params": params, "mb": round(size / 2**20, 1), "grid": grid}
    print(json.dumps(summary))
    if a.json:
        atomic_write_json(a.json, summary)


def cmd_inception(a) -> None:
    import torch
    from safetensors.torch import save_file

    from stellar_tok.evaluation.fid import FEATURES, new_extractor

    skeleton = new_extractor(None, [FEATURES]).state_dict()  # names and shapes only (meta device)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in skeleton.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(0)
        elif k.startswith("fc."):
            sd[k] = torch.full(v.shape, float("nan"))  # no classifier: FID/KID only, no Inception Score
        elif k.endswith(("bn.weight", "running_var")):
            sd[k] = torch.ones(v.shape)
        elif k.endswith(("bn.bias", "running_mean")) or v.ndim == 1:
            sd[k] = torch.zeros(v.shape)
        else:  # He-normal convolutions keep the activations' scale through the ReLUs
            fan_in = math.prod(v.shape[1:])
            sd[k] = torch.randn(v.shape, generator=g) * math.sqrt(2.0 / fan_in)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    save_file(sd, a.out, metadata={"note": "random weights: plumbing only"})
    print(json.dumps({"tensors": len(sd), "mb": round(os.path.getsize(a.out) / 2**20, 1)}))


# ----------------------------------------------------------------------------------------------
# run: a project command, measured
# ----------------------------------------------------------------------------------------------


def _batch_size(batch) -> int:
    try:
        if isinstance(batch, dict):
            return int(batch["label"].shape[0])
        return int(batch[-1].shape[0])
    except Exception:
        return 0


def cmd_run(a, argv: list[str]) -> None:
    import importlib
    import resource

    import torch

    rank = int(os.environ.get("RANK", "0"))
    mod = importlib.import_module(a.module)
    t0 = time.time()
    requested: list[float] = []  # time each batch was asked for
    waits: list[float] = []  # time spent waiting for it
    sizes: list[int] = []

    def stats(status: str) -> dict:
        steps = [b - a_ for a_, b in zip(requested, requested[1:])]  # step i: from asking batch i to asking batch i+1
        warm = steps[3:] if len(steps) > 6 else steps
        out = {"module": a.module, "argv": argv, "status": status, "wall_s": round(time.time() - t0, 2), "batches": len(requested)}
        if steps:
            out["s_per_step_median"] = round(statistics.median(warm), 4)
            out["s_per_step_mean"] = round(sum(warm) / len(warm), 4)
            n_img = sum(sizes[len(sizes) - len(warm) - 1 : -1]) if len(sizes) > len(warm) else sum(sizes)
            out["images_per_s"] = round(n_img / max(1e-9, sum(warm)), 2)
            out["batch"] = sizes[0]
            out["first_batch_wait_s"] = round(waits[0], 3)
            later = waits[1:]
            out["wait_s_total"] = round(sum(later), 3)
            out["wait_share"] = round(sum(later) / max(1e-9, sum(steps)), 4)  # of the time after the first batch
            out["wait_s_median"] = round(statistics.median(later), 4) if later else 0.0
            if a.split_at and len(steps) > a.split_at + 2:
                before, after = steps[3 : a.split_at], steps[a.split_at + 1 :]
                if before:
                    out["s_per_step_before_split"] = round(statistics.median(before), 4)
                out["s_per_step_after_split"] = round(statistics.median(after), 4)
                out["split_at"] = a.split_at
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["device"] = torch.cuda.get_device_name(0)
            out["peak_gpu_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            out["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        out["peak_rss_children_gib"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)
        return out

    def save(status: str) -> None:
        if rank == 0:
            atomic_write_json(a.stats, stats(status))

    # the trainers draw their batches through `epoch_batches`: in the module itself, or in the shared training engine
    holders = [m for m in (mod, sys.modules.get("stellar_tok.training.engine")) if m is not None and hasattr(m, "epoch_batches")]
    if holders:
        original = holders[0].epoch_batches

        def timed_batches(*args, **kwargs):
            it = original(*args, **kwargs)
            while True:
                t = time.time()
                batch = next(it)
                requested.append(t)
                waits.append(time.time() - t)
                sizes.append(_batch_size(batch))
                if len(requested) % 25 == 0:
                    save("running")
                yield batch

        for m in holders:
            m.epoch_batches = timed_batches
    save("started")
    status = "error"
    try:
        mod.main(argv)
        status = "ok"
    except SystemExit as e:
        status = "ok" if not e.code else f"exit {e.code}"
        raise
    finally:
        save(status)


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _grep(path: str, pattern: str) -> str | None:
    try:
        with open(path, errors="replace") as f:
            hits = [m.group(0) for line in f if (m := re.search(pattern, line))]
        return hits[-1] if hits else None
    except OSError:
        return None


def _du_mb(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return round(total / 2**20, 1)


def _gib(s: dict) -> str:
    if "peak_gpu_alloc_gib" in s:
        return f"{s['peak_gpu_alloc_gib']} ({s.get('peak_gpu_reserved_gib', '?')} reserved)"
    return f"- (RSS {s['peak_rss_gib']})" if "peak_rss_gib" in s else "-"


def _row_notes(stage: str, w: str) -> tuple[dict, str, str, str]:
    """(details, throughput, s/step, peak memory) of a stage from the files it wrote."""
    st = lambda name: _load(os.path.join(w, "stats", f"{name}.json"))  # noqa: E731
    log = os.path.join(w, "logs", f"{stage}.log")
    d: dict = {}
    thr = sps = mem = "-"
    if stage == "data_render":
        d = st("images")
        if d.get("images_per_s"):
            thr = f"{d['images_per_s']} img/s rendered ({d.get('workers')} processes)"
    elif stage.startswith("data_shards_"):
        split = stage.rsplit("_", 1)[1]
        d = {"line": _grep(log, r"wrote \d+ images, skipped .*")}
        shards = sorted(glob.glob(os.path.join(w, "shards", f"{split}-*.tar")))
        d["shards"], d["shards_mb"] = len(shards), round(sum(os.path.getsize(p) for p in shards) / 2**20, 1)
        if d["line"] and (m := re.match(r"wrote (\d+)", d["line"])):
            d["images"] = int(m.group(1))
    elif stage == "mae":
        d = st("mae")
    elif stage in ("b16", "h14_start", "h14_resume", "gen_train"):
        s = st(stage)
        out_dir = {"b16": "b16", "h14_start": "h14", "h14_resume": "h14", "gen_train": "gen"}[stage]
        summ = _load(os.path.join(w, out_dir, "summary.json"))
        d = {k: s[k] for k in ("status", "batches", "batch", "s_per_step_median", "s_per_step_before_split", "s_per_step_after_split",
                               "images_per_s", "first_batch_wait_s", "wait_s_total", "wait_share", "wait_s_median",
                               "peak_gpu_alloc_gib", "peak_gpu_reserved_gib", "peak_rss_gib", "device") if k in s}
        if summ:
            d["summary"] = {k: summ.get(k) for k in ("step", "images_seen", "seconds", "export", "skipped_samples", "stopped_by")}
            last = summ.get("last") or {}
            d["last"] = {k: last[k] for k in ("loss", "psnr", "align", "lpips", "gan_g", "gan_d", "loc_max", "token_proto_used") if k in last}
        for pat in (r"model\.init_from=\S+: .*", r"running: .*", r"resumed from \S+ at step \d+", r"done: .*"):
            if (hit := _grep(log, pat)):
                d.setdefault("log", []).append(hit[:300])
        export = os.path.join(w, out_dir, {"gen": "generator"}.get(out_dir, "tokenizer"))
        d["export_exists"] = os.path.isfile(os.path.join(export, "config.json"))
        if os.path.isdir(os.path.join(w, out_dir, "checkpoints")):
            d["checkpoints_mb"] = _du_mb(os.path.join(w, out_dir, "checkpoints"))
        if "images_per_s" in s:
            thr = f"{s['images_per_s']} img/s (batch {s.get('batch')})"
        if "s_per_step_median" in s:
            sps = str(s["s_per_step_median"])
            if "s_per_step_after_split" in s:
                sps += f" ({s.get('s_per_step_before_split', '?')} before / {s['s_per_step_after_split']} after GAN)"
        mem = _gib(s)
    elif stage == "tokenize":
        s = st(stage)
        d = {"line": _grep(log, r"tokenize: .*")}
        d.update({k: s[k] for k in ("peak_gpu_alloc_gib", "peak_rss_gib") if k in s})
        if d["line"] and (m := re.search(r"(\d+) img/s", d["line"])):
            thr = f"{m.group(1)} img/s (x2 with flips; decode on 1 core)"
        mem = _gib(s)
    elif stage == "sample":
        s, summ = st(stage), _load(os.path.join(w, "samples", "summary.json"))
        d = {"summary": summ}
        n, sec = summ.get("n") or summ.get("images") or summ.get("total"), summ.get("seconds")
        if n and sec:
            thr = f"{n / max(sec, 1e-9):.1f} img/s ({n} images)"
        mem = _gib(s)
    elif stage in ("fid_ref", "fid"):
        s = st(stage)
        if stage == "fid":
            m = _load(os.path.join(w, "eval", "metrics.json"))
            d = {"results": m.get("results"), "extractor": m.get("extractor"), "n_samples": m.get("n_samples"),
                 "reference_n": (m.get("reference") or {}).get("n")}
        mem = _gib(s)
    return d, thr, sps, mem


NOTES = {
    "data_render": "procedural ImageNet-like class folders (JPEG, grey/CMYK JPEG, PNG, 2 truncated files)",
    "data_shards_train": "python -m stellar_tok.make_shards (originals, not resized)",
    "data_shards_val": "python -m stellar_tok.make_shards, val split (classes.json of train)",
    "fid_weights": "random-weights torch-fidelity Inception-v3 for fid.weights= (the real one is not offline)",
    "mae": "random-weights ViT-MAE folder (HF layout, json + safetensors only) for model.init_from",
    "b16": "configs/tokenizer/vit_b16.yaml, GAN from recon.gan_start; LPIPS with a RANDOM backbone (no VGG weights offline)",
    "h14_start": "configs/tokenizer/vit_h14.yaml under FSDP2 (configs/accelerate/fsdp_h14.yaml), model.init_from=null",
    "h14_resume": "the same, train.resume=auto: continues the sharded checkpoint, exports again",
    "tokenize": "stellar_tok.tokenize of the train shards with the B/16 export, flip=true",
    "gen_train": "configs/generator/b.yaml on those latents",
    "sample": "generators.sample, class-conditional, every class",
    "fid_ref": "stellar_tok.fid_stats of the val split (random-weights Inception)",
    "fid": "generators.evaluate gFID: PLUMBING ONLY (random-weights Inception; the real weights are not offline)",
}


def cmd_report(a) -> None:
    import shutil
    import tarfile

    w, res = a.work, a.out
    os.makedirs(res, exist_ok=True)
    stages = []
    try:
        with open(os.path.join(w, "stages.jsonl")) as f:
            stages = [json.loads(line) for line in f if line.strip()]
    except OSError:
        pass
    env = _load(os.path.join(w, "stats", "env.json"))
    rows, details = [], {}
    for s in stages:
        d, thr, sps, mem = _row_notes(s["stage"], w)
        details[s["stage"]] = {**s, "details": d}
        extra = ""
        if s["stage"] == "b16" and "wait_share" in d:
            extra = f"; data wait {100 * d['wait_share']:.1f}% of step time after the first batch ({d.get('first_batch_wait_s')} s)"
        if s["stage"] in ("h14_start", "h14_resume"):
            extra = f"; export {'written' if d.get('export_exists') else 'MISSING'}"
            if s["stage"] == "h14_resume":
                extra += "; " + next((x for x in d.get("log", []) if x.startswith("resumed")), "NO resume line")
        if s["stage"] == "fid" and d.get("results"):
            extra = f"; gFID {d['results'].get('fid', float('nan')):.1f} on {d.get('n_samples')} samples vs {d.get('reference_n')} val images"
        if s["stage"] == "data_render" and d.get("kinds"):
            extra = (f"; {d.get('train')} train + {d.get('val')} val images, {d.get('classes')} classes, shorter side "
                     f"{d.get('short_side')}, {d.get('mean_kb')} KB mean, files by kind {d.get('kinds')}")
        if s["stage"].startswith("data_shards_") and d.get("line"):
            extra = f"; {d['line']}; {d.get('shards')} shards, {d.get('shards_mb')} MB"
            if d.get("images") and isinstance(s.get("wall_s"), (int, float)) and s["wall_s"] > 0:
                thr = f"{d['images'] / s['wall_s']:.0f} img/s (stage wall, start-up included)"
        if s["stage"] == "mae" and d:
            extra = f"; {d.get('tensors')} tensors, {d.get('params', 0) / 1e6:.1f} M parameters, {d.get('mb')} MB"
        if s["stage"] == "b16" and d.get("last"):
            extra += f"; last {d['last']}"
        status = "ok" if s["rc"] == 0 else ("SKIPPED" if s["rc"] == "skipped" else f"FAILED rc {s['rc']}")
        rows.append(f"| {s['stage']} | {status} | {s['wall_s']} | {thr} | {sps} | {mem} | {NOTES.get(s['stage'], '')}{extra} |")
    total = round(sum(s["wall_s"] for s in stages if isinstance(s.get("wall_s"), (int, float))), 1)
    lines = [f"# ImageNet-path rehearsal (SCALE={env.get('scale', '?')})", "",
             f"Machine: {env.get('machine', '?')}. Stages' wall time together: {total} s. "
             "Peak memory: torch.cuda.max_memory_allocated of the stage's process (reserved in brackets), GiB; on CPU "
             "the process's peak RSS. Throughput: steady-state medians (steps after the first 3).", "",
             "| stage | exit | wall s | throughput | s/step | peak GPU mem GiB | what / notes |", "|---|---|---:|---|---|---|---|",
             *rows, ""]
    with open(os.path.join(res, "summary.md"), "w") as f:
        f.write("\n".join(lines))
    atomic_write_json(os.path.join(res, "summary.json"), {"env": env, "stages": details})
    logs = os.path.join(res, "logs.tar.gz")
    with atomic_path(logs) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for pattern in ("logs/*.log", "stats/*.json", "stages.jsonl", "*/summary.json", "*/metrics.jsonl", "*/config.yaml",
                        "latents/manifest.json", "eval/metrics.*", "shards/classes.json"):
            for p in sorted(glob.glob(os.path.join(w, pattern))):
                if os.path.realpath(p).startswith(os.path.realpath(res) + os.sep):
                    continue
                tar.add(p, arcname=os.path.relpath(p, w))
    for src, dst in ((os.path.join(w, "samples", "grid.png"), "samples_grid.png"),):
        if os.path.isfile(src) and os.path.getsize(src) < 15 * 2**20:
            shutil.copyfile(src, os.path.join(res, dst))
    recon = sorted(glob.glob(os.path.join(w, "b16", "images", "step-*.png")))
    if recon and os.path.getsize(recon[-1]) < 15 * 2**20:
        shutil.copyfile(recon[-1], os.path.join(res, "b16_reconstruction.png"))
    print("\n".join(lines))


COMMANDS = {  # command -> its keys and defaults (key=value, through benchmarks.common.parse_kv)
    "images": {"out": "", "train": "6400", "val": "1000", "classes": "16", "workers": str(os.cpu_count() or 1), "seed": "0",
               "json": ""},
    "mae": {"out": "", "width": "768", "depth": "12", "heads": "12", "patch": "16", "image_size": "224", "json": ""},
    "inception": {"out": ""},
    "run": {"module": "", "stats": "", "split_at": "0"},
    "report": {"work": "", "out": ""},
}
REQUIRED = {"images": ("out",), "mae": ("out",), "inception": ("out",), "run": ("module", "stats"), "report": ("work", "out")}
INTS = ("train", "val", "classes", "workers", "seed", "width", "depth", "heads", "patch", "image_size", "split_at")


def parse_command_line(argv: list[str]) -> tuple[SimpleNamespace, list[str]]:
    """`COMMAND key=value ... [-- ARGS]` -> (the keys, typed; ARGS, for `run`)."""
    from benchmarks.common import parse_kv

    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1 :]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}; one of {', '.join(COMMANDS)}", file=sys.stderr)
            raise SystemExit(2)
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    cmd = argv[0]
    kv = parse_kv(argv[1:], COMMANDS[cmd], __doc__, f"python -m benchmarks.imagenet_like {cmd}")
    missing = [k for k in REQUIRED[cmd] if not kv[k]]
    if missing:
        print(f"error: {cmd} needs {', '.join(f'{k}=' for k in missing)}", file=sys.stderr)
        raise SystemExit(2)
    a = SimpleNamespace(cmd=cmd, **{k: int(v) if k in INTS else (v or None) for k, v in kv.items()})
    return a, rest


def main(argv: list[str] | None = None) -> None:
    a, rest = parse_command_line(sys.argv[1:] if argv is None else argv)
    if a.cmd == "images":
        cmd_images(a)
    elif a.cmd == "mae":
        cmd_mae(a)
    elif a.cmd == "inception":
        cmd_inception(a)
    elif a.cmd == "run":
        cmd_run(a, rest)
    else:
        cmd_report(a)


if __name__ == "__main__":
    main()
