"""The generator's trainer: its step (`GeneratorStep`), the run around it (`train(cfg)`, behind
`python -m generators.train`) and the run's parts:

    GeneratorStep     class dropout -> flow-matching loss -> update -> EMA; the sample grids
    train             data, model, EMA, optimizer, the loop (`stellar_tok.training.engine`), the exports
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
from diffusers.training_utils import EMAModel
from omegaconf import OmegaConf

from stellar_tok.data import worker_options
from stellar_tok.errors import UserError
from stellar_tok.evaluation.pictures import enlarged_grid
from stellar_tok.latents.dataset import LatentDataset, collate_latents, latent_shapes, tokenizer_fingerprint
from stellar_tok.model.latent import Latent, latent_fingerprint
from stellar_tok.model.tokenizer import StellarTokenizer
from stellar_tok.training.checkpoint import export_pretrained
from stellar_tok.training.engine import TrainingRun, announce, make_accelerator

from .dit import LatentDiT
from .flow import flow_loss, sample_latents, sample_t
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


# ----------------------------------------------------------------------------------------------
# the step
# ----------------------------------------------------------------------------------------------

class GeneratorStep:
    """One training step: class dropout (for classifier-free guidance) -> flow-matching loss at sampled times ->
    the update (`TrainingRun.update`) -> the EMA. `sample_grid` draws class-conditional samples with the EMA weights."""

    def __init__(self, cfg, run, model, ema, gen, num_classes: int, tokenizer):
        self.cfg, self.run, self.model, self.ema, self.gen = cfg, run, model, ema, gen
        self.num_classes, self.tokenizer = num_classes, tokenizer
        self.net = run.accelerator.unwrap_model(model)
        self.labels_grid = grid_labels(num_classes, cfg.sample.per_class, run.accelerator.device)

    def __call__(self, batch):
        cfg, acc, gen, device = self.cfg, self.run.accelerator, self.gen, self.run.accelerator.device
        z, log_loc, y = batch["z"].to(device), batch["log_loc"].to(device), batch["label"].to(device)
        drop = torch.rand(y.shape, generator=gen, device=device) < cfg.flow.class_dropout
        y = torch.where(drop, torch.full_like(y, self.num_classes), y)  # the null class
        t = sample_t(y.shape[0], cfg.flow.t_sampling, gen, device, cfg.flow.logit_mean, cfg.flow.logit_std)
        with acc.autocast():
            loss, logs = flow_loss(self.model, z, log_loc, y, t, gen)
        if not self.run.update(loss, logs):  # NaN/inf on any process: no update, counted; too many in a row stop the run
            return None
        self.ema.step(self.net.parameters())
        logs.update(loss=loss.detach(), ema_decay=self.ema.cur_decay_value or 0.0)
        return logs, y.shape[0]

    def after_step(self, stopping: bool) -> None:
        if self.run.state.step % self.cfg.train.sample_every == 0 and not stopping:
            self.sample_grid()

    def sample_grid(self) -> None:
        """images/step-XXXXXXX.png from the EMA weights (the main process, with a tokenizer at hand)."""
        acc, net, ema, step = self.run.accelerator, self.net, self.ema, self.run.state.step
        if self.tokenizer is None or not acc.is_main_process:
            return
        ema.store(net.parameters())
        ema.copy_to(net.parameters())
        net.eval()
        path = os.path.join(self.cfg.train.output_dir, "images", f"step-{step:07d}.png")
        img = save_sample_grid(net, self.tokenizer, self.labels_grid, path, self.cfg.sample.steps, self.cfg.sample.cfg)
        net.train()
        ema.restore(net.parameters())
        try:
            acc.get_tracker("tensorboard").writer.add_image("samples", img, step)
        except Exception:
            pass


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------

def train(cfg) -> dict:
    """Train the generator of a `GenConfig`; the run's summary."""
    accelerator = make_accelerator(cfg.train, cfg)
    device = accelerator.device

    # --- data ----------------------------------------------------------------------------------
    ds = LatentDataset(cfg.data.latents, normalize=True, flip_p=cfg.data.flip_p, in_memory=cfg.data.in_memory)
    announce(accelerator, cfg.optim.batch_size, f"{cfg.train.steps:,} steps on {len(ds):,} latents")
    if ds.num_classes < 1:
        raise UserError(f"{cfg.data.latents} has no class labels: the generator is class-conditional")
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.optim.batch_size, shuffle=True, drop_last=len(ds) >= cfg.optim.batch_size,
                                         num_workers=cfg.data.num_workers, collate_fn=collate_latents,
                                         generator=torch.Generator().manual_seed(cfg.train.seed),
                                         **worker_options(cfg.data.num_workers))  # a stop signal to the group: the main process decides

    # --- model, EMA, optimizer -----------------------------------------------------------------
    model = build_model(cfg, ds)
    ema = EMAModel(model.parameters(), decay=cfg.train.ema, foreach=True)
    configure_ema(ema, cfg.train)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas))
    run = TrainingRun(accelerator, cfg.train, cfg.optim, cfg.train.steps, "generator")
    sched = run.lr_scheduler(opt)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    net = accelerator.unwrap_model(model)
    ema.to(device)
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed * 1000 + accelerator.process_index)
    run.checkpoints(rng=gen, scheduler=sched, ema=ema)
    tokenizer = sample_tokenizer(cfg, ds.manifest, accelerator)
    if accelerator.is_main_process:  # the exported generator names the latent it models (generators.sample checks it)
        net.register_to_config(tokenizer_hash=latent_hash(ds.manifest, tokenizer))
    if run.begin("generator", {k: str(v) for k, v in OmegaConf.to_container(cfg).items()}):
        ema.to(device)
        configure_ema(ema, cfg.train)  # the config, not the checkpoint, says how the EMA decays from here on

    # --- train, then the final checkpoint and the exports ----------------------------------------
    step = GeneratorStep(cfg, run, model, ema, gen, ds.num_classes, tokenizer)
    run.fit(step, loader, model, opt, after_step=step.after_step)
    ckpt_path = run.save()
    export = pipe_dir = None
    if accelerator.is_main_process:
        step.sample_grid()
        export, pipe_dir = export_generator(cfg.train.output_dir, net, ema, tokenizer)
    return run.finish(ckpt_path, {"export": export, "pipeline": pipe_dir}, f"generator {export}; pipeline {pipe_dir}")
