"""What a `tokenize` run is, and whether an existing latent folder continues it.

    check_settings   refuses settings the run cannot use (before anything is loaded)
    plan_work        the data set, the units of work in order, the class names and the input file list
    run_identity     what must match for a restart to continue an existing folder
    check_existing   refuses a folder made by another tokenizer, other settings or another input file list
    shard_done       whether a unit's shard is finished (whole, from this tokenizer, from this input)

The units' batches: `stellar_tok.latents.sources`; the run: `stellar_tok.latents.writer`.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

from omegaconf import OmegaConf

from stellar_tok.config import check_precision
from stellar_tok.data import ArrayDataset, FolderDataset, build_dataset, wds_shards
from stellar_tok.errors import UserError

from .dataset import DTYPES, FORMAT, SHARD_DIR
from .sources import WorkUnit


def check_settings(cfg) -> None:
    """Refuse a `TokenizeConfig` the run cannot use: no out, an unknown dtype, split or precision, sizes < 1."""
    if not cfg.out:
        raise UserError("out=DIR is required (the latent folder to write)")
    if cfg.dtype not in DTYPES:
        raise UserError(f"config key 'dtype' must be one of {', '.join(DTYPES)} (got {cfg.dtype!r})")
    if cfg.split not in ("train", "val"):
        raise UserError(f"config key 'split' must be train or val (got {cfg.split!r})")
    check_precision(cfg, "mixed_precision")  # no | bf16 | fp16 (a bare `no` on the command line arrives as false)
    if cfg.shard_size < 1 or cfg.batch_size < 1:
        raise UserError("shard_size and batch_size must be >= 1")


def list_hash(items) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(item.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()[:16]


def plan_work(cfg) -> tuple[object, list[WorkUnit], list[str], Optional[dict]]:
    """The data set (None for webdataset), the units of work in order, the class names, and the input list
    (count and hash of the shard URLs, or of the folder's relative paths and labels; None for embedded sets)."""
    name = cfg.data.name
    if name == "wds":
        urls, classes = wds_shards(cfg.data, cfg.split)
        inputs = {"files": len(urls), "hash": list_hash(urls)}
        return None, [WorkUnit(f"{cfg.split}-{k:06d}", u, None) for k, u in enumerate(urls)], classes, inputs
    ds, inputs = build_dataset(cfg.data, cfg.split), None
    if isinstance(ds, FolderDataset):
        ds.random_crop = False  # a deterministic cache: centre crops
        root = os.path.join(ds.root, "")
        rel = (p[len(root):] if p.startswith(root) else os.path.relpath(p, ds.root) for p in ds.paths)
        inputs = {"files": len(ds), "hash": list_hash(f"{r}\t{int(y)}" for r, y in zip(rel, ds.labels))}
    assert isinstance(ds, (ArrayDataset, FolderDataset))
    n, s = len(ds), cfg.shard_size
    work = [WorkUnit(f"{cfg.split}-{k:06d}", range(lo, min(lo + s, n)), min(lo + s, n) - lo) for k, lo in enumerate(range(0, n, s))]
    return ds, work, list(ds.classes), inputs


def run_identity(cfg, fingerprint: str, tok_config: dict, inputs: Optional[dict]) -> dict:
    """What must match for a restart to continue an existing folder (`inputs`: the input file list, see `plan_work`)."""
    data = {k: v for k, v in OmegaConf.to_container(cfg.data).items() if k not in ("num_workers",)}
    return {"format": FORMAT, "tokenizer_hash": fingerprint, "tokenizer_config": tok_config, "data": data, "split": cfg.split,
            "flip": bool(cfg.flip), "dtype": cfg.dtype, "shard_size": cfg.shard_size if cfg.data.name != "wds" else None,
            "inputs": inputs}


def check_existing(out: str, identity: dict) -> None:
    """Refuse a folder at `out` that another run made (see `run_identity`), or that holds shards but no manifest."""
    f = os.path.join(out, "manifest.json")
    if not os.path.isfile(f):
        if os.path.isdir(os.path.join(out, SHARD_DIR)) and os.listdir(os.path.join(out, SHARD_DIR)):
            raise UserError(f"out={out} holds shards but no manifest.json: use a new out= or overwrite=true")
        return
    with open(f) as fh:
        old = json.load(fh)
    for key, value in identity.items():
        if key == "inputs" and old.get(key) != value:
            if not old.get(key):
                raise UserError(f"out={out} was written by a tokenize that did not record its input file list: "
                                "use a new out= or overwrite=true to redo it")
            then, now = old[key]["files"], value["files"]
            raise UserError(f"out={out} holds latents of another list of input files ({then} files then, {now} now"
                            f"{', other names' if then == now else ''}): the input changed since; use a new out= or overwrite=true to redo it")
        if old.get(key) != value:
            what = "another tokenizer" if key in ("tokenizer_hash", "tokenizer_config") else f"another {key}"
            have = old.get(key)
            detail = f" ({have} vs {value})" if key == "tokenizer_hash" or not isinstance(value, dict) else ""
            raise UserError(f"out={out} holds latents made with {what}{detail}: use a new out= or overwrite=true")


def shard_done(meta: Optional[dict], w: WorkUnit, fingerprint: str) -> bool:
    """Whether a unit of work is finished: its shard is whole, from this tokenizer, and from this input."""
    if meta is None or meta.get("tokenizer_hash") != fingerprint:
        return False
    return meta.get("source") == str(w.source) if w.count is None else meta["count"] <= w.count
