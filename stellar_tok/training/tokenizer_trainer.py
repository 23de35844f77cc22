"""The tokenizer's trainer: its step (`TokenizerStep`) and the run around it (`train(cfg)`, what
`python -m stellar_tok.train` calls).

    cfg = load_config(["config=configs/tokenizer/tiny.yaml", "train.steps=200"])
    summary = train(cfg)        # checkpoints, tokenizer/ export, summary.json in cfg.train.output_dir

The loop around the step, checkpoints, budgets, metrics and the summary are `stellar_tok.training.engine`'s, shared
with the generator's trainer; where the weights come from and the export are `stellar_tok.training.tokenizer_weights`.
"""
from __future__ import annotations

import math
import os

import torch
from accelerate.utils import DistributedDataParallelKwargs, gather_object
from omegaconf import OmegaConf

from stellar_tok.data import build_loader, reset_skipped_samples, skipped_samples
from stellar_tok.data.views import make_views, to_unit_range
from stellar_tok.evaluation.pictures import reconstruction_grid
from stellar_tok.losses.reconstruction import PatchDiscriminator, ReconstructionLoss, describe_gan_start

from .engine import TrainingRun, announce, make_accelerator, no_block_wrapping, param_groups
from .objective import TokenizerWithHeads
from .tokenizer_weights import build_tokenizer, export_tokenizer, heldout_loader, load_align_heads


# ----------------------------------------------------------------------------------------------
# the step
# ----------------------------------------------------------------------------------------------

class TokenizerStep:
    """One training step: views of the batch -> the objective (encoder, alignment, decoder) -> the reconstruction
    losses -> the update (`TrainingRun.update`); then the discriminator's own step (GAN) and the EMA teacher."""

    def __init__(self, cfg, run, objective, recon_loss, disc, opt_d, views_cfg, gen):
        self.cfg, self.run, self.objective, self.recon_loss, self.disc, self.opt_d = cfg, run, objective, recon_loss, disc, opt_d
        self.views_cfg, self.gen = views_cfg, gen
        self.model = run.accelerator.unwrap_model(objective)
        self.bare_disc = run.accelerator.unwrap_model(disc) if disc is not None else None  # the generator's GAN term: no DDP hooks, no grads
        self.out = self.views = None  # the last step's, for the image grid

    def __call__(self, batch):
        cfg, acc, step = self.cfg, self.run.accelerator, self.run.state.step
        images, labels = batch  # uint8 images (B,3,R,R), or the loader's crops (stellar_tok.data.crops)
        with torch.no_grad():
            views = make_views(to_unit_range(images, acc.device), self.views_cfg, self.gen, cfg.model.patch_size)
        with acc.autocast():
            out = self.objective(views)
            loss = cfg.align.weight * out["align_loss"]
            logs = dict(out["align_logs"])
            if self.recon_loss is not None:
                rl, rlogs = self.recon_loss.generator_loss(out["recon"], views["main"], step, self.bare_disc, self.model.tokenizer.last_layer)
                loss = loss + cfg.recon.weight * rl
                logs.update(rlogs)
        if not self.run.update(loss, logs):  # NaN/inf on any process: no update, counted; too many in a row stop the run
            return None
        if self.disc is not None and self.recon_loss.gan_active(step):
            self.opt_d.zero_grad(set_to_none=True)  # FSDP2: what the generator's term wrote into the discriminator (see `frozen`)
            with acc.autocast():
                d_loss, dlogs = self.recon_loss.discriminator_loss(self.disc, out["recon"], views["main"])
            acc.backward(d_loss)
            self.opt_d.step()
            self.opt_d.zero_grad(set_to_none=True)
            logs.update(dlogs)
        self.model.update_teacher()
        with torch.no_grad():
            logs["loc_max"] = out["log_loc"].exp().max(-1).values.mean()
        logs.update(loss=loss.detach(), align=out["align_loss"].detach())  # tensors: no wait for the GPU here
        self.out, self.views = out, views
        return logs, labels.shape[0]

    def save_grid(self, stopping: bool) -> None:
        """input | reconstruction | localization map of the last step, every train.image_every steps and at the end."""
        acc, step = self.run.accelerator, self.run.state.step
        if not acc.is_main_process or not (step % self.cfg.train.image_every == 0 or stopping):
            return
        path = os.path.join(self.cfg.train.output_dir, "images", f"step-{step:07d}.png")
        grid = reconstruction_grid(self.views["main"], self.out["recon"].detach(), self.out["log_loc"].detach().exp(), path)
        try:
            acc.get_tracker("tensorboard").writer.add_image("reconstruction", grid, step)
        except Exception:
            pass


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------

def train(cfg) -> dict:
    """Train the tokenizer `cfg` describes (a loaded `stellar_tok.config.Config`; its files checked with
    `stellar_tok.training.preflight.check_data_paths`): one process or many. Returns the run's summary."""
    reset_skipped_samples()  # count this run's bad samples only
    accelerator = make_accelerator(cfg.train, cfg, cpu_fsdp=True,  # an FSDP launch config on a machine without GPUs: FSDP2 there too
                                   # alignment only (recon.enabled=false): the decoder gets no gradient, which DDP must be told
                                   kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=not cfg.recon.enabled)])
    device = accelerator.device

    # --- model, losses, optimisers, data --------------------------------------------------------
    tokenizer = build_tokenizer(cfg, accelerator).set_activation_checkpointing(cfg.train.activation_checkpointing)
    objective = TokenizerWithHeads(tokenizer, cfg.align)
    heads_note = load_align_heads(objective, cfg)  # a converted published checkpoint's clustering heads, if any
    if heads_note and accelerator.is_main_process:
        print(heads_note, flush=True)
    if cfg.train.compile:  # after the objective: a deep-copied EMA teacher stays eager
        tokenizer.compile_blocks()
    opt = torch.optim.AdamW(param_groups(objective, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    views_cfg = cfg.views if cfg.align.enabled else OmegaConf.merge(cfg.views, {"global_crops": 0, "local_crops": 0})
    # file-backed data: the loader cuts the views from each decoded original (stellar_tok.data.crops)
    loader = build_loader(cfg.data, cfg.optim.batch_size, "train", num_workers=cfg.data.num_workers, seed=cfg.data.seed, views=views_cfg)
    run = TrainingRun(accelerator, cfg.train, cfg.optim, run_length(cfg, loader, accelerator), "train")
    recon_loss = ReconstructionLoss(cfg.recon, run.total).to(device) if cfg.recon.enabled else None  # the GAN's start: a step of this run
    sched = run.lr_scheduler(opt)
    stats_loader = heldout_loader(cfg, accelerator)
    disc = opt_d = None
    if cfg.recon.enabled and cfg.recon.gan_weight > 0:
        disc = PatchDiscriminator(cfg.recon.disc_channels, cfg.recon.disc_layers)
        opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.recon.disc_lr, betas=(0.5, 0.9), weight_decay=0.0)
    objective, opt = accelerator.prepare(objective, opt)
    if disc is not None:  # a pair of its own: accelerate's FSDP2 prepares one model (with its optimizer) per call
        with no_block_wrapping(accelerator):  # FSDP: the discriminator has no transformer Block, it is one unit
            disc, opt_d = accelerator.prepare(disc, opt_d)
    prepare_loader = cfg.data.name != "wds"  # webdataset already splits shards by node and worker
    if prepare_loader:
        loader = accelerator.prepare(loader)
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed * 1000 + accelerator.process_index)
    run.checkpoints(rng=gen, scheduler=sched)
    run.begin("stellar_tok", _flat(OmegaConf.to_container(cfg)))

    # --- train ----------------------------------------------------------------------------------
    state, skipped_before = run.state, dict(run.state.skipped)

    def count_skipped():  # before every checkpoint: the bad samples of every process, and of the runs resumed
        state.skipped = _skipped_total(accelerator, skipped_before, skipped_samples())

    step = TokenizerStep(cfg, run, objective, recon_loss, disc, opt_d, views_cfg, gen)
    run.fit(step, loader, objective, opt, skip=prepare_loader, after_step=step.save_grid, before_save=count_skipped, show=("psnr",),
            log_extras=lambda: {"data_skipped": float(sum(skipped_samples().values()) + sum(skipped_before.values()))},  # this process
            stop_after=cfg.train.stop_after)

    # --- final checkpoint and export ------------------------------------------------------------
    ckpt_path = run.save()
    export = export_tokenizer(cfg, accelerator, objective, stats_loader, state.step)
    skipped = state.skipped
    detail = f" {skipped}" if skipped else ""
    return run.finish(ckpt_path, {"export": export, "skipped_samples": skipped},
                      f"skipped {sum(skipped.values())} bad samples{detail}; tokenizer {export}")


def run_length(cfg, loader, accelerator) -> int:
    """The run's steps: train.steps, or train.epochs passes over the data (data.epoch_size for wds, the train
    split's size otherwise) at this launch's global batch. Prints what is running, and when the GAN starts, on the main process."""
    world, batch = accelerator.num_processes, cfg.optim.batch_size
    total, length = cfg.train.steps, f"{cfg.train.steps:,} steps"
    if cfg.train.epochs > 0:
        per_epoch = cfg.data.epoch_size if cfg.data.name == "wds" else len(loader.dataset)
        total = max(1, math.ceil(cfg.train.epochs * per_epoch / (batch * world)))
        length = f"{cfg.train.epochs:g} epochs of {per_epoch:,} images = {total:,} steps"
    if cfg.recon.enabled and cfg.recon.gan_weight > 0:  # refuses a start the run never reaches
        length += f"; {describe_gan_start(cfg.recon, total)}"
    announce(accelerator, batch, length)
    return total


def _skipped_total(accelerator, before: dict, now: dict) -> dict:
    """Bad samples skipped by every process (and its loader workers) in this run, plus those of the runs
    this one resumed, by reason."""
    total = dict(before)
    for counts in (gather_object([now]) if accelerator.num_processes > 1 else [now]):
        for k, v in counts.items():
            total[k] = total.get(k, 0) + v
    return total


def _flat(d, prefix=""):
    """A nested config dict as one level of dotted keys, values as TensorBoard's hyperparameters take them."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
