"""Generator cost: the latent DiT against a DiT of the same width and depth on a 32x32x4 SD-VAE latent.

    python benchmarks/generator_cost.py [config=xl] [batch=2] [rounds=3] [threads=2] [device=cpu|cuda] [precision=fp32|bf16]

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


def main(argv):
    from diffusers import DiTTransformer2DModel
    from omegaconf import OmegaConf

    from generators import LatentDiT

    kv = parse_kv(argv, {"config": "xl", "batch": "2", "rounds": "3", "threads": "2", "device": "cpu", "precision": "fp32"}, __doc__,
                  "python benchmarks/generator_cost.py")
    name, b, rounds = kv["config"], int(kv["batch"]), int(kv["rounds"])
    torch.set_num_threads(int(kv["threads"]))
    dev, precision = kv["device"], kv["precision"]
    cuda, cast = device_setup(dev, precision)
    m = OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "configs", "generator", f"{name}.yaml")).model
    torch.manual_seed(0)
    ours = LatentDiT(num_tokens=16, token_channels=32, grid=16, loc_patch=m.loc_patch, width=m.width, depth=m.depth, heads=m.heads,
                     num_classes=1000).eval().to(dev)
    dit = DiTTransformer2DModel(num_attention_heads=m.heads, attention_head_dim=m.width // m.heads, in_channels=4, out_channels=8,
                                num_layers=m.depth, sample_size=32, patch_size=2, num_embeds_ada_norm=1000).eval().to(dev)
    n_ours, n_dit = sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in dit.parameters())

    tok, loc = torch.randn(2 * b, 16, 32, device=dev), torch.randn(2 * b, 256, 16, device=dev)
    t, y = torch.rand(2 * b, device=dev), torch.randint(0, 1000, (2 * b,), device=dev)
    z, ts = torch.randn(2 * b, 4, 32, 32, device=dev), torch.randint(0, 1000, (2 * b,), device=dev)

    @torch.no_grad()
    def step_ours():
        ours(tok, loc, t, y)

    @torch.no_grad()
    def step_dit():
        dit(z, timestep=ts, class_labels=y)

    from stellar_tok import Latent, StellarTokenizer
    from tokenizer_speed import sd_vae

    tcfg = OmegaConf.to_container(OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "configs", "tokenizer", "vit_b16.yaml")).model)
    tokenizer, vae = StellarTokenizer(**tcfg).eval().to(dev), sd_vae().to(dev)
    lat = Latent(torch.randn(b, 16, 32, device=dev), torch.randn(b, 256, 16, device=dev).log_softmax(-1))
    zl = torch.randn(b, 4, 32, 32, device=dev)

    @torch.no_grad()
    def dec_ours():
        tokenizer.decode(lat)

    @torch.no_grad()
    def dec_vae():
        vae.decode(zl)

    f_ours, f_dit = flops(lambda: step_ours()) / (2 * b), flops(lambda: step_dit()) / (2 * b)
    def timed(fn) -> float:
        return common_timed(fn, cuda, cast)

    for fn in (step_ours, step_dit, dec_ours, dec_vae):  # warm-up
        timed(fn)
    so, sd, do, dv = [], [], [], []
    for _ in range(rounds):
        for fn, acc in ((step_ours, so), (step_dit, sd), (dec_ours, do), (dec_vae, dv)):
            acc.append(timed(fn))
    mo, md, mdo, mdv = median(so), median(sd), median(do), median(dv)
    e2e_o, e2e_d = b / (50 * mo + mdo), b / (50 * md + mdv)
    cmd = "python benchmarks/generator_cost.py " + " ".join(argv)
    body = f"""```bash
{cmd.strip()}
```

{machine()}; config `{name}` (width {m.width}, depth {m.depth}, heads {m.heads}); one guided step = one forward of {2 * b} sequences
(batch {b}, conditional + unconditional); {rounds} alternating rounds{f", on the GPU in {precision}" if cuda else ""}.

| model | sequence | parameters | forward GFLOPs / image | s per guided step (batch {b}) | images/s, 50 guided steps | s to decode the batch | images/s from noise, decoder included |
|---|---|---|---|---|---|---|---|
| STELLAR latent DiT (16 tokens + 16x16x16 loc, patch 2) | 80 | {n_ours / 1e6:.0f} M | {f_ours / 1e9:.1f} | {mo:.3f} | {b / (50 * mo):.4f} | {mdo:.3f} (STELLAR decoder) | {e2e_o:.4f} |
| DiT on SD-VAE 32x32x4, patch 2 (`diffusers` DiTTransformer2DModel) | 256 | {n_dit / 1e6:.0f} M | {f_dit / 1e9:.1f} | {md:.3f} | {b / (50 * md):.4f} | {mdv:.3f} (SD-VAE decoder) | {e2e_d:.4f} |
| ratio DiT / ours | | | {f_dit / f_ours:.2f}x | {md / mo:.2f}x | | {mdv / mdo:.1f}x | {e2e_o / e2e_d:.2f}x |
"""
    print(body)
    write_section(f"Generator cost: {name} against DiT on a 32x32x4 latent" + (f" (GPU, {precision})" if cuda else ""), body)


if __name__ == "__main__":
    main(sys.argv[1:])
