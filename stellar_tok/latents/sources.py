"""The sources of `tokenize`'s units of work: what one unit reads, as batches of (images, labels, keys).

    WorkUnit         one output shard: its name, its input (a range of indices, or an input tar's URL), its size
    UnitRead         how reading one unit went: `error` is set when its input could not be read whole
    KeyedFolder      folder images by index, with their relative path as key (a bad file is skipped, counted)
    tar_samples_strict  the raw samples of one input tar; any read error ends the stream and is recorded
    unit_batches     the batches of one unit: uint8 images (B,3,R,R), labels (B,), keys (B strings)

The units themselves, in order, and the checks before a run: `stellar_tok.latents.plan`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import webdataset as wds

from stellar_tok.data import ArrayDataset, BadSample, FolderDataset, decode_wds_sample, load_rgb, resize_and_crop, worker_options
from stellar_tok.data.shards import read_error_message


@dataclass
class WorkUnit:
    name: str  # output shard name, without extension
    source: object  # range of indices, or a shard URL
    count: Optional[int]  # images, when known in advance


class UnitRead:
    """How reading one unit of work went: `error` is set (one line) when its input could not be read whole."""

    error: Optional[str] = None


class KeyedFolder(torch.utils.data.Dataset):
    """Folder images by index, with their relative path as key; a bad file gives None (skipped, counted)."""

    def __init__(self, ds, indices):
        self.ds, self.indices = ds, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = self.indices[i]
        try:
            img, label = self.ds.load(j)
        except BadSample as bad:
            self.ds.skips.add(bad.reason, f"{self.ds.path(j)}: {bad}")
            return None
        return img, label, os.path.relpath(self.ds.path(j), self.ds.root)


def collate_keyed(batch):
    """(images (B,3,R,R) uint8, labels (B,), keys) of the readable items; None when none is."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch]), [b[2] for b in batch]


def describe_read_error(exn: Exception) -> str:
    """One line for a read error (webdataset appends the stream and URL to the arguments; keep the message)."""
    message = next((l.strip() for l in read_error_message(exn).split(" @ ")[0].splitlines() if l.strip()), "")
    return f"{type(exn).__name__}: {message}" if message else type(exn).__name__


def tar_samples_strict(url: str, read: UnitRead) -> Iterator[dict]:
    """The raw samples of one input tar; any read error (cannot open, cut short, duplicate member, a failing
    pipe) ends the stream and is recorded in `read.error`, so the caller knows the tar was not read whole."""
    source = {"url": url}
    try:
        yield from wds.tarfile_samples([source], handler=wds.reraise_exception)
        stream = source.pop("stream", None)
        if stream is not None:
            stream.close()  # a pipe: a failed command shows up here
    except Exception as exn:  # noqa: BLE001 - every read error fails the unit
        read.error = describe_read_error(exn)
    finally:
        stream = source.get("stream")
        if stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - already failed
                pass


def wds_items(url: str, resolution: int, skips, read: UnitRead) -> Iterator[tuple[torch.Tensor, int, str]]:
    """Decoded (image, label, key) of one input tar; bad samples are skipped and counted in `skips`, as the
    training reader does (`stellar_tok.data`); a read error stops the stream (see `tar_samples_strict`)."""
    make = lambda data: resize_and_crop(load_rgb(data, target=resolution), resolution, False)  # noqa: E731  centre crop
    for sample in tar_samples_strict(url, read):
        decoded = decode_wds_sample(sample, make, skips, f"{url}:{sample.get('__key__', '?')}")
        if decoded is not None:
            yield decoded[0], decoded[1], str(sample.get("__key__", "?"))


def unit_batches(dataset, work: WorkUnit, cfg, skips, read: UnitRead) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """The batches of one unit of work: (images uint8 (B,3,R,R), labels (B,), keys)."""
    bs = cfg.batch_size
    if isinstance(dataset, ArrayDataset):  # in memory: slice the arrays, no per-item work
        idx = work.source
        for lo in range(idx.start, idx.stop, bs):
            hi = min(lo + bs, idx.stop)
            images = torch.from_numpy(dataset.images[lo:hi].copy()).permute(0, 3, 1, 2)  # (B,3,R,R) uint8
            yield images, torch.from_numpy(dataset.labels[lo:hi].copy()), [f"{cfg.split}/{i:08d}" for i in range(lo, hi)]
    elif isinstance(dataset, FolderDataset):
        loader = torch.utils.data.DataLoader(KeyedFolder(dataset, work.source), batch_size=bs, num_workers=cfg.num_workers,
                                             collate_fn=collate_keyed, **worker_options(cfg.num_workers))  # stop signals: the main process decides
        for b in loader:
            if b is not None:
                yield b
    else:  # webdataset: one input tar, read whole or failed
        buf = []
        for item in wds_items(work.source, cfg.data.resolution, skips, read):
            buf.append(item)
            if len(buf) == bs:
                yield collate_keyed(buf)
                buf = []
        if buf:
            yield collate_keyed(buf)
