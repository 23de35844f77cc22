"""Multi-crop views and patch masks, drawn per image and applied to a whole batch at once.

Every random choice (crop box, flip, rotation, colour jitter, grayscale, blur, noise, mask) is drawn
independently for each image, then applied with batched tensor ops (`affine_grid`/`grid_sample`, grouped
convolutions), so the same code runs on GPU and CPU without per-image Python loops. (The reference code
drew colour jitter, blur and grayscale once per batch, so one step in five saw only grey images.)

    make_views(images (B,3,R,R) in [-1,1], or the crops a loader cut) ->
        main    (B,3,G,G)         first global crop: crop + flip only, clean and unmasked
        masked  M x (B,3,G,G)     a photometric copy of the main crop, then M-1 further global crops
        keep    M x (B,K)         visible patch indices of each masked view (K = N * (1 - mask_ratio))
        local   n x (B,3,l,l)     local crops (they contribute through their CLS only)

Where the crops are cut: file-backed data (folder, wds) is cut in the data loader from each decoded
original (`stellar_tok.data.crops`: a view never comes from a smaller copy of the image), and `make_views` gets
those crops; in-memory data sets (shapes, digits) are their own originals, and `make_views` cuts their
views here from the batch (`random_crop`), with the same rule.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _uniform(b, lo, hi, g, device):
    return torch.rand(b, generator=g, device=device) * (hi - lo) + lo


def _bernoulli(b, p, g, device):
    return torch.rand(b, generator=g, device=device) < p


def random_crop(images, size, scale, g, rotation=0.0, flip=True, ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop (+ flip, + rotation up to `rotation` degrees) per image, via one grid_sample.

    images (B,3,H,W) -> (B,3,size,size). Boxes are in normalised coordinates; rotated views sample
    outside the image by reflection."""
    b, dev = images.shape[0], images.device
    area = _uniform(b, scale[0], scale[1], g, dev)
    log_r = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), g, dev)
    aspect = log_r.exp()
    w = (area * aspect).sqrt().clamp(max=1.0)  # fraction of the width
    h = (area / aspect).sqrt().clamp(max=1.0)
    cx = _uniform(b, 0, 1, g, dev) * (1 - w) + w / 2  # centre, [0,1] coordinates
    cy = _uniform(b, 0, 1, g, dev) * (1 - h) + h / 2
    sx = torch.where(_bernoulli(b, 0.5, g, dev) & flip, -w, w)
    angle = _uniform(b, -rotation, rotation, g, dev) * math.pi / 180
    cos, sin = angle.cos(), angle.sin()
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 1] = sx * cos, -h * sin
    theta[:, 1, 0], theta[:, 1, 1] = sx * sin, h * cos
    theta[:, 0, 2], theta[:, 1, 2] = cx * 2 - 1, cy * 2 - 1
    grid = F.affine_grid(theta, (b, 3, size, size), align_corners=False)
    src = images
    if images.shape[-1] > 2 * size:  # strong downscale: pre-smooth against aliasing
        src = F.interpolate(images, scale_factor=0.5, mode="area")
    return F.grid_sample(src.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(x):  # (B,3,H,W) in [0,1] -> (B,1,H,W)
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def color_jitter(x, cfg, g):
    """Per-image brightness, contrast, saturation, hue (YIQ rotation) with probability cfg.jitter_p.

    x in [-1,1] (B,3,H,W)."""
    b, dev = x.shape[0], x.device
    x = (x + 1) / 2
    on = _bernoulli(b, cfg.jitter_p, g, dev).view(b, 1, 1, 1)
    y = x
    if cfg.brightness:
        y = y * _uniform(b, 1 - cfg.brightness, 1 + cfg.brightness, g, dev).view(b, 1, 1, 1)
    if cfg.contrast:
        m = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
        y = (y - m) * _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, g, dev).view(b, 1, 1, 1) + m
    if cfg.saturation:
        gr = _gray(y)
        y = (y - gr) * _uniform(b, 1 - cfg.saturation, 1 + cfg.saturation, g, dev).view(b, 1, 1, 1) + gr
    if cfg.hue:
        ang = _uniform(b, -cfg.hue, cfg.hue, g, dev) * 2 * math.pi
        yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=dev)
        q = torch.einsum("ij,bjhw->bihw", yiq, y)
        c, s = ang.cos().view(b, 1, 1), ang.sin().view(b, 1, 1)
        i2 = c * q[:, 1] - s * q[:, 2]
        q2 = s * q[:, 1] + c * q[:, 2]
        q = torch.stack([q[:, 0], i2, q2], dim=1)
        y = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(yiq), q)
    y = y.clamp(0, 1)
    x = torch.where(on, y, x)
    gray = _bernoulli(b, cfg.grayscale_p, g, dev).view(b, 1, 1, 1)
    x = torch.where(gray, _gray(x).expand_as(x), x)
    return x * 2 - 1


def gaussian_blur(x, cfg, g):
    """Per-image Gaussian blur (kernel cfg.blur_kernel, sigma in cfg.blur_sigma) with probability cfg.blur_p."""
    b, c, h, w = x.shape
    dev = x.device
    k = cfg.blur_kernel
    sigma = _uniform(b, cfg.blur_sigma[0], cfg.blur_sigma[1], g, dev)
    r = torch.arange(k, device=dev, dtype=torch.float32) - (k - 1) / 2
    kern = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
    kern = kern / kern.sum(-1, keepdim=True)  # (B, k)
    kern = kern.repeat_interleave(c, dim=0)  # (B*3, k)
    y = F.pad(x.reshape(1, b * c, h, w), (k // 2,) * 4, mode="reflect")
    y = F.conv2d(y, kern[:, None, :, None], groups=b * c)
    y = F.conv2d(y, kern[:, None, None, :], groups=b * c).view(b, c, h, w)
    on = _bernoulli(b, cfg.blur_p, g, dev).view(b, 1, 1, 1)
    return torch.where(on, y, x)


def add_noise(x, cfg, g):
    """Per-image additive Gaussian pixel noise (std up to cfg.noise_std) with probability cfg.noise_p."""
    if not cfg.noise_p:
        return x
    b, dev = x.shape[0], x.device
    std = _uniform(b, 0, cfg.noise_std, g, dev).view(b, 1, 1, 1)
    on = _bernoulli(b, cfg.noise_p, g, dev).view(b, 1, 1, 1)
    noise = torch.randn(x.shape, generator=g, device=dev) * std
    return torch.where(on, x + noise, x).clamp(-1, 1)


def photometric(x, cfg, g):
    return add_noise(gaussian_blur(color_jitter(x, cfg, g), cfg, g), cfg, g)


def sample_keep(b, grid, mask_ratio, g, device, focal_p=0.0, focal_sigma=(0.1, 0.5)):
    """Indices of the visible patches, (B, K) sorted, K = round(N (1 - mask_ratio)).

    Focal masking (per image with probability focal_p): keep-scores get a soft Gaussian bias toward a
    random centre (sigma a fraction of the grid side), and the K best of score + Gumbel noise are kept, so
    the kept set leans toward the centre without being a hard blob."""
    n = grid * grid
    k = max(1, int(round(n * (1 - mask_ratio))))
    gumbel = -torch.log(-torch.log(torch.rand(b, n, generator=g, device=device).clamp(1e-9, 1 - 1e-9)))
    score = gumbel
    if focal_p > 0:
        c = (torch.arange(grid, device=device, dtype=torch.float32) + 0.5) / grid
        yy, xx = torch.meshgrid(c, c, indexing="ij")
        pos = torch.stack([xx.flatten(), yy.flatten()], dim=-1)  # (N, 2)
        centre = torch.rand(b, 1, 2, generator=g, device=device)
        sigma = _uniform(b, focal_sigma[0], focal_sigma[1], g, device).view(b, 1)
        bias = -((pos[None] - centre) ** 2).sum(-1) / (2 * sigma**2)  # log of a Gaussian weight
        on = _bernoulli(b, focal_p, g, device).view(b, 1)
        score = score + torch.where(on, bias, torch.zeros_like(bias))
    return score.topk(k, dim=1).indices.sort(dim=1).values


def to_unit_range(batch, device):
    """uint8 images, or a dict of uint8 crops (`stellar_tok.data.crops`), -> float in [-1, 1] on `device`."""
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True).float() / 127.5 - 1 for k, v in batch.items()}
    return batch.to(device, non_blocking=True).float() / 127.5 - 1


def make_views(source, cfg, g, patch_size):
    """source: images (B,3,R,R) in [-1,1] to cut every view from, or a loader's crops in [-1,1]
    {"main" (B,3,G,G), "global" (B,M-1,3,G,G), "local" (B,n,3,l,l)} -> dict(main, masked, keep, local);
    see the module docstring."""
    if isinstance(source, dict):  # cut in the loader from the decoded originals
        main, globals_, locals_ = source["main"], source["global"].unbind(1), source["local"].unbind(1)
        if len(globals_) < cfg.global_crops - 1 or len(locals_) < cfg.local_crops:
            raise ValueError(f"the loader cut {len(globals_)} + 1 global and {len(locals_)} local crops; views asks for "
                             f"{cfg.global_crops} and {cfg.local_crops}")
        cut_global, cut_local = lambda i: globals_[i], lambda i: locals_[i]  # noqa: E731
    else:  # in-memory originals: cut here, in the order (and so from the RNG stream) of the batch
        main = random_crop(source, cfg.global_size, cfg.global_scale, g, rotation=0.0)
        cut_global = lambda i: random_crop(source, cfg.global_size, cfg.global_scale, g, cfg.rotation)  # noqa: E731
        cut_local = lambda i: random_crop(source, cfg.local_size, cfg.local_scale, g, cfg.rotation)  # noqa: E731
    b, device = main.shape[0], main.device
    masked = [photometric(main, cfg, g)]
    for i in range(cfg.global_crops - 1):
        masked.append(photometric(cut_global(i), cfg, g))
    grid = cfg.global_size // patch_size
    keep = [sample_keep(b, grid, cfg.mask_ratio, g, device, cfg.focal_p, cfg.focal_sigma) for _ in masked]
    local = [photometric(cut_local(j), cfg, g) for j in range(cfg.local_crops)]
    return {"main": main, "masked": masked, "keep": keep, "local": local}
