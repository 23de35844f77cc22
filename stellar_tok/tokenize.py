"""Encode a data set with a trained tokenizer into latent shards, for generator training.

    python -m stellar_tok.tokenize tokenizer=runs/tiny/tokenizer data.name=shapes out=latents/shapes [flip=true]
    accelerate launch -m stellar_tok.tokenize tokenizer=DIR data.name=wds data.path=/data/train-{000000..000999}.tar out=DIR

Writes `out/shards/<split>-NNNNNN.safetensors`, `out/manifest.json` and `out/stats.json` (format:
`stellar_tok.latent_data`). Images are centre-cropped to the tokenizer's resolution (no random crops: the
cache is deterministic); `flip=true` also stores the latent of the mirrored image. The work is cut into
shards (`shard_size` images of an image folder or embedded set; one latent shard per input tar for
webdataset) and process p of P takes shards p, p+P, ... Restarting the same command skips finished shards;
a shard is written under a temporary name and renamed when whole. A folder made by another tokenizer or
other settings is refused (use a new `out=` or `overwrite=true`).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from omegaconf import OmegaConf

from .config import DataConfig, load_tokenizer_command_config, parse_overrides
from .errors import UserError, cli_entry
from .latent_data import DTYPES, FORMAT, SHARD_DIR, StatsAccumulator, read_shard_meta, tokenizer_fingerprint, write_shard


@dataclass
class TokenizeConfig:
    tokenizer: Optional[str] = None  # an exported tokenizer folder (save_pretrained)
    out: Optional[str] = None  # the latent folder to write
    data: DataConfig = field(default_factory=DataConfig)  # data.resolution defaults to the tokenizer's image_size
    split: str = "train"  # train | val
    flip: bool = False  # also store the latent of the horizontally flipped image
    dtype: str = "float16"  # storage dtype of tokens and loc: float16 | bfloat16 | float32
    shard_size: int = 4096  # images per shard (folder and embedded sets; webdataset keeps its input shards)
    batch_size: int = 256
    num_workers: int = 0  # image-decoding workers (folder data)
    mixed_precision: str = "no"  # no | bf16 | fp16 autocast for the encoder (GPU)
    overwrite: bool = False  # delete an existing latent folder at `out` first
    progress: bool = True


@dataclass
class _Work:
    name: str  # output shard name, without extension
    source: object  # range of indices, or a shard URL
    count: Optional[int]  # images, when known in advance


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
        from .data import BadSample

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


def _batches(dataset, work: _Work, cfg) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    from .data import ArrayDataset, FolderDataset

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
    else:  # webdataset: one input tar
        from .data import _decode_shard_samples, _ShardErrorHandler, _skip_counter, _tar_samples

        skips = _skip_counter()
        stream = _decode_shard_samples(_tar_samples([{"url": work.source}], _ShardErrorHandler(skips)),
                                       cfg.data.resolution, False, skips, with_keys=True)
        buf = []
        for (img, label), key in stream:
            buf.append((img, label, key))
            if len(buf) == bs:
                yield _collate_keyed(buf)
                buf = []
        if buf:
            yield _collate_keyed(buf)


def _plan(cfg) -> tuple[object, list[_Work], list[str]]:
    """The data set (None for webdataset), the units of work in order, and the class names."""
    from .data import ArrayDataset, FolderDataset, _build_folder, _shard_classes, _shard_urls, build_dataset

    name = cfg.data.name
    if name == "wds":
        urls = _shard_urls(cfg.data.path, cfg.split)
        return None, [_Work(f"{cfg.split}-{k:06d}", u, None) for k, u in enumerate(urls)], _shard_classes(urls)
    if name == "folder":
        ds = _build_folder(cfg.data, cfg.data.resolution, cfg.split)
        ds.random_crop = False  # a deterministic cache: centre crops
    else:
        ds = build_dataset(cfg.data, cfg.split)
    assert isinstance(ds, (ArrayDataset, FolderDataset))
    n, s = len(ds), cfg.shard_size
    work = [_Work(f"{cfg.split}-{k:06d}", range(lo, min(lo + s, n)), min(lo + s, n) - lo) for k, lo in enumerate(range(0, n, s))]
    return ds, work, list(ds.classes)


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------


def _identity(cfg, fingerprint: str, tok_config: dict) -> dict:
    """What must match for a restart to continue an existing folder."""
    data = {k: v for k, v in OmegaConf.to_container(cfg.data).items() if k not in ("num_workers",)}
    return {"format": FORMAT, "tokenizer_hash": fingerprint, "tokenizer_config": tok_config, "data": data, "split": cfg.split,
            "flip": bool(cfg.flip), "dtype": cfg.dtype, "shard_size": cfg.shard_size if cfg.data.name != "wds" else None}


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _check_existing(out: str, identity: dict) -> None:
    f = os.path.join(out, "manifest.json")
    if not os.path.isfile(f):
        if os.path.isdir(os.path.join(out, SHARD_DIR)) and os.listdir(os.path.join(out, SHARD_DIR)):
            raise UserError(f"out={out} holds shards but no manifest.json: use a new out= or overwrite=true")
        return
    with open(f) as fh:
        old = json.load(fh)
    for key, value in identity.items():
        if old.get(key) != value:
            what = "another tokenizer" if key in ("tokenizer_hash", "tokenizer_config") else f"another {key}"
            have = old.get(key)
            detail = f" ({have} vs {value})" if key == "tokenizer_hash" or not isinstance(value, dict) else ""
            raise UserError(f"out={out} holds latents made with {what}{detail}: use a new out= or overwrite=true")


def tokenize(cfg, tokenizer=None) -> dict:
    """Run the job described by a `TokenizeConfig`; returns the summary (also stored in the manifest)."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from .data import reset_skipped_samples, skipped_samples
    from .tokenizer import StellarTokenizer

    if not cfg.out:
        raise UserError("out=DIR is required (the latent folder to write)")
    if cfg.dtype not in DTYPES:
        raise UserError(f"config key 'dtype' must be one of {', '.join(DTYPES)} (got {cfg.dtype!r})")
    if cfg.split not in ("train", "val"):
        raise UserError(f"config key 'split' must be train or val (got {cfg.split!r})")
    if cfg.mixed_precision not in ("no", "bf16", "fp16"):
        raise UserError(f"config key 'mixed_precision' must be no, bf16 or fp16 (got {cfg.mixed_precision!r})")
    if cfg.shard_size < 1 or cfg.batch_size < 1:
        raise UserError("shard_size and batch_size must be >= 1")
    state = PartialState(cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)
    device = state.device
    if tokenizer is None:
        if not cfg.tokenizer or not os.path.isdir(cfg.tokenizer):
            raise UserError(f"tokenizer=DIR must name an exported tokenizer folder (got {cfg.tokenizer!r})")
        tokenizer = StellarTokenizer.from_pretrained(cfg.tokenizer)
    tok = tokenizer.to(device).eval()
    tok_config = {k: v for k, v in dict(tok.config).items() if not k.startswith("_")}
    fingerprint = tokenizer_fingerprint(tok)
    out, shard_dir = cfg.out, os.path.join(cfg.out, SHARD_DIR)
    identity = _identity(cfg, fingerprint, tok_config)

    if not cfg.overwrite:  # every process refuses on its own, before any waits or deletes
        _check_existing(out, identity)
    if state.is_main_process:
        if cfg.overwrite and os.path.isdir(out):
            shutil.rmtree(out)
        os.makedirs(shard_dir, exist_ok=True)
        for f in os.listdir(shard_dir):  # debris of a killed run: never valid
            if f.endswith(".tmp"):
                os.remove(os.path.join(shard_dir, f))
    state.wait_for_everyone()

    dataset, work, classes = _plan(cfg)
    if state.is_main_process:
        _write_json(os.path.join(out, "manifest.json"), {**identity, "complete": False, "classes": classes})
    mine = work[state.process_index :: state.num_processes]
    todo, done_before = [], 0
    for w in mine:
        meta = read_shard_meta(os.path.join(shard_dir, w.name + ".safetensors"))
        if meta is not None and meta.get("tokenizer_hash") == fingerprint:
            done_before += 1
        else:
            todo.append(w)

    reset_skipped_samples()
    dtype = DTYPES[cfg.dtype]
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    known = all(w.count is not None for w in todo)
    pbar = tqdm(total=sum(w.count for w in todo) if known else None, unit="img", desc=f"tokenize [{state.process_index}]",
                disable=not (cfg.progress and state.is_main_process), dynamic_ncols=True)
    t0 = time.time()
    n_new = 0
    for w in todo:
        parts = {"tokens": [], "loc": [], "label": [], "tokens_flip": [], "loc_flip": []}
        keys: list[str] = []
        acc = StatsAccumulator(tok.config.latent_channels)
        skipped_before = sum(skipped_samples().values())
        for images, labels, batch_keys in _batches(dataset, w, cfg):
            x = images.to(device, non_blocking=True).float() / 127.5 - 1
            views = [("", x), ("_flip", x.flip(-1))] if cfg.flip else [("", x)]
            for suffix, v in views:
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    lat = tok.encode(v)
                t, l = lat.tokens.to(dtype).cpu(), lat.loc.to(dtype).cpu()
                parts["tokens" + suffix].append(t)
                parts["loc" + suffix].append(l)
                acc.add(t, l)
            parts["label"].append(labels.long())
            keys += list(batch_keys)
            pbar.update(len(batch_keys))
        if not keys:
            continue  # an input shard with no readable image: nothing to write, nothing to count as done
        tensors = {k: torch.cat(v) for k, v in parts.items() if v}
        skipped = sum(skipped_samples().values()) - skipped_before
        meta = {"format": FORMAT, "tokenizer_hash": fingerprint, "count": str(len(keys)), "keys": json.dumps(keys),
                "stats": json.dumps(acc.to_dict()), "skipped": str(skipped), "source": str(w.source if cfg.data.name == "wds" else "")}
        write_shard(os.path.join(shard_dir, w.name + ".safetensors"), tensors, meta)
        n_new += len(keys)
    pbar.close()
    seconds = time.time() - t0
    state.wait_for_everyone()

    summary = {}
    if state.is_main_process:
        summary = _finish(out, work, identity, classes, tok_config, n_new, seconds, done_before, cfg.tokenizer)
        print(f"tokenize: {summary['images']} images{' (+ flipped)' if cfg.flip else ''} in {summary['shards']} shards "
              f"({done_before} already done), skipped {summary['skipped']}, {seconds:.1f}s, "
              f"{n_new / max(seconds, 1e-9):.0f} img/s in this run -> {out}")
    state.wait_for_everyone()
    return summary


def _finish(out, work, identity, classes, tok_config, n_new, seconds, done_before, tokenizer_path=None) -> dict:
    shard_dir = os.path.join(out, SHARD_DIR)
    shards, parts, skipped, images = [], [], 0, 0
    for w in work:
        file = w.name + ".safetensors"
        meta = read_shard_meta(os.path.join(shard_dir, file))
        if meta is None:
            if w.count is None:  # a webdataset shard without a single readable image
                continue
            raise UserError(f"shard {file} is missing after the run: rerun the same command to complete {out}")
        shards.append({"file": file, "count": meta["count"]})
        parts.append(json.loads(meta["stats"]))
        skipped += int(meta.get("skipped", 0))
        images += meta["count"]
    if not images:
        raise UserError(f"no image could be tokenized from data.name={identity['data']['name']} split={identity['split']}")
    stats = StatsAccumulator.merge(parts, tok_config["latent_channels"]).stats()
    n, r, c = tok_config["image_size"] // tok_config["patch_size"], tok_config["num_tokens"], tok_config["latent_channels"]
    _write_json(os.path.join(out, "stats.json"), {**stats.to_dict(), "images": images, "includes_flipped": identity["flip"]})
    summary = {"images": images, "shards": len(shards), "skipped": skipped, "seconds": round(seconds, 2),
               "images_this_run": n_new, "shards_already_done": done_before}
    manifest = {**identity, "complete": True, "classes": classes, "shards": shards, "count": images, "tokenizer_path": tokenizer_path,
                "shapes": {"tokens": [r, c], "loc": [n * n, r], "label": []},
                "dtypes": {"tokens": identity["dtype"], "loc": identity["dtype"], "label": "int64"},
                "loc_representation": f"log L clamped at log({tok_config['loc_floor']})", "summary": summary}
    _write_json(os.path.join(out, "manifest.json"), manifest)
    return summary


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    overrides = parse_overrides("python -m stellar_tok.tokenize", __doc__, TokenizeConfig, argv, "tokenizer=DIR out=DIR data.name=shapes flip=true")
    cfg = load_tokenizer_command_config(overrides, TokenizeConfig)
    return tokenize(cfg)


if __name__ == "__main__":
    main()
