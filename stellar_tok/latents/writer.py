"""Encode a data set with a trained tokenizer into latent shards: the library behind `python -m stellar_tok.tokenize`.

`tokenize(cfg, tokenizer=None)` does the work and returns the summary; ``cfg`` follows `TokenizeConfig`. What it
writes, how the work is split between processes, resumed and refused: the command's help
(`stellar_tok.tokenize`), and the format: `stellar_tok.latents.dataset`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from omegaconf import OmegaConf

from stellar_tok.config import DataConfig, check_precision
from stellar_tok.errors import UserError
from stellar_tok.files import atomic_write_json
from stellar_tok.model.latent import latent_fingerprint
from .dataset import DTYPES, FORMAT, SHARD_DIR, StatsAccumulator, read_shard_meta, tokenizer_fingerprint, write_shard


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


@dataclass
class _Work:
    name: str  # output shard name, without extension
    source: object  # range of indices, or a shard URL
    count: Optional[int]  # images, when known in advance


class _Read:
    """How reading one unit of work went: `error` is set (one line) when its input could not be read whole."""

    error: Optional[str] = None


# ----------------------------------------------------------------------------------------------
# Sources: batches of (images uint8 (B,3,R,R), labels (B,), keys) for one unit of work
# ----------------------------------------------------------------------------------------------


class _KeyedFolder(torch.utils.data.Dataset):
    """Folder images by index, with their relative path as key; a bad file gives None (skipped, counted)."""

    def __init__(self, ds, indices):
        self.ds, self.indices = ds, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        from stellar_tok.data import BadSample

        j = self.indices[i]
        try:
            img, label = self.ds.load(j)
        except BadSample as bad:
            self.ds.skips.add(bad.reason, f"{self.ds.path(j)}: {bad}")
            return None
        return img, label, os.path.relpath(self.ds.path(j), self.ds.root)


def _collate_keyed(batch):
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch]), [b[2] for b in batch]


def _describe(exn: Exception) -> str:
    """One line for a read error (webdataset appends the stream and URL to the arguments; keep the message)."""
    from stellar_tok.data.shards import read_error_message

    message = next((l.strip() for l in read_error_message(exn).split(" @ ")[0].splitlines() if l.strip()), "")
    return f"{type(exn).__name__}: {message}" if message else type(exn).__name__


def _tar_samples_strict(url: str, read: _Read) -> Iterator[dict]:
    """The raw samples of one input tar; any read error (cannot open, cut short, duplicate member, a failing
    pipe) ends the stream and is recorded in `read.error`, so the caller knows the tar was not read whole."""
    import webdataset as wds

    source = {"url": url}
    try:
        yield from wds.tarfile_samples([source], handler=wds.reraise_exception)
        stream = source.pop("stream", None)
        if stream is not None:
            stream.close()  # a pipe: a failed command shows up here
    except Exception as exn:  # noqa: BLE001 - every read error fails the unit
        read.error = _describe(exn)
    finally:
        stream = source.get("stream")
        if stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - already failed
                pass


def _wds_items(url: str, resolution: int, skips, read: _Read) -> Iterator[tuple[torch.Tensor, int, str]]:
    """Decoded (image, label, key) of one input tar; bad samples are skipped and counted in `skips`, as the
    training reader does (`stellar_tok.data`); a read error stops the stream (see `_tar_samples_strict`)."""
    from stellar_tok.data import decode_wds_sample, load_rgb, resize_and_crop

    make = lambda data: resize_and_crop(load_rgb(data, target=resolution), resolution, False)  # noqa: E731  centre crop
    for sample in _tar_samples_strict(url, read):
        decoded = decode_wds_sample(sample, make, skips, f"{url}:{sample.get('__key__', '?')}")
        if decoded is not None:
            yield decoded[0], decoded[1], str(sample.get("__key__", "?"))


def _batches(dataset, work: _Work, cfg, skips, read: _Read) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    from stellar_tok.data import ArrayDataset, FolderDataset

    bs = cfg.batch_size
    if isinstance(dataset, ArrayDataset):  # in memory: slice the arrays, no per-item work
        idx = work.source
        for lo in range(idx.start, idx.stop, bs):
            hi = min(lo + bs, idx.stop)
            images = torch.from_numpy(dataset.images[lo:hi].copy()).permute(0, 3, 1, 2)  # (B,3,R,R) uint8
            yield images, torch.from_numpy(dataset.labels[lo:hi].copy()), [f"{cfg.split}/{i:08d}" for i in range(lo, hi)]
    elif isinstance(dataset, FolderDataset):
        loader = torch.utils.data.DataLoader(_KeyedFolder(dataset, work.source), batch_size=bs, num_workers=cfg.num_workers,
                                             collate_fn=_collate_keyed)
        for b in loader:
            if b is not None:
                yield b
    else:  # webdataset: one input tar, read whole or failed
        buf = []
        for item in _wds_items(work.source, cfg.data.resolution, skips, read):
            buf.append(item)
            if len(buf) == bs:
                yield _collate_keyed(buf)
                buf = []
        if buf:
            yield _collate_keyed(buf)


def _list_hash(items) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(item.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()[:16]


def _plan(cfg) -> tuple[object, list[_Work], list[str], Optional[dict]]:
    """The data set (None for webdataset), the units of work in order, the class names, and the input list
    (count and hash of the shard URLs, or of the folder's relative paths and labels; None for embedded sets)."""
    from stellar_tok.data import ArrayDataset, FolderDataset, build_dataset, wds_shards

    name = cfg.data.name
    if name == "wds":
        urls, classes = wds_shards(cfg.data, cfg.split)
        inputs = {"files": len(urls), "hash": _list_hash(urls)}
        return None, [_Work(f"{cfg.split}-{k:06d}", u, None) for k, u in enumerate(urls)], classes, inputs
    ds, inputs = build_dataset(cfg.data, cfg.split), None
    if isinstance(ds, FolderDataset):
        ds.random_crop = False  # a deterministic cache: centre crops
        root = os.path.join(ds.root, "")
        rel = (p[len(root):] if p.startswith(root) else os.path.relpath(p, ds.root) for p in ds.paths)
        inputs = {"files": len(ds), "hash": _list_hash(f"{r}\t{int(y)}" for r, y in zip(rel, ds.labels))}
    assert isinstance(ds, (ArrayDataset, FolderDataset))
    n, s = len(ds), cfg.shard_size
    work = [_Work(f"{cfg.split}-{k:06d}", range(lo, min(lo + s, n)), min(lo + s, n) - lo) for k, lo in enumerate(range(0, n, s))]
    return ds, work, list(ds.classes), inputs


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------


def _identity(cfg, fingerprint: str, tok_config: dict, inputs: Optional[dict]) -> dict:
    """What must match for a restart to continue an existing folder (`inputs`: the input file list, see `_plan`)."""
    data = {k: v for k, v in OmegaConf.to_container(cfg.data).items() if k not in ("num_workers",)}
    return {"format": FORMAT, "tokenizer_hash": fingerprint, "tokenizer_config": tok_config, "data": data, "split": cfg.split,
            "flip": bool(cfg.flip), "dtype": cfg.dtype, "shard_size": cfg.shard_size if cfg.data.name != "wds" else None,
            "inputs": inputs}


def _check_existing(out: str, identity: dict) -> None:
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


def tokenize(cfg, tokenizer=None) -> dict:
    """Run the job described by a `TokenizeConfig`; returns the summary (also stored in the manifest)."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from stellar_tok.data import FolderDataset, SkipCounter, reset_skipped_samples
    from stellar_tok.launch import describe_launch
    from stellar_tok.model.tokenizer import StellarTokenizer

    if not cfg.out:
        raise UserError("out=DIR is required (the latent folder to write)")
    if cfg.dtype not in DTYPES:
        raise UserError(f"config key 'dtype' must be one of {', '.join(DTYPES)} (got {cfg.dtype!r})")
    if cfg.split not in ("train", "val"):
        raise UserError(f"config key 'split' must be train or val (got {cfg.split!r})")
    check_precision(cfg, "mixed_precision")  # no | bf16 | fp16 (a bare `no` on the command line arrives as false)
    if cfg.shard_size < 1 or cfg.batch_size < 1:
        raise UserError("shard_size and batch_size must be >= 1")
    state = PartialState(cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)
    device = state.device
    if state.is_main_process:
        print(f"running: {describe_launch(state, cfg.mixed_precision)}, batch {cfg.batch_size} per process", flush=True)
    if tokenizer is None:
        if not cfg.tokenizer or not os.path.isdir(cfg.tokenizer):
            raise UserError(f"tokenizer=DIR must name an exported tokenizer folder (got {cfg.tokenizer!r})")
        tokenizer = StellarTokenizer.from_pretrained(cfg.tokenizer)
    tok = tokenizer.to(device).eval()
    tok_config = {k: v for k, v in dict(tok.config).items() if not k.startswith("_")}
    fingerprint = tokenizer_fingerprint(tok)
    out, shard_dir = cfg.out, os.path.join(cfg.out, SHARD_DIR)
    dataset, work, classes, inputs = _plan(cfg)  # every process lists the input itself
    identity = _identity(cfg, fingerprint, tok_config, inputs)

    if not cfg.overwrite:  # every process refuses on its own, before any waits or deletes
        _check_existing(out, identity)
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
    mine = work[state.process_index :: state.num_processes]
    todo, done_before = [], 0
    for w in mine:
        if _shard_done(read_shard_meta(os.path.join(shard_dir, w.name + ".safetensors")), w, fingerprint):
            done_before += 1
        else:
            todo.append(w)

    reset_skipped_samples()
    dtype = DTYPES[cfg.dtype]
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    known = all(w.count is not None for w in todo)
    pbar = tqdm(total=sum(w.count for w in todo) if known else None, unit="img", desc=f"tokenize [{state.process_index}]",
                disable=not (cfg.progress and state.is_main_process), dynamic_ncols=True)
    skips = dataset.skips if isinstance(dataset, FolderDataset) else SkipCounter()  # the folder counts its own
    t0 = time.time()
    n_new = 0
    for w in todo:
        parts = {"z": [], "log_loc": [], "label": [], "z_flip": [], "log_loc_flip": []}
        keys: list[str] = []
        acc = StatsAccumulator(tok.config.latent_channels)
        skipped_before = skips.total()
        read = _Read()
        for images, labels, batch_keys in _batches(dataset, w, cfg, skips, read):
            x = images.to(device, non_blocking=True).float() / 127.5 - 1
            views = [("", x), ("_flip", x.flip(-1))] if cfg.flip else [("", x)]
            for suffix, v in views:
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    lat = tok.encode(v)
                t, l = lat.z.to(dtype).cpu(), lat.log_loc.to(dtype).cpu()
                parts["z" + suffix].append(t)
                parts["log_loc" + suffix].append(l)
                acc.add(t, l)
            parts["label"].append(labels.long())
            keys += list(batch_keys)
            pbar.update(len(batch_keys))
        if read.error is not None:  # not read whole: write nothing, record why (for the summary), redo on rerun
            atomic_write_json(os.path.join(shard_dir, w.name + FAILED_SUFFIX), {"shard": w.name, "source": str(w.source), "error": read.error})
            continue
        if keys:
            tensors = {k: torch.cat(v) for k, v in parts.items() if v}
        else:  # read whole, but no readable image: an empty shard, so the unit counts as done
            r, c, n = tok_config["num_tokens"], tok_config["latent_channels"], (tok_config["image_size"] // tok_config["patch_size"]) ** 2
            views = ["", "_flip"] if cfg.flip else [""]
            tensors = {"label": torch.zeros(0, dtype=torch.int64), **{f"z{v}": torch.zeros(0, r, c, dtype=dtype) for v in views},
                       **{f"log_loc{v}": torch.zeros(0, n, r, dtype=dtype) for v in views}}
        skipped = skips.total() - skipped_before
        unlabelled = [k for k, y in zip(keys, tensors["label"].tolist()) if y < 0]
        meta = {"format": FORMAT, "tokenizer_hash": fingerprint, "count": str(len(keys)), "keys": json.dumps(keys),
                "stats": json.dumps(acc.to_dict()), "skipped": str(skipped), "source": str(w.source if cfg.data.name == "wds" else ""),
                "unlabelled": str(len(unlabelled)),
                "first_unlabelled": (f"{w.source}:{unlabelled[0]}" if cfg.data.name == "wds" else unlabelled[0]) if unlabelled else ""}
        write_shard(os.path.join(shard_dir, w.name + ".safetensors"), tensors, meta)
        n_new += len(keys)
    pbar.close()
    seconds = time.time() - t0
    state.wait_for_everyone()

    summary = {}
    if state.is_main_process:
        summary = _finish(out, work, identity, classes, tok_config, n_new, seconds, done_before, cfg.tokenizer, latent_fingerprint(tok))
        print(_summary_line(summary, work, cfg, out), flush=True)
    state.wait_for_everyone()
    return summary


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
    shown = "; ".join(f"{f['source']}: {f['error']}" for f in failed[:3]) + (f"; and {len(failed) - 3} more" if len(failed) > 3 else "")
    return (f"tokenize: INCOMPLETE: {len(failed)} of {len(work)} input shards failed ({shown}); {done}; "
            f"rerun the same command once they are readable to redo only the failed shards (list: {os.path.join(out, 'manifest.json')})")


def _shard_done(meta: Optional[dict], w: _Work, fingerprint: str) -> bool:
    """Whether a unit of work is finished: its shard is whole, from this tokenizer, and from this input."""
    if meta is None or meta.get("tokenizer_hash") != fingerprint:
        return False
    return meta.get("source") == str(w.source) if w.count is None else meta["count"] <= w.count


def _finish(out, work, identity, classes, tok_config, n_new, seconds, done_before, tokenizer_path=None, latent_hash=None) -> dict:
    """Write manifest.json (and stats.json when no shard failed) from the shards' metadata. `latent_hash`: the
    tokenizer's latent fingerprint (stellar_tok.model.latent.latent_fingerprint), which a generator trained on these
    latents records, so that it needs no tokenizer at hand."""
    shard_dir = os.path.join(out, SHARD_DIR)
    fingerprint = identity["tokenizer_hash"]
    shards, parts, failed, skipped, images, unlabelled, first_unlabelled = [], [], [], 0, 0, 0, ""
    for w in work:
        file = w.name + ".safetensors"
        meta = read_shard_meta(os.path.join(shard_dir, file))
        if not _shard_done(meta, w, fingerprint):
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
               "shards_already_done": done_before, "failed": failed}
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
