"""Pictures of what the tokenizer does: input | reconstruction | localization map coloured by token."""
from __future__ import annotations

import colorsys

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image


def token_palette(r: int) -> torch.Tensor:
    """r well-separated colours (r, 3) in [0,1] (golden-ratio hues, alternating lightness)."""
    cols = [colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 1.0 if i % 2 == 0 else 0.65) for i in range(r)]
    return torch.tensor(cols, dtype=torch.float32)


def loc_map(loc: torch.Tensor, size: int) -> torch.Tensor:
    """loc = L (B,N,r) -> (B,3,size,size): each patch coloured by its arg-max token, shaded by confidence."""
    b, n, r = loc.shape
    grid = int(n**0.5)
    pal = token_palette(r).to(loc.device)
    conf, idx = loc.float().max(dim=-1)  # (B, N)
    rgb = pal[idx] * (0.35 + 0.65 * conf[..., None])  # (B, N, 3)
    rgb = rgb.view(b, grid, grid, 3).permute(0, 3, 1, 2)
    return F.interpolate(rgb, size=(size, size), mode="nearest")


def enlarged_grid(images: torch.Tensor, nrow: int, min_size: int = 64, path: str | None = None) -> torch.Tensor:
    """images (B,3,H,W) in [0,1] -> one grid (3,H',W'), small images enlarged (nearest) to at least about
    `min_size` px so they can be seen. Saves a PNG when path is given."""
    scale = max(1, min_size // images.shape[-1])
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    if path:
        save_image(grid, path)
    return grid


def reconstruction_grid(images: torch.Tensor, recon: torch.Tensor, loc: torch.Tensor, path: str | None = None, n: int = 8) -> torch.Tensor:
    """images, recon (B,3,H,W) in [-1,1], loc L (B,N,r). Rows: input, reconstruction, localization map.
    Saves a PNG when path is given; returns the grid (3,H',W') in [0,1]."""
    n = min(n, images.shape[0])
    x = (images[:n].float().cpu() + 1) / 2
    y = (recon[:n].float().cpu().clamp(-1, 1) + 1) / 2
    m = loc_map(loc[:n].cpu(), images.shape[-1])
    return enlarged_grid(torch.cat([x, y, m]), nrow=n, min_size=96, path=path)
