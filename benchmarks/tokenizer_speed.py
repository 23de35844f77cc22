"""Tokenizer throughput at 256 px: the ViT-B/16 STELLAR tokenizer against the Stable Diffusion VAE architecture.

    python benchmarks/tokenizer_speed.py [batches=1,16] [rounds=3] [threads=2] [device=cpu|cuda] [precision=fp32|bf16]

Both models have random weights (cost depends on the architecture only): ours from
configs/tokenizer/vit_b16.yaml, the reference `diffusers`' `AutoencoderKL` with the SD-VAE layout (channels
128/256/512/512, two ResNet blocks per level, 4 latent channels, 8x down). Encode, decode and
encode+decode are timed in one process, alternating between the two models, `rounds` times per batch size
(1 round for batches above 4: the VAE takes minutes per batch of 16 on a CPU); the table has images/s from
the median and the ratio ours / VAE. Forward FLOPs per image come from torch.utils.flop_counter.
device=cuda: both models on the GPU (every round, every batch size, after a warm-up; synchronised timing),
precision=bf16 under torch.autocast; the table goes to its own section.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_setup, machine, median, write_section  # noqa: E402
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

    kv = dict(a.split("=", 1) for a in argv)
    batches = [int(b) for b in kv.get("batches", "1,16").split(",")]
    rounds = int(kv.get("rounds", 3))
    torch.set_num_threads(int(kv.get("threads", 2)))
    dev, precision = kv.get("device", "cpu"), kv.get("precision", "fp32")
    cuda, cast = device_setup(dev, precision)
    m = OmegaConf.to_container(OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "configs", "tokenizer", "vit_b16.yaml")).model)
    torch.manual_seed(0)
    ours, vae = StellarTokenizer(**m).eval().to(dev), sd_vae().to(dev)

    def timed(fn) -> float:
        return common_timed(fn, cuda, cast)

    def fns(x):
        with torch.no_grad():
            lat, z = ours.encode(x), vae.encode(x).latent_dist.mode()
        return {
            ("ours", "encode"): lambda: ours.encode(x),
            ("ours", "decode"): lambda: ours.decode(lat),
            ("ours", "encode+decode"): lambda: ours.decode(ours.encode(x)),
            ("vae", "encode"): lambda: vae.encode(x).latent_dist.mode(),
            ("vae", "decode"): lambda: vae.decode(z).sample,
            ("vae", "encode+decode"): lambda: vae.decode(vae.encode(x).latent_dist.mode()).sample,
        }

    x1 = torch.rand(1, 3, 256, 256, device=dev) * 2 - 1
    f1 = fns(x1)
    with torch.no_grad():
        gf = {k: flops(f) / 1e9 for k, f in f1.items()}
    rows, raw = [], {}
    for b in batches:
        x = torch.rand(b, 3, 256, 256, device=dev) * 2 - 1
        f = fns(x)
        times = {k: [] for k in f}
        with torch.no_grad():
            for k in f:  # warm-up
                timed(f[k]) if b == 1 or cuda else None
            for _ in range(rounds if b <= 4 or cuda else 1):
                for op in ("encode", "decode", "encode+decode"):
                    for model in ("ours", "vae"):
                        times[(model, op)].append(timed(f[(model, op)]))
        for op in ("encode", "decode", "encode+decode"):
            o, v = b / median(times[("ours", op)]), b / median(times[("vae", op)])
            raw[(b, op)] = (o, v)
            rows.append(f"| {op} | {b} | {gf[('ours', op)]:.1f} | {gf[('vae', op)]:.1f} | {o:.2f} | {v:.3f} | **{o / v:.1f}x** |")
        print(rows[-3:], flush=True)
    cmd = "python benchmarks/tokenizer_speed.py " + " ".join(argv)
    n_ours, n_vae = sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in vae.parameters())
    body = f"""```bash
{cmd.strip()}
```

{machine()}; 256 px, random weights. Ours: `configs/tokenizer/vit_b16.yaml` ({n_ours / 1e6:.0f} M parameters: ViT-B/16 encoder,
16 tokens x 32 channels + L, 6-block width-512 decoder). SD-VAE: `diffusers` AutoencoderKL, 128/256/512/512, 2 blocks per
level ({n_vae / 1e6:.0f} M). {"On the GPU, " + precision + ", synchronised timing, median of " + str(rounds) + " alternating rounds after a warm-up" if cuda else
f"Median of {rounds} alternating rounds for batch <= 4, one round above"}.

| operation | batch | ours GFLOPs / image | SD-VAE GFLOPs / image | ours images/s | SD-VAE images/s | ours / SD-VAE |
|---|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n"
    print(body)
    write_section("Tokenizer throughput at 256 px against the SD-VAE architecture" + (f" (GPU, {precision})" if cuda else ""), body)


if __name__ == "__main__":
    main(sys.argv[1:])
