"""Tokenizer throughput at 256 px: the ViT-B/16 STELLAR tokenizer against the Stable Diffusion VAE architecture.

    python -m benchmarks.tokenizer_speed [batches=1,16] [rounds=3] [big_rounds=1] [threads=2] [device=cpu|cuda]
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

import sys
from dataclasses import dataclass

import torch
from torch._inductor import config as inductor_config

from benchmarks.common import count_flops, device_setup, machine, median, model_config, parse_args, sd_vae, timed, write_section
from stellar_tok import StellarTokenizer
from stellar_tok.config import tokenizer_kwargs
from stellar_tok.errors import UserError, cli_entry
from stellar_tok.model.vit import Block

OPS = ("encode", "decode", "encode+decode")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


@dataclass
class TokenizerSpeedArgs:
    batches: str = "1,16"  # comma-separated batch sizes
    rounds: int = 3  # alternating timed rounds per batch size
    big_rounds: int = 1  # the rounds of batches above 4 on a CPU
    threads: int = 2  # torch threads
    device: str = "cpu"  # cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    compile: str = "none"  # none | default | reduce-overhead | max-autotune (torch.compile of encode and decode)


class Contenders:
    """Ours and the SD-VAE at random weights, their encode and decode eager and as timed (compiled with compile=MODE),
    and for eager runs the bare ViT blocks of ours (no stem, sparse tokens, L or bottleneck)."""

    def __init__(self, args: TokenizerSpeedArgs):
        self.dev, self.mode = args.device, args.compile
        self.cuda, self.cast = device_setup(args.device, args.precision)
        torch.manual_seed(0)
        self.ours, self.vae = StellarTokenizer(**tokenizer_kwargs(model_config("vit_b16"))).eval().to(self.dev), sd_vae().to(self.dev)
        self.eager = {"ours": (self.ours.encode, self.ours.decode),
                      "vae": (lambda x: self.vae.encode(x).latent_dist.mode(), lambda z: self.vae.decode(z).sample)}
        self.run = self.eager
        if self.mode != "none":
            inductor_config.freezing = True
            kw = {} if self.mode == "default" else {"mode": self.mode}
            self.run = {k: (torch.compile(e, **kw), torch.compile(d, **kw)) for k, (e, d) in self.eager.items()}
        c = self.ours.config
        self.n = (c.image_size // c.patch_size) ** 2
        self.plain = None if self.mode != "none" else (
            torch.nn.Sequential(*[Block(c.width, c.heads, c.mlp_ratio) for _ in range(c.depth)]).eval().to(self.dev),
            torch.nn.Sequential(*[Block(c.decoder_width, c.decoder_heads, c.decoder_mlp_ratio) for _ in range(c.decoder_depth)]).eval().to(self.dev))

    def timed(self, fn) -> float:
        return timed(fn, self.cuda, self.cast)

    def ops(self, x: torch.Tensor, models: dict) -> dict:
        """{(model, operation): a call of it on x}: ours and vae from `models`, plain (encode+decode) when eager."""
        with torch.no_grad():
            lat = {k: e(x) for k, (e, _) in self.eager.items()}
        # CUDA graphs (reduce-overhead) reuse their output memory: each call starts a new step
        step = torch.compiler.cudagraph_mark_step_begin if models is not self.eager and self.mode == "reduce-overhead" else (lambda: None)
        out = {}
        for k, (e, d) in models.items():
            out[(k, "encode")] = lambda e=e: (step(), e(x))
            out[(k, "decode")] = lambda d=d, k=k: (step(), d(lat[k]))
            out[(k, "encode+decode")] = lambda e=e, d=d: (step(), d(e(x)))
        if self.plain is not None:
            c = self.ours.config
            t_enc = torch.randn(len(x), 1 + self.n, c.width, device=self.dev)
            t_dec = torch.randn(len(x), self.n, c.decoder_width, device=self.dev)
            out[("plain", "encode+decode")] = lambda: (self.plain[0](t_enc), self.plain[1](t_dec))
        return out

    def gflops(self) -> dict:
        """Forward GFLOPs per image of every (model, operation), eager, at batch 1."""
        x1 = torch.rand(1, 3, 256, 256, device=self.dev) * 2 - 1
        with torch.no_grad():
            return {k: count_flops(f) / 1e9 for k, f in self.ops(x1, self.eager).items()}

    def times(self, b: int, rounds: int) -> dict:
        """{(model, operation): seconds of each of `rounds` alternating rounds} at batch b, after a warm-up where due."""
        x = torch.rand(b, 3, 256, 256, device=self.dev) * 2 - 1
        f = self.ops(x, self.run)
        times = {k: [] for k in f}
        with torch.no_grad():
            for k in f:  # warm-up (and compilation)
                self.timed(f[k]) if b == 1 or self.cuda or self.mode != "none" else None
            for _ in range(rounds):
                for op in OPS:
                    for model in ("ours", "plain", "vae"):
                        if (model, op) in f:
                            times[(model, op)].append(self.timed(f[(model, op)]))
        return times


def read_args(argv: list[str] | None) -> TokenizerSpeedArgs:
    args = parse_args("python -m benchmarks.tokenizer_speed", __doc__, TokenizerSpeedArgs, argv, "batches=1,16 rounds=3")
    if args.compile not in COMPILE_MODES:
        raise UserError(f"compile={args.compile!r}: use none, default, reduce-overhead or max-autotune")
    return args


def measure(con: Contenders, args: TokenizerSpeedArgs) -> tuple[list[str], list[str], dict]:
    """(table rows, sentences on the bare blocks, GFLOPs) over every batch size."""
    gf = con.gflops()
    rows, plain_rows = [], []
    for b in (int(b) for b in args.batches.split(",")):
        times = con.times(b, args.rounds if b <= 4 or con.cuda else args.big_rounds)
        raw = {}
        for op in OPS:
            o, v = b / median(times[("ours", op)]), b / median(times[("vae", op)])
            raw[op] = (o, v)
            rows.append(f"| {op} | {b} | {gf[('ours', op)]:.1f} | {gf[('vae', op)]:.1f} | {o:.2f} | {v:.3f} | **{o / v:.1f}x** |")
        if con.plain is not None:
            p = b / median(times[("plain", "encode+decode")])
            plain_rows.append(f"{p:.2f} images/s at batch {b} ({p / raw['encode+decode'][1]:.1f}x the SD-VAE's encode+decode; ours "
                              f"{raw['encode+decode'][0] / p:.2f}x the plain blocks' speed)")
        print(rows[-3:], plain_rows[-1:], flush=True)
    return rows, plain_rows, gf


def report_body(con: Contenders, args: TokenizerSpeedArgs, argv: list[str], rows: list[str], plain_rows: list[str], gf: dict) -> str:
    cmd = "python -m benchmarks.tokenizer_speed " + " ".join(argv)
    mode, c, n, rounds = args.compile, con.ours.config, con.n, args.rounds
    compiled = ("" if mode == "none" else f" Both models compiled: `torch.compile(mode={mode!r})` of encode and of decode, "
                "inductor freezing on, compilation in the warm-up.")
    n_ours, n_vae = sum(p.numel() for p in con.ours.parameters()), sum(p.numel() for p in con.vae.parameters())
    body = f"""```bash
{cmd.strip()}
```

{machine()}; 256 px, random weights. Ours: `configs/tokenizer/vit_b16.yaml` ({n_ours / 1e6:.0f} M parameters: ViT-B/16 encoder,
16 tokens x 32 channels + L, 6-block width-512 decoder). SD-VAE: `diffusers` AutoencoderKL, 128/256/512/512, 2 blocks per
level ({n_vae / 1e6:.0f} M). {"On the GPU, " + args.precision + ", synchronised timing, median of " + str(rounds) + " alternating rounds after a warm-up" if con.cuda else
f"Median of {rounds} alternating rounds for batch <= 4, {args.big_rounds} above"}.{compiled}

| operation | batch | ours GFLOPs / image | SD-VAE GFLOPs / image | ours images/s | SD-VAE images/s | ours / SD-VAE |
|---|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n"
    if plain_rows:
        body += (f"\nBare ViT blocks of the same widths and depths in the same rounds ({c.depth} x {c.width} on {1 + n} tokens + "
                 f"{c.decoder_depth} x {c.decoder_width} on {n}: no stem, sparse tokens, L, bottleneck or pixel head; "
                 f"{gf[('plain', 'encode+decode')]:.1f} GFLOPs / image): " + "; ".join(plain_rows) + ".\n")
    return body


@cli_entry
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = read_args(argv)
    torch.set_num_threads(args.threads)
    con = Contenders(args)
    rows, plain_rows, gf = measure(con, args)
    body = report_body(con, args, argv, rows, plain_rows, gf)
    print(body)
    tags = ([f"GPU, {args.precision}"] if con.cuda else []) + ([f"torch.compile {args.compile}"] if args.compile != "none" else [])
    write_section("Tokenizer throughput at 256 px against the SD-VAE architecture" + (f" ({', '.join(tags)})" if tags else ""), body)


if __name__ == "__main__":
    main()
