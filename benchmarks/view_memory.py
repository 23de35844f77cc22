"""Activation memory of the training step per image, by number of views: the tensors autograd saves for backward.

    python -m benchmarks.view_memory [config=vit_b16] [views=4+6,8+8] [checkpoint=0,12] [batch=2] [threads=2]

Builds the tokenizer, objective and reconstruction loss as `stellar_tok.train` does (random weights, LPIPS with a
random backbone), cuts the views of `batch` random images, runs the forward of the objective and the L1 + LPIPS
loss under `torch.autograd.graph.saved_tensors_hooks`, and sums the bytes of the distinct tensors saved for
backward, per image, in fp32 on the CPU. Under bf16 autocast most of them (matmul and attention inputs) are half
that size; parameters, gradients and AdamW moments come on top. `views=G+L` sets views.global_crops=G and
views.local_crops=L; `checkpoint=K` recomputes the first K encoder blocks in the backward
(`train.activation_checkpointing=K`, -1: all): only their inputs are kept. Writes a table to docs/BENCHMARKS.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmarks.common import machine, parse_args, write_section
from stellar_tok.config import load_config, tokenizer_kwargs
from stellar_tok.data.views import make_views
from stellar_tok.errors import cli_entry
from stellar_tok.losses.reconstruction import ReconstructionLoss
from stellar_tok.model.tokenizer import StellarTokenizer
from stellar_tok.training.objective import TokenizerWithHeads


@dataclass
class ViewMemoryArgs:
    config: str = "vit_b16"  # a packaged tokenizer config
    views: str = "4+6,8+8"  # comma-separated G+L: views.global_crops=G, views.local_crops=L
    checkpoint: str = "0"  # comma-separated encoder block counts under activation checkpointing (-1: all)
    batch: int = 2  # random images
    threads: int = 2  # torch threads


def saved_bytes_per_image(config: str, global_crops: int, local_crops: int, batch: int, checkpoint: int = 0) -> float:
    cfg = load_config([f"config=configs/tokenizer/{config}.yaml", f"views.global_crops={global_crops}",
                       f"views.local_crops={local_crops}", "recon.lpips_random_backbone=true"])
    torch.manual_seed(0)
    tokenizer = StellarTokenizer(**tokenizer_kwargs(cfg.model)).set_activation_checkpointing(checkpoint)
    objective = TokenizerWithHeads(tokenizer, cfg.align)
    recon = ReconstructionLoss(cfg.recon)
    size = cfg.model.image_size
    views = make_views(torch.rand(batch, 3, size, size) * 2 - 1, cfg.views, torch.Generator().manual_seed(0), cfg.model.patch_size)
    seen, total = set(), 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = objective(views)
        out["align_loss"] + recon.generator_loss(out["recon"], views["main"], 0)[0]
    return total / batch


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = parse_args("python -m benchmarks.view_memory", __doc__, ViewMemoryArgs, argv, "views=4+6,8+8 batch=2")
    torch.set_num_threads(args.threads)
    rows = []
    for spec in args.views.split(","):
        g, l = (int(x) for x in spec.split("+"))
        for k in (int(x) for x in args.checkpoint.split(",")):
            mib = saved_bytes_per_image(args.config, g, l, args.batch, k) / 2**20
            rows.append(f"| {g} + {l} | {'all' if k == -1 else k} | {mib:,.0f} |")
            print(rows[-1], flush=True)
    body = (f"`python -m benchmarks.view_memory config={args.config} views={args.views} checkpoint={args.checkpoint} "
            f"batch={args.batch}` ({machine()}): tensors saved for backward per image, fp32, by masked global + local "
            "views and by encoder blocks under activation checkpointing (`train.activation_checkpointing`).\n\n"
            "| views (global + local) | checkpointed encoder blocks | MiB per image |\n|---|---|---|\n" + "\n".join(rows))
    write_section(f"Activation memory by views ({args.config})", body)


if __name__ == "__main__":
    main()
