"""Encode a data set with a trained tokenizer into latent shards: the library behind `python -m stellar_tok.tokenize`.

`tokenize(cfg, tokenizer=None)` does the work and returns the summary; ``cfg`` follows `TokenizeConfig`. What it
writes, how the work is split between processes, resumed and refused: the command's help
(`stellar_tok.tokenize`), and the format: `stellar_tok.latents.dataset`. This file is the run: the folder made
ready, each unit of work encoded and written as a shard, then the manifest and the summary. The units and the
checks before a run: `stellar_tok.latents.plan`; what one unit reads: `stellar_tok.latents.sources`.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from stellar_tok.config import DataConfig
from stellar_tok.data import FolderDataset, SkipCounter, StopSignals, reset_skipped_samples
from stellar_tok.errors import UserError
from stellar_tok.files import atomic_write_json
from stellar_tok.launch import describe_launch
from stellar_tok.model.latent import latent_fingerprint
from stellar_tok.model.tokenizer import StellarTokenizer

from .dataset import DTYPES, FORMAT, SHARD_DIR, StatsAccumulator, read_shard_meta, tokenizer_fingerprint, write_shard
from .plan import check_existing, check_settings, plan_work, run_identity, shard_done
from .sources import UnitRead, WorkUnit, unit_batches


@dataclass
class TokenizeConfig:
    tokenizer: Optional[str] = None  # an exported tokenizer folder (save_pretrained)
    out: Optional[str] = None  # the latent folder to write
    data: DataConfig = field(default_factory=DataConfig)  # data.resolution defaults to the tokenizer's image_size
    split: str = "train"  # train | val
    flip: bool = False  # also store the latent of the horizontally flipped image
    dtype: str = "float16"  # storage dtype of z and log L: float16 | bfloat16 | float32
    shard_size: int = 4096  # images per shard (folder and embedded sets; webdataset keeps its input shards)
    batch_size: int = 256
    num_workers: int = 0  # image-decoding workers (folder data)
    mixed_precision: str = "no"  # no | bf16 | fp16 autocast for the encoder (GPU)
    overwrite: bool = False  # delete an existing latent folder at `out` first
    progress: bool = True


FAILED_SUFFIX = ".failed.json"  # shards/<name>.failed.json: why a unit's input could not be read (this run)


def tokenize(cfg, tokenizer=None) -> dict:
    """Run the job described by a `TokenizeConfig`; returns the summary (also stored in the manifest)."""
    check_settings(cfg)
    state = PartialState(cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)
    if state.is_main_process:
        print(f"running: {describe_launch(state, cfg.mixed_precision)}, batch {cfg.batch_size} per process", flush=True)
    tok = _load_tokenizer(cfg, tokenizer).to(state.device).eval()
    tok_config = {k: v for k, v in dict(tok.config).items() if not k.startswith("_")}
    fingerprint = tokenizer_fingerprint(tok)
    dataset, work, classes, inputs = plan_work(cfg)  # every process lists the input itself
    identity = run_identity(cfg, fingerprint, tok_config, inputs)
    _prepare_folder(cfg, state, identity, classes)

    shard_dir = os.path.join(cfg.out, SHARD_DIR)
    mine = work[state.process_index :: state.num_processes]
    todo = [w for w in mine if not shard_done(read_shard_meta(os.path.join(shard_dir, w.name + ".safetensors")), w, fingerprint)]
    stop = StopSignals("stopping after this shard (finished shards are kept; the same command finishes the rest)")
    try:  # SIGTERM/SIGINT, to this process or its group: the shard being encoded is finished, the others recorded
        n_new, seconds = _run_units(cfg, state, tok, fingerprint, dataset, todo, stop)
        state.wait_for_everyone()
    finally:
        stop.restore()

    summary = {}
    if state.is_main_process:
        summary = _finish(cfg.out, work, identity, classes, tok_config, n_new, seconds, len(mine) - len(todo), cfg.tokenizer,
                          latent_fingerprint(tok), stopped_by=stop.signal_name)
        print(_summary_line(summary, work, cfg, cfg.out), flush=True)
    state.wait_for_everyone()
    return summary


def _load_tokenizer(cfg, tokenizer):
    """The tokenizer given, else the exported folder `cfg.tokenizer`."""
    if tokenizer is not None:
        return tokenizer
    if not cfg.tokenizer or not os.path.isdir(cfg.tokenizer):
        raise UserError(f"tokenizer=DIR must name an exported tokenizer folder (got {cfg.tokenizer!r})")
    return StellarTokenizer.from_pretrained(cfg.tokenizer)


def _prepare_folder(cfg, state, identity: dict, classes: list[str]) -> None:
    """Refuse another run's folder, or clear it (overwrite); remove debris; an incomplete manifest.json."""
    out, shard_dir = cfg.out, os.path.join(cfg.out, SHARD_DIR)
    if not cfg.overwrite:  # every process refuses on its own, before any waits or deletes
        check_existing(out, identity)
    if state.is_main_process:
        if cfg.overwrite and os.path.isdir(out):
            shutil.rmtree(out)
        os.makedirs(shard_dir, exist_ok=True)
        for f in os.listdir(shard_dir):  # debris of a killed run (never valid), failure records of the last run
            if f.endswith((".tmp", FAILED_SUFFIX)):
                os.remove(os.path.join(shard_dir, f))
    state.wait_for_everyone()
    if state.is_main_process:
        atomic_write_json(os.path.join(out, "manifest.json"), {**identity, "complete": False, "classes": classes})


def _run_units(cfg, state, tok, fingerprint: str, dataset, todo: list[WorkUnit], stop: StopSignals) -> tuple[int, float]:
    """Encode and write this process's unfinished units: (images written, seconds). A unit whose input could not
    be read whole writes nothing but a record of why (for the summary); a rerun redoes it. Once `stop` is requested
    the units not begun get a record saying so instead."""
    reset_skipped_samples()
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    encoder = _UnitEncoder(tok, state.device, DTYPES[cfg.dtype], amp, bool(cfg.flip))
    known = all(w.count is not None for w in todo)
    pbar = tqdm(total=sum(w.count for w in todo) if known else None, unit="img", desc=f"tokenize [{state.process_index}]",
                disable=not (cfg.progress and state.is_main_process), dynamic_ncols=True)
    skips = dataset.skips if isinstance(dataset, FolderDataset) else SkipCounter()  # the folder counts its own
    shard_dir = os.path.join(cfg.out, SHARD_DIR)
    t0 = time.time()
    n_new = 0
    for i, w in enumerate(todo):
        if stop.requested:
            for rest in todo[i:]:
                atomic_write_json(os.path.join(shard_dir, rest.name + FAILED_SUFFIX),
                                  {"shard": rest.name, "source": str(rest.source if rest.count is None else rest.name + ".safetensors"),
                                   "error": f"not done: stopped by {stop.signal_name}"})
            break
        skipped_before = skips.total()
        read = UnitRead()
        parts, keys, acc = encoder.encode(unit_batches(dataset, w, cfg, skips, read), pbar)
        if read.error is not None:  # not read whole: write nothing, record why (for the summary), redo on rerun
            atomic_write_json(os.path.join(shard_dir, w.name + FAILED_SUFFIX), {"shard": w.name, "source": str(w.source), "error": read.error})
            continue
        _write_unit(shard_dir, w, cfg, encoder, fingerprint, parts, keys, acc, skips.total() - skipped_before)
        n_new += len(keys)
    pbar.close()
    return n_new, time.time() - t0


@dataclass
class _UnitEncoder:
    """The tokenizer's latents of a unit's batches, in the storage dtype (and of the mirrored images with flip)."""

    tok: object
    device: torch.device
    dtype: torch.dtype  # storage dtype of z and log L
    amp: Optional[torch.dtype]  # autocast dtype, None: full precision
    flip: bool

    def encode(self, batches, pbar) -> tuple[dict, list[str], StatsAccumulator]:
        """(the stored tensors' parts by name, the keys, the statistics of the stored latents)."""
        parts = {"z": [], "log_loc": [], "label": [], "z_flip": [], "log_loc_flip": []}
        keys: list[str] = []
        acc = StatsAccumulator(self.tok.config.latent_channels)
        for images, labels, batch_keys in batches:
            x = images.to(self.device, non_blocking=True).float() / 127.5 - 1
            views = [("", x), ("_flip", x.flip(-1))] if self.flip else [("", x)]
            for suffix, v in views:
                with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                    lat = self.tok.encode(v)
                t, l = lat.z.to(self.dtype).cpu(), lat.log_loc.to(self.dtype).cpu()
                parts["z" + suffix].append(t)
                parts["log_loc" + suffix].append(l)
                acc.add(t, l)
            parts["label"].append(labels.long())
            keys += list(batch_keys)
            pbar.update(len(batch_keys))
        return parts, keys, acc

    def empty(self) -> dict:
        """The tensors of a unit read whole without a readable image (an empty shard: the unit counts as done)."""
        c = self.tok.config
        r, ch, n = c.num_tokens, c.latent_channels, (c.image_size // c.patch_size) ** 2
        views = ["", "_flip"] if self.flip else [""]
        return {"label": torch.zeros(0, dtype=torch.int64), **{f"z{v}": torch.zeros(0, r, ch, dtype=self.dtype) for v in views},
                **{f"log_loc{v}": torch.zeros(0, n, r, dtype=self.dtype) for v in views}}


def _write_unit(shard_dir: str, w: WorkUnit, cfg, encoder: _UnitEncoder, fingerprint: str, parts: dict, keys: list[str],
                acc: StatsAccumulator, skipped: int) -> None:
    """shards/<name>.safetensors of one unit read whole, with its keys, statistics and counts in the metadata."""
    tensors = {k: torch.cat(v) for k, v in parts.items() if v} if keys else encoder.empty()
    unlabelled = [k for k, y in zip(keys, tensors["label"].tolist()) if y < 0]
    is_wds = cfg.data.name == "wds"
    meta = {"format": FORMAT, "tokenizer_hash": fingerprint, "count": str(len(keys)), "keys": json.dumps(keys),
            "stats": json.dumps(acc.to_dict()), "skipped": str(skipped), "source": str(w.source if is_wds else ""),
            "unlabelled": str(len(unlabelled)),
            "first_unlabelled": (f"{w.source}:{unlabelled[0]}" if is_wds else unlabelled[0]) if unlabelled else ""}
    write_shard(os.path.join(shard_dir, w.name + ".safetensors"), tensors, meta)


def _summary_line(summary: dict, work: list, cfg, out: str) -> str:
    """One line: what was written and, when input shards failed, which and why (first three) and what to do."""
    s = summary
    done = (f"{s['images']} images{' (+ flipped)' if cfg.flip else ''} in {s['shards']} shards ({s['shards_already_done']} already done), "
            f"skipped {s['skipped']}"
            + (f", {s['unlabelled']} unlabelled (label -1, first: {s['first_unlabelled']})" if s.get("unlabelled") else "")
            + f", {s['seconds']:.1f}s, {s['images_this_run'] / max(s['seconds'], 1e-9):.0f} img/s in this run -> {out}")
    failed = s.get("failed") or []
    if not failed:
        return f"tokenize: {done}"
    if s.get("stopped_by"):
        return (f"tokenize: STOPPED by {s['stopped_by']}: {len(failed)} of {len(work)} shards not done; {done}; "
                f"rerun the same command to finish them (list: {os.path.join(out, 'manifest.json')})")
    shown = "; ".join(f"{f['source']}: {f['error']}" for f in failed[:3]) + (f"; and {len(failed) - 3} more" if len(failed) > 3 else "")
    return (f"tokenize: INCOMPLETE: {len(failed)} of {len(work)} input shards failed ({shown}); {done}; "
            f"rerun the same command once they are readable to redo only the failed shards (list: {os.path.join(out, 'manifest.json')})")



def _finish(out, work, identity, classes, tok_config, n_new, seconds, done_before, tokenizer_path=None, latent_hash=None,
            stopped_by=None) -> dict:
    """Write manifest.json (and stats.json when no shard failed) from the shards' metadata. `latent_hash`: the
    tokenizer's latent fingerprint (stellar_tok.model.latent.latent_fingerprint), which a generator trained on these
    latents records, so that it needs no tokenizer at hand. `stopped_by`: the signal that stopped the run early."""
    shard_dir = os.path.join(out, SHARD_DIR)
    fingerprint = identity["tokenizer_hash"]
    shards, parts, failed, skipped, images, unlabelled, first_unlabelled = [], [], [], 0, 0, 0, ""
    for w in work:
        file = w.name + ".safetensors"
        meta = read_shard_meta(os.path.join(shard_dir, file))
        if not shard_done(meta, w, fingerprint):
            record = os.path.join(shard_dir, w.name + FAILED_SUFFIX)
            if os.path.isfile(record):
                with open(record) as f:
                    failed.append(json.load(f))
            else:  # e.g. a process that stopped without a word
                failed.append({"shard": w.name, "source": str(w.source if w.count is None else file), "error": "no shard was written"})
            continue
        skipped += int(meta.get("skipped", 0))
        unlabelled += int(meta.get("unlabelled", 0))
        first_unlabelled = first_unlabelled or meta.get("first_unlabelled", "")
        if not meta["count"]:  # an input without a single readable image: done, nothing to list
            continue
        shards.append({"file": file, "count": meta["count"]})
        parts.append(json.loads(meta["stats"]))
        images += meta["count"]
    if not images and not failed:
        raise UserError(f"no image could be tokenized from data.name={identity['data']['name']} split={identity['split']}")
    summary = {"images": images, "shards": len(shards), "skipped": skipped, "unlabelled": unlabelled,
               "first_unlabelled": first_unlabelled or None, "seconds": round(seconds, 2), "images_this_run": n_new,
               "shards_already_done": done_before, "failed": failed, "stopped_by": stopped_by}
    n, r, c = tok_config["image_size"] // tok_config["patch_size"], tok_config["num_tokens"], tok_config["latent_channels"]
    manifest = {**identity, "complete": not failed, "classes": classes, "shards": shards, "count": images,
                "unlabelled": unlabelled, "first_unlabelled": first_unlabelled or None, "failed": failed,
                "tokenizer_path": tokenizer_path, "latent_hash": latent_hash, "shapes": {"z": [r, c], "log_loc": [n * n, r], "label": []},
                "dtypes": {"z": identity["dtype"], "log_loc": identity["dtype"], "label": "int64"},
                "loc_representation": f"log L clamped at log({tok_config['loc_floor']})", "summary": summary}
    if not failed:  # statistics of the whole set only
        stats = StatsAccumulator.merge(parts, tok_config["latent_channels"]).stats()
        atomic_write_json(os.path.join(out, "stats.json"), {**stats.to_dict(), "images": images, "includes_flipped": identity["flip"]})
    atomic_write_json(os.path.join(out, "manifest.json"), manifest)
    return summary
