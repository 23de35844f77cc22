"""Latent shards on disk: the format `python -m stellar_tok.tokenize` writes and `LatentDataset` reads.

A latent data set is a folder:

    manifest.json         what made it (tokenizer fingerprint and config, data, split, flip, dtype), the shard
                          list with counts, the tensor shapes and dtypes, and whether it is complete
    stats.json            LatentStats over every stored latent (flipped copies included): per-channel
                          mean/std of z, scalar mean/std of log L, and the image count
    shards/<split>-NNNNNN.safetensors
        z            (n, r, c)   the sparse tokens after the bottleneck
        log_loc      (n, N, r)   log L, clamped at log(loc_floor): the representation the generator models
        label        (n,)        int64 class (-1 when unlabelled)
        z_flip, log_loc_flip     the same for the horizontally flipped image (when tokenized with flip=true)
        metadata: tokenizer fingerprint, source keys (JSON list), and the float64 sums the statistics are
                  aggregated from (so a resumed run never re-reads finished shards)

Shards are written under a temporary name and renamed when complete, so a shard that exists is whole. Sets of
the first format (``stellar-latents/1``) named z ``tokens`` and log L ``loc``; they are read as they are.

Normalisation is one pair of functions, `Latent.normalize(stats)` / `Latent.denormalize()`: the reader
applies the first (with this folder's stats.json), and a normalised `Latent` carries its statistics, so
`StellarTokenizer.decode` undoes exactly that normalisation.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from stellar_tok.errors import UserError
from stellar_tok.files import atomic_path
from stellar_tok.model.latent import Latent, LatentStats, hash_state_dict

FORMAT = "stellar-latents/2"
READABLE_FORMATS = ("stellar-latents/1", FORMAT)
OLD_NAMES = {"stellar-latents/1": {"z": "tokens", "log_loc": "loc"}}  # what a format called z and log L on disk
SHARD_DIR = "shards"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

__all__ = ["FORMAT", "LatentDataset", "StatsAccumulator", "tokenizer_fingerprint", "write_shard", "read_shard_meta",
           "read_manifest", "collate_latents", "latent_shapes"]


def tokenizer_fingerprint(tokenizer: torch.nn.Module) -> str:
    """sha256 (16 hex digits) of a tokenizer's state dict, names and bytes: the same weights, the same hash."""
    h = hashlib.sha256()
    hash_state_dict(h, tokenizer.state_dict())
    return h.hexdigest()[:16]


class StatsAccumulator:
    """Float64 running sums for `LatentStats`: per-channel over z, scalar over log L (the sums' saved names say tok
    for z and loc for log L)."""

    def __init__(self, channels: int):
        self.tok_sum = torch.zeros(channels, dtype=torch.float64)
        self.tok_sq = torch.zeros(channels, dtype=torch.float64)
        self.n_tok = 0
        self.loc_sum = self.loc_sq = 0.0
        self.n_loc = 0

    def add(self, z: torch.Tensor, log_loc: torch.Tensor) -> None:
        t = z.detach().double().reshape(-1, z.shape[-1]).cpu()
        self.tok_sum += t.sum(0)
        self.tok_sq += (t * t).sum(0)
        self.n_tok += t.shape[0]
        l = log_loc.detach().double().cpu()
        self.loc_sum += float(l.sum())
        self.loc_sq += float((l * l).sum())
        self.n_loc += l.numel()

    def to_dict(self) -> dict:
        return {"tok_sum": self.tok_sum.tolist(), "tok_sq": self.tok_sq.tolist(), "n_tok": self.n_tok,
                "loc_sum": self.loc_sum, "loc_sq": self.loc_sq, "n_loc": self.n_loc}

    @classmethod
    def merge(cls, parts: Iterable[dict], channels: int) -> "StatsAccumulator":
        acc = cls(channels)
        for p in parts:
            acc.tok_sum += torch.tensor(p["tok_sum"], dtype=torch.float64)
            acc.tok_sq += torch.tensor(p["tok_sq"], dtype=torch.float64)
            acc.n_tok += p["n_tok"]
            acc.loc_sum += p["loc_sum"]
            acc.loc_sq += p["loc_sq"]
            acc.n_loc += p["n_loc"]
        return acc

    def stats(self) -> LatentStats:
        if not self.n_tok:
            raise ValueError("no latents were accumulated")
        mean = self.tok_sum / self.n_tok
        std = (self.tok_sq / self.n_tok - mean**2).clamp_min(0).sqrt()
        lm = self.loc_sum / self.n_loc
        ls = max(self.loc_sq / self.n_loc - lm * lm, 0.0) ** 0.5
        return LatentStats(mean.float(), std.float().clamp_min(1e-6), torch.tensor(lm, dtype=torch.float32),
                           torch.tensor(max(ls, 1e-6), dtype=torch.float32))


def write_shard(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors shard atomically (`stellar_tok.files.atomic_path`: a temporary file, fsync, rename)."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def read_shard_meta(path: str) -> dict | None:
    """The metadata of a finished shard (with `count` as an int), or None if it cannot be read."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
        if meta.get("format") not in READABLE_FORMATS:
            return None
        meta["count"] = int(meta["count"])
        return meta
    except Exception:
        return None


def read_manifest(path: str) -> dict:
    """manifest.json of a latent folder; a one-line UserError if it is missing or incomplete."""
    f = os.path.join(path, "manifest.json")
    if not os.path.isfile(f):
        raise UserError(f"{path} is not a latent folder (no manifest.json): write one with python -m stellar_tok.tokenize")
    with open(f) as fh:
        manifest = json.load(fh)
    if manifest.get("format") not in READABLE_FORMATS:
        raise UserError(f"{f} has format {manifest.get('format')!r}, expected one of {', '.join(READABLE_FORMATS)}")
    if not manifest.get("complete"):
        failed = manifest.get("failed") or []
        if failed:
            first = failed[0]
            raise UserError(f"{path} is incomplete: {len(failed)} input shard{'s' if len(failed) > 1 else ''} failed to read (first: "
                            f"{first.get('source')}: {first.get('error')}): make them readable and rerun the same tokenize command")
        raise UserError(f"{path} is incomplete (the tokenize run did not finish): rerun the same tokenize command to complete it")
    return manifest


def latent_shapes(manifest: dict) -> tuple[int, int, int]:
    """``(r, c, N)`` of the latents a manifest describes (either format)."""
    names = {"z": "z", "log_loc": "log_loc", **OLD_NAMES.get(manifest.get("format"), {})}
    r, c = manifest["shapes"][names["z"]]
    n, _ = manifest["shapes"][names["log_loc"]]
    return int(r), int(c), int(n)


def collate_latents(batch: list[dict]) -> dict:
    """DataLoader collate for `LatentDataset` items: stacks z, log_loc and label."""
    return {"z": torch.stack([b["z"] for b in batch]), "log_loc": torch.stack([b["log_loc"] for b in batch]),
            "label": torch.tensor([b["label"] for b in batch], dtype=torch.int64)}


class LatentDataset(torch.utils.data.Dataset):
    """Map-style reader of a latent folder. Items: dict(z (r,c), log_loc (N,r), label int), float32.

    normalize   apply `Latent.normalize` with this folder's stats.json (default), or return raw latents
    flip_p      probability of returning the flipped image's latent instead (default 0.5 when the folder
                holds flipped copies, else 0); drawn from torch's global RNG, so per DataLoader worker
    in_memory   load every shard at construction (fast for small sets); else shards are memory-mapped
                and read item by item

    `to_latent(batch)` turns a collated batch (`collate_latents`) into a `Latent` that carries the
    statistics, ready for `StellarTokenizer.decode`.
    """

    def __init__(self, path: str, normalize: bool = True, flip_p: float | None = None, in_memory: bool = False):
        self.path = path
        self.manifest = read_manifest(path)
        with open(os.path.join(path, "stats.json")) as f:
            self.stats = LatentStats.from_dict(json.load(f))
        self.normalize = bool(normalize)
        self.has_flip = bool(self.manifest["flip"])
        self.flip_p = (0.5 if self.has_flip else 0.0) if flip_p is None else float(flip_p)
        if self.flip_p > 0 and not self.has_flip:
            raise UserError(f"flip_p={self.flip_p} but {path} holds no flipped latents (tokenize with flip=true)")
        self.files = [os.path.join(path, SHARD_DIR, s["file"]) for s in self.manifest["shards"]]
        counts = np.array([s["count"] for s in self.manifest["shards"]], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.classes = self.manifest.get("classes") or []
        old = OLD_NAMES.get(self.manifest["format"], {})  # what an older set calls z and log_loc on disk
        self._stored = {**old, **{f"{k}_flip": f"{v}_flip" for k, v in old.items()}}
        self._handles: dict[int, object] = {}
        self._memory: list[dict] | None = None
        if in_memory:
            self._memory = [self._load_shard(f) for f in self.files]

    def _load_shard(self, file: str) -> dict:
        with safe_open(file, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_classes(self) -> int:
        """The number of classes, for class-conditional use: the folder's class names, else the largest label + 1.
        A class is then required of every item: an unlabelled one (label -1) is refused with a one-line
        `UserError` naming the first."""
        n, first = self.unlabelled()
        if n:
            raise UserError(f"{self.path}: {n} of {len(self)} samples have no class (label -1; first: {first}), but class-conditional "
                            "training needs one for every sample: tokenize labelled data (class sub-folders, or a .cls in every shard sample)")
        if len(self.classes):
            return len(self.classes)
        labels = self.labels()
        return int(labels.max()) + 1 if len(labels) else 0

    def unlabelled(self) -> tuple[int, str | None]:
        """How many items are unlabelled (label -1), and the source of the first (None if there is none).

        Recorded by tokenize in the manifest; folders written before that are read (label tensors only)."""
        if "unlabelled" in self.manifest:
            return int(self.manifest["unlabelled"]), self.manifest.get("first_unlabelled")
        labels = self.labels()
        bad = (labels < 0).nonzero().flatten()
        if not len(bad):
            return 0, None
        i = int(bad[0])
        shard = int(np.searchsorted(self.offsets, i, side="right") - 1)
        keys = json.loads(read_shard_meta(self.files[shard])["keys"])
        return len(bad), keys[i - int(self.offsets[shard])]

    def labels(self) -> torch.Tensor:
        """Every label, in item order (reads only the label tensors)."""
        out = []
        for i, file in enumerate(self.files):
            if self._memory is not None:
                out.append(self._memory[i]["label"])
            else:
                with safe_open(file, framework="pt") as f:
                    out.append(f.get_tensor("label"))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)

    def keys(self) -> list[str]:
        """The source key of every item, in order."""
        keys = []
        for file in self.files:
            keys += json.loads(read_shard_meta(file)["keys"])
        return keys

    def __getstate__(self):  # open file handles stay in the process that opened them
        d = self.__dict__.copy()
        d["_handles"] = {}
        return d

    def _get(self, shard: int, name: str, row: int) -> torch.Tensor:
        name = self._stored.get(name, name)
        if self._memory is not None:
            return self._memory[shard][name][row]
        h = self._handles.get(shard)
        if h is None:
            h = self._handles[shard] = safe_open(self.files[shard], framework="pt")
        return h.get_slice(name)[row : row + 1][0]

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        index = int(index) + (n if int(index) < 0 else 0)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} latents")
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        row = index - int(self.offsets[shard])
        suffix = "_flip" if self.flip_p > 0 and torch.rand(()) < self.flip_p else ""
        lat = Latent(self._get(shard, "z" + suffix, row)[None].float(), self._get(shard, "log_loc" + suffix, row)[None].float())
        if self.normalize:
            lat = lat.normalize(self.stats)
        return {"z": lat.z[0], "log_loc": lat.log_loc[0], "label": int(self._get(shard, "label", row))}

    def to_latent(self, batch: dict) -> Latent:
        """A collated batch -> `Latent` (normalised and carrying `stats`, or raw)."""
        return Latent(batch["z"], batch["log_loc"], self.normalize, self.stats if self.normalize else None)
