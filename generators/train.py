"""Train the latent diffusion transformer on latent shards.

    accelerate launch -m generators.train config=configs/generator/tiny.yaml data.latents=latents/shapes [key=value ...]
    python -m generators.train config=configs/generator/tiny.yaml data.latents=DIR train.steps=500

Writes to train.output_dir:
    checkpoints/step-XXXXXXX/   accelerate state (model, EMA, optimizer, scheduler, RNG, step) for resume
    generator/                  the exported EMA generator: config.json + safetensors (+ latent statistics)
    pipeline/                   a `StellarDiTPipeline` (tokenizer + generator + scheduler), when a tokenizer is known
    images/step-XXXXXXX.png     class-conditional samples from the EMA weights (one row per class)
    logs/, metrics.jsonl, config.yaml, summary.json
"""
from __future__ import annotations

import json
import os
import time

import torch
from omegaconf import OmegaConf

from stellar_tok.errors import UserError, cli_entry
from stellar_tok.config import parse_overrides
from stellar_tok.budget import Budget, RunProgress, cosine_with_warmup
from stellar_tok.checkpoint import Checkpointer, TrainState, epoch_batches, export_pretrained
from stellar_tok.guards import GracefulStop, NonFiniteGuard
from stellar_tok.train import end_training, truncate_metrics

from .config import GenConfig, load_config


def grid_labels(num_classes: int, per_class: int, device) -> torch.Tensor:
    """Up to 10 classes, `per_class` samples each: (min(C,10) * per_class,)."""
    k = min(num_classes, 10)
    return torch.arange(k, device=device).repeat_interleave(per_class)


def save_sample_grid(model, tokenizer, labels, path: str, steps: int, cfg_scale: float, seed: int = 0) -> torch.Tensor:
    from stellar_tok.latent import Latent
    from stellar_tok.visual import enlarged_grid

    from .flow import sample_latents

    g = torch.Generator(device=labels.device).manual_seed(seed)
    tokens, loc = sample_latents(model, labels, steps, cfg_scale, generator=g)
    images = tokenizer.decode(Latent(tokens, loc, True, model.latent_stats)).float().cpu()
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
    """The generator's `tokenizer_hash`: the latent fingerprint (stellar_tok.latent.latent_fingerprint) of the tokenizer
    that wrote the latents, when it is at hand (`tokenizer`, or the manifest's tokenizer_path) and is that tokenizer
    (its whole fingerprint is the manifest's); otherwise the manifest's whole fingerprint, which the sampler accepts
    for that exact tokenizer only."""
    from stellar_tok.latent import latent_fingerprint
    from stellar_tok.latent_data import tokenizer_fingerprint
    from stellar_tok.tokenizer import StellarTokenizer

    want = manifest["tokenizer_hash"]
    for tok in (tokenizer, manifest.get("tokenizer_path")):
        if isinstance(tok, str):
            tok = StellarTokenizer.from_pretrained(tok) if os.path.isfile(os.path.join(tok, "config.json")) else None
        if tok is not None and tokenizer_fingerprint(tok) == want:
            return latent_fingerprint(tok)
    print(f"note: the tokenizer that wrote {want} is not at hand (sample.tokenizer, the manifest's tokenizer_path): the generator "
          f"records its whole fingerprint and is accepted by that exact tokenizer only", flush=True)
    return want


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    overrides = parse_overrides("python -m generators.train", __doc__, GenConfig, argv, "config=configs/generator/tiny.yaml data.latents=DIR")
    return train(load_config(overrides))


def train(cfg) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import EMAModel

    from stellar_tok.latent_data import LatentDataset, collate_latents
    from stellar_tok.launch import describe_launch
    from stellar_tok.tokenizer import StellarTokenizer

    from .dit import LatentDiT
    from .flow import flow_loss, sample_t
    from .pipeline import StellarDiTPipeline

    out_dir = cfg.train.output_dir
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,  # gloo on CPU-only machines
        mixed_precision=cfg.train.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=out_dir, logging_dir=os.path.join(out_dir, "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(cfg.train.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # GPUs: TF32 for what autocast leaves in fp32 (as DiT)
    device = accelerator.device
    if accelerator.is_main_process:
        os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
        OmegaConf.save(cfg, os.path.join(out_dir, "config.yaml"))

    # --- data ----------------------------------------------------------------------------------
    ds = LatentDataset(cfg.data.latents, normalize=True, flip_p=cfg.data.flip_p, in_memory=cfg.data.in_memory)
    batch, world = cfg.optim.batch_size, accelerator.num_processes
    accelerator.print(f"running: {describe_launch(accelerator)}, batch {batch} per process = {batch * world} global; "
                      f"{cfg.train.steps:,} steps on {len(ds):,} latents", flush=True)
    man = ds.manifest
    r, c = man["shapes"]["tokens"]
    n, _ = man["shapes"]["loc"]
    grid = int(round(n**0.5))
    num_classes = ds.num_classes
    if num_classes < 1:
        raise UserError(f"{cfg.data.latents} has no class labels: the generator is class-conditional")
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.optim.batch_size, shuffle=True, drop_last=len(ds) >= cfg.optim.batch_size,
                                         num_workers=cfg.data.num_workers, collate_fn=collate_latents,
                                         generator=torch.Generator().manual_seed(cfg.train.seed))

    # --- model ---------------------------------------------------------------------------------
    m = cfg.model
    model = LatentDiT(num_tokens=r, token_channels=c, grid=grid, loc_patch=m.loc_patch, width=m.width, depth=m.depth, heads=m.heads,
                      mlp_ratio=m.mlp_ratio, num_classes=num_classes, class_names=list(ds.classes) or None,
                      tokenizer_hash=man["tokenizer_hash"])
    model.set_latent_stats(ds.stats)
    if cfg.train.compile:
        for blk in model.blocks:
            blk.compile()
    ema = EMAModel(model.parameters(), decay=cfg.train.ema, foreach=True)
    configure_ema(ema, cfg.train)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio))
    model, opt, loader = accelerator.prepare(model, opt, loader)
    state = TrainState()
    net = accelerator.unwrap_model(model)
    ema.to(device)
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed * 1000 + accelerator.process_index)
    ckpt = Checkpointer(accelerator, out_dir, cfg.train.keep_ckpts, state, rng=gen, scheduler=sched, ema=ema)

    tok_path = cfg.sample.tokenizer or man.get("tokenizer_path")
    tokenizer = None
    if tok_path and os.path.isdir(tok_path) and accelerator.is_main_process:
        tokenizer = StellarTokenizer.from_pretrained(tok_path).to(device).eval()
    if accelerator.is_main_process:  # the exported generator names the latent it models (generators.sample checks it)
        net.register_to_config(tokenizer_hash=latent_hash(man, tokenizer))

    if ckpt.resume(cfg.train.resume):
        ema.to(device)
        configure_ema(ema, cfg.train)  # the config, not the checkpoint, says how the EMA decays from here on
    if accelerator.is_main_process:  # the log continues from the step this run starts at
        truncate_metrics(os.path.join(out_dir, "metrics.jsonl"), state.step)
    accelerator.init_trackers("generator", config={k: str(v) for k, v in OmegaConf.to_container(cfg).items()})

    stop = GracefulStop()  # SIGTERM/SIGINT: finish the step, checkpoint, export
    guard = NonFiniteGuard(accelerator, state, cfg.train.max_nonfinite, on_abort=ckpt.save)

    total = cfg.train.steps
    t_start = t_window = time.time()
    budget = Budget(state, cfg.train.max_minutes, cfg.train.max_cpu_minutes)
    pbar = RunProgress(budget, total, state.step, accelerator.is_main_process and cfg.train.progress, "generator")  # ETA: steps or budget
    img_window, start_step, last = 0, state.step, {}
    labels_grid = grid_labels(num_classes, cfg.sample.per_class, device)

    def sample_grid():
        if tokenizer is None or not accelerator.is_main_process:
            return
        ema.store(net.parameters())
        ema.copy_to(net.parameters())
        net.eval()
        path = os.path.join(out_dir, "images", f"step-{state.step:07d}.png")
        img = save_sample_grid(net, tokenizer, labels_grid, path, cfg.sample.steps, cfg.sample.cfg)
        net.train()
        ema.restore(net.parameters())
        try:
            accelerator.get_tracker("tensorboard").writer.add_image("samples", img, state.step)
        except Exception:
            pass

    model.train()
    data = epoch_batches(loader, state, accelerator)
    stopping = state.step >= total
    while not stopping:
        b = next(data)
        tokens, loc, y = b["tokens"].to(device), b["loc"].to(device), b["label"].to(device)
        drop = torch.rand(y.shape, generator=gen, device=device) < cfg.flow.class_dropout
        y = torch.where(drop, torch.full_like(y, num_classes), y)
        t = sample_t(y.shape[0], cfg.flow.t_sampling, gen, device, cfg.flow.logit_mean, cfg.flow.logit_std)
        with accelerator.autocast():
            loss, logs = flow_loss(model, tokens, loc, y, t, gen)
        if not guard.ok(loss):  # NaN/inf on any process: no update, counted; too many in a row stops the run
            opt.zero_grad(set_to_none=True)
            continue
        accelerator.backward(loss)
        if cfg.optim.grad_clip > 0:
            logs["grad_norm"] = float(accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip))
        opt.step()
        sched.step()
        budget.adjust_lr(opt, sched, state.step, cfg.optim.warmup_steps, total, cfg.optim.min_lr_ratio)
        opt.zero_grad(set_to_none=True)
        ema.step(net.parameters())
        state.step += 1
        state.images_seen += y.shape[0] * accelerator.num_processes
        img_window += y.shape[0] * accelerator.num_processes
        budget.tick()
        logs.update(loss=float(loss.detach()), lr=opt.param_groups[0]["lr"], ema_decay=ema.cur_decay_value or 0.0,
                    nonfinite_skipped=float(state.nonfinite_total))
        last = logs
        if state.step % cfg.train.log_every == 0 or state.step == total:
            logs["images_per_s"] = img_window / max(1e-9, time.time() - t_window)
            t_window, img_window = time.time(), 0
            accelerator.log(logs, step=state.step)
            if accelerator.is_main_process:
                with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps({"step": state.step, **{k: round(v, 6) for k, v in logs.items()}}) + "\n")
            pbar.set_postfix(step=state.step, loss=f"{logs['loss']:.3f}", ips=f"{logs['images_per_s']:.0f}")
        pbar.update(state.step)
        stopping = stop.should_stop(accelerator, late=budget.exhausted(), done=state.step >= total)  # the same on every process
        if state.step % cfg.train.sample_every == 0 and not stopping:
            sample_grid()
        if state.step % cfg.train.ckpt_every == 0 and not stopping:
            ckpt.save()
    pbar.close()

    ckpt_path = ckpt.save()
    export = pipe_dir = None
    if accelerator.is_main_process:
        sample_grid()
        ema.store(net.parameters())
        ema.copy_to(net.parameters())
        export = export_pretrained(net, out_dir, "generator")
        if tokenizer is not None:
            pipe = StellarDiTPipeline(tokenizer=tokenizer, transformer=net, scheduler=FlowMatchEulerDiscreteScheduler())
            pipe_dir = export_pretrained(pipe, out_dir, "pipeline")
        ema.restore(net.parameters())
    elapsed = time.time() - t_start
    summary = {"step": state.step, "images_seen": state.images_seen, "seconds": round(elapsed, 1), "checkpoint": ckpt_path,
               "export": export, "pipeline": pipe_dir, "nonfinite_skipped": state.nonfinite_total, "stopped_by": stop.signal_name,
               "last": {k: round(v, 5) for k, v in last.items()}}
    if accelerator.is_main_process:
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        accelerator.print(f"done: {state.step} steps ({state.step - start_step} in this run), {elapsed:.0f}s; generator {export}; pipeline {pipe_dir}")
    end_training(accelerator, stop)
    return summary


if __name__ == "__main__":
    main()
