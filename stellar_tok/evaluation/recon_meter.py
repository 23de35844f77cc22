"""Reconstruction metrics of a tokenizer, accumulated batch by batch: PSNR, SSIM, LPIPS, and the Inception features of
the reconstructions for rFID / rKID against a reference; and the downsampled-pixel baseline at the latent's size.

    ReconMeter        per-image PSNR/SSIM/LPIPS and Inception features of reconstructions; `result(ref)` the means
    pixel_baseline    area-downsampling to k x k and bicubic back: the baseline's "reconstruction"
    downsample_size   the largest k with no more values than the latent
    build_eval_lpips  the LPIPS network of `lpips=` (auto: VGG when its weights are available, else skipped)
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from stellar_tok.errors import UserError
from stellar_tok.losses.reconstruction import backbone_weights_path, build_lpips

from .fid import feature_stats, fid_from_stats, inception_features, kid_from_features
from .metrics import psnr, ssim, to_uint8, to_unit


def downsample_size(tokenizer, resolution: int) -> int:
    """Largest k with 3*k*k <= the latent's number of values (r*c + N*r; dense decoder N*c), below the resolution."""
    values = tokenizer.latent_values((resolution // tokenizer.config.patch_size) ** 2)
    return max(1, min(resolution - 1, math.isqrt(values // 3)))


def pixel_baseline(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B,3,R,R) in [-1,1] -> (downsampled (B,3,k,k), bicubic reconstruction (B,3,R,R) in [-1,1])."""
    down = F.interpolate(x, size=(k, k), mode="area")
    return down, F.interpolate(down, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)


def build_eval_lpips(kind: str, device):
    """-> (module or None, note). `auto` uses VGG when its weights are cached or downloadable."""
    if kind == "none":
        return None, "not computed (lpips=none)"
    try:
        return build_lpips(False, "vgg" if kind == "auto" else kind).to(device), "vgg" if kind == "auto" else kind
    except UserError:
        if kind != "auto":
            raise
        warnings.warn(f"LPIPS skipped: no VGG weights at {backbone_weights_path('vgg')} and no network to fetch them "
                      "(copy the file there, or pass lpips=none to silence this)")
        return None, "skipped (no VGG weights offline)"


class ReconMeter:
    """Per-image PSNR/SSIM/LPIPS and Inception features of reconstructions."""

    def __init__(self, extractor, lpips_net, batch_size):
        self.extractor, self.lpips, self.batch_size = extractor, lpips_net, batch_size
        self.psnr, self.ssim, self.lp, self.feats = [], [], [], []

    def add(self, x: torch.Tensor, rec: torch.Tensor) -> None:  # both (B,3,R,R) in [-1,1]
        a, b = to_unit(x.cpu()), to_unit(rec.cpu())
        self.psnr.append(psnr(a, b).clamp(max=100.0))
        self.ssim.append(ssim(a, b))
        if self.lpips is not None:
            with torch.no_grad():
                self.lp.append(self.lpips(x, b.to(x.device) * 2 - 1).flatten().float().cpu())
        if self.extractor is not None:
            self.feats.append(inception_features(self.extractor, to_uint8(rec).to(self.device), self.batch_size))

    @property
    def device(self):
        return next(self.extractor.parameters()).device

    def result(self, ref: dict | None) -> dict:
        out = {"psnr": float(torch.cat(self.psnr).mean()), "ssim": float(torch.cat(self.ssim).mean())}
        if self.lp:
            out["lpips"] = float(torch.cat(self.lp).mean())
        if self.feats and ref is not None:
            feats = np.concatenate(self.feats)
            out["rfid"] = float(fid_from_stats(feature_stats(feats), ref))
            if "features" in ref:
                kid, kid_std = kid_from_features(feats, ref["features"], subset_size=min(1000, len(feats), len(ref["features"])))
                out["rkid"], out["rkid_std"] = float(kid), float(kid_std)
        return out
