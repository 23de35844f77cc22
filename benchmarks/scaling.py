"""How the ViT-B/16 tokenizer's cost grows with resolution (128/256/512 px, r = 16) and with r (8/16/32, 256 px).

    python -m benchmarks.scaling [rounds=3] [threads=2]

Random weights, configs/tokenizer/vit_b16.yaml with image_size and num_tokens overridden. Per setting:
encode and encode+decode forward GFLOPs per image (torch.utils.flop_counter), measured encode time per image
(batch 2), and the time of one reconstruction training step per image (batch 2: encode -> decode -> L1 ->
backward; the alignment heads, augmented views and LPIPS of a full training step come on top). Medians of
`rounds`. Writes a table to docs/BENCHMARKS.md and the plot docs/images/scaling.png.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks.common import ROOT, count_flops, machine, median, model_config, parse_args, write_section
from stellar_tok import StellarTokenizer
from stellar_tok.config import tokenizer_kwargs
from stellar_tok.errors import cli_entry


@dataclass
class ScalingArgs:
    rounds: int = 3  # timed rounds per setting (median)
    threads: int = 2  # torch threads


def gflops(fn) -> float:
    return count_flops(fn) / 1e9


def measure(base: dict, size: int, r: int, rounds: int, batch: int = 2) -> dict:
    torch.manual_seed(0)
    tok = StellarTokenizer(**{**base, "image_size": size, "num_tokens": r})
    x = torch.rand(batch, 3, size, size) * 2 - 1
    tok.eval()
    with torch.no_grad():
        enc = gflops(lambda: tok.encode(x[:1]))
        encdec = gflops(lambda: tok.decode(tok.encode(x[:1])))

    def encode():
        with torch.no_grad():
            tok.encode(x)

    def step():
        out = tok(x)
        F.l1_loss(out["recon"], x).backward()
        tok.zero_grad(set_to_none=True)

    tok.train()
    step()  # warm-up
    te, ts = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        encode()
        te.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    return {"size": size, "r": r, "patches": (size // base["patch_size"]) ** 2, "enc_gflops": enc, "encdec_gflops": encdec,
            "enc_s": median(te) / batch, "step_s": median(ts) / batch}


def plot(rows_res, rows_r, path):
    import matplotlib  # heavy: matplotlib, only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib, only for the plot

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, rows, key, label in ((axes[0], rows_res, "size", "resolution (px), r = 16"), (axes[1], rows_r, "r", "r (sparse tokens), 256 px")):
        xs = [row[key] for row in rows]
        ax.plot(xs, [row["enc_s"] * 1e3 for row in rows], "o-", label="encode, ms / image")
        ax.plot(xs, [row["step_s"] * 1e3 for row in rows], "s-", label="recon. training step, ms / image")
        ax.plot(xs, [row["encdec_gflops"] for row in rows], "^--", label="encode+decode GFLOPs / image")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs, [str(v) for v in xs])
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle("ViT-B/16 STELLAR tokenizer cost, CPU", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args("python -m benchmarks.scaling", __doc__, ScalingArgs, argv, "rounds=3 threads=2")
    rounds = args.rounds
    torch.set_num_threads(args.threads)
    base = tokenizer_kwargs(model_config("vit_b16"))
    rows_res = [measure(base, s, 16, rounds) for s in (128, 256, 512)]
    print(rows_res, flush=True)
    rows_r = [measure(base, 256, r, rounds) for r in (8, 16, 32)]
    print(rows_r, flush=True)
    plot(rows_res, rows_r, os.path.join(ROOT, "docs", "images", "scaling.png"))

    def line(row):
        return (f"| {row['size']} | {row['r']} | {row['patches']} | {row['enc_gflops']:.1f} | {row['encdec_gflops']:.1f} | "
                f"{row['enc_s'] * 1e3:.0f} | {row['step_s'] * 1e3:.0f} |")

    cmd = "python -m benchmarks.scaling " + " ".join(argv)
    body = f"""```bash
{cmd.strip()}
```

{machine()}; `configs/tokenizer/vit_b16.yaml` with random weights, batch 2, median of {rounds}. The training step is the
reconstruction part only (encode -> decode -> L1 -> backward). Plot: `docs/images/scaling.png`.

| resolution | r | patches N | encode GFLOPs / image | encode+decode GFLOPs / image | encode ms / image | recon. step ms / image |
|---|---|---|---|---|---|---|
""" + "\n".join(line(row) for row in rows_res + rows_r[:1] + rows_r[2:]) + "\n"
    print(body)
    write_section("Scaling with resolution and r (ViT-B/16 tokenizer)", body)


if __name__ == "__main__":
    main()
