"""Class-conditional sampling from a latent generator into an ADM-style samples.npz (plus a grid and PNGs).

    sample             the job of `python -m generators.sample` (its config): noise -> guided ODE -> the tokenizer's
                       decoder -> uint8 images; each process fills a memory-mapped part, the first streams samples.npz
    sample_noise       the starting noise of samples by global index: depends only on (seed, index)
    save_npz_streamed  np.savez's layout written chunk by chunk (arr_0 never whole in memory)
    check_tokenizer    refuses a tokenizer whose latent is not the one the generator modelled

The knobs and the files in words: `python -m generators.sample --help`.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
import zipfile

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image
from tqdm.auto import tqdm

from stellar_tok.errors import UserError
from stellar_tok.evaluation.pictures import enlarged_grid
from stellar_tok.files import atomic_path, atomic_write_json
from stellar_tok.latents.dataset import tokenizer_fingerprint
from stellar_tok.launch import describe_launch
from stellar_tok.model.latent import Latent, latent_fingerprint
from stellar_tok.model.tokenizer import StellarTokenizer

from .dit import LatentDiT
from .flow import SCHEDULERS, autocast_dtype, make_scheduler, sample_latents

PNG_AUTO_MAX = 1000  # png=auto writes per-sample PNGs up to this many images in the whole set
GRID_MAX_CLASSES = 32  # grid.png: rows for at most this many classes (the first requested)


def sample_noise(seed: int, indices, dim: int) -> torch.Tensor:
    """(len(indices), dim) float32 N(0, I) noise on the CPU. Row k is drawn by a generator seeded from a hash of
    (seed, indices[k]), so it depends only on the seed and the sample's global index: not on the batch, the number
    of processes or the other samples; and no two seeds share a sample (with the former seed + i, sample i of
    seed s + 1 was sample i + 1 of seed s)."""
    rows = []
    for i in indices:
        # "generators.sample" is part of the seed, not a module path: changing it changes every sample
        digest = hashlib.sha256(f"generators.sample/{int(seed)}/{int(i)}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)  # 63 bits
        rows.append(torch.randn(dim, generator=g))
    return torch.stack(rows) if rows else torch.zeros(0, dim)


def _png_mode(cfg) -> str:
    if cfg.save_png is not None:  # the old boolean key
        return "true" if cfg.save_png else "false"
    mode = str(cfg.png).strip().lower()
    if mode not in ("auto", "true", "false"):
        raise UserError(f"png must be auto, true or false (got {cfg.png!r})")
    return mode


def _parse_classes(spec: str, model) -> list[int]:
    k, names = model.config.num_classes, list(model.config.class_names or [])
    if spec == "all":
        return list(range(k))
    out = []
    for item in str(spec).split(","):
        item = item.strip()
        if item.lstrip("-").isdigit():
            cid = int(item)
        elif item in names:
            cid = names.index(item)
        else:
            raise UserError(f"classes: {item!r} is neither a class id (0..{k - 1}) nor a class name {names}")
        if not 0 <= cid < k:
            raise UserError(f"classes: id {cid} is out of range 0..{k - 1}")
        out.append(cid)
    return out


def save_npz_streamed(path: str, shape: tuple, chunks, labels: np.ndarray) -> None:
    """np.savez's layout (stored members arr_0.npy = uint8 `shape`, arr_1.npy = labels) written chunk by chunk, so
    arr_0 never has to fit in memory; `chunks` yields uint8 arrays that fill `shape` in order."""
    written = 0
    with atomic_path(path) as tmp:  # a short stream raises: no file is left
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
                for c in chunks:
                    c = np.ascontiguousarray(c, dtype=np.uint8)
                    f.write(c.tobytes())
                    written += c.size
            with zf.open("arr_1.npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(labels))
        if written != int(np.prod(shape)):
            raise RuntimeError(f"samples.npz: wrote {written} values, expected {int(np.prod(shape))}")


def check_tokenizer(model, tok) -> None:
    """Refuse a tokenizer whose latent is not the one the generator modelled. The generator's `tokenizer_hash` is the
    latent fingerprint (stellar_tok.model.latent.latent_fingerprint: encoder, bottleneck and the settings that shape the
    latent, not the decoder), so a tokenizer whose decoder was retrained on the frozen encoder (train.decoder_from) is
    accepted; generators exported before it carry the whole tokenizer's fingerprint, which still matches the tokenizer
    itself."""
    want = model.config.tokenizer_hash
    if not want or want == latent_fingerprint(tok):
        return
    if want == tokenizer_fingerprint(tok):  # an older generator folder: the exact tokenizer
        return
    raise UserError(f"the generator was trained on the latents of another tokenizer (fingerprint {want}; this tokenizer's latent "
                    f"fingerprint is {latent_fingerprint(tok)}); pass the tokenizer used by stellar_tok.tokenize, or one whose "
                    f"decoder was retrained on its encoder (train.decoder_from; generators exported before latent "
                    f"fingerprints accept only the exact tokenizer)")


def _check_options(cfg) -> tuple[float, float]:
    """Refuse missing model folders and unknown knobs; the guidance interval (lo, hi)."""
    for key in ("generator", "tokenizer"):
        path = getattr(cfg, key)
        if not path or not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"{key}=DIR must name an exported {key} folder with config.json (got {path!r})")
    try:
        lo, hi = (float(x) for x in str(cfg.interval).split(","))
    except ValueError:
        raise UserError(f"interval must be two numbers lo,hi in [0, 1] (got {cfg.interval!r})") from None
    if cfg.scheduler not in SCHEDULERS:
        raise UserError(f"scheduler must be one of {', '.join(SCHEDULERS)} (got {cfg.scheduler!r})")
    if not cfg.shift > 0:
        raise UserError(f"shift must be > 0 (got {cfg.shift!r})")
    if cfg.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise UserError(f"mixed_precision must be auto, no, bf16 or fp16 (got {cfg.mixed_precision!r})")
    return lo, hi


def sample(cfg) -> dict:
    """The job of `python -m generators.sample` (a `SampleConfig`); the summary on the first process, {} elsewhere."""
    interval = _check_options(cfg)
    png_mode = _png_mode(cfg)
    state = PartialState(cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)
    device = state.device
    model = LatentDiT.from_pretrained(cfg.generator).to(device).eval()
    tok = StellarTokenizer.from_pretrained(cfg.tokenizer).to(device).eval()
    check_tokenizer(model, tok)
    classes = _parse_classes(cfg.classes, model)
    if cfg.n < 1 or cfg.batch_size < 1:
        raise UserError(f"n and batch_size must be >= 1 (got n={cfg.n}, batch_size={cfg.batch_size})")
    labels_all = torch.tensor(classes).repeat_interleave(cfg.n)  # (C*n,)
    save_png = png_mode == "true" or (png_mode == "auto" and len(labels_all) <= PNG_AUTO_MAX)
    parts_dir = os.path.join(cfg.out, "parts")
    os.makedirs(parts_dir, exist_ok=True)
    if save_png:
        os.makedirs(os.path.join(cfg.out, "images"), exist_ok=True)
    amp = autocast_dtype(cfg.mixed_precision, device)
    precision = {None: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]
    if state.is_main_process:
        print(f"running: {describe_launch(state, precision)}, batch {cfg.batch_size} per process; {len(labels_all):,} samples "
              f"of {len(classes)} classes", flush=True)
    t0 = time.time()
    _sample_part(cfg, state, model, tok, labels_all, interval, amp, save_png)
    state.wait_for_everyone()
    summary = {}
    if state.is_main_process:
        total, procs = len(labels_all), state.num_processes
        _assemble(cfg, procs, labels_all, len(classes))
        seconds = time.time() - t0
        summary = {"images": total, "classes": classes, "seconds": round(seconds, 2), "images_per_s": round(total / max(seconds, 1e-9), 2),
                   "cfg": cfg.cfg, "interval": list(interval), "steps": cfg.steps, "scheduler": cfg.scheduler, "shift": cfg.shift,
                   "seed": cfg.seed, "mixed_precision": precision, "png": save_png, "processes": procs}
        atomic_write_json(os.path.join(cfg.out, "summary.json"), summary)
        print(f"sample: {total} images of {len(classes)} classes in {seconds:.1f}s -> {cfg.out}/grid.png, samples.npz"
              + (", images/" if save_png else ""))
    state.wait_for_everyone()
    return summary


def _sample_part(cfg, state, model, tok, labels_all: torch.Tensor, interval: tuple[float, float], amp, save_png: bool) -> None:
    """This process's samples p, p+P, ...: out/parts/<p>.npy (len(mine),H,W,3) uint8, memory-mapped, and their PNGs."""
    device, names = state.device, list(model.config.class_names or [])
    mine = list(range(state.process_index, len(labels_all), state.num_processes))
    r, c, n = model.config.num_tokens, model.config.token_channels, model.config.grid**2
    dim = r * c + n * r
    part = None  # this process's images (len(mine),H,W,3), memory-mapped
    pbar = tqdm(total=len(mine), unit="img", disable=not (cfg.progress and state.is_main_process), desc="sample")
    for i in range(0, len(mine), cfg.batch_size):
        idx = mine[i : i + cfg.batch_size]
        noise = sample_noise(cfg.seed, idx, dim).to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            z, log_loc = sample_latents(model, labels_all[idx].to(device), cfg.steps, cfg.cfg, interval,
                                         scheduler=make_scheduler(cfg.scheduler, cfg.shift), noise=noise)
            x = tok.decode(Latent(z, log_loc, True, model.latent_stats))
        batch = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (B,H,W,3)
        if part is None:
            part = np.lib.format.open_memmap(os.path.join(cfg.out, "parts", f"{state.process_index:05d}.npy"), mode="w+",
                                             dtype=np.uint8, shape=(len(mine), *batch.shape[1:]))
        part[i : i + len(idx)] = batch
        if save_png:
            for j, im in zip(idx, batch):
                y = int(labels_all[j])
                Image.fromarray(im).save(os.path.join(cfg.out, "images", f"{names[y] if names else y}_{j:06d}.png"))
        pbar.update(len(idx))
    pbar.close()
    if part is not None:
        part.flush()
        del part


def _assemble(cfg, procs: int, labels_all: torch.Tensor, num_classes: int) -> None:
    """samples.npz (streamed from the processes' parts, in sample order) and grid.png; the parts are removed."""
    total, parts_dir = len(labels_all), os.path.join(cfg.out, "parts")
    parts = [np.load(os.path.join(parts_dir, f"{p:05d}.npy"), mmap_mode="r") for p in range(min(procs, total))]

    def rows(a: int, b: int) -> np.ndarray:  # samples a..b-1 in order; sample j is row j // P of process j % P
        return np.stack([parts[j % procs][j // procs] for j in range(a, b)])

    step = max(1, (64 << 20) // parts[0][0].nbytes)  # about 64 MiB per chunk
    save_npz_streamed(os.path.join(cfg.out, "samples.npz"), (total, *parts[0].shape[1:]),
                      (rows(a, min(a + step, total)) for a in range(0, total, step)), labels_all.numpy())
    per_row = min(cfg.n, 16)
    grid = np.concatenate([rows(k * cfg.n, k * cfg.n + per_row) for k in range(min(num_classes, GRID_MAX_CLASSES))])
    enlarged_grid(torch.from_numpy(grid).permute(0, 3, 1, 2).float() / 255, nrow=per_row, path=os.path.join(cfg.out, "grid.png"))
    del parts
    shutil.rmtree(parts_dir)
