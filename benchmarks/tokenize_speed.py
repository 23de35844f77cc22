"""Tokenize step against the tokenizer's own batched `encode` in a loop, side by side.

    python -m benchmarks.tokenize_speed [tokenizer=DIR] [images=4096] [batch_size=256] [rounds=3] [threads=2]

Both read the same in-memory `shapes` images (uint8) and produce latents for every one: the loop calls
`tok.encode` per batch and keeps the result in memory; the tokenize job (`stellar_tok.latents.writer.tokenize` on the
command's configuration, as `python -m stellar_tok.tokenize` runs it: it also loads the tokenizer folder) also
casts to float16, accumulates statistics and writes safetensors shards. Runs alternate; the table reports medians.
Cost does not depend on the weights, so without `tokenizer=` a random tiny tokenizer is used (saved to a
temporary folder for the command).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import torch

from benchmarks.common import machine, median, model_config, parse_args, write_section
from stellar_tok import StellarTokenizer
from stellar_tok.config import load_tokenizer_command_config, tokenizer_kwargs
from stellar_tok.data import build_dataset
from stellar_tok.errors import cli_entry
from stellar_tok.latents.writer import TokenizeConfig, tokenize


@dataclass
class TokenizeSpeedArgs:
    tokenizer: Optional[str] = None  # an exported tokenizer folder; none: a random tiny tokenizer
    images: int = 4096  # `shapes` images tokenized per run
    batch_size: int = 256
    rounds: int = 3  # alternating runs of each
    threads: int = 2  # torch threads


def encode_loop(tok: StellarTokenizer, images: torch.Tensor, bs: int) -> float:
    """Images/s of `tok.encode` over `images` (uint8) in batches of bs, the latents kept in memory."""
    t = time.perf_counter()
    out = []
    for i in range(0, len(images), bs):
        lat = tok.encode(images[i : i + bs].float() / 127.5 - 1)
        out.append((lat.z, lat.log_loc))
    return len(images) / (time.perf_counter() - t)


def tokenize_run(tok_dir: str, n: int, res: int, bs: int) -> float:
    """Images/s of the tokenize job over n `shapes` images at res px, as the command runs it."""
    with tempfile.TemporaryDirectory() as d:
        args = [f"tokenizer={tok_dir}", f"out={d}/lat", "data.name=shapes", f"data.resolution={res}", f"data.train_size={n}",
                f"batch_size={bs}", "shard_size=4096", "progress=false"]
        t = time.perf_counter()
        tokenize(load_tokenizer_command_config(args, TokenizeConfig))  # what the command runs
        return n / (time.perf_counter() - t)


@cli_entry
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args("python -m benchmarks.tokenize_speed", __doc__, TokenizeSpeedArgs, argv, "images=4096 threads=2")
    torch.set_num_threads(args.threads)
    n, bs, rounds = args.images, args.batch_size, args.rounds
    if args.tokenizer:
        tok = StellarTokenizer.from_pretrained(args.tokenizer).eval()
    else:
        torch.manual_seed(0)
        tok = StellarTokenizer(**tokenizer_kwargs(model_config("tiny"))).eval()
    res = tok.config.image_size
    ds = build_dataset({"name": "shapes", "resolution": res, "train_size": n, "val_size": 8}, "train")
    images = torch.from_numpy(ds.images.copy()).permute(0, 3, 1, 2)
    encode_loop(tok, images, bs)  # warm-up
    loop, job = [], []
    with tempfile.TemporaryDirectory() as saved:
        tok_dir = args.tokenizer
        if not tok_dir:  # the random tokenizer, as a folder the command can read
            tok_dir = os.path.join(saved, "tokenizer")
            tok.save_pretrained(tok_dir)
        for _ in range(rounds):
            loop.append(encode_loop(tok, images, bs))
            job.append(tokenize_run(tok_dir, n, res, bs))
    cmd = "python -m benchmarks.tokenize_speed " + " ".join(argv)
    body = f"""```bash
{cmd.strip()}
```

{machine()}; {n} `shapes` images at {res} px, batch {bs}, tokenizer width {tok.config.width} depth {tok.config.depth}, {rounds} alternating rounds.

| | images/s (median) | runs |
|---|---|---|
| `tok.encode` in a loop (latents kept in memory) | {median(loop):.0f} | {', '.join(f'{x:.0f}' for x in loop)} |
| `stellar_tok.tokenize` (loads the tokenizer folder; float16 shards + stats on disk) | {median(job):.0f} | {', '.join(f'{x:.0f}' for x in job)} |
| ratio tokenize / loop | {median(job) / median(loop):.2f} | |
"""
    print(body)
    write_section("Tokenize step against an encode loop", body)


if __name__ == "__main__":
    main()
