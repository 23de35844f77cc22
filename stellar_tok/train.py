"""Train the STELLAR tokenizer.

    accelerate launch -m stellar_tok.train config=configs/tokenizer/tiny.yaml [key=value ...]
    python -m stellar_tok.train config=configs/tokenizer/tiny.yaml train.steps=200

One process or many (accelerate: DDP/FSDP, CPU or GPU). Writes to train.output_dir:
    checkpoints/step-XXXXXXX/   everything a resume needs (stellar_tok.checkpoint: atomic, verified, last train.keep_ckpts)
    tokenizer/                  the exported tokenizer: config.json + safetensors (+ latent statistics)
    images/step-XXXXXXX.png     input | reconstruction | localization map, every train.image_every steps
    logs/                       TensorBoard
    metrics.jsonl               the logged scalars, one JSON line per train.log_every steps
    config.yaml                 the resolved configuration
    summary.json                steps, time, bad samples skipped, non-finite steps skipped, what stopped the run

`train.resume=auto` continues from the newest valid checkpoint: same step, LR, data position and random
streams. SIGTERM/SIGINT finish the current step, then checkpoint and export before exiting.
`train.decoder_from=DIR` trains a fresh decoder on the frozen encoder of an exported tokenizer (the paper's
reconstruction protocol): the latent stays DIR's, only the decoder learns, from the reconstruction losses.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings

import torch
from omegaconf import OmegaConf

from .budget import Budget, RunProgress, cosine_with_warmup
from .checkpoint import Checkpointer, TrainState, epoch_batches, export_pretrained
from .config import Config, check_data_paths, cls_is_trained, inert_settings, load_config, parse_overrides, tokenizer_kwargs
from .errors import UserError, cli_entry
from .guards import GracefulStop, NonFiniteGuard
from .launch import describe_launch

USAGE = __doc__


def param_groups(module: torch.nn.Module, weight_decay: float):
    """No weight decay on biases, norms, embeddings, queries and prototypes-free 1-D tensors."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "token" in name.split(".")[-1] or "pos" in name.split(".")[-1] else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def load_frozen_encoder(tokenizer, path: str) -> None:
    """Everything but the decoder from the tokenizer exported at `path`; then a fresh, trainable decoder, the rest frozen."""
    from .tokenizer import StellarTokenizer

    source = StellarTokenizer.from_pretrained(path)
    encoder = {k: v for k, v in source.state_dict().items() if not k.startswith(StellarTokenizer.DECODER_PREFIXES)}
    missing, unexpected = tokenizer.load_state_dict(encoder, strict=False)
    if unexpected or any(not k.startswith(StellarTokenizer.DECODER_PREFIXES) for k in missing):
        raise UserError(f"train.decoder_from={path}: its weights do not fit the encoder (missing {missing[:3]}, unexpected {unexpected[:3]})")
    tokenizer.fresh_decoder_on_frozen_encoder()


@torch.no_grad()
def compute_latent_stats(tokenizer, loader, device, batches: int):
    """Per-channel mean/std of the tokens and scalar mean/std of log L over a few clean batches."""
    from .latent import LatentStats
    from .views import to_unit_range

    tok_sum = tok_sq = None
    loc_sum = loc_sq = 0.0
    n_tok = n_loc = 0
    for i, (images, _) in enumerate(loader):
        if i >= batches:
            break
        lat = tokenizer.encode(to_unit_range(images, device))
        t = lat.tokens.flatten(0, 1).double()
        tok_sum = t.sum(0) if tok_sum is None else tok_sum + t.sum(0)
        tok_sq = (t**2).sum(0) if tok_sq is None else tok_sq + (t**2).sum(0)
        n_tok += t.shape[0]
        loc_sum += lat.loc.double().sum().item()
        loc_sq += (lat.loc.double() ** 2).sum().item()
        n_loc += lat.loc.numel()
    mean = tok_sum / n_tok
    std = (tok_sq / n_tok - mean**2).clamp_min(0).sqrt()
    lm = loc_sum / n_loc
    ls = math.sqrt(max(loc_sq / n_loc - lm**2, 0.0))
    return LatentStats(mean.float(), std.float(), torch.tensor(lm, dtype=torch.float32), torch.tensor(ls, dtype=torch.float32))


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    overrides = parse_overrides("python -m stellar_tok.train", USAGE, Config, argv, "config=configs/tokenizer/tiny.yaml train.steps=500")
    cfg = load_config(overrides)
    check_data_paths(cfg)
    if os.environ.get("RANK", "0") == "0":  # once per launch
        for line in inert_settings(cfg):
            print(f"warning: {line}", file=sys.stderr, flush=True)
    return train(cfg)


def run_length(cfg, loader, accelerator) -> int:
    """The run's steps: train.steps, or train.epochs passes over the data (data.epoch_size for wds, the train
    split's size otherwise) at this launch's global batch. Prints what is running, on the main process."""
    world, batch = accelerator.num_processes, cfg.optim.batch_size
    total, length = cfg.train.steps, f"{cfg.train.steps:,} steps"
    if cfg.train.epochs > 0:
        per_epoch = cfg.data.epoch_size if cfg.data.name == "wds" else len(loader.dataset)
        total = max(1, math.ceil(cfg.train.epochs * per_epoch / (batch * world)))
        length = f"{cfg.train.epochs:g} epochs of {per_epoch:,} images = {total:,} steps"
    accelerator.print(f"running: {describe_launch(accelerator)}, batch {batch} per process = {batch * world} global; {length}", flush=True)
    return total


def end_training(accelerator, stop: GracefulStop) -> None:
    """Close the trackers, restore the signal handlers, leave the process group (every trainer's last step)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    stop.restore()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def training_record(cfg, step: int) -> dict:
    """What readers of an export need to know of its training (tokenizer/training.json): the steps, and whether any loss
    reached the CLS token (probes label an untrained CLS). A fresh decoder keeps its encoder's record."""
    cls_trained = cls_is_trained(cfg)
    if cfg.train.decoder_from:
        source = os.path.join(cfg.train.decoder_from, "training.json")
        cls_trained = json.load(open(source)).get("cls_trained") if os.path.isfile(source) else None
    return {"steps": step, "cls_trained": cls_trained, "align": {k: cfg.align[k] for k in ("enabled", "image_loss", "image_feature")},
            "decoder_from": cfg.train.decoder_from, "init_from": cfg.model.init_from}


def gathered_tokenizer(accelerator, objective, model_cfg):
    """The trained tokenizer as a plain, unsharded `StellarTokenizer` (eval mode) on the main process; None on the others.

    Every process must call it: the full state dict comes from accelerate's `get_state_dict`, which under FSDP
    gathers the shards collectively (onto the main process, in CPU memory). Under DDP it is the weights as they are."""
    from .tokenizer import StellarTokenizer

    full = accelerator.get_state_dict(objective)
    if not accelerator.is_main_process:
        return None
    prefix = "tokenizer."
    tok = StellarTokenizer(**tokenizer_kwargs(model_cfg))  # without model.init_from (a run option)
    tok.load_state_dict({k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)})
    return tok.to(accelerator.device).eval()


@contextlib.contextmanager
def no_block_wrapping(accelerator):
    """Under FSDP, `accelerator.prepare` within the block shards the model as one unit: accelerate's transformer
    wrap policy refuses a model without the configured layer class (the discriminator has no `Block`)."""
    from accelerate.utils import DistributedType

    plugin = accelerator.state.fsdp_plugin if accelerator.distributed_type == DistributedType.FSDP else None
    if plugin is None:
        yield
        return
    names = plugin.transformer_cls_names_to_wrap
    plugin.transformer_cls_names_to_wrap = []
    try:
        yield
    finally:
        plugin.transformer_cls_names_to_wrap = names


def fsdp_on_cpu(accelerator) -> None:
    """`accelerate launch --config_file` with an FSDP config on a machine without GPUs: accelerate forms the gloo
    group (MULTI_CPU) but switches FSDP on only for accelerator devices, so training would silently fall back to DDP.
    FSDP2 (`torch.distributed.fsdp.fully_shard`) runs on the CPU: turn accelerate's own FSDP2 path on, with the
    plugin the launcher's FSDP_* variables describe. FSDP1 needs a GPU and is refused with one line."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* environment the launcher set
    if plugin.fsdp_version != 2:
        raise UserError("FSDP on the CPU needs fsdp_version: 2 in the accelerate config (FSDP1 runs on GPUs only)")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    # both shared states: every later AcceleratorState() copies the distributed type from PartialState's
    PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def train(cfg) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration, set_seed

    from .data import build_loader, heldout_is_train, reset_skipped_samples, skipped_samples
    from .objective import StellarObjective
    from .reconstruction import PatchDiscriminator, ReconstructionLoss
    from .tokenizer import StellarTokenizer
    from .views import make_views, to_unit_range

    out_dir = cfg.train.output_dir
    reset_skipped_samples()  # count this run's bad samples only
    accelerator = Accelerator(
        # several processes without GPUs (`accelerate launch --multi_gpu` or torchrun on a CPU machine):
        # accelerate only forms the gloo group when asked for the CPU explicitly
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        mixed_precision=cfg.train.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=out_dir, logging_dir=os.path.join(out_dir, "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # alignment only (recon.enabled=false): the decoder gets no gradient, which DDP must be told
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=not cfg.recon.enabled)],
    )
    fsdp_on_cpu(accelerator)  # an FSDP launch config on a machine without GPUs: FSDP2 runs there too
    set_seed(cfg.train.seed)  # same initial weights on every process
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # GPUs: TF32 for what autocast leaves in fp32 (as DiT)
    device = accelerator.device
    if accelerator.is_main_process:
        os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
        OmegaConf.save(cfg, os.path.join(out_dir, "config.yaml"))

    # --- model, losses, optimisers ------------------------------------------------------------
    tokenizer = StellarTokenizer(**tokenizer_kwargs(cfg.model))
    if cfg.model.init_from:  # the reference recipe: the encoder starts from a Hugging Face ViT-MAE (stellar_tok.mae_init)
        from .mae_init import load_mae_encoder

        report = load_mae_encoder(tokenizer, cfg.model.init_from)
        if accelerator.is_main_process:
            print(report["summary"], flush=True)
    if cfg.train.decoder_from:  # the paper's reconstruction protocol: a fresh decoder on a frozen encoder
        load_frozen_encoder(tokenizer, cfg.train.decoder_from)
    objective = StellarObjective(tokenizer, cfg.align)
    if cfg.train.compile:  # after the objective: a deep-copied EMA teacher stays eager
        tokenizer.compile_blocks()
    recon_loss = ReconstructionLoss(cfg.recon).to(device) if cfg.recon.enabled else None
    use_gan = cfg.recon.enabled and cfg.recon.gan_weight > 0
    opt = torch.optim.AdamW(param_groups(objective, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    views_cfg = cfg.views if cfg.align.enabled else OmegaConf.merge(cfg.views, {"global_crops": 0, "local_crops": 0})
    # file-backed data: the loader cuts the views from each decoded original (stellar_tok.crops)
    loader = build_loader(cfg.data, cfg.optim.batch_size, "train", num_workers=cfg.data.num_workers, seed=cfg.data.seed, views=views_cfg)
    total = run_length(cfg, loader, accelerator)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(cfg.optim.warmup_steps, total, cfg.optim.min_lr_ratio))
    # latent statistics: held-out images, centre crops at the model's size (data.resolution is what training decodes to)
    stats_data = OmegaConf.merge(cfg.data, {"resolution": cfg.model.image_size})
    stats_loader = build_loader(stats_data, cfg.optim.batch_size, "val", num_workers=0, seed=cfg.data.seed)
    if accelerator.is_main_process and heldout_is_train(cfg.data):
        warnings.warn(f"data.path {cfg.data.path!r} has no held-out split: the exported latent statistics come from training images (set data.val_path)")
    prepare_loader = cfg.data.name != "wds"  # webdataset already splits shards by node and worker
    if use_gan:
        disc = PatchDiscriminator(cfg.recon.disc_channels, cfg.recon.disc_layers)
        opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.recon.disc_lr, betas=(0.5, 0.9), weight_decay=0.0)
    else:
        disc = opt_d = None
    objective, opt = accelerator.prepare(objective, opt)
    if use_gan:  # a pair of its own: accelerate's FSDP2 prepares one model (with its optimizer) per call
        with no_block_wrapping(accelerator):  # FSDP: the discriminator has no transformer Block, it is one unit
            disc, opt_d = accelerator.prepare(disc, opt_d)
    if prepare_loader:
        loader = accelerator.prepare(loader)
    state = TrainState()
    model = accelerator.unwrap_model(objective)
    bare_disc = accelerator.unwrap_model(disc) if use_gan else None  # the generator's GAN term: no DDP hooks, no grads
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed * 1000 + accelerator.process_index)
    ckpt = Checkpointer(accelerator, out_dir, cfg.train.keep_ckpts, state, rng=gen, scheduler=sched)
    ckpt.resume(cfg.train.resume)
    if accelerator.is_main_process:  # the log continues from the step this run starts at
        truncate_metrics(os.path.join(out_dir, "metrics.jsonl"), state.step)
    skipped_before = dict(state.skipped)
    accelerator.init_trackers("stellar_tok", config=_flat(OmegaConf.to_container(cfg)))

    stop = GracefulStop()  # SIGTERM/SIGINT: finish the step, checkpoint, export
    guard = NonFiniteGuard(accelerator, state, cfg.train.max_nonfinite, on_abort=ckpt.save)
    t_start = time.time()
    budget = Budget(state, cfg.train.max_minutes, cfg.train.max_cpu_minutes)
    pbar = RunProgress(budget, total, state.step, accelerator.is_main_process and cfg.train.progress, "train")  # ETA: steps or budget
    t_window, img_window = time.time(), 0
    last_logs: dict = {}
    world = accelerator.num_processes

    objective.train()
    data_iter = epoch_batches(loader, state, accelerator, skip=prepare_loader)
    start_step = state.step
    stopping = state.step >= total
    while not stopping:
        images, labels = next(data_iter)  # uint8 images (B,3,R,R), or the loader's crops (stellar_tok.crops)
        with torch.no_grad():
            views = make_views(to_unit_range(images, device), views_cfg, gen, cfg.model.patch_size)
        with accelerator.autocast():
            out = objective(views)
            loss = cfg.align.weight * out["align_loss"]
            logs = dict(out["align_logs"])
            if recon_loss is not None:
                rl, rlogs = recon_loss.generator_loss(out["recon"], views["main"], state.step, bare_disc, model.tokenizer.last_layer)
                loss = loss + cfg.recon.weight * rl
                logs.update(rlogs)
        if not guard.ok(loss):  # NaN/inf on any process: no update, counted; too many in a row stops the run
            opt.zero_grad(set_to_none=True)
            continue
        accelerator.backward(loss)
        if cfg.optim.grad_clip > 0:
            gn = accelerator.clip_grad_norm_(objective.parameters(), cfg.optim.grad_clip)
            logs["grad_norm"] = float(gn)
        opt.step()
        sched.step()
        budget.adjust_lr(opt, sched, state.step, cfg.optim.warmup_steps, total, cfg.optim.min_lr_ratio)
        opt.zero_grad(set_to_none=True)
        if use_gan and recon_loss.gan_active(state.step):
            opt_d.zero_grad(set_to_none=True)  # FSDP2: what the generator's term wrote into the discriminator (see `frozen`)
            with accelerator.autocast():
                d_loss, dlogs = recon_loss.discriminator_loss(disc, out["recon"], views["main"])
            accelerator.backward(d_loss)
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
            logs.update(dlogs)
        model.update_teacher()
        state.step += 1
        state.images_seen += labels.shape[0] * world
        img_window += labels.shape[0] * world
        budget.tick()

        with torch.no_grad():
            logs["loc_max"] = float(out["log_loc"].exp().max(-1).values.mean())
        logs.update(loss=float(loss.detach()), align=float(out["align_loss"].detach()), lr=opt.param_groups[0]["lr"],
                    nonfinite_skipped=float(state.nonfinite_total))
        last_logs = logs
        if state.step % cfg.train.log_every == 0 or state.step == total:
            ips = img_window / max(1e-9, time.time() - t_window)
            t_window, img_window = time.time(), 0
            logs["images_per_s"] = ips
            logs["data_skipped"] = float(sum(skipped_samples().values()) + sum(skipped_before.values()))  # this process
            accelerator.log(logs, step=state.step)
            if accelerator.is_main_process:
                with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps({"step": state.step, **{k: round(v, 6) for k, v in logs.items()}}) + "\n")
            pbar.set_postfix(step=state.step, loss=f"{logs['loss']:.3f}", psnr=f"{logs.get('psnr', float('nan')):.1f}", ips=f"{ips:.0f}")
        pbar.update(state.step)
        # every process must agree to stop at the same step: a signal, the time budget, stop_after or the end
        stopping = stop.should_stop(accelerator, late=budget.exhausted(),
                                    done=state.step >= total or bool(cfg.train.stop_after and state.step - start_step >= cfg.train.stop_after))
        if accelerator.is_main_process and (state.step % cfg.train.image_every == 0 or stopping):
            _save_grid(out, views["main"], os.path.join(out_dir, "images", f"step-{state.step:07d}.png"), accelerator)
        if state.step % cfg.train.ckpt_every == 0 and not stopping:
            state.skipped = _skipped_total(accelerator, skipped_before, skipped_samples())
            ckpt.save()
    pbar.close()

    # --- final checkpoint and export ------------------------------------------------------------
    state.skipped = skipped = _skipped_total(accelerator, skipped_before, skipped_samples())
    ckpt_path = ckpt.save()
    tok = gathered_tokenizer(accelerator, objective, cfg.model)  # every process takes part (FSDP: the shards are gathered)
    export = None
    if tok is not None:  # the main process: statistics and export from the whole, unsharded tokenizer
        tok.set_latent_stats(compute_latent_stats(tok, stats_loader, device, cfg.train.stats_batches))
        export = export_pretrained(tok, out_dir, "tokenizer", {"training.json": training_record(cfg, state.step)})
    elapsed = time.time() - t_start
    summary = {"step": state.step, "images_seen": state.images_seen, "seconds": round(elapsed, 1), "checkpoint": ckpt_path,
               "export": export, "skipped_samples": skipped, "nonfinite_skipped": state.nonfinite_total,
               "stopped_by": stop.signal_name, "last": {k: round(v, 5) for k, v in last_logs.items()}}
    if accelerator.is_main_process:
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        why = f" (stopped by {stop.signal_name})" if stop.signal_name else ""
        detail = f" {skipped}" if skipped else ""
        accelerator.print(f"done: {state.step} steps{why}, {state.images_seen} images in {elapsed:.0f}s, skipped "
                          f"{sum(skipped.values())} bad samples{detail}, {state.nonfinite_total} non-finite steps; "
                          f"checkpoint {ckpt_path}; tokenizer {export}")
    end_training(accelerator, stop)
    return summary


def truncate_metrics(path: str, step: int) -> None:
    """Drop the lines logged after `step` (by a run killed after its last checkpoint): they are logged again."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except ValueError:  # a line cut short by the kill
                pass
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def _skipped_total(accelerator, before: dict, now: dict) -> dict:
    """Bad samples skipped by every process (and its loader workers) in this run, plus those of the runs
    this one resumed, by reason."""
    from accelerate.utils import gather_object

    total = dict(before)
    for counts in (gather_object([now]) if accelerator.num_processes > 1 else [now]):
        for k, v in counts.items():
            total[k] = total.get(k, 0) + v
    return total


def _save_grid(out, main, path, accelerator):
    from .visual import reconstruction_grid

    grid = reconstruction_grid(main, out["recon"].detach(), out["log_loc"].detach().exp(), path)
    try:
        accelerator.get_tracker("tensorboard").writer.add_image("reconstruction", grid, int(path.split("-")[-1][:-4]))
    except Exception:
        pass


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


if __name__ == "__main__":
    main()
