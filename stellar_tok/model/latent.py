"""The generative latent of one image: sparse tokens (what) and a localization matrix (where).

    z:       (B, r, c)  the r sparse semantic tokens S after the bottleneck (`to_latent`), c channels each
    log_loc: (B, N, r)  log L, the log-probabilities of the localization matrix, clamped at log(loc_floor);
                        softmax over the last axis gives back L (rows sum to 1); `probs()` does that

`normalize(stats)` / `denormalize()` are the one pair that maps a latent to and from zero-mean
unit-variance form, with per-channel statistics of z and the scalar mean/std of log L (`LatentStats`). A
normalised latent remembers the statistics it was normalised with (`latent.stats`), so `denormalize()` and
`StellarTokenizer.decode` undo exactly that normalisation, whether the statistics are the ones the tokenizer
ships or those of a latent data set (`stellar_tok.latents.dataset`). Generators model the normalised form.

Names used across the package: S = ``sparse`` (B,r,d), z = ``z`` (B,r,c), L = ``loc`` (B,N,r), log L =
``log_loc``, F = L·S = ``lowrank`` (B,N,d). The names ``tokens`` and ``loc`` of older versions for z and log L
still read (`Latent.tokens`, `Latent.loc` with a warning; old latent sets and statistics files as they are);
the statistics buffers keep their saved names (``latent_token_mean`` ... ``latent_loc_std``) so that every
exported model loads.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import warnings
from dataclasses import dataclass, replace

import torch

from stellar_tok.config import DECODER_KEYS  # the keys train.decoder_from lets a run choose


@dataclass
class LatentStats:
    z_mean: torch.Tensor  # (c,) per channel of z
    z_std: torch.Tensor  # (c,)
    log_loc_mean: torch.Tensor  # () scalar over all entries of log L
    log_loc_std: torch.Tensor  # ()

    def to(self, *args, **kwargs) -> "LatentStats":
        return LatentStats(*(t.to(*args, **kwargs) for t in (self.z_mean, self.z_std, self.log_loc_mean, self.log_loc_std)))

    def to_dict(self) -> dict:
        """JSON-ready: lists of floats."""
        return {"z_mean": self.z_mean.tolist(), "z_std": self.z_std.tolist(),
                "log_loc_mean": float(self.log_loc_mean), "log_loc_std": float(self.log_loc_std)}

    @classmethod
    def from_dict(cls, d: dict) -> "LatentStats":
        """From `to_dict`'s keys, or the older ones (token_mean, token_std, loc_mean, loc_std)."""
        t = lambda v: torch.as_tensor(v, dtype=torch.float32)  # noqa: E731
        get = lambda new, old: t(d[new] if new in d else d[old])  # noqa: E731
        return cls(get("z_mean", "token_mean"), get("z_std", "token_std"), get("log_loc_mean", "loc_mean"), get("log_loc_std", "loc_std"))


@dataclass
class Latent:
    z: torch.Tensor  # (B, r, c)
    log_loc: torch.Tensor  # (B, N, r) log-probabilities
    normalized: bool = False
    stats: LatentStats | None = None  # the statistics a normalised latent was normalised with

    def __post_init__(self):
        if self.z.dim() != 3 or self.log_loc.dim() != 3 or self.z.shape[0] != self.log_loc.shape[0]:
            raise ValueError(f"Latent expects z (B,r,c) and log_loc (B,N,r), got {tuple(self.z.shape)} and {tuple(self.log_loc.shape)}")
        if self.z.shape[1] != self.log_loc.shape[2]:
            raise ValueError(f"Latent z has r={self.z.shape[1]} rows but log_loc has {self.log_loc.shape[2]} columns")

    @property
    def tokens(self) -> torch.Tensor:
        """The older name of `z`."""
        warnings.warn("Latent.tokens is now Latent.z", FutureWarning, stacklevel=2)
        return self.z

    @property
    def loc(self) -> torch.Tensor:
        """The older name of `log_loc` (log L, not L: `probs()` gives L)."""
        warnings.warn("Latent.loc is now Latent.log_loc", FutureWarning, stacklevel=2)
        return self.log_loc

    def __len__(self) -> int:
        return self.z.shape[0]

    def __getitem__(self, idx) -> "Latent":
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return replace(self, z=self.z[idx], log_loc=self.log_loc[idx])

    @property
    def num_tokens(self) -> int:
        return self.z.shape[1]

    @property
    def num_patches(self) -> int:
        return self.log_loc.shape[1]

    def to(self, *args, **kwargs) -> "Latent":
        return replace(self, z=self.z.to(*args, **kwargs), log_loc=self.log_loc.to(*args, **kwargs))

    def probs(self) -> torch.Tensor:
        """L itself, (B, N, r), rows summing to 1 (defined for the raw, not the normalised, latent)."""
        if self.normalized:
            raise ValueError("probs() needs a raw latent: call denormalize(stats) first")
        return self.log_loc.float().softmax(-1)

    def normalize(self, stats: LatentStats) -> "Latent":
        if self.normalized:
            raise ValueError("latent is already normalised")
        s = stats.to(self.z.device)
        return Latent((self.z - s.z_mean) / s.z_std, (self.log_loc - s.log_loc_mean) / s.log_loc_std, True, stats)

    def denormalize(self, stats: LatentStats | None = None) -> "Latent":
        """Undo `normalize`: with the statistics the latent carries, or with `stats` when given."""
        if not self.normalized:
            raise ValueError("latent is not normalised")
        stats = stats if stats is not None else self.stats
        if stats is None:
            raise ValueError("this normalised latent carries no statistics: pass denormalize(stats)")
        s = stats.to(self.z.device)
        return Latent(self.z * s.z_std + s.z_mean, self.log_loc * s.log_loc_std + s.log_loc_mean, False)

    @staticmethod
    def cat(latents: list["Latent"]) -> "Latent":
        flags = {l.normalized for l in latents}
        if len(flags) != 1:
            raise ValueError("cannot concatenate raw and normalised latents")
        stats = latents[0].stats
        if any(l.stats is not stats for l in latents[1:]) and flags == {True}:
            raise ValueError("cannot concatenate latents normalised with different statistics")
        return Latent(torch.cat([l.z for l in latents]), torch.cat([l.log_loc for l in latents]), flags.pop(), stats)


class LatentStatsBuffers:
    """Mixin for a torch module that ships the latent statistics with its weights (as buffers; their names, kept from
    older versions, say token for z and loc for log L)."""

    def register_latent_stats(self, channels: int) -> None:
        self.register_buffer("latent_token_mean", torch.zeros(channels))
        self.register_buffer("latent_token_std", torch.ones(channels))
        self.register_buffer("latent_loc_mean", torch.zeros(()))
        self.register_buffer("latent_loc_std", torch.ones(()))

    @property
    def latent_stats(self) -> LatentStats:
        return LatentStats(self.latent_token_mean, self.latent_token_std, self.latent_loc_mean, self.latent_loc_std)

    def set_latent_stats(self, stats: LatentStats) -> None:
        self.latent_token_mean.copy_(stats.z_mean)
        self.latent_token_std.copy_(stats.z_std.clamp(min=1e-6))
        self.latent_loc_mean.copy_(stats.log_loc_mean)
        self.latent_loc_std.copy_(stats.log_loc_std.clamp(min=1e-6))


LATENT_STATS_BUFFERS = ("latent_token_mean", "latent_token_std", "latent_loc_mean", "latent_loc_std")


def hash_state_dict(h, state: dict) -> None:
    """Feed a state dict into the hash `h`, in name order: each name, dtype, shape and the tensor's bytes."""
    for name, t in sorted(state.items()):
        h.update(name.encode())
        t = t.detach().cpu().contiguous()
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def latent_fingerprint(tokenizer: torch.nn.Module) -> str:
    """sha256 (16 hex digits) of what makes a tokenizer's latent: its weights and buffers outside the pixel decoder
    (`DECODER_PREFIXES`), i.e. the encoder, the localization head, the bottleneck to_latent and the input
    normalisation; and its config keys outside the decoder's shape (stellar_tok.config.DECODER_KEYS) whose values
    differ from their defaults (tau, loc_floor, norm_eps, ...; a key added later with a neutral default leaves
    the fingerprint alone).

    A tokenizer whose decoder was retrained on the frozen encoder (`train.decoder_from`) encodes bit for bit the same
    latent, and has this fingerprint; a different encoder has another. Left out on purpose as well: the latent
    statistics the tokenizer ships. They are re-measured on export (a decoder_from run gets its own, which move
    with its batch size and device), they do not change a single latent value, and a generator denormalises its
    samples with its own statistics (LatentDiT.latent_stats), not the tokenizer's."""
    skip = tuple(getattr(tokenizer, "DECODER_PREFIXES", ()))
    h = hashlib.sha256(b"stellar latent v1")
    hash_state_dict(h, {k: t for k, t in tokenizer.state_dict().items() if not (k.startswith(skip) or k in LATENT_STATS_BUFFERS)})
    config = dict(getattr(tokenizer, "config", None) or {})
    try:
        defaults = {k: p.default for k, p in inspect.signature(type(tokenizer).__init__).parameters.items()}
    except (TypeError, ValueError):
        defaults = {}

    def canon(v):  # 4 and 4.0, tuples and lists: one spelling
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return v
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, (list, tuple)):
            return [canon(x) for x in v]
        return str(v)

    keys = {k: canon(v) for k, v in config.items()
            if not k.startswith("_") and k not in DECODER_KEYS and not (k in defaults and canon(defaults[k]) == canon(v))}
    h.update(json.dumps(keys, sort_keys=True).encode())
    return h.hexdigest()[:16]
