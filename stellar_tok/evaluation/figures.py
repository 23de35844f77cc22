"""Figures of what a tokenizer learned, as PNG files: the pictures `python -m stellar_tok.visualize` writes.

    token_heatmaps  per image: input, arg-max map, then the r columns of L as heat maps
    token_swap      decode(S of A, L of B) and the reverse, next to A, B and their reconstructions
    token_dropout   the reconstruction with one token removed, for the tokens with the largest share
    loss_curves     every scalar of a training's TensorBoard logs (`read_scalars`), or of its metrics.jsonl
    visualize       all of them (and the reconstruction grid) for a `stellar_tok.visualize` config
"""
from __future__ import annotations

import json
import math
import os

import torch

from stellar_tok.data.reference import image_batches
from stellar_tok.errors import UserError
from stellar_tok.model.latent import Latent
from stellar_tok.model.tokenizer import StellarTokenizer

from .pictures import loc_map, reconstruction_grid, token_palette


def _plt():
    import matplotlib  # heavy: only for the figures

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: only for the figures

    return plt


def _show(ax, img: torch.Tensor, title: str | None = None) -> None:
    """img (3,H,W) in [-1,1] or (H,W,3) in [0,1]."""
    if img.dim() == 3 and img.shape[0] == 3:
        img = ((img.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0)
    ax.imshow(img.cpu().numpy(), interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def _drop_token(latent: Latent, j: int) -> Latent:
    """The latent without token j: its column of log L pushed to -inf, so softmax renormalises the rest."""
    loc = latent.log_loc.clone()
    loc[..., j] = -1e4
    return Latent(latent.z, loc)


@torch.no_grad()
def token_heatmaps(tok, x: torch.Tensor, path: str) -> None:
    """x (B,3,H,W) in [-1,1]: one row per image: input, arg-max map, the r heat maps of L."""
    plt = _plt()
    cmap = plt.get_cmap("magma")
    latent = tok.encode(x)
    L = latent.probs()  # (B, N, r)
    b, n, r = L.shape
    g, size = int(math.isqrt(n)), x.shape[-1]
    pal = token_palette(r)
    fig, axes = plt.subplots(b, r + 2, figsize=(1.0 * (r + 2), 1.15 * b), squeeze=False)
    argmax = loc_map(L, size)
    for i in range(b):
        _show(axes[i, 0], x[i], "input" if i == 0 else None)
        _show(axes[i, 1], argmax[i].permute(1, 2, 0), "arg-max" if i == 0 else None)
        for j in range(r):
            heat = L[i, :, j].view(g, g)
            ax = axes[i, j + 2]
            ax.imshow(cmap(heat.clamp(0, 1).numpy())[..., :3], interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            for s in ax.spines.values():
                s.set_edgecolor(pal[j].tolist()), s.set_linewidth(2)
            ax.set_title(f"t{j} {100 * float(heat.mean()):.0f}%", fontsize=6)
    fig.suptitle("L: where each of the r sparse tokens is used (colour = L[patch, token], 0 to 1)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def token_swap(tok, a: torch.Tensor, b: torch.Tensor, path: str) -> None:
    """a, b (P,3,H,W) in [-1,1]: per pair A, B, rec A, S_A+L_B, S_B+L_A, rec B."""
    plt = _plt()
    la, lb = tok.encode(a), tok.encode(b)
    cols = [("A", a), ("B", b), ("decode(S_A, L_A)", tok.decode(la)), ("decode(S_A, L_B)", tok.decode(Latent(la.z, lb.log_loc))),
            ("decode(S_B, L_A)", tok.decode(Latent(lb.z, la.log_loc))), ("decode(S_B, L_B)", tok.decode(lb))]
    p = a.shape[0]
    fig, axes = plt.subplots(p, len(cols), figsize=(1.35 * len(cols), 1.35 * p), squeeze=False)
    for i in range(p):
        for c, (name, imgs) in enumerate(cols):
            _show(axes[i, c], imgs[i], name if i == 0 else None)
    fig.suptitle("S = what (sparse tokens), L = where (localization): swapping them", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def token_dropout(tok, x: torch.Tensor, path: str, k: int = 8) -> None:
    """x (B,3,H,W): per image input, reconstruction, then the reconstruction without each of its top-k tokens."""
    plt = _plt()
    latent = tok.encode(x)
    share = latent.probs().mean(1)  # (B, r)
    k = min(k, share.shape[1])
    fig, axes = plt.subplots(x.shape[0], k + 2, figsize=(1.1 * (k + 2), 1.2 * x.shape[0]), squeeze=False)
    rec = tok.decode(latent)
    for i in range(x.shape[0]):
        _show(axes[i, 0], x[i], "input" if i == 0 else None)
        _show(axes[i, 1], rec[i], "reconstruction" if i == 0 else None)
        top = share[i].argsort(descending=True)[:k]
        for c, j in enumerate(top.tolist()):
            img = tok.decode(_drop_token(latent[i], j))[0]
            _show(axes[i, c + 2], img, f"- t{j} ({100 * float(share[i, j]):.0f}%)")
    fig.suptitle("Reconstruction with one token removed (largest share first)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_scalars(logs: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under `logs` (or, without any, a metrics.jsonl beside it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # heavy: only to read the logs

    series: dict[str, list[tuple[int, float]]] = {}
    for root, _, files in os.walk(logs):
        if any(f.startswith("events.out.tfevents") for f in files):
            acc = EventAccumulator(root, size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags().get("scalars", []):
                series.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    if not series:
        jl = os.path.join(os.path.dirname(os.path.normpath(logs)), "metrics.jsonl")
        jl = jl if os.path.exists(jl) else os.path.join(logs, "metrics.jsonl")
        if os.path.exists(jl):
            with open(jl) as f:
                for line in f:
                    rec = json.loads(line)
                    for k, v in rec.items():
                        if k != "step" and isinstance(v, (int, float)):
                            series.setdefault(k, []).append((rec["step"], float(v)))
    return {k: sorted(v) for k, v in series.items()}


def loss_curves(logs: str, path: str) -> int:
    """One panel per scalar; returns the number of panels (0: nothing found, nothing written)."""
    series = read_scalars(logs)
    if not series:
        return 0
    plt = _plt()
    tags = sorted(series, key=lambda t: (not ("loss" in t or t in ("align", "pixel", "lpips", "psnr")), t))
    cols = 4
    rows = math.ceil(len(tags) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.2 * rows), squeeze=False)
    for ax, tag in zip(axes.flat, tags):
        steps, values = zip(*series[tag])
        ax.plot(steps, values, lw=1)
        ax.set_title(tag, fontsize=8)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tags):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return len(tags)


def visualize(cfg) -> list[str]:
    """The PNG files of `python -m stellar_tok.visualize` (see its --help) for a VisualizeConfig; returns their paths."""
    if not cfg.out:
        raise UserError("out=DIR is required (where the PNG files go)")
    if cfg.split not in ("train", "val"):
        raise UserError(f"split must be train or val (got {cfg.split!r})")
    os.makedirs(cfg.out, exist_ok=True)
    tok = StellarTokenizer.from_pretrained(cfg.tokenizer).eval().to(cfg.device)
    need = max(cfg.n, cfg.heatmap_images, 2 * cfg.swap_pairs)
    images = torch.cat([x for x, _ in image_batches(cfg.data, cfg.split, need, need)])
    if len(images) < 2:
        raise UserError(f"the {cfg.split} split has fewer than 2 images")
    x = images.to(cfg.device).float() / 127.5 - 1
    written = []

    def out(name):
        written.append(os.path.join(cfg.out, name))
        return written[-1]

    latent = tok.encode(x[: cfg.n])
    reconstruction_grid(x[: cfg.n], tok.decode(latent), latent.probs(), out("reconstructions.png"), n=cfg.n)
    token_heatmaps(tok, x[: cfg.heatmap_images], out("token_heatmaps.png"))
    p = min(cfg.swap_pairs, len(x) // 2)
    token_swap(tok, x[:p], x[p : 2 * p], out("token_swap.png"))
    token_dropout(tok, x[: min(4, len(x))], out("token_dropout.png"), cfg.dropout_tokens)
    logs = cfg.logs or os.path.join(os.path.dirname(os.path.normpath(cfg.tokenizer)), "logs")
    if os.path.exists(logs) and loss_curves(logs, os.path.join(cfg.out, "loss_curves.png")):
        written.append(os.path.join(cfg.out, "loss_curves.png"))
    elif cfg.logs:
        raise UserError(f"no TensorBoard scalars or metrics.jsonl found under logs={cfg.logs}")
    return written
