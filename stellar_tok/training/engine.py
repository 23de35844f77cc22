"""The training engine both trainers share: everything around the step.

    accelerator = make_accelerator(cfg.train, cfg)          # seeded, TensorBoard, config.yaml in train.output_dir
    ...                                                     # the trainer builds its model, optimizer and loader
    run = TrainingRun(accelerator, cfg.train, cfg.optim, total, "train")
    sched = run.lr_scheduler(opt)                           # the one LR writer: warm-up, cosine over steps or time
    model, opt, loader = accelerator.prepare(model, opt, loader)
    run.checkpoints(rng=gen, scheduler=sched)               # + anything else a resume needs (an EMA)
    run.begin("project", config)                            # resume, cut metrics.jsonl back, start the trackers

    def step(batch):                                        # the trainer's own step
        loss, logs = ...
        if not run.update(loss, logs):                      # non-finite on any process: skipped, counted
            return None
        ...                                                 # whatever follows the optimizer (EMA, a discriminator)
        return logs, batch_size

    run.fit(step, loader, model, opt)                       # until the end, a signal, the time budget or stop_after
    path = run.save()                                       # the final checkpoint; then the trainer's exports
    return run.finish(path, {"export": ...}, "tokenizer ...")   # summary.json, the last line, the trackers closed

`fit` is the loop: the step, then the counters (step, images, time budget), the LR for the next step,
metrics (TensorBoard and metrics.jsonl every train.log_every steps), the progress bar, the stop decision that
every process agrees on (signal, budget, end, stop_after), the trainer's `after_step` hook and a checkpoint
every train.ckpt_every steps. SIGTERM/SIGINT finish the current step, then the trainer checkpoints and exports.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from datetime import timedelta

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    FullyShardedDataParallelPlugin,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    set_seed,
)
from omegaconf import OmegaConf

from stellar_tok.errors import UserError
from stellar_tok.files import atomic_write_json, atomic_write_text
from stellar_tok.launch import describe_launch

from .budget import Budget, RunProgress
from .checkpoint import Checkpointer, TrainState, epoch_batches
from .guards import GracefulStop, NonFiniteGuard
from .lost_process import raise_if_lost, register_process, report_lost_process


# ----------------------------------------------------------------------------------------------
# the accelerator
# ----------------------------------------------------------------------------------------------

def make_accelerator(train_cfg, cfg, cpu_fsdp: bool = False, **kwargs):
    """The `accelerate.Accelerator` of a run writing to train_cfg.output_dir (TensorBoard in logs/, seedable
    samplers), seeded with train_cfg.seed on every process; the main process writes `cfg` to config.yaml and makes
    images/. `cpu_fsdp`: an FSDP launch config on a machine without GPUs runs FSDP2 (`fsdp_on_cpu`). `kwargs`: more
    Accelerator arguments (kwargs_handlers). A collective waits at most train.collective_timeout seconds for a lost
    process (stellar_tok.training.lost_process)."""
    out_dir = train_cfg.output_dir
    timeout = timedelta(seconds=collective_timeout(train_cfg))
    kwargs["kwargs_handlers"] = [*kwargs.get("kwargs_handlers", []), InitProcessGroupKwargs(timeout=timeout)]
    accelerator = Accelerator(
        # several processes without GPUs (`accelerate launch --multi_gpu` or torchrun on a CPU machine):
        # accelerate only forms the gloo group when asked for the CPU explicitly
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        mixed_precision=train_cfg.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=out_dir, logging_dir=os.path.join(out_dir, "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        **kwargs,
    )
    if cpu_fsdp:
        fsdp_on_cpu(accelerator)
    set_seed(train_cfg.seed)  # same initial weights on every process
    register_process(accelerator, out_dir)  # who runs where: a survivor names the process that was lost
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # GPUs: TF32 for what autocast leaves in fp32 (as DiT)
    if accelerator.is_main_process:
        os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
        OmegaConf.save(cfg, os.path.join(out_dir, "config.yaml"))
    return accelerator


def collective_timeout(train_cfg) -> float:
    """train.collective_timeout (seconds; 600 where a config has no such key)."""
    return float(train_cfg.get("collective_timeout", 600.0))


def announce(accelerator, batch: int, length: str) -> None:
    """The run's first line, on the main process: the launch, the per-process and global batch, and `length`."""
    world = accelerator.num_processes
    accelerator.print(f"running: {describe_launch(accelerator)}, batch {batch} per process = {batch * world} global; {length}", flush=True)


def fsdp_on_cpu(accelerator) -> None:
    """`accelerate launch --config_file` with an FSDP config on a machine without GPUs: accelerate forms the gloo
    group (MULTI_CPU) but switches FSDP on only for accelerator devices, so training would silently fall back to DDP.
    FSDP2 (`torch.distributed.fsdp.fully_shard`) runs on the CPU: turn accelerate's own FSDP2 path on, with the
    plugin the launcher's FSDP_* variables describe. FSDP1 needs a GPU and is refused with one line."""
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


@contextlib.contextmanager
def no_block_wrapping(accelerator):
    """Under FSDP, `accelerator.prepare` within the block shards the model as one unit: accelerate's transformer
    wrap policy refuses a model without the configured layer class (a discriminator has no `Block`)."""
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


def param_groups(module: torch.nn.Module, weight_decay: float):
    """AdamW groups: no weight decay on biases, norms, embeddings, queries and other 1-D tensors."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "token" in name.split(".")[-1] or "pos" in name.split(".")[-1] else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------

def as_floats(logs: dict) -> dict:
    """`logs` with its tensor values as floats. A training step leaves its scalars as 0-d tensors on the device, so
    that it never waits for the GPU to read them (the non-finite guard is the step's one wait); they are read here,
    at log steps, with one transfer per device."""
    out = dict(logs)
    by_device: dict = {}
    for key, value in logs.items():
        if torch.is_tensor(value):
            by_device.setdefault(value.device, []).append(key)
    for keys in by_device.values():
        values = torch.stack([logs[k].detach().float().reshape(()) for k in keys]).cpu().tolist()
        out.update(zip(keys, values))
    return out


class TrainingRun:
    """One training run around a trainer's step: counters, time budget and LR, checkpoints, the loop, the summary.

    `train_cfg` needs output_dir, resume, max_minutes, max_cpu_minutes, max_nonfinite, keep_ckpts, log_every,
    ckpt_every, progress; `optim_cfg` warmup_steps, min_lr_ratio, grad_clip. `total`: the run's steps; `desc`: the
    progress bar's label."""

    def __init__(self, accelerator, train_cfg, optim_cfg, total: int, desc: str):
        self.accelerator, self.cfg, self.optim_cfg = accelerator, train_cfg, optim_cfg
        self.total, self.desc = total, desc
        self.out_dir = train_cfg.output_dir
        self.state = TrainState()
        self.budget = Budget(self.state, train_cfg.max_minutes, train_cfg.max_cpu_minutes)
        self.ckpt = self.guard = self.stop = self.sched = None
        self.model = self.opt = None
        self.before_save = None
        self.last_logs: dict = {}
        self.start_step = 0
        self.t_start = time.time()

    # --- set-up ---------------------------------------------------------------------------
    def lr_scheduler(self, opt):
        """The LR of `opt` (before `accelerator.prepare`): linear warm-up, then a cosine over the steps or the time
        budget, whichever is further along (stellar_tok.training.budget). `fit` steps it once per trained step."""
        o = self.optim_cfg
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, self.budget.lr_schedule(o.warmup_steps, self.total, o.min_lr_ratio))
        return self.sched

    def checkpoints(self, rng=None, **objects) -> Checkpointer:
        """The run's checkpointer: the prepared models and optimizers, the state, `rng` (this process's generator)
        and `objects` (an LR scheduler, an EMA)."""
        self.ckpt = Checkpointer(self.accelerator, self.out_dir, self.cfg.keep_ckpts, self.state, rng=rng, **objects)
        self.guard = NonFiniteGuard(self.accelerator, self.state, self.cfg.max_nonfinite, on_abort=self.ckpt.save)
        return self.ckpt

    def begin(self, project: str, config: dict) -> str | None:
        """Resume as train.resume says; drop the metrics logged after that step; start the trackers. The checkpoint
        resumed from, or None."""
        path = self.ckpt.resume(self.cfg.resume)
        if self.accelerator.is_main_process:  # the log continues from the step this run starts at
            truncate_metrics(os.path.join(self.out_dir, "metrics.jsonl"), self.state.step)
        self.accelerator.init_trackers(project, config=config)
        return path

    # --- the step's update ------------------------------------------------------------------
    def update(self, loss: torch.Tensor, logs: dict) -> bool:
        """Backward, gradient clipping (optim.grad_clip > 0: logs grad_norm) and the optimizer step of `fit`'s model
        and optimizer. False, with nothing updated, when the loss is non-finite on any process (the guard counts it
        and stops the run after train.max_nonfinite in a row). The guard reads the loss after the backward is queued,
        so the device never idles while the host waits for that one read."""
        self.accelerator.backward(loss)
        if not self.guard.ok(loss):
            self.opt.zero_grad(set_to_none=True)
            return False
        if self.optim_cfg.grad_clip > 0:
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.optim_cfg.grad_clip)
            logs["grad_norm"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor, gathered by every process here
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return True

    # --- the loop ---------------------------------------------------------------------------
    def fit(self, step, loader, model, opt, *, skip: bool = True, after_step=None, before_save=None, log_extras=None, show=(),
            stop_after: int = 0) -> None:
        """Train until the run's steps are done, a signal arrives, the time budget is spent or `stop_after` steps
        of this invocation are done: the same step on every process.

        `step(batch)` -> (logs with "loss", the process's batch size), or None for a step not taken. `loader`: the
        data, epoch after epoch from the resumed position (`skip`: replay the batches the epoch already used).
        `after_step(stopping)`: after each step. `before_save()`: before each checkpoint from here on, the final one
        included (every process calls it). `log_extras()`: more scalars at each logged step. `show`: more logs on the
        progress bar."""
        acc, cfg, state = self.accelerator, self.cfg, self.state
        self.model, self.opt, self.before_save = model, opt, before_save
        self.stop = GracefulStop()  # SIGTERM/SIGINT: finish the step, checkpoint, export
        self.t_start = t_window = time.time()
        self.budget.start()
        pbar = RunProgress(self.budget, self.total, state.step, acc.is_main_process and cfg.progress, self.desc)  # ETA: steps or budget
        img_window, self.start_step = 0, state.step
        batches = epoch_batches(loader, state, acc, skip=skip)
        model.train()
        stopping = state.step >= self.total
        try:
            while not stopping:
                taken = step(next(batches))
                if taken is None:
                    continue
                logs, n = taken
                state.step += 1
                state.images_seen += n * acc.num_processes
                img_window += n * acc.num_processes
                self.budget.tick()
                self.sched.step()  # the LR of the next step: its step count and the time spent so far
                logs.update(lr=opt.param_groups[0]["lr"], nonfinite_skipped=float(state.nonfinite_total))
                self.last_logs = logs
                if state.step % cfg.log_every == 0 or state.step == self.total:
                    logs["images_per_s"] = img_window / max(1e-9, time.time() - t_window)
                    t_window, img_window = time.time(), 0
                    self._log(as_floats(logs), pbar, log_extras, show)
                pbar.update(state.step)
                # every process must agree to stop at the same step: a signal, the time budget, stop_after or the end
                done = state.step >= self.total or bool(stop_after and state.step - self.start_step >= stop_after)
                stopping = self.stop.should_stop(acc, late=self.budget.exhausted(), done=done)
                if after_step is not None:
                    after_step(stopping)
                if state.step % cfg.ckpt_every == 0 and not stopping:
                    self.save()
        except BaseException as e:
            try:
                raise_if_lost(acc, self.out_dir, collective_timeout(cfg), e)  # a process gone: one line naming it
            finally:
                self.stop.restore()  # on the normal path finish() restores the signal handlers
            raise
        finally:
            pbar.close()

    def _log(self, logs: dict, pbar, log_extras, show) -> None:
        if log_extras is not None:
            logs.update(log_extras())
        self.accelerator.log(logs, step=self.state.step)
        if self.accelerator.is_main_process:
            with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": self.state.step, **{k: round(v, 6) for k, v in logs.items()}}) + "\n")
        more = {k: f"{logs.get(k, float('nan')):.1f}" for k in show}
        pbar.set_postfix(step=self.state.step, loss=f"{logs['loss']:.3f}", **more, ips=f"{logs['images_per_s']:.0f}")

    # --- the end ----------------------------------------------------------------------------
    def save(self) -> str:
        """A checkpoint now (every process calls it)."""
        with report_lost_process(self.accelerator, self.out_dir, collective_timeout(self.cfg)):
            if self.before_save is not None:
                self.before_save()
            return self.ckpt.save()

    def finish(self, checkpoint: str, outputs: dict, done: str) -> dict:
        """The run's summary (also summary.json) and its last line, `done` at its end; then `end_training`."""
        state, stop = self.state, self.stop
        elapsed = time.time() - self.t_start
        summary = {"step": state.step, "images_seen": state.images_seen, "seconds": round(elapsed, 1), "checkpoint": checkpoint,
                   **outputs, "nonfinite_skipped": state.nonfinite_total, "stopped_by": stop.signal_name,
                   "last": {k: round(v, 5) for k, v in as_floats(self.last_logs).items()}}
        if self.accelerator.is_main_process:
            atomic_write_json(os.path.join(self.out_dir, "summary.json"), summary)
            why = f" (stopped by {stop.signal_name})" if stop.signal_name else ""
            self.accelerator.print(f"done: {state.step} steps ({state.step - self.start_step} in this run){why}, {state.images_seen} images "
                                   f"in {elapsed:.0f}s, {state.nonfinite_total} non-finite steps; checkpoint {checkpoint}; {done}")
        end_training(self.accelerator, stop)
        return summary


def end_training(accelerator, stop: GracefulStop) -> None:
    """Close the trackers, restore the signal handlers, leave the process group (every trainer's last step)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    stop.restore()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


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
    atomic_write_text(path, "".join(keep))
