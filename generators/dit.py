"""A class-conditional diffusion transformer (DiT, adaLN-Zero) over the STELLAR latent.

One image's latent is z, the r sparse tokens after the bottleneck (c channels each), and log L, the log of the
localization matrix (N x r). The model sees one sequence:

    z        (B, r, c)   -> Linear(c, D)         + a learned embedding per token slot   r positions
    log_loc  (B, N, r)   -> r-channel map on the g x g patch grid, patchified p x p
                        -> Linear(p*p*r, D)     + fixed 2-D sin-cos positions          (g/p)^2 positions
    + a type embedding (0: token, 1: localization) on every position

then `depth` DiT blocks conditioned on timestep + class through adaLN-Zero, and a final adaLN layer with one
linear head per part, unpatchified back to (z, log_loc). The output is the velocity of both parts.
Class `num_classes` is the null class used for classifier-free guidance.

Shapes: B batch, r tokens, c token channels, N = g*g patches, p loc patch, P = (g/p)^2 loc positions,
T = r + P sequence length, D width.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange

from stellar_tok.files import SafetensorsOnly
from stellar_tok.model.latent import LatentStatsBuffers
from stellar_tok.model.vit import Attention, Mlp, sincos_pos_embed


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]  # x (B,T,D), shift/scale (B,D)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features of 1000 t -> MLP -> (B, D)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000 * t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.mlp[0].weight.dtype))


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated by the condition; gates start at zero."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)  # SDPA
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # x (B,T,D), c (B,D)
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=-1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))


class LatentDiT(SafetensorsOnly, ModelMixin, ConfigMixin, LatentStatsBuffers):
    """DiT over (z, log_loc). Saves/loads like a `diffusers` model and ships the latent statistics it was
    trained with (`latent_stats`), so its samples can be denormalised without the data set."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        num_tokens: int = 16,
        token_channels: int = 32,
        grid: int = 16,
        loc_patch: int = 2,
        width: int = 1152,
        depth: int = 28,
        heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_names: list | None = None,  # optional, for pipelines and grids
        tokenizer_hash: str | None = None,  # the latent it models: stellar_tok.model.latent.latent_fingerprint of its tokenizer
        # (encoder side only, so a decoder retrained with train.decoder_from fits); older exports: the whole tokenizer's
    ):
        super().__init__()
        if grid % loc_patch:
            raise ValueError(f"loc_patch {loc_patch} must divide the patch grid {grid}")
        if width % 4:
            raise ValueError(f"width {width} must be divisible by 4")
        r, c, p, d = num_tokens, token_channels, loc_patch, width
        self.loc_grid = grid // p
        self.token_in = nn.Linear(c, d)
        self.token_pos = nn.Parameter(torch.randn(1, r, d) * 0.02)  # one learned embedding per token slot
        self.loc_in = nn.Linear(p * p * r, d)
        self.register_buffer("loc_pos", sincos_pos_embed(d, self.loc_grid)[None], persistent=False)  # (1, P, D)
        self.type_embed = nn.Parameter(torch.zeros(2, d))
        self.t_embed = TimestepEmbedder(d)
        self.y_embed = nn.Embedding(num_classes + 1, d)  # last row: the null class (guidance)
        self.blocks = nn.ModuleList([DiTBlock(d, heads, mlp_ratio) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.token_out = nn.Linear(d, c)
        self.loc_out = nn.Linear(d, p * p * r)
        # the normalisation of the latents this model was trained on (set by the trainer)
        self.register_latent_stats(c)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        for lin in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for blk in self.blocks:  # adaLN-Zero: every residual branch starts closed
            nn.init.zeros_(blk.ada[-1].weight)
            nn.init.zeros_(blk.ada[-1].bias)
        for lin in (self.final_ada[-1], self.token_out, self.loc_out):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    @property
    def seq_len(self) -> int:
        return self.config.num_tokens + self.loc_grid**2

    # ------------------------------------------------------------------------------------------
    # sequence packing
    # ------------------------------------------------------------------------------------------
    def patchify_loc(self, log_loc: torch.Tensor) -> torch.Tensor:
        """(B, N, r) -> (B, P, p*p*r): the r-channel map on the patch grid, cut into p x p patches."""
        g, p = self.config.grid, self.config.loc_patch
        return rearrange(log_loc, "b (h p w q) r -> b (h w) (p q r)", h=g // p, p=p, w=g // p, q=p)

    def unpatchify_loc(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P, p*p*r) -> (B, N, r)."""
        g, p = self.config.grid, self.config.loc_patch
        return rearrange(x, "b (h w) (p q r) -> b (h p w q) r", h=g // p, p=p, q=p)

    def embed(self, z: torch.Tensor, log_loc: torch.Tensor) -> torch.Tensor:
        """z (B,r,c), log_loc (B,N,r) -> the input sequence (B, T, D)."""
        t = self.token_in(z) + self.token_pos + self.type_embed[0]  # (B, r, D)
        l = self.loc_in(self.patchify_loc(log_loc)) + self.loc_pos.to(z.dtype) + self.type_embed[1]  # (B, P, D)
        return torch.cat([t, l], dim=1)

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor, log_loc: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B,r,c), log_loc (B,N,r) noisy normalised latent; t (B,) in [0,1]; y (B,) class or null_class.

        Returns the predicted velocity (d z/dt, d log_loc/dt), same shapes as the inputs."""
        x = self.embed(z, log_loc)  # (B, T, D)
        c = self.t_embed(t) + self.y_embed(y)  # (B, D)
        for blk in self.blocks:
            x = blk(x, c)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        x = modulate(self.final_norm(x), shift, scale)  # (B, T, D)
        r = self.config.num_tokens
        return self.token_out(x[:, :r]), self.unpatchify_loc(self.loc_out(x[:, r:]))

    def forward_with_cfg(self, z, log_loc, t, y, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Classifier-free guidance on every channel of both parts: v_u + scale (v_c - v_u)."""
        if scale == 1.0:
            return self(z, log_loc, t, y)
        null = torch.full_like(y, self.null_class)
        vt, vl = self(torch.cat([z, z]), torch.cat([log_loc, log_loc]), torch.cat([t, t]), torch.cat([y, null]))
        (ct, ut), (cl, ul) = vt.chunk(2), vl.chunk(2)
        return ut + scale * (ct - ut), ul + scale * (cl - ul)
