"""Generator cost: the latent DiT against a DiT of the same width and depth on a 32x32x4 SD-VAE latent.

    python -m benchmarks.generator_cost [config=xl] [batch=2] [rounds=3] [threads=2] [device=cpu|cuda] [precision=fp32|bf16]

Both models are built with random weights (cost depends on the architecture only): ours from
configs/generator/<config>.yaml over the ViT-B/16 tokenizer's latent at 256 px (16 tokens x 32 channels +
a 16x16x16 localization map, patch 2: 80 positions); the reference is `diffusers`' `DiTTransformer2DModel`
with the same width, depth and heads on a 32x32x4 latent with patch 2 (256 positions), i.e. DiT-XL/2 for
config=xl. Reported: forward FLOPs per image (torch.utils.flop_counter), and seconds per guided denoising
step (one forward of 2 x batch, conditional + unconditional), median of alternating runs, from which the
sampling rate with 50 guided steps follows (images/s = batch / (50 x seconds per step)), and the
end-to-end rate from noise to pixels adds each side's decoder (ours: the ViT-B/16 tokenizer's decoder of
configs/tokenizer/vit_b16.yaml; DiT: the SD-VAE decoder, `diffusers` AutoencoderKL 128/256/512/512), timed on
the same batch: images/s = batch / (50 x step + decode). device=cuda: on the GPU (synchronised timing,
precision=bf16 under torch.autocast), in a section of its own.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from benchmarks.common import count_flops, device_setup, machine, median, model_config, parse_args, sd_vae, timed, write_section
from generators import LatentDiT
from stellar_tok import Latent, StellarTokenizer
from stellar_tok.config import tokenizer_kwargs
from stellar_tok.errors import cli_entry


@dataclass
class GeneratorCostArgs:
    config: str = "xl"  # a packaged generator config: tiny, b, l, xl
    batch: int = 2  # images per guided step (2 x batch sequences: conditional + unconditional)
    rounds: int = 3  # alternating timed rounds
    threads: int = 2  # torch threads
    device: str = "cpu"  # cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (autocast)


def build(m: SimpleNamespace, b: int, dev: str) -> dict:
    """The four timed calls ({"step_ours", "step_dit", "dec_ours", "dec_vae"}: no-grad closures over random inputs of
    batch b) and the two generators ({"ours", "dit"}), for the generator config's `model` section m."""
    from diffusers import DiTTransformer2DModel  # heavy: diffusers, only for the reference DiT

    torch.manual_seed(0)
    ours = LatentDiT(num_tokens=16, token_channels=32, grid=16, loc_patch=m.loc_patch, width=m.width, depth=m.depth, heads=m.heads,
                     num_classes=1000).eval().to(dev)
    dit = DiTTransformer2DModel(num_attention_heads=m.heads, attention_head_dim=m.width // m.heads, in_channels=4, out_channels=8,
                                num_layers=m.depth, sample_size=32, patch_size=2, num_embeds_ada_norm=1000).eval().to(dev)
    tok, loc = torch.randn(2 * b, 16, 32, device=dev), torch.randn(2 * b, 256, 16, device=dev)
    t, y = torch.rand(2 * b, device=dev), torch.randint(0, 1000, (2 * b,), device=dev)
    z, ts = torch.randn(2 * b, 4, 32, 32, device=dev), torch.randint(0, 1000, (2 * b,), device=dev)
    tokenizer, vae = StellarTokenizer(**tokenizer_kwargs(model_config("vit_b16"))).eval().to(dev), sd_vae().to(dev)
    lat = Latent(torch.randn(b, 16, 32, device=dev), torch.randn(b, 256, 16, device=dev).log_softmax(-1))
    zl = torch.randn(b, 4, 32, 32, device=dev)
    calls = {"step_ours": lambda: ours(tok, loc, t, y), "step_dit": lambda: dit(z, timestep=ts, class_labels=y),
             "dec_ours": lambda: tokenizer.decode(lat), "dec_vae": lambda: vae.decode(zl)}
    return {"calls": {k: torch.no_grad()(f) for k, f in calls.items()}, "ours": ours, "dit": dit}


def measure(built: dict, rounds: int, cuda: bool, cast) -> dict:
    """Median seconds of each call over `rounds` alternating rounds, after one warm-up call each."""
    calls = built["calls"]
    for fn in calls.values():  # warm-up
        timed(fn, cuda, cast)
    times = {k: [] for k in calls}
    for _ in range(rounds):
        for k, fn in calls.items():
            times[k].append(timed(fn, cuda, cast))
    return {k: median(v) for k, v in times.items()}


def report_body(args: GeneratorCostArgs, argv: list[str], m, built: dict, flops: dict, sec: dict, cuda: bool) -> str:
    b, rounds = args.batch, args.rounds
    n_ours, n_dit = (sum(p.numel() for p in built[k].parameters()) for k in ("ours", "dit"))
    f_ours, f_dit = flops["step_ours"], flops["step_dit"]
    mo, md, mdo, mdv = sec["step_ours"], sec["step_dit"], sec["dec_ours"], sec["dec_vae"]
    e2e_o, e2e_d = b / (50 * mo + mdo), b / (50 * md + mdv)
    cmd = "python -m benchmarks.generator_cost " + " ".join(argv)
    return f"""```bash
{cmd.strip()}
```

{machine()}; config `{args.config}` (width {m.width}, depth {m.depth}, heads {m.heads}); one guided step = one forward of {2 * b} sequences
(batch {b}, conditional + unconditional); {rounds} alternating rounds{f", on the GPU in {args.precision}" if cuda else ""}.

| model | sequence | parameters | forward GFLOPs / image | s per guided step (batch {b}) | images/s, 50 guided steps | s to decode the batch | images/s from noise, decoder included |
|---|---|---|---|---|---|---|---|
| STELLAR latent DiT (16 tokens + 16x16x16 loc, patch 2) | 80 | {n_ours / 1e6:.0f} M | {f_ours / 1e9:.1f} | {mo:.3f} | {b / (50 * mo):.4f} | {mdo:.3f} (STELLAR decoder) | {e2e_o:.4f} |
| DiT on SD-VAE 32x32x4, patch 2 (`diffusers` DiTTransformer2DModel) | 256 | {n_dit / 1e6:.0f} M | {f_dit / 1e9:.1f} | {md:.3f} | {b / (50 * md):.4f} | {mdv:.3f} (SD-VAE decoder) | {e2e_d:.4f} |
| ratio DiT / ours | | | {f_dit / f_ours:.2f}x | {md / mo:.2f}x | | {mdv / mdo:.1f}x | {e2e_o / e2e_d:.2f}x |
"""


@cli_entry
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args("python -m benchmarks.generator_cost", __doc__, GeneratorCostArgs, argv, "config=xl batch=2")
    torch.set_num_threads(args.threads)
    cuda, cast = device_setup(args.device, args.precision)
    m = SimpleNamespace(**model_config(args.config, kind="generator"))
    built = build(m, args.batch, args.device)
    flops = {k: count_flops(built["calls"][k]) / (2 * args.batch) for k in ("step_ours", "step_dit")}  # per image
    body = report_body(args, argv, m, built, flops, measure(built, args.rounds, cuda, cast), cuda)
    print(body)
    write_section(f"Generator cost: {args.config} against DiT on a 32x32x4 latent" + (f" (GPU, {args.precision})" if cuda else ""), body)


if __name__ == "__main__":
    main()
