"""Rectified flow (flow matching with velocity prediction) over the two-part latent.

    x_t = (1 - t) x + t e,   e ~ N(0, I),   t in [0, 1]  (t = 0: data, t = 1: noise)
    the model predicts v = e - x;  loss = mean squared error over every value of both parts

This is the convention of `diffusers`' flow-matching schedulers (sigma = t), so any scheduler of that family
integrates the ODE from t = 1 to 0; `make_scheduler` builds the two the sampler offers:

    euler   FlowMatchEulerDiscreteScheduler: one model evaluation per step (the default)
    heun    FlowMatchHeunDiscreteScheduler: second order, 2 * steps - 1 evaluations (the last step is Euler's, to t = 0)

Timestep shift (SD3, LightningDiT; `diffusers`' `shift`): every time of the step grid u (evenly spaced from
1 down to about 0) becomes

    t = shift * u / (1 + (shift - 1) * u)

In this code's convention (t = 1 noise, t = 0 data), shift > 1 moves every step towards the noise end, so more
of the steps are spent on the coarse, high-noise part of the path (shift = 3: u = 0.5 -> t = 0.75); shift < 1
moves them towards the data; shift = 1 leaves the grid alone. A code base whose t runs the other way (t = 0
noise) writes the same schedule with 1/shift in place of shift.
"""
from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

SCHEDULERS = ("euler", "heun")


def make_scheduler(kind: str = "euler", shift: float = 1.0):
    """A `diffusers` flow-matching scheduler: `kind` euler | heun, with the timestep `shift` (module docstring)."""
    if kind not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)} (got {kind!r})")
    if not shift > 0:
        raise ValueError(f"shift must be > 0 (got {shift!r})")
    cls = FlowMatchEulerDiscreteScheduler if kind == "euler" else FlowMatchHeunDiscreteScheduler
    return cls(shift=float(shift))


def autocast_dtype(mixed_precision: str, device) -> torch.dtype | None:
    """Sampling precision: auto -> bf16 autocast on CUDA, fp32 elsewhere; no -> fp32; bf16 | fp16 -> that autocast."""
    choices = {"auto": None, "no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if mixed_precision not in choices:
        raise ValueError(f"mixed_precision must be one of {', '.join(choices)} (got {mixed_precision!r})")
    if mixed_precision == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else None
    return choices[mixed_precision]


def sample_t(b: int, kind: str, g: torch.Generator | None, device, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Training timesteps (B,): uniform, or logit-normal (sigmoid of N(mean, std), SD3) which favours the middle."""
    if kind == "uniform":
        return torch.rand(b, generator=g, device=device)
    if kind == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(b, generator=g, device=device))
    raise ValueError(f"flow.t_sampling must be uniform or logit_normal (got {kind!r})")


def flow_loss(model, z: torch.Tensor, log_loc: torch.Tensor, y: torch.Tensor, t: torch.Tensor, g: torch.Generator | None = None):
    """z (B,r,c), log_loc (B,N,r) normalised clean latents; y (B,) labels (null class already applied);
    t (B,). Returns (loss, dict of the per-part losses)."""
    e_tok = torch.randn(z.shape, generator=g, device=z.device, dtype=z.dtype)
    e_loc = torch.randn(log_loc.shape, generator=g, device=log_loc.device, dtype=log_loc.dtype)
    tt = t[:, None, None]
    v_tok, v_loc = model((1 - tt) * z + tt * e_tok, (1 - tt) * log_loc + tt * e_loc, t, y)
    se_tok = (v_tok.float() - (e_tok - z).float()).pow(2)
    se_loc = (v_loc.float() - (e_loc - log_loc).float()).pow(2)
    loss = (se_tok.sum() + se_loc.sum()) / (se_tok.numel() + se_loc.numel())
    return loss, {"loss_tokens": se_tok.mean().detach(), "loss_loc": se_loc.mean().detach()}  # read at log steps only


def flatten_latent(z: torch.Tensor, log_loc: torch.Tensor) -> torch.Tensor:
    """(B,r,c), (B,N,r) -> (B, r*c + N*r): one tensor for a scheduler."""
    return torch.cat([z.flatten(1), log_loc.flatten(1)], dim=1)


def split_latent(x: torch.Tensor, r: int, c: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `flatten_latent`."""
    return x[:, : r * c].view(-1, r, c), x[:, r * c :].view(-1, n, r)


@torch.no_grad()
def sample_latents(model, labels: torch.Tensor, steps: int = 50, cfg_scale: float = 1.0, interval: tuple[float, float] = (0.0, 1.0),
                   generator: torch.Generator | None = None, scheduler=None, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrate the flow ODE from noise (t = 1) to data (t = 0) with a flow-matching scheduler
    (default: `diffusers.FlowMatchEulerDiscreteScheduler`, no shift; `make_scheduler` gives heun and a timestep
    shift). Guidance `cfg_scale` is applied to every channel of both parts while t lies in `interval` (conditional
    model elsewhere). Deterministic given `generator`.

    Returns normalised (z (B,r,c), log_loc (B,N,r)) in float32."""
    cfg = model.config
    r, c, n = cfg.num_tokens, cfg.token_channels, cfg.grid**2
    device, dtype = labels.device, next(model.parameters()).dtype
    scheduler = scheduler or FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(steps, device=device)
    b = labels.shape[0]
    x = noise if noise is not None else torch.randn(b, r * c + n * r, generator=generator, device=device, dtype=torch.float32)
    lo, hi = interval
    for t in scheduler.timesteps:
        sigma = float(t) / scheduler.config.num_train_timesteps
        scale = cfg_scale if lo <= sigma <= hi else 1.0
        tok, log_loc = split_latent(x, r, c, n)
        tt = torch.full((b,), sigma, device=device)
        vt, vl = model.forward_with_cfg(tok.to(dtype), log_loc.to(dtype), tt, labels, scale)
        x = scheduler.step(flatten_latent(vt.float(), vl.float()), t, x).prev_sample
    return split_latent(x, r, c, n)
