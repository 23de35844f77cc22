"""The generator trainer's parts (the step and the run: `generators.train`).

    grid_labels       the classes of the sample grids
    save_sample_grid  class-conditional samples decoded into a grid image
    configure_ema     the EMA's decay as the config says
    latent_hash       the latent fingerprint the exported generator records (generators.sampling checks it)
    build_model       the `LatentDiT` for a latent data set
    sample_tokenizer  the tokenizer that decodes the sample grids and goes into the exported pipeline
    export_generator  out/generator (EMA weights) and out/pipeline
"""
from __future__ import annotations

import os

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from stellar_tok.evaluation.pictures import enlarged_grid
from stellar_tok.latents.dataset import latent_shapes, tokenizer_fingerprint
from stellar_tok.model.latent import Latent, latent_fingerprint
from stellar_tok.model.tokenizer import StellarTokenizer
from stellar_tok.training.checkpoint import export_pretrained

from .dit import LatentDiT
from .flow import sample_latents
from .pipeline import StellarDiTPipeline


def grid_labels(num_classes: int, per_class: int, device) -> torch.Tensor:
    """Up to 10 classes, `per_class` samples each: (min(C,10) * per_class,)."""
    k = min(num_classes, 10)
    return torch.arange(k, device=device).repeat_interleave(per_class)


def save_sample_grid(model, tokenizer, labels, path: str, steps: int, cfg_scale: float, seed: int = 0) -> torch.Tensor:
    """Samples of `labels` (one row per class) decoded by `tokenizer`, saved at `path`; the grid (3,H,W)."""
    g = torch.Generator(device=labels.device).manual_seed(seed)
    z, log_loc = sample_latents(model, labels, steps, cfg_scale, generator=g)
    images = tokenizer.decode(Latent(z, log_loc, True, model.latent_stats)).float().cpu()
    return enlarged_grid((images + 1) / 2, nrow=int((labels == labels[0]).sum()), path=path)


def configure_ema(ema, train_cfg) -> None:
    """The EMA decays as the config says. train.ema_warmup=false (the default, DiT): a constant `train.ema` (the
    first update copies the weights, as DiT's initial sync). diffusers' EMAModel ramps the decay up otherwise, even
    without its warm-up ((1 + s) / (10 + s)), so min_decay = decay pins it. train.ema_warmup=true: diffusers'
    warm-up 1 - (1 + s)^(-2/3), capped at train.ema; it reaches 0.9999 only after 10^6 steps (0.99982 at 400k), 0.999
    after 31,623 (short runs, tiny.yaml)."""
    ema.decay = float(train_cfg.ema)
    ema.use_ema_warmup = bool(train_cfg.ema_warmup)
    ema.power, ema.inv_gamma = 2 / 3, 1.0
    ema.min_decay = 0.0 if train_cfg.ema_warmup else float(train_cfg.ema)


def latent_hash(manifest: dict, tokenizer=None) -> str:
    """The generator's `tokenizer_hash`: the latent fingerprint (stellar_tok.model.latent.latent_fingerprint) of the tokenizer
    that wrote the latents. The manifest records it (tokenize since latent_hash was added); for older latent folders,
    it is measured on that tokenizer when it is at hand (`tokenizer`, or the manifest's tokenizer_path) and is that
    tokenizer (its whole fingerprint is the manifest's); otherwise the manifest's whole fingerprint, which the sampler
    accepts for that exact tokenizer only."""
    if manifest.get("latent_hash"):
        return manifest["latent_hash"]
    want = manifest["tokenizer_hash"]
    for tok in (tokenizer, manifest.get("tokenizer_path")):
        if isinstance(tok, str):
            tok = StellarTokenizer.from_pretrained(tok) if os.path.isfile(os.path.join(tok, "config.json")) else None
        if tok is not None and tokenizer_fingerprint(tok) == want:
            return latent_fingerprint(tok)
    print(f"note: the tokenizer that wrote {want} is not at hand (sample.tokenizer, the manifest's tokenizer_path): the generator "
          f"records its whole fingerprint and is accepted by that exact tokenizer only", flush=True)
    return want


def build_model(cfg, ds):
    """The `LatentDiT` for the latents of `ds` (their token and localization shapes, classes and statistics)."""
    man, m = ds.manifest, cfg.model
    r, c, n = latent_shapes(man)
    model = LatentDiT(num_tokens=r, token_channels=c, grid=int(round(n**0.5)), loc_patch=m.loc_patch, width=m.width, depth=m.depth,
                      heads=m.heads, mlp_ratio=m.mlp_ratio, num_classes=ds.num_classes, class_names=list(ds.classes) or None,
                      tokenizer_hash=man["tokenizer_hash"])
    model.set_latent_stats(ds.stats)
    if cfg.train.compile:
        for blk in model.blocks:
            blk.compile()
    return model


def sample_tokenizer(cfg, manifest: dict, accelerator):
    """The tokenizer that decodes the sample grids and goes into the exported pipeline (sample.tokenizer, or the
    manifest's tokenizer_path), on the main process; None without one."""
    path = cfg.sample.tokenizer or manifest.get("tokenizer_path")
    if path and os.path.isdir(path) and accelerator.is_main_process:
        return StellarTokenizer.from_pretrained(path).to(accelerator.device).eval()
    return None


def export_generator(out_dir: str, net, ema, tokenizer) -> tuple[str, str | None]:
    """out_dir/generator with the EMA weights, and out_dir/pipeline when a tokenizer is at hand; the training weights
    are put back."""
    ema.store(net.parameters())
    ema.copy_to(net.parameters())
    export = export_pretrained(net, out_dir, "generator")
    pipe_dir = None
    if tokenizer is not None:
        pipe = StellarDiTPipeline(tokenizer=tokenizer, transformer=net, scheduler=FlowMatchEulerDiscreteScheduler())
        pipe_dir = export_pretrained(pipe, out_dir, "pipeline")
    ema.restore(net.parameters())
    return export, pipe_dir
