"""The generative latent of one image: sparse tokens (what) and a localization matrix (where).

    tokens: (B, r, c)  the r sparse semantic tokens after the bottleneck, c channels each
    loc:    (B, N, r)  log L, the log-probabilities of the localization matrix, clamped at log(loc_floor);
                       softmax over the last axis gives back L (rows sum to 1)

`normalize` / `denormalize` map a latent to and from zero-mean unit-variance form with the per-channel
statistics of the tokens and the scalar mean/std of log L that the tokenizer ships (`LatentStats`).
Generators model the normalised form; `StellarTokenizer.decode` accepts either and checks the flag.
"""
from __future__ import annotations

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


@dataclass
class Latent:
    tokens: torch.Tensor  # (B, r, c)
    loc: torch.Tensor  # (B, N, r) log-probabilities
    normalized: bool = False

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
        return Latent((self.tokens - s.token_mean) / s.token_std, (self.loc - s.loc_mean) / s.loc_std, True)

    def denormalize(self, stats: LatentStats) -> "Latent":
        if not self.normalized:
            raise ValueError("latent is not normalised")
        s = stats.to(self.tokens.device)
        return Latent(self.tokens * s.token_std + s.token_mean, self.loc * s.loc_std + s.loc_mean, False)

    @staticmethod
    def cat(latents: list["Latent"]) -> "Latent":
        flags = {l.normalized for l in latents}
        if len(flags) != 1:
            raise ValueError("cannot concatenate raw and normalised latents")
        return Latent(torch.cat([l.tokens for l in latents]), torch.cat([l.loc for l in latents]), flags.pop())
