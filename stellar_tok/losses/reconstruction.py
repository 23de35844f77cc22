"""Reconstruction losses: L1/L2 + LPIPS + PatchGAN hinge loss with the VQGAN adaptive weight, from the step
`recon.gan_start` resolves to in the run (`gan_start_step`: a fraction of the run, or a step count).

LPIPS uses the `lpips` package (VGG). Its linear layers ship with the package; the VGG backbone comes from
torchvision's weight cache. Without those weights and without a network, construction fails with one line
saying how to provide them, unless `recon.lpips_random_backbone=true` (tests and tiny CPU configs).
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torchvision.models import AlexNet_Weights, VGG16_Weights

from stellar_tok.errors import UserError
from stellar_tok.files import weights_only_loads


def backbone_weights_path(net: str = "vgg") -> str:
    """Where torchvision caches the ImageNet weights that LPIPS's backbone loads."""
    url = {"vgg": VGG16_Weights.IMAGENET1K_V1.url, "alex": AlexNet_Weights.IMAGENET1K_V1.url}[net]
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def build_lpips(random_backbone: bool, net: str = "vgg") -> nn.Module:
    """lpips.LPIPS with its shipped linear layers. net: vgg (the standard) or alex (about 20x cheaper)."""
    import lpips  # heavy: only when a run uses LPIPS

    if net not in ("vgg", "alex"):
        raise UserError(f"recon.lpips_net must be 'vgg' or 'alex' (got {net!r})")
    with warnings.catch_warnings(), weights_only_loads():  # the backbone and linear-layer files are never fully unpickled
        warnings.simplefilter("ignore", UserWarning)  # torchvision's 'pretrained' deprecation notes
        if not random_backbone and not os.path.exists(backbone_weights_path(net)):
            try:  # a machine with network downloads the weights here, once
                return lpips.LPIPS(net=net, verbose=False).eval().requires_grad_(False)
            except Exception as e:  # URLError, socket errors, ...
                raise UserError(
                    f"LPIPS needs torchvision's {net} weights at {backbone_weights_path(net)} and they could not be downloaded "
                    f"({type(e).__name__}); copy that file there from a machine with network, or set "
                    "recon.lpips_random_backbone=true (random backbone, for tests only)"
                ) from None
        return lpips.LPIPS(net=net, pnet_rand=random_backbone, verbose=False).eval().requires_grad_(False)


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix/VQGAN NLayerDiscriminator, GroupNorm instead of BatchNorm so that
    it behaves the same on one process and many)."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        mods = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers):
            nxt = channels * min(2**i, 8)
            mods += [nn.Conv2d(ch, nxt, 4, 2, 1, bias=False), nn.GroupNorm(min(32, nxt // 4), nxt), nn.LeakyReLU(0.2)]
            ch = nxt
        nxt = channels * min(2**layers, 8)
        mods += [nn.Conv2d(ch, nxt, 3, 1, 1, bias=False), nn.GroupNorm(min(32, nxt // 4), nxt), nn.LeakyReLU(0.2)]
        mods += [nn.Conv2d(nxt, 1, 3, 1, 1)]
        self.net = nn.Sequential(*mods)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,3,H,W) -> patch logits (B,1,h,w)
        return self.net(x)


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Within the block the module's parameters need no gradient (their flags are restored after): gradients
    flow through it to its input only.

    FSDP2 modules are left as they are (FSDP2 fixes each parameter's requires_grad at its first all-gather): the
    term then also writes gradients into the module, which its owner clears before the module's own step."""
    if isinstance(module, FSDPModule):
        yield module
        return
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's balance: ||d nll / d last|| / (||d g / d last|| + 1e-4), clamped to [0, max_weight], detached."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def gan_start_step(cfg, total_steps: int) -> int:
    """The step at which the GAN starts in a run of `total_steps`: `recon.gan_start` in [0, 1) is a fraction of the
    run (rounded down to a step: always one the run reaches), >= 1 a step count. A step count the run never reaches
    is refused in one line."""
    value = float(cfg.gan_start)
    step = int(value * total_steps + 1e-9) if value < 1 else int(value)  # 1e-9: 0.29 * 100 is 28.999...
    if step >= total_steps:
        raise UserError(f"recon.gan_start={value:g} starts the GAN at step {step:,}, which a run of {total_steps:,} steps never "
                        "reaches: give a fraction of the run in [0, 1) (e.g. 0.5) or an earlier step, or recon.gan_weight=0")
    return step


def describe_gan_start(cfg, total_steps: int) -> str:
    """For the run's first line: "GAN from step 46,918 (recon.gan_start=0.5 of 93,836 steps)"; refuses as `gan_start_step`."""
    value = float(cfg.gan_start)
    given = f"{value:g} of {total_steps:,} steps" if value < 1 else f"{int(value)}"
    return f"GAN from step {gan_start_step(cfg, total_steps):,} (recon.gan_start={given})"


class ReconstructionLoss(nn.Module):
    """`total_steps`: the run's length, against which a fractional `recon.gan_start` is resolved (`gan_start_step`);
    None (a benchmark of single steps): a fraction is never reached, a step count is used as it is."""

    def __init__(self, cfg, total_steps: int | None = None):
        super().__init__()
        self.cfg = cfg
        if cfg.pixel not in ("l1", "l2"):
            raise UserError(f"recon.pixel must be 'l1' or 'l2' (got {cfg.pixel!r})")
        self.lpips = build_lpips(cfg.lpips_random_backbone, cfg.get("lpips_net", "vgg")) if cfg.lpips_weight > 0 else None
        start = float(cfg.gan_start)
        self.gan_start = (gan_start_step(cfg, total_steps) if total_steps is not None and cfg.gan_weight > 0
                          else int(start) if start >= 1 or start == 0 else float("inf"))

    def gan_active(self, step: int) -> bool:
        return self.cfg.gan_weight > 0 and step >= self.gan_start

    def generator_loss(self, recon, target, step: int, disc: nn.Module | None = None, last_layer=None):
        """recon, target (B,3,H,W) in [-1,1] -> (loss, logs: 0-d tensors, read at log steps only).

        `disc`: the bare discriminator (not a DDP wrapper). Its adversarial term trains the decoder only: the
        discriminator's parameters get no gradient from it, so its own step follows the hinge loss alone."""
        c = self.cfg
        recon, target = recon.float(), target.float()
        pix = (recon - target).abs().mean() if c.pixel == "l1" else F.mse_loss(recon, target)
        nll = c.pixel_weight * pix
        logs = {"pixel": pix.detach(), "psnr": -10 * torch.log10(F.mse_loss(recon.detach().clamp(-1, 1), target) / 4 + 1e-12)}
        if self.lpips is not None:
            perc = self.lpips(recon, target).mean()
            nll = nll + c.lpips_weight * perc
            logs["lpips"] = perc.detach()
        loss = nll
        if disc is not None and self.gan_active(step):
            with frozen(disc):
                g = -disc(recon).mean()
            w = adaptive_weight(nll, g, last_layer, c.gan_max_adaptive) if torch.is_grad_enabled() else torch.tensor(1.0)
            loss = loss + c.gan_weight * w * g
            logs.update(gan_g=g.detach(), gan_adaptive_weight=w.detach())
        return loss, logs

    def discriminator_loss(self, disc: nn.Module, recon, target):
        real, fake = disc(target.float()), disc(recon.detach().float())
        loss = hinge_d_loss(real, fake)
        return loss, {"gan_d": loss.detach(), "d_real": real.mean().detach(), "d_fake": fake.mean().detach()}
