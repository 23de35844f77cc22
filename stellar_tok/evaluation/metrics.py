"""Pixel metrics: PSNR and SSIM per image, on images in [0, 1].

SSIM follows Wang et al. (2004) and their reference MATLAB code: an 11x11 Gaussian window with sigma 1.5,
K1 = 0.01, K2 = 0.03, data range 1, "valid" filtering (no padding), the mean of the SSIM map; colour images
are scored per channel and averaged. Written here (40 lines) rather than taken from torchmetrics or
scikit-image to keep both out of the dependencies; tests check it against hand-computed values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """x, y (B,C,H,W) -> PSNR in dB per image (B,). Identical images give +inf."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1-D Gaussian (size,)."""
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """x, y (B,C,H,W) -> mean SSIM per image (B,). Images smaller than the window use a window of their size."""
    x, y = x.double(), y.double()
    c = x.shape[1]
    win_size = min(win_size, x.shape[-1], x.shape[-2])
    g = gaussian_window(win_size, sigma).to(x.device)
    w_h = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)  # separable: rows, then columns
    w_v = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(t):  # (B,C,H,W) -> (B,C,H-w+1,W-w+1), per channel
        return F.conv2d(F.conv2d(t, w_h, groups=c), w_v, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1,1] float or uint8 images -> [0,1] float32, quantised to 8 bits (what a saved PNG holds)."""
    if images.dtype == torch.uint8:
        return images.float() / 255
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round() / 255


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1,1] float -> uint8 (B,3,H,W), the same rounding as `to_unit`."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
