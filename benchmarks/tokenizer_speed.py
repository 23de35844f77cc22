"""Tokenizer throughput at 256 px: the ViT-B/16 STELLAR tokenizer against the Stable Diffusion VAE architecture.

    python benchmarks/tokenizer_speed.py [batches=1,16] [rounds=3] [big_rounds=1] [threads=2] [device=cpu|cuda]
                                         [precision=fp32|bf16] [compile=none|default|reduce-overhead|max-autotune]

Both models have random weights (cost depends on the architecture only): ours from
configs/tokenizer/vit_b16.yaml, the reference `diffusers`' `AutoencoderKL` with the SD-VAE layout (channels
128/256/512/512, two ResNet blocks per level, 4 latent channels, 8x down). Encode, decode and
encode+decode are timed in one process, alternating between the two models, `rounds` times per batch size
(`big_rounds` for batches above 4 on a CPU, 1 by default: the VAE takes minutes per batch of 16 there); the
table has images/s from the median and the ratio ours / VAE. Forward FLOPs per image come from
torch.utils.flop_counter (eager).
device=cuda: both models on the GPU (every round, every batch size, after a warm-up; synchronised timing),
precision=bf16 under torch.autocast; the table goes to its own section.
compile=MODE: both models' encode and decode go through torch.compile(mode=MODE) with inductor's freezing
(weights folded as constants, as for inference), compiled during the warm-up; the table goes to its own section.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_setup, machine, median, parse_kv, write_section  # noqa: E402
from common import timed as common_timed  # noqa: E402


def flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def sd_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256).eval()


def main(argv):
    from omegaconf import OmegaConf

    from stellar_tok import StellarTokenizer

    kv = parse_kv(argv, {"batches": "1,16", "rounds": "3", "big_rounds": "1", "threads": "2", "device": "cpu",
                         "precision": "fp32", "compile": "none"}, __doc__, "python benchmarks/tokenizer_speed.py")
    batches = [int(b) for b in kv["batches"].split(",")]
    rounds, big_rounds = int(kv["rounds"]), int(kv["big_rounds"])
    torch.set_num_threads(int(kv["threads"]))
    dev, precision, mode = kv["device"], kv["precision"], kv["compile"]
    if mode not in ("none", "default", "reduce-overhead", "max-autotune"):
        sys.exit(f"compile={mode!r}: use none, default, reduce-overhead or max-autotune")
    cuda, cast = device_setup(dev, precision)
    m = OmegaConf.to_container(OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "configs", "tokenizer", "vit_b16.yaml")).model)
    torch.manual_seed(0)
    ours, vae = StellarTokenizer(**m).eval().to(dev), sd_vae().to(dev)

    def timed(fn) -> float:
        return common_timed(fn, cuda, cast)

    eager = {"ours": (ours.encode, ours.decode),
             "vae": (lambda x: vae.encode(x).latent_dist.mode(), lambda z: vae.decode(z).sample)}
    if mode != "none":
        from torch._inductor import config as inductor_config

        inductor_config.freezing = True
        kw = {} if mode == "default" else {"mode": mode}
        run = {k: (torch.compile(e, **kw), torch.compile(d, **kw)) for k, (e, d) in eager.items()}
    else:
        run = eager

    # reference: bare ViT blocks of the same widths and depths (no stem, sparse tokens, L or bottleneck), eager runs only
    from stellar_tok.model.vit import Block

    c, n = ours.config, (ours.config.image_size // ours.config.patch_size) ** 2
    plain = None if mode != "none" else (
        torch.nn.Sequential(*[Block(c.width, c.heads, c.mlp_ratio) for _ in range(c.depth)]).eval().to(dev),
        torch.nn.Sequential(*[Block(c.decoder_width, c.decoder_heads, c.decoder_mlp_ratio) for _ in range(c.decoder_depth)]).eval().to(dev))

    def fns(x, models):
        with torch.no_grad():
            lat = {k: e(x) for k, (e, _) in eager.items()}
        # CUDA graphs (reduce-overhead) reuse their output memory: each call starts a new step
        step = torch.compiler.cudagraph_mark_step_begin if models is not eager and mode == "reduce-overhead" else (lambda: None)
        out = {}
        for k, (e, d) in models.items():
            out[(k, "encode")] = lambda e=e: (step(), e(x))
            out[(k, "decode")] = lambda d=d, k=k: (step(), d(lat[k]))
            out[(k, "encode+decode")] = lambda e=e, d=d: (step(), d(e(x)))
        if plain is not None:
            t_enc, t_dec = torch.randn(len(x), 1 + n, c.width, device=dev), torch.randn(len(x), n, c.decoder_width, device=dev)
            out[("plain", "encode+decode")] = lambda: (plain[0](t_enc), plain[1](t_dec))
        return out

    x1 = torch.rand(1, 3, 256, 256, device=dev) * 2 - 1
    with torch.no_grad():
        gf = {k: flops(f) / 1e9 for k, f in fns(x1, eager).items()}
    rows, raw, plain_rows = [], {}, []
    for b in batches:
        x = torch.rand(b, 3, 256, 256, device=dev) * 2 - 1
        f = fns(x, run)
        times = {k: [] for k in f}
        with torch.no_grad():
            for k in f:  # warm-up (and compilation)
                timed(f[k]) if b == 1 or cuda or mode != "none" else None
            for _ in range(rounds if b <= 4 or cuda else big_rounds):
                for op in ("encode", "decode", "encode+decode"):
                    for model in ("ours", "plain", "vae"):
                        if (model, op) in f:
                            times[(model, op)].append(timed(f[(model, op)]))
        for op in ("encode", "decode", "encode+decode"):
            o, v = b / median(times[("ours", op)]), b / median(times[("vae", op)])
            raw[(b, op)] = (o, v)
            rows.append(f"| {op} | {b} | {gf[('ours', op)]:.1f} | {gf[('vae', op)]:.1f} | {o:.2f} | {v:.3f} | **{o / v:.1f}x** |")
        if plain is not None:
            p = b / median(times[("plain", "encode+decode")])
            plain_rows.append(f"{p:.2f} images/s at batch {b} ({p / raw[(b, 'encode+decode')][1]:.1f}x the SD-VAE's encode+decode; ours "
                              f"{raw[(b, 'encode+decode')][0] / p:.2f}x the plain blocks' speed)")
        print(rows[-3:], plain_rows[-1:], flush=True)
    cmd = "python benchmarks/tokenizer_speed.py " + " ".join(argv)
    compiled = ("" if mode == "none" else f" Both models compiled: `torch.compile(mode={mode!r})` of encode and of decode, "
                "inductor freezing on, compilation in the warm-up.")
    n_ours, n_vae = sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in vae.parameters())
    body = f"""```bash
{cmd.strip()}
```

{machine()}; 256 px, random weights. Ours: `configs/tokenizer/vit_b16.yaml` ({n_ours / 1e6:.0f} M parameters: ViT-B/16 encoder,
16 tokens x 32 channels + L, 6-block width-512 decoder). SD-VAE: `diffusers` AutoencoderKL, 128/256/512/512, 2 blocks per
level ({n_vae / 1e6:.0f} M). {"On the GPU, " + precision + ", synchronised timing, median of " + str(rounds) + " alternating rounds after a warm-up" if cuda else
f"Median of {rounds} alternating rounds for batch <= 4, {big_rounds} above"}.{compiled}

| operation | batch | ours GFLOPs / image | SD-VAE GFLOPs / image | ours images/s | SD-VAE images/s | ours / SD-VAE |
|---|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n"
    if plain_rows:
        body += (f"\nBare ViT blocks of the same widths and depths in the same rounds ({c.depth} x {c.width} on {1 + n} tokens + "
                 f"{c.decoder_depth} x {c.decoder_width} on {n}: no stem, sparse tokens, L, bottleneck or pixel head; "
                 f"{gf[('plain', 'encode+decode')]:.1f} GFLOPs / image): " + "; ".join(plain_rows) + ".\n")
    print(body)
    tags = ([f"GPU, {precision}"] if cuda else []) + ([f"torch.compile {mode}"] if mode != "none" else [])
    write_section("Tokenizer throughput at 256 px against the SD-VAE architecture" + (f" ({', '.join(tags)})" if tags else ""), body)


if __name__ == "__main__":
    main(sys.argv[1:])
