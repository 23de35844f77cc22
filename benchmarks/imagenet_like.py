"""Helpers of `benchmarks/imagenet_rehearsal.sh`, one `stage=` each: ImageNet-like data made offline, a random ViT-MAE
folder, a random FID Inception, a measuring wrapper around the project's commands, and the summary table.

    python -m benchmarks.imagenet_like stage=images out=DIR train=6400 val=1000 classes=16 workers=16 [json=F]
    python -m benchmarks.imagenet_like stage=mae out=DIR [width=768 depth=12 heads=12 patch=16 image_size=224] [json=F]
    python -m benchmarks.imagenet_like stage=inception out=FILE.safetensors
    python -m benchmarks.imagenet_like stage=run module=MODULE stats=F.json [split_at=N] args='key=value ...'
    python -m benchmarks.imagenet_like stage=report work=WORK_DIR out=RESULTS_DIR

A stage reads only its own keys (another one stops the command, as an unknown key does).

`images` renders DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg (benchmarks/imagenet_data.py): ImageNet-like
files (JPEG quality 75-95, shorter side 300-500 px, aspect 3:4..4:3, about 3% with a shorter side of 1000-1400 px,
about 2% greyscale JPEGs, a few CMYK JPEGs, RGB/palette/RGBA PNGs, and two truncated JPEGs in train that
`make_shards` must skip). Each class is one of the 8 `stellar_tok.data.shapes` outlines drawn once, three times or
twice (8 x 3 = up to 24 classes), in any hue, size, position and rotation, on a low-frequency colour field with
optional stripes and noise: the class is the shape and the count, nothing else.

`mae` writes config.json + model.safetensors of a Hugging Face ViTMAEForPreTraining with random weights (keys
`vit.embeddings.*`, `vit.encoder.layer.*`, `vit.layernorm.*` and a few `decoder.*` that the loader ignores),
built with json and safetensors only: what `model.init_from` reads (stellar_tok.model.mae_init).

`inception` writes a random-weights state dict of torch-fidelity's Inception-v3 (classifier NaN, so FID/KID
only), for `fid.weights=`: the real weights cannot be fetched offline, so an FID with it tests the plumbing and
means nothing.

`run` calls `MODULE.main(ARGS)` in this process, ARGS being `args` split as a shell would (also under `accelerate
launch -m benchmarks.imagenet_like stage=run ...`), and writes to `stats`: wall time, batches drawn, the time spent
waiting for each batch (the trainers' `epoch_batches` is wrapped), seconds per step (median, also before and after
`split_at`, e.g. the GAN's start), images per second, peak GPU memory (torch.cuda.max_memory_allocated / reserved)
and peak RSS. Rewritten every 25 batches, so a killed stage still leaves figures.

`report` turns WORK_DIR/stages.jsonl and the files the stages wrote into RESULTS_DIR/summary.md and summary.json,
and packs the logs into RESULTS_DIR/logs.tar.gz (at most 8 files in RESULTS_DIR, as the device tool returns;
benchmarks/imagenet_report.py).
"""
from __future__ import annotations

import importlib
import json
import math
import os
import resource
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
from safetensors.torch import save_file

from benchmarks.common import parse_args
from benchmarks.imagenet_data import render_images
from benchmarks.imagenet_report import write_report
from stellar_tok.errors import UserError, cli_entry
from stellar_tok.evaluation.fid import FEATURES, new_extractor
from stellar_tok.files import atomic_write_json


@dataclass
class ImagenetLikeArgs:
    stage: Optional[str] = None  # images | mae | inception | run | report
    out: Optional[str] = None  # images, mae: a folder; inception: a .safetensors file; report: RESULTS_DIR
    train: int = 6400  # images: train files
    val: int = 1000  # images: val files
    classes: int = 16  # images: 1..24
    workers: int = os.cpu_count() or 1  # images: rendering processes
    seed: int = 0  # images
    json: Optional[str] = None  # images, mae: also write the summary to this file
    width: int = 768  # mae: hidden size
    depth: int = 12  # mae: encoder layers
    heads: int = 12  # mae
    patch: int = 16  # mae: patch size
    image_size: int = 224  # mae
    module: Optional[str] = None  # run: the command module whose main(argv) runs, e.g. stellar_tok.train
    stats: Optional[str] = None  # run: the JSON file of the measurements
    split_at: int = 0  # run: > 0: also the medians of the steps before and after this one (e.g. the GAN's start)
    args: Optional[str] = None  # run: the command's arguments, one string split as a shell would: 'key=value key=value'
    work: Optional[str] = None  # report: the rehearsal's WORK_DIR


STAGES = {  # stage -> (the keys it reads, those it needs)
    "images": (("out", "train", "val", "classes", "workers", "seed", "json"), ("out",)),
    "mae": (("out", "width", "depth", "heads", "patch", "image_size", "json"), ("out",)),
    "inception": (("out",), ("out",)),
    "run": (("module", "stats", "split_at", "args"), ("module", "stats")),
    "report": (("work", "out"), ("work", "out")),
}


def read_args(argv: list[str] | None) -> ImagenetLikeArgs:
    """The arguments, checked against the stage: it needs its keys and reads no other."""
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args("python -m benchmarks.imagenet_like", __doc__, ImagenetLikeArgs, argv, "stage=images out=DIR")
    if a.stage not in STAGES:
        raise UserError(f"stage= must be one of {', '.join(STAGES)} (got {a.stage!r})")
    reads, needs = STAGES[a.stage]
    foreign = [k for k in dict.fromkeys(arg.split("=", 1)[0] for arg in argv) if k != "stage" and k not in reads]
    if foreign:
        raise UserError(f"stage={a.stage} does not read {', '.join(repr(k) for k in foreign)}; its keys: {', '.join(reads)}")
    missing = [k for k in needs if not getattr(a, k)]
    if missing:
        raise UserError(f"stage={a.stage} needs {', '.join(f'{k}=' for k in missing)}")
    return a


# ----------------------------------------------------------------------------------------------
# mae, inception
# ----------------------------------------------------------------------------------------------


def write_mae(a: "ImagenetLikeArgs") -> dict:
    """OUT/config.json + OUT/model.safetensors of a random-weights ViTMAEForPreTraining (`width`, `depth`, `heads`,
    `patch`, `image_size`); returns (and writes to `json`) a summary."""
    g = torch.Generator().manual_seed(0)
    d, mlp, grid = a.width, a.width * 4, a.image_size // a.patch

    def normal(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    sd = {"vit.embeddings.cls_token": normal(1, 1, d), "vit.embeddings.position_embeddings": normal(1, 1 + grid * grid, d),
          "vit.embeddings.patch_embeddings.projection.weight": normal(d, 3, a.patch, a.patch),
          "vit.embeddings.patch_embeddings.projection.bias": torch.zeros(d),
          "vit.layernorm.weight": torch.ones(d), "vit.layernorm.bias": torch.zeros(d),
          "decoder.decoder_embed.weight": normal(a.width // 2, d), "decoder.decoder_embed.bias": torch.zeros(a.width // 2),
          "decoder.mask_token": normal(1, 1, a.width // 2)}
    for i in range(a.depth):
        p = f"vit.encoder.layer.{i}."
        for name, (o, n) in {"attention.attention.query": (d, d), "attention.attention.key": (d, d),
                             "attention.attention.value": (d, d), "attention.output.dense": (d, d),
                             "intermediate.dense": (mlp, d), "output.dense": (d, mlp)}.items():
            sd[p + name + ".weight"], sd[p + name + ".bias"] = normal(o, n), torch.zeros(o)
        for name in ("layernorm_before", "layernorm_after"):
            sd[p + name + ".weight"], sd[p + name + ".bias"] = torch.ones(d), torch.zeros(d)
    config = {"architectures": ["ViTMAEForPreTraining"], "model_type": "vit_mae", "hidden_size": d,
              "num_hidden_layers": a.depth, "num_attention_heads": a.heads, "intermediate_size": mlp,
              "hidden_act": "gelu", "layer_norm_eps": 1e-12, "image_size": a.image_size, "patch_size": a.patch,
              "num_channels": 3, "qkv_bias": True, "decoder_hidden_size": a.width // 2, "mask_ratio": 0.75,
              "note": "random weights (benchmarks/imagenet_like.py stage=mae): the layout of facebook/vit-mae-*, not its weights"}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    save_file(sd, os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
    size = os.path.getsize(os.path.join(a.out, "model.safetensors"))
    params = sum(v.numel() for v in sd.values())
    summary = {"tensors": len(sd), "params": params, "mb": round(size / 2**20, 1), "grid": grid}
    print(json.dumps(summary))
    if a.json:
        atomic_write_json(a.json, summary)
    return summary


def write_inception(path: str) -> None:
    """A random-weights state dict of torch-fidelity's Inception-v3 at `path` (classifier NaN: FID/KID only)."""
    skeleton = new_extractor(None, [FEATURES]).state_dict()  # names and shapes only (meta device)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in skeleton.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(0)
        elif k.startswith("fc."):
            sd[k] = torch.full(v.shape, float("nan"))  # no classifier: FID/KID only, no Inception Score
        elif k.endswith(("bn.weight", "running_var")):
            sd[k] = torch.ones(v.shape)
        elif k.endswith(("bn.bias", "running_mean")) or v.ndim == 1:
            sd[k] = torch.zeros(v.shape)
        else:  # He-normal convolutions keep the activations' scale through the ReLUs
            fan_in = math.prod(v.shape[1:])
            sd[k] = torch.randn(v.shape, generator=g) * math.sqrt(2.0 / fan_in)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(sd, path, metadata={"note": "random weights: plumbing only"})
    print(json.dumps({"tensors": len(sd), "mb": round(os.path.getsize(path) / 2**20, 1)}))


# ----------------------------------------------------------------------------------------------
# run: a project command, measured
# ----------------------------------------------------------------------------------------------


def _batch_size(batch) -> int:
    try:
        if isinstance(batch, dict):
            return int(batch["label"].shape[0])
        return int(batch[-1].shape[0])
    except Exception:
        return 0


class BatchClock:
    """When each batch of a run was asked for, how long it took to come and its size; `stats` sums them up."""

    def __init__(self, module: str, argv: list[str], split_at: int):
        self.module, self.argv, self.split_at = module, argv, split_at
        self.t0 = time.time()
        self.requested: list[float] = []  # time each batch was asked for
        self.waits: list[float] = []  # time spent waiting for it
        self.sizes: list[int] = []

    def timed(self, batches, every: int, save):
        """`batches`, recording each; `save()` every `every` batches."""
        while True:
            t = time.time()
            batch = next(batches)
            self.requested.append(t)
            self.waits.append(time.time() - t)
            self.sizes.append(_batch_size(batch))
            if len(self.requested) % every == 0:
                save()
            yield batch

    def step_stats(self) -> dict:
        requested, waits, sizes, split_at = self.requested, self.waits, self.sizes, self.split_at
        steps = [b - a for a, b in zip(requested, requested[1:])]  # step i: from asking batch i to asking batch i+1
        if not steps:
            return {}
        warm = steps[3:] if len(steps) > 6 else steps
        n_img = sum(sizes[len(sizes) - len(warm) - 1 : -1]) if len(sizes) > len(warm) else sum(sizes)
        later = waits[1:]
        out = {"s_per_step_median": round(statistics.median(warm), 4), "s_per_step_mean": round(sum(warm) / len(warm), 4),
               "images_per_s": round(n_img / max(1e-9, sum(warm)), 2), "batch": sizes[0], "first_batch_wait_s": round(waits[0], 3),
               "wait_s_total": round(sum(later), 3),
               "wait_share": round(sum(later) / max(1e-9, sum(steps)), 4),  # of the time after the first batch
               "wait_s_median": round(statistics.median(later), 4) if later else 0.0}
        if split_at and len(steps) > split_at + 2:
            before, after = steps[3:split_at], steps[split_at + 1 :]
            if before:
                out["s_per_step_before_split"] = round(statistics.median(before), 4)
            out["s_per_step_after_split"] = round(statistics.median(after), 4)
            out["split_at"] = split_at
        return out

    def stats(self, status: str) -> dict:
        out = {"module": self.module, "argv": self.argv, "status": status, "wall_s": round(time.time() - self.t0, 2),
               "batches": len(self.requested), **self.step_stats()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["device"] = torch.cuda.get_device_name(0)
            out["peak_gpu_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            out["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        out["peak_rss_children_gib"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)
        return out


def run_measured(module: str, stats_path: str, split_at: int, argv: list[str]) -> None:
    """`module.main(argv)` in this process, its batches timed; the figures go to `stats_path` (rank 0) at the start,
    every 25 batches and at the end, whatever the end."""
    rank = int(os.environ.get("RANK", "0"))
    mod = importlib.import_module(module)
    clock = BatchClock(module, argv, split_at)

    def save(status: str = "running") -> None:
        if rank == 0:
            atomic_write_json(stats_path, clock.stats(status))

    # the trainers draw their batches through `epoch_batches`: in the module itself, or in the shared training engine
    holders = [m for m in (mod, sys.modules.get("stellar_tok.training.engine")) if m is not None and hasattr(m, "epoch_batches")]
    if holders:
        original = holders[0].epoch_batches

        def timed_batches(*args, **kwargs):
            return clock.timed(original(*args, **kwargs), 25, save)

        for m in holders:
            m.epoch_batches = timed_batches
    save("started")
    status = "error"
    try:
        mod.main(argv)
        status = "ok"
    except SystemExit as e:
        status = "ok" if not e.code else f"exit {e.code}"
        raise
    finally:
        save(status)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    a = read_args(argv)
    if a.stage == "images":
        render_images(a.out, a.train, a.val, a.classes, a.workers, a.seed, a.json)
    elif a.stage == "mae":
        write_mae(a)
    elif a.stage == "inception":
        write_inception(a.out)
    elif a.stage == "run":
        run_measured(a.module, a.stats, a.split_at, shlex.split(a.args or ""))
    else:
        write_report(a.work, a.out)


if __name__ == "__main__":
    main()
