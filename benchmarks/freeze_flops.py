"""FLOPs of one training step with the encoder frozen (train.freeze=encoder, alignment off) against full training.

    python -m benchmarks.freeze_flops [batch=128] [count_batch=2] [configs=vit_b16_from_reference,vit_b16]

Counted as benchmarks/train_speed counts them: torch.utils.flop_counter over one eager step of the trainer's work
(views, the objective, L1 + LPIPS with a random backbone, backward; the optimizer's elementwise update is not a
counted op), on random images of each config's resolution, fp32 on the CPU. The step is counted at `count_batch` and
at twice it, and scaled to `batch` (every counted op is per image, so the count is linear in the batch: the two
counts show it). `vit_b16@224` is vit_b16.yaml at the published weights' 224 px. Prints a table and one JSON line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from benchmarks.common import count_flops, parse_args
from stellar_tok.config import load_config, tokenizer_kwargs
from stellar_tok.data.views import make_views
from stellar_tok.losses.reconstruction import ReconstructionLoss
from stellar_tok.model.tokenizer import StellarTokenizer
from stellar_tok.training.objective import TokenizerWithHeads
from stellar_tok.training.tokenizer_weights import freeze_encoder

AT_224 = ["model.image_size=224", "views.global_size=224", "data.resolution=224"]
CONFIGS = {"vit_b16_from_reference": [], "vit_b16": [], "vit_b16@224": AT_224}


@dataclass
class FreezeFlopsArgs:
    batch: int = 128  # the batch the FLOPs are reported at
    count_batch: int = 2  # the batch a step is counted at (and twice it)
    configs: str = "vit_b16_from_reference,vit_b16,vit_b16@224"
    threads: int = 2


def step_flops(name: str, batch: int) -> int:
    """FLOPs of one training step of config `name` (CONFIGS) at `batch`, built as stellar_tok.train builds it."""
    cfg = load_config([f"config={name.split('@')[0]}", "model.init_from=null", "recon.lpips_random_backbone=true",
                       f"optim.batch_size={batch}", *CONFIGS[name]])
    torch.manual_seed(0)
    tok = StellarTokenizer(**tokenizer_kwargs(cfg.model))
    if cfg.train.freeze == "encoder":
        freeze_encoder(tok)
    objective = TokenizerWithHeads(tok, cfg.align).train()
    recon = ReconstructionLoss(cfg.recon)
    views_cfg = cfg.views if cfg.align.enabled else OmegaConf.merge(cfg.views, {"global_crops": 0, "local_crops": 0})  # as the trainer
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, cfg.data.resolution, cfg.data.resolution, generator=gen) * 2 - 1

    def step():
        with torch.no_grad():
            views = make_views(images, views_cfg, gen, cfg.model.patch_size)
        out = objective(views)
        loss = cfg.align.weight * out["align_loss"] + cfg.recon.weight * recon.generator_loss(out["recon"], views["main"], 0, None, tok.last_layer)[0]
        loss.backward()

    return count_flops(step)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args("python -m benchmarks.freeze_flops", __doc__, FreezeFlopsArgs, argv, "batch=128 count_batch=2")
    torch.set_num_threads(args.threads)
    rows = {}
    for name in args.configs.split(","):
        a, b = step_flops(name, args.count_batch), step_flops(name, 2 * args.count_batch)
        rows[name] = {"tflop_per_step": a / args.count_batch * args.batch / 1e12, "linear": abs(b - 2 * a) <= 1e-6 * b}
    print(f"| config | TFLOP / step at batch {args.batch} | linear in the batch |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['tflop_per_step']:.1f} | {r['linear']} |")
    print(json.dumps({"batch": args.batch, "rows": rows}))
    return rows


if __name__ == "__main__":
    main()
