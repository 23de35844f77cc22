"""The evaluation of a tokenizer that `python -m stellar_tok.evaluate` runs: one pass over the held-out images
(reconstructions through the recon meter, the FID reference computed in the same pass when not cached, the probes'
held-out features), then the probes on cached train features, then `out/metrics.json` and `out/metrics.md`.

The protocol in words: `python -m stellar_tok.evaluate --help`; the Markdown table: `stellar_tok.evaluation.report`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from stellar_tok.data import heldout_is_train
from stellar_tok.data.reference import ReferenceImages
from stellar_tok.errors import UserError
from stellar_tok.evaluation import fid
from stellar_tok.files import atomic_write_json, atomic_write_text
from stellar_tok.latents.dataset import tokenizer_fingerprint
from stellar_tok.model.tokenizer import StellarTokenizer

from .feature_cache import check_probe_memory, pixel_features, pixel_subset, probe_features, train_features
from .fid_reference import cache_root, default_ref_path, reference_identity
from .pictures import reconstruction_grid
from .probing import knn_classify, linear_probe
from .recon_meter import ReconMeter, build_eval_lpips, downsample_size, pixel_baseline
from .report import markdown_table

TASKS = ("recon", "linear", "knn")


def check_eval_config(cfg) -> tuple[list[str], list[str]]:
    """The tasks and feature kinds of `cfg` (lpips normalised in place); a UserError for a bad setting."""
    tasks = [t.strip() for t in str(cfg.tasks).split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise UserError(f"tasks must be a comma list of {', '.join(TASKS)} (got {cfg.tasks!r})")
    kinds = [k.strip() for k in str(cfg.features).split(",") if k.strip()]
    if not kinds or any(k not in ("tokens", "cls", "lowrank") for k in kinds):
        raise UserError(f"features must be a comma list of tokens, cls, lowrank (got {cfg.features!r})")
    if str(cfg.lpips).lower() in ("off", "false", "none"):  # YAML reads a bare off as false
        cfg.lpips = "none"
    if cfg.lpips not in ("auto", "vgg", "alex", "none"):
        raise UserError(f"lpips must be auto, vgg, alex or none (got {cfg.lpips!r})")
    if not cfg.out:
        raise UserError("out=DIR is required (where metrics.json and metrics.md go)")
    for key, lo in (("n_eval", 0), ("n_train", 0), ("baseline_n", 1), ("probe_epochs", 1), ("knn_k", 1), ("batch_size", 1), ("grid", 0)):
        if cfg[key] < lo:
            raise UserError(f"{key} must be an integer >= {lo} (got {cfg[key]})")
    return tasks, kinds


@dataclass
class _Run:
    """What every step of one evaluation reads."""

    cfg: object
    tok: StellarTokenizer
    device: torch.device
    tasks: list
    kinds: list
    k_down: int
    held_out: ReferenceImages
    train_images: ReferenceImages | None = None  # the probes' train images
    pixel_sets: dict = field(default_factory=dict)  # split -> the pixel baselines' own subset (None: the probes' images)

    @property
    def semantics(self) -> list:
        return [t for t in self.tasks if t in ("linear", "knn")]

    def pixels_in_pass(self, split: str) -> bool:
        """Whether the pixel baselines' features of `split` come with the probes' own (the same images)."""
        return bool(self.cfg.baselines) and self.pixel_sets.get(split) is None


@dataclass
class _Recon:
    """The reconstruction side: the FID extractor and reference, LPIPS, one meter per row, the baseline's cache."""

    fid_batch: int
    extractor: object = None
    ref: dict | None = None
    ref_path: str | None = None
    ref_identity: dict | None = None
    real_feats: list | None = None  # a list: the reference is computed in the same pass and cached
    lpips_note: str = "not computed"
    meters: dict = field(default_factory=dict)
    baseline_path: str | None = None
    baseline_cached: dict | None = None


def _recon_setup(run: _Run) -> _Recon:
    cfg, device = run.cfg, run.device
    recon = _Recon(fid_batch=cfg.fid.batch_size or (100 if device.type == "cuda" else 10))  # 10: fastest on CPU
    lpips_net = None
    if "recon" in run.tasks:
        recon.extractor = fid.build_inception(cfg.fid.weights, device=device)
        recon.ref_identity = reference_identity(run.held_out, recon.extractor)
        recon.ref_path = cfg.fid.ref or default_ref_path(recon.ref_identity)
        if os.path.exists(recon.ref_path):
            recon.ref = fid.load_stats(recon.ref_path)
        elif cfg.fid.ref:
            raise UserError(f"fid.ref={cfg.fid.ref} does not exist (make it with python -m stellar_tok.fid_stats)")
        else:
            recon.real_feats = []
        lpips_net, recon.lpips_note = build_eval_lpips(cfg.lpips, device)
    recon.meters["stellar"] = ReconMeter(recon.extractor, lpips_net, recon.fid_batch)
    if cfg.baselines and "recon" in run.tasks:  # depends on the data only: computed once, cached beside the reference
        key = {"data": recon.ref_identity, "k_down": run.k_down, "reference": os.path.abspath(recon.ref_path), "lpips": recon.lpips_note}
        name = "baseline-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12] + ".json"
        recon.baseline_path = os.path.join(cache_root(), "fid_refs", name)
        if os.path.exists(recon.baseline_path) and recon.real_feats is None:
            with open(recon.baseline_path) as f:
                recon.baseline_cached = json.load(f)
        else:
            recon.meters["pixels_down"] = ReconMeter(recon.extractor, lpips_net, recon.fid_batch)
    return recon


def _held_out_pass(run: _Run, recon: _Recon) -> dict[str, list]:
    """One pass over the held-out images: reconstructions into the meters (and the reference's features when it is
    computed here), the first batch's grid, and the probes' held-out features (returned, per kind)."""
    cfg, tok, tasks, semantics = run.cfg, run.tok, run.tasks, run.semantics
    val: dict[str, list] = {}
    grid_done = cfg.grid <= 0
    total = run.held_out.size_hint()
    for images, labels in tqdm(run.held_out.loader(cfg.batch_size, cfg.num_workers), total=total and math.ceil(total / cfg.batch_size),
                               desc="held-out images", disable=not cfg.progress):
        x = images.to(run.device).float() / 127.5 - 1  # (B,3,R,R) in [-1,1]
        f = tok.features(x, with_latent=True) if semantics else None  # one encoder pass for both tasks
        if "recon" in tasks:
            latent = f["latent"] if f is not None else tok.encode(x)  # tokens (B,r,c), log L (B,N,r)
            rec = tok.decode(latent)  # (B,3,R,R)
            recon.meters["stellar"].add(x, rec)
            if "pixels_down" in recon.meters:
                recon.meters["pixels_down"].add(x, pixel_baseline(x, run.k_down)[1])
            if recon.real_feats is not None:
                recon.real_feats.append(fid.inception_features(recon.extractor, images.to(run.device), recon.fid_batch))
            if not grid_done:
                reconstruction_grid(x, rec, latent.probs(), os.path.join(cfg.out, "reconstructions.png"), n=cfg.grid)
                grid_done = True
        if semantics:
            for k, v in probe_features(tok, x, labels, run.kinds, run.pixels_in_pass("val"), run.k_down, f).items():
                val.setdefault(k, []).append(v)
    return val


def _save_reference(recon: _Recon, held_out: ReferenceImages) -> None:
    """The reference statistics computed in the held-out pass, saved to the cache and read back."""
    feats = np.concatenate(recon.real_feats)
    stats = fid.feature_stats(feats)
    stats["features"] = feats.astype(np.float32)
    fid.save_stats(recon.ref_path, stats, meta={"data": recon.ref_identity, "extractor": recon.extractor.weights_source,
                                                "images": held_out.describe()})
    recon.ref = fid.load_stats(recon.ref_path)


def _recon_results(run: _Run, recon: _Recon, n_eval: int, split_label: str) -> dict[str, dict]:
    results: dict[str, dict] = {"stellar": {}}
    if run.cfg.baselines:
        results["pixels_down"], results["pixels"] = {}, {}
    if "recon" in run.tasks:
        for name, m in recon.meters.items():
            results[name].update(m.result(recon.ref))
        if recon.baseline_cached is not None:
            results["pixels_down"].update(recon.baseline_cached)
        elif recon.baseline_path:
            atomic_write_json(recon.baseline_path, results["pixels_down"], indent=None)
        for r in results.values():  # every rFID / rKID carries the number of images and the split it was measured on
            if "rfid" in r:
                r["rfid_n_eval"], r["rfid_split"] = n_eval, split_label
    return results


def _plan_probes(run: _Run) -> None:
    """The probes' images (train; held-out: run.held_out) and the pixel baselines' (`pixel_subset`: their own class-
    spread subset of baseline_n where the probes read more); refuses, before any work, features that would not fit in
    memory (`check_probe_memory`)."""
    cfg = run.cfg
    if not run.semantics:
        return
    run.train_images = ReferenceImages(cfg.data, "train", cfg.n_train, cfg.seed)
    if cfg.baselines:
        run.pixel_sets = {"val": pixel_subset(cfg, "val", run.held_out), "train": pixel_subset(cfg, "train", run.train_images)}
    res, width = int(cfg.data.resolution), int(run.tok.config.width)
    counts, dims = {}, {}
    for split, own in (("val", run.held_out), ("train", run.train_images)):
        counts[f"{split} features"], dims[f"{split} features"] = own.size_hint(), len(run.kinds) * width
        if cfg.baselines:
            n = own.size_hint() if run.pixels_in_pass(split) else cfg.baseline_n  # at most: the subset of a smaller split is smaller
            counts[f"{split} pixels"], dims[f"{split} pixels"] = n, 3 * res * res + 3 * run.k_down**2
    check_probe_memory(counts, dims, f"lower baseline_n={cfg.baseline_n} (the pixel baselines' images per split), n_train={cfg.n_train} "
                                     f"or n_eval={cfg.n_eval}, or set baselines=false")


def _probe_results(run: _Run, results: dict, tr: dict, val: dict[str, list]) -> None:
    """Linear probe and kNN of every feature kind (and the pixel baselines, on their own images) into `results`."""
    cfg, semantics = run.cfg, run.semantics
    va = {k: torch.cat(v) for k, v in val.items()}
    probes = [("stellar", k, k, tr, va) for k in run.kinds]
    if cfg.baselines:
        ptr, pva = ({"train": tr, "val": va}[s] if run.pixels_in_pass(s) else pixel_features(cfg, run.pixel_sets[s], run.k_down, run.device)
                    for s in ("train", "val"))
        probes += [("pixels", "pixels", "pixels", ptr, pva), ("pixels_down", "pixels_down", "pixels", ptr, pva)]
    for row, feat, col, a, b in probes:
        suffix = col if row == "stellar" else "pixels"
        if "linear" in semantics:
            results[row][f"linear_{suffix}"] = linear_probe(a[feat].float(), a["labels"], b[feat].float(), b["labels"], epochs=cfg.probe_epochs,
                                                             lr=cfg.probe_lr, weight_decay=cfg.probe_weight_decay, seed=cfg.seed)
        if "knn" in semantics:
            results[row][f"knn_{suffix}"] = knn_classify(a[feat], a["labels"], b[feat], b["labels"], k=cfg.knn_k, temperature=cfg.knn_temperature)
        if row != "stellar":
            results[row]["probe_n_train"], results[row]["probe_n_eval"] = len(a["labels"]), len(b["labels"])


def _pixel_probes(run: _Run) -> str | None:
    """Which images the pixel baselines' probes read, in words (None: no baselines or no probes)."""
    if not (run.cfg.baselines and run.semantics):
        return None
    if not any(run.pixel_sets.values()):
        return "the probes' own images"
    return (f"a seeded subset of at most baseline_n={run.cfg.baseline_n} images per split, spread over the classes, where the "
            "probes read more (the rows' probe_n_train / probe_n_eval)")


def _report(run: _Run, recon: _Recon, fingerprint: str, results: dict, times: dict, n_eval: int, split_label: str,
            train_images: ReferenceImages | None, n_train: int) -> dict:
    cfg, tok, res, k_down, semantics = run.cfg, run.tok, int(run.cfg.data.resolution), run.k_down, run.semantics
    tc = tok.config
    n_patches = (res // tc.patch_size) ** 2
    return {
        "tokenizer": {"path": cfg.tokenizer, "fingerprint": fingerprint, "num_tokens": tc.num_tokens, "latent_channels": tc.latent_channels,
                      "patches": n_patches, "latent_values": tok.latent_values(n_patches),
                      "decoder_input": tc.decoder_input},
        "data": {"val": run.held_out.identity, "train": train_images.identity if semantics else None, "split": split_label,
                 "n_eval": n_eval, "n_train": n_train,
                 "held_out": run.held_out.describe(), "probe_train": train_images.describe() if semantics else None},
        "protocol": {"tasks": run.tasks, "features": run.kinds, "psnr_ssim": "8-bit images in [0,1]; SSIM 11x11 Gaussian sigma 1.5, valid, per channel",
                     "lpips": recon.lpips_note, "fid_reference": recon.ref_path, "fid_extractor": getattr(recon.extractor, "weights_source", None),
                     "linear": {"epochs": cfg.probe_epochs, "lr": cfg.probe_lr, "weight_decay": cfg.probe_weight_decay, "batch_size": 256, "head": "LayerNorm+Linear"},
                     "knn": {"k": cfg.knn_k, "temperature": cfg.knn_temperature, "similarity": "cosine"},
                     "pixels_down": f"area-downsampled to {k_down}x{k_down} ({3 * k_down * k_down} values), bicubic back to {res}",
                     "pixel_probes": _pixel_probes(run)},
        "results": {k: {m: round(v, 4) if isinstance(v, float) else v for m, v in r.items()} for k, r in results.items()},
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "config": OmegaConf.to_container(cfg) if OmegaConf.is_config(cfg) else None,
    }


def evaluate(cfg) -> dict:
    """Evaluate the tokenizer of `cfg` (an EvalConfig, see `python -m stellar_tok.evaluate --help`); writes
    out/metrics.json, out/metrics.md and out/reconstructions.png, and returns the report."""
    tasks, kinds = check_eval_config(cfg)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device))
    os.makedirs(cfg.out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    times: dict[str, float] = {}
    t_start = time.time()
    tok = StellarTokenizer.from_pretrained(cfg.tokenizer).eval().to(device)
    fingerprint = tokenizer_fingerprint(tok)
    held_out = ReferenceImages(cfg.data, "val", cfg.n_eval, cfg.seed)  # centre crops, a seeded subset spread over the classes
    run = _Run(cfg, tok, device, tasks, kinds, downsample_size(tok, int(cfg.data.resolution)), held_out)
    split_label = "val (falls back to train images)" if heldout_is_train(cfg.data) else "val"
    _plan_probes(run)  # refuses probe features that would not fit in memory, before any work
    recon = _recon_setup(run)
    t = time.time()
    val = _held_out_pass(run, recon)
    times["held_out_pass"] = time.time() - t
    n_eval = sum(len(p) for p in recon.meters["stellar"].psnr) if "recon" in tasks else sum(len(v) for v in val.get("labels", []))
    if recon.real_feats is not None:
        _save_reference(recon, held_out)
    results = _recon_results(run, recon, n_eval, split_label)
    train_images, n_train = None, 0
    if run.semantics:
        t = time.time()
        train_images = run.train_images
        tr = train_features(tok, cfg, kinds, run.k_down, fingerprint, device, train_images, baselines=run.pixels_in_pass("train"))
        times["train_features"] = time.time() - t
        t = time.time()
        _probe_results(run, results, tr, val)
        times["probes"] = time.time() - t
        n_train = int(len(tr["labels"]))
    times["total"] = time.time() - t_start
    report = _report(run, recon, fingerprint, results, times, n_eval, split_label, train_images, n_train)
    atomic_write_json(os.path.join(cfg.out, "metrics.json"), report, indent=2)
    atomic_write_text(os.path.join(cfg.out, "metrics.md"), markdown_table(report))
    return report
