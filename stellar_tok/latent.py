"""The generative latent of one image: sparse tokens (what) and a localization matrix (where).

    tokens: (B, r, c)  the r sparse semantic tokens after the bottleneck, c channels each
    loc:    (B, N, r)  log L, the log-probabilities of the localization matrix, clamped at log(loc_floor);
                       softmax over the last axis gives back L (rows sum to 1)

`normalize(stats)` / `denormalize()` are the one pair that maps a latent to and from zero-mean
unit-variance form, with per-channel statistics of the tokens and the scalar mean/std of log L
(`LatentStats`). A normalised latent remembers the statistics it was normalised with (`latent.stats`), so
`denormalize()` and `StellarTokenizer.decode` undo exactly that normalisation, whether the statistics are
the ones the tokenizer ships or those of a latent data set (`stellar_tok.latent_data`). Generators model the
normalised form.
"""
from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass, replace

import torch


@dataclass
class LatentStats:
    token_mean: torch.Tensor  # (c,)
    token_std: torch.Tensor  # (c,)
    loc_mean: torch.Tensor  # () scalar over all entries of log L
    loc_std: torch.Tensor  # ()

    def to(self, *args, **kwargs) -> "LatentStats":
        return LatentStats(*(t.to(*args, **kwargs) for t in (self.token_mean, self.token_std, self.loc_mean, self.loc_std)))

    def to_dict(self) -> dict:
        """JSON-ready: lists of floats."""
        return {"token_mean": self.token_mean.tolist(), "token_std": self.token_std.tolist(),
                "loc_mean": float(self.loc_mean), "loc_std": float(self.loc_std)}

    @classmethod
    def from_dict(cls, d: dict) -> "LatentStats":
        t = lambda v: torch.as_tensor(v, dtype=torch.float32)  # noqa: E731
        return cls(t(d["token_mean"]), t(d["token_std"]), t(d["loc_mean"]), t(d["loc_std"]))


@dataclass
class Latent:
    tokens: torch.Tensor  # (B, r, c)
    loc: torch.Tensor  # (B, N, r) log-probabilities
    normalized: bool = False
    stats: LatentStats | None = None  # the statistics a normalised latent was normalised with

    def __post_init__(self):
        if self.tokens.dim() != 3 or self.loc.dim() != 3 or self.tokens.shape[0] != self.loc.shape[0]:
            raise ValueError(f"Latent expects tokens (B,r,c) and loc (B,N,r), got {tuple(self.tokens.shape)} and {tuple(self.loc.shape)}")
        if self.tokens.shape[1] != self.loc.shape[2]:
            raise ValueError(f"Latent tokens have r={self.tokens.shape[1]} but loc has {self.loc.shape[2]} columns")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, idx) -> "Latent":
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return replace(self, tokens=self.tokens[idx], loc=self.loc[idx])

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    @property
    def num_patches(self) -> int:
        return self.loc.shape[1]

    def to(self, *args, **kwargs) -> "Latent":
        return replace(self, tokens=self.tokens.to(*args, **kwargs), loc=self.loc.to(*args, **kwargs))

    def probs(self) -> torch.Tensor:
        """L itself, (B, N, r), rows summing to 1 (defined for the raw, not the normalised, latent)."""
        if self.normalized:
            raise ValueError("probs() needs a raw latent: call denormalize(stats) first")
        return self.loc.float().softmax(-1)

    def normalize(self, stats: LatentStats) -> "Latent":
        if self.normalized:
            raise ValueError("latent is already normalised")
        s = stats.to(self.tokens.device)
        return Latent((self.tokens - s.token_mean) / s.token_std, (self.loc - s.loc_mean) / s.loc_std, True, stats)

    def denormalize(self, stats: LatentStats | None = None) -> "Latent":
        """Undo `normalize`: with the statistics the latent carries, or with `stats` when given."""
        if not self.normalized:
            raise ValueError("latent is not normalised")
        stats = stats if stats is not None else self.stats
        if stats is None:
            raise ValueError("this normalised latent carries no statistics: pass denormalize(stats)")
        s = stats.to(self.tokens.device)
        return Latent(self.tokens * s.token_std + s.token_mean, self.loc * s.loc_std + s.loc_mean, False)

    @staticmethod
    def cat(latents: list["Latent"]) -> "Latent":
        flags = {l.normalized for l in latents}
        if len(flags) != 1:
            raise ValueError("cannot concatenate raw and normalised latents")
        stats = latents[0].stats
        if any(l.stats is not stats for l in latents[1:]) and flags == {True}:
            raise ValueError("cannot concatenate latents normalised with different statistics")
        return Latent(torch.cat([l.tokens for l in latents]), torch.cat([l.loc for l in latents]), flags.pop(), stats)


class LatentStatsBuffers:
    """Mixin for a torch module that ships the latent statistics with its weights (as buffers)."""

    def register_latent_stats(self, channels: int) -> None:
        self.register_buffer("latent_token_mean", torch.zeros(channels))
        self.register_buffer("latent_token_std", torch.ones(channels))
        self.register_buffer("latent_loc_mean", torch.zeros(()))
        self.register_buffer("latent_loc_std", torch.ones(()))

    @property
    def latent_stats(self) -> LatentStats:
        return LatentStats(self.latent_token_mean, self.latent_token_std, self.latent_loc_mean, self.latent_loc_std)

    def set_latent_stats(self, stats: LatentStats) -> None:
        self.latent_token_mean.copy_(stats.token_mean)
        self.latent_token_std.copy_(stats.token_std.clamp(min=1e-6))
        self.latent_loc_mean.copy_(stats.loc_mean)
        self.latent_loc_std.copy_(stats.loc_std.clamp(min=1e-6))


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
    from .config import DECODER_KEYS  # the keys train.decoder_from lets a run choose

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
