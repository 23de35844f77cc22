"""Train the latent diffusion transformer on latent shards.

    accelerate launch -m generators.train config=configs/generator/tiny.yaml data.latents=latents/shapes [key=value ...]
    python -m generators.train config=configs/generator/tiny.yaml data.latents=DIR train.steps=500

Writes to train.output_dir:
    checkpoints/step-XXXXXXX/   accelerate state (model, EMA, optimizer, scheduler, RNG, step) for resume
    generator/                  the exported EMA generator: config.json + safetensors (+ latent statistics)
    pipeline/                   a `StellarDiTPipeline` (tokenizer + generator + scheduler), when a tokenizer is known
    images/step-XXXXXXX.png     class-conditional samples from the EMA weights (one row per class)
    logs/, metrics.jsonl, config.yaml, summary.json

This file is the generator's run and its step (`GeneratorStep`); the model, the EMA, the sample grids and the
exports are `generators.training`'s; the loop around the step, checkpoints, budgets, metrics and the summary are
`stellar_tok.training.engine`'s, shared with the tokenizer's trainer.
"""
from __future__ import annotations

import os

import torch
from diffusers.training_utils import EMAModel
from omegaconf import OmegaConf

from stellar_tok.config import parse_overrides
from stellar_tok.errors import UserError, cli_entry
from stellar_tok.latents.dataset import LatentDataset, collate_latents
from stellar_tok.training.engine import TrainingRun, announce, make_accelerator

from .config import GenConfig, load_config
from .flow import flow_loss, sample_t
from .training import build_model, configure_ema, export_generator, grid_labels, latent_hash, sample_tokenizer, save_sample_grid


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    overrides = parse_overrides("python -m generators.train", __doc__, GenConfig, argv, "config=configs/generator/tiny.yaml data.latents=DIR")
    return train(load_config(overrides))


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
                                         generator=torch.Generator().manual_seed(cfg.train.seed))

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


if __name__ == "__main__":
    main()
