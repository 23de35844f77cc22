"""Transformer building blocks shared by the tokenizer's encoder and decoder.

Pre-norm ViT blocks with PyTorch's fused scaled-dot-product attention (SDPA picks flash / memory-efficient
kernels on GPU and a fused kernel on CPU), plus the positional encodings the tokenizer uses.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, D)
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, D/H)
        return self.proj(rearrange(x, "b h t d -> b t (h d)"))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine embedding (MAE), (grid*grid, dim); used to initialise the learned one."""
    if dim % 4:
        raise ValueError(f"width {dim} must be divisible by 4 for 2-D sin-cos position embeddings")
    coords = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    parts = []
    for pos in (yy.flatten(), xx.flatten()):
        out = pos[:, None] * omega[None]
        parts += [torch.sin(out), torch.cos(out)]
    return torch.cat(parts, dim=1).float()


def interpolate_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize a (1, G*G, D) patch position embedding to (1, grid*grid, D) bicubically (for smaller crops)."""
    old = int(math.isqrt(pos.shape[1]))
    if old == grid:
        return pos
    pos = rearrange(pos, "1 (h w) d -> 1 d h w", h=old)
    pos = F.interpolate(pos.float(), size=(grid, grid), mode="bicubic", align_corners=False).to(pos.dtype)
    return rearrange(pos, "1 d h w -> 1 (h w) d")


class FourierPositionEncoding(nn.Module):
    """Random Fourier features of normalised patch coordinates (as in SAM's prompt encoder).

    The random projection is a *persistent* buffer, so it is saved and restored with the weights (the
    reference code re-drew it on reload, which silently broke reloaded decoders).
    """

    def __init__(self, dim: int, grid: int, scale: float = 1.0, seed: int = 0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"decoder width {dim} must be even")
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("gaussian", scale * torch.randn(2, dim // 2, generator=gen), persistent=True)
        self.grid = grid

    def forward(self, grid: int | None = None) -> torch.Tensor:  # -> (1, grid*grid, D)
        grid = grid or self.grid
        c = (torch.arange(grid, device=self.gaussian.device, dtype=torch.float32) + 0.5) / grid
        yy, xx = torch.meshgrid(c, c, indexing="ij")
        coords = torch.stack([xx, yy], dim=-1).reshape(-1, 2) * 2 - 1  # (N, 2) in [-1, 1]
        proj = 2 * math.pi * coords @ self.gaussian  # (N, D/2)
        return torch.cat([proj.sin(), proj.cos()], dim=-1)[None]
