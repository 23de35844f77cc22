"""Scoring generated samples against a data set's statistics: the work of `python -m generators.evaluate`.

    evaluate_samples  gFID, KID, Inception Score and class accuracy of a set of samples (a `GenEvalConfig`);
                      writes out/metrics.json and out/metrics.md and returns the report
    markdown_table    the report as a one-row Markdown table and a line naming the reference and the extractor

What is compared with what, in words: `python -m generators.evaluate --help`. The samples are read by
`generators.sample_files`; the reference statistics are `stellar_tok.evaluation.fid_reference`'s.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from generators import judge
from stellar_tok.data.reference import ReferenceImages
from stellar_tok.errors import UserError
from stellar_tok.evaluation import fid
from stellar_tok.evaluation.fid import FeatureStats, feature_batches, fid_from_stats, kid_from_features, load_stats
from stellar_tok.evaluation.fid_reference import reference_identity, reference_side, reference_stats
from stellar_tok.files import atomic_write_json, atomic_write_text

from .sample_files import ResizedSamples, open_samples


def _square_side(samples, cfg) -> int:
    """The samples' (square) side; refuses other shapes."""
    h, w = samples.size
    if h != w:
        raise UserError(f"samples={cfg.samples} are {h}x{w} px: gFID needs square samples (the reference is centre-cropped squares)")
    return h


def scoring_side(cfg, side: int, ref: dict | None) -> tuple[int, str]:
    """The side the samples are scored at, and what set it: the reference file's (`reference_side`: our meta, ADM's
    arr_0), else data.resolution, else the samples' own `side`. Samples of another side need `resize=bicubic`
    (`ResizedSamples`); without it the mismatch is refused in one line."""
    made_at = reference_side(ref, cfg.fid.ref) if ref is not None else None
    if made_at:
        target, source = made_at, f"the reference fid.ref={cfg.fid.ref} was made at {made_at} px"
    elif ref is None and cfg.data.resolution:
        target, source = int(cfg.data.resolution), f"data.resolution={cfg.data.resolution}"
    elif ref is not None:
        target, source = side, f"fid.ref={cfg.fid.ref} does not say its image size (scored at the samples' own)"
    else:
        target, source = side, "the samples' own size"
    if target != side and cfg.resize != "bicubic":
        raise UserError(f"the samples are {side} px but {source}: pass resize=bicubic to score them resized to {target} px "
                        f"(bicubic, as LlamaGen's sampler does for ADM's evaluator), or use a reference made at {side} px")
    return target, source


def _check_request(cfg) -> None:
    if cfg.resize not in ("none", "bicubic"):
        raise UserError(f"resize must be none or bicubic (got {cfg.resize!r})")
    if not cfg.samples:
        raise UserError("samples=PATH is required (a samples.npz or a folder of images)")
    if not cfg.out:
        raise UserError("out=DIR is required (where metrics.json and metrics.md go)")
    if cfg.split not in ("train", "val"):
        raise UserError(f"split must be train or val (got {cfg.split!r})")


def evaluate_samples(cfg) -> dict:
    """Score the samples of a `GenEvalConfig`; writes out/metrics.json and out/metrics.md, returns the report."""
    _check_request(cfg)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device))
    t0 = time.time()
    samples = open_samples(cfg.samples)
    side = _square_side(samples, cfg)
    if len(samples) < 2:
        raise UserError(f"samples={cfg.samples} holds {len(samples)} image(s); FID needs at least 2")
    ref = None
    if cfg.fid.ref and os.path.exists(cfg.fid.ref):  # given statistics (ours, or ADM's mu/sigma): the data is not read
        ref, ref_path = load_stats(cfg.fid.ref), cfg.fid.ref
    target, source = scoring_side(cfg, side, ref)
    cfg.data.resolution = target
    if target != side:
        samples = ResizedSamples(samples, target)
    extractor = fid.build_inception(cfg.fid.weights, device=device)
    batch = cfg.fid.batch_size or (100 if device.type == "cuda" else 10)
    if ref is None:
        ref, ref_path = reference_stats(extractor, cfg.data, cfg.split, cfg.n_ref, cfg.fid.ref, batch, progress=cfg.progress,
                                        seed=cfg.seed, num_workers=cfg.num_workers)
    res, notes = _feature_scores(extractor, samples, ref, batch, cfg)
    _class_accuracy(cfg, samples, ref, res, notes)
    report = {"samples": cfg.samples, "n_samples": int(len(samples)), "sample_size": side, "scored_size": target,
              "resize": "bicubic" if target != side else None, "scored_size_from": source,
              "reference": {"path": ref_path, "n": int(ref["n"]), "data": _reference_data(cfg, ref, extractor)},
              "extractor": extractor.weights_source, "results": res, "notes": notes, "seconds": round(time.time() - t0, 1)}
    os.makedirs(cfg.out, exist_ok=True)
    atomic_write_json(os.path.join(cfg.out, "metrics.json"), report, indent=2)
    atomic_write_text(os.path.join(cfg.out, "metrics.md"), markdown_table(report))
    return report


def _feature_scores(extractor, samples, ref: dict, batch: int, cfg) -> tuple[dict, list[str]]:
    """gFID, and KID (when the reference keeps features) and the Inception Score (when the extractor has a
    classifier): (results, notes on what was left out)."""
    keep = "features" in ref  # sample features are kept only for KID
    acc, feats, logits = FeatureStats(), [], []
    for f, lg in feature_batches(extractor, samples.batches(batch), batch, progress=cfg.progress, total=len(samples), desc="inception (samples)"):
        acc.add(f)
        if keep:
            feats.append(f.astype(np.float32))
        if lg is not None:
            logits.append(lg)
    res: dict = {"fid": float(fid_from_stats(acc.stats(), ref))}
    notes = []
    if keep:
        feats = np.concatenate(feats)
        kid, kid_std = kid_from_features(feats, ref["features"], subset_size=min(cfg.kid_subset_size, len(feats), len(ref["features"])))
        res["kid"], res["kid_std"] = float(kid), float(kid_std)
    else:
        notes.append("KID left out: the reference keeps no features")
    if logits:
        from torch_fidelity.metric_isc import isc_features_to_metric  # heavy: torch-fidelity, only for the Inception Score

        isc = isc_features_to_metric(torch.cat(logits))
        res["is"], res["is_std"] = float(isc["inception_score_mean"]), float(isc["inception_score_std"])
    else:
        notes.append("Inception Score left out: these Inception weights have no classifier")
    return res, notes


def _class_accuracy(cfg, samples, ref: dict, res: dict, notes: list[str]) -> None:
    """The judge's accuracy on labelled samples of an embedded set, into `res`; a note in `notes` when it cannot be."""
    labels = samples.labels
    ref_name = ((ref.get("meta") or {}).get("data") or {}).get("name")  # the data set the reference was made of
    judged = cfg.class_accuracy and labels is not None and cfg.data.name in ("shapes", "digits") and ref_name == cfg.data.name
    if cfg.class_accuracy and labels is not None and not judged:
        notes.append(f"class accuracy left out: it needs samples and a reference of an embedded set (data.name=shapes|digits), "
                     f"the reference here is {ref_name or 'not of one'}")
    if judged:
        data_cfg = {"name": cfg.data.name, "resolution": int(cfg.data.resolution)}
        if cfg.data.name == "shapes":
            data_cfg.update(train_size=int(cfg.data.train_size), val_size=int(cfg.data.val_size), seed=int(cfg.data.seed))
        model, judge_acc, classes = judge.judge(data_cfg, cfg.classifier_cache, progress=cfg.progress)
        acc_cls = judge.class_accuracy(np.asarray(samples.array()), labels, model, classes)
        res["class_accuracy"], res["judge_val_accuracy"], res["per_class_accuracy"] = acc_cls["accuracy"], judge_acc, acc_cls["per_class"]


def _reference_data(cfg, ref: dict, extractor) -> dict:
    """What the reference statistics were made of, for the report."""
    meta = ref.get("meta", {})
    if meta.get("format") == "adm":
        return {"format": "adm", "resolution": reference_side(ref, cfg.fid.ref),
                "note": "ADM reference batch: mu/sigma as given (ImageNet train, centre crops, TF Inception pool3)"}
    if cfg.fid.ref and "data" not in meta:
        return {"format": meta.get("format", "unknown")}
    return meta.get("data") or reference_identity(ReferenceImages(cfg.data, cfg.split, cfg.n_ref, cfg.seed), extractor)


def _sizes(report: dict) -> str:
    side, scored = report.get("sample_size", "?"), report.get("scored_size")
    return f"{side} px" if scored in (None, side) else f"{side} px, bicubic to {scored}"


def markdown_table(report: dict) -> str:
    """The report as a Markdown table (one row) and a line naming the reference, the extractor and the notes."""
    r = report["results"]
    cols = [(k, name, fmt) for k, name, fmt in [("fid", "gFID", ".2f"), ("kid", "KID", ".4f"), ("is", "IS", ".2f"), ("class_accuracy", "class accuracy (%)", ".2f")] if k in r]
    ref, d = report["reference"], report["reference"]["data"]
    if d.get("format") == "adm":
        what = f"ADM reference batch {os.path.basename(ref['path'])} (mu/sigma as given, images of {d.get('resolution') or '?'} px)"
    elif "name" in d:
        what = (f"{ref['n']} images ({d['name']}, {d['split']}, {d.get('crop', 'centre')} crops at {d['resolution']} px"
                f"{', seeded subset spread over the classes' if d.get('n') else ''})")
    else:
        what = os.path.basename(ref["path"])
    lines = ["| samples | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---:|" * len(cols),
             f"| {report['n_samples']} ({_sizes(report)}) | " + " | ".join(format(r[c[0]], c[2]) for c in cols) + " |", "",
             f"Reference: {what}; extractor: {report['extractor']} (2048-d pool3). " + " ".join(n + "." for n in report["notes"]),
             f"Sizes: samples {report.get('sample_size', '?')} px, scored at {report.get('scored_size', '?')} px "
             f"({report.get('scored_size_from', '?')}){'; samples resized bicubic' if report.get('resize') else ''}.", ""]
    return "\n".join(lines)
