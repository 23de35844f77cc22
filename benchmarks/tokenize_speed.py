"""Tokenize step against the tokenizer's own batched `encode` in a loop, side by side.

    python benchmarks/tokenize_speed.py [tokenizer=DIR] [images=4096] [batch_size=256] [rounds=3] [threads=2]

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

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, median, parse_kv, write_section  # noqa: E402


def main(argv):
    from omegaconf import OmegaConf

    from stellar_tok import StellarTokenizer
    from stellar_tok.config import load_tokenizer_command_config, tokenizer_kwargs
    from stellar_tok.data import build_dataset
    from stellar_tok.latents.writer import TokenizeConfig, tokenize

    kv = parse_kv(argv, {"tokenizer": "", "images": "4096", "batch_size": "256", "rounds": "3", "threads": "2"}, __doc__,
                  "python benchmarks/tokenize_speed.py")
    torch.set_num_threads(int(kv["threads"]))
    n, bs, rounds = int(kv["images"]), int(kv["batch_size"]), int(kv["rounds"])
    if kv["tokenizer"]:
        tok = StellarTokenizer.from_pretrained(kv["tokenizer"]).eval()
    else:
        model = OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "configs", "tokenizer", "tiny.yaml")).model
        torch.manual_seed(0)
        tok = StellarTokenizer(**tokenizer_kwargs(model)).eval()
    res = tok.config.image_size
    ds = build_dataset({"name": "shapes", "resolution": res, "train_size": n, "val_size": 8}, "train")
    images = torch.from_numpy(ds.images.copy()).permute(0, 3, 1, 2)

    def encode_loop():
        t = time.perf_counter()
        out = []
        for i in range(0, n, bs):
            lat = tok.encode(images[i : i + bs].float() / 127.5 - 1)
            out.append((lat.z, lat.log_loc))
        return n / (time.perf_counter() - t)

    def tokenize_run(tok_dir: str):
        with tempfile.TemporaryDirectory() as d:
            args = [f"tokenizer={tok_dir}", f"out={d}/lat", "data.name=shapes", f"data.resolution={res}", f"data.train_size={n}",
                    f"batch_size={bs}", "shard_size=4096", "progress=false"]
            t = time.perf_counter()
            tokenize(load_tokenizer_command_config(args, TokenizeConfig))  # what the command runs
            return n / (time.perf_counter() - t)

    encode_loop()  # warm-up
    loop, job = [], []
    with tempfile.TemporaryDirectory() as saved:
        tok_dir = kv["tokenizer"]
        if not tok_dir:  # the random tokenizer, as a folder the command can read
            tok_dir = os.path.join(saved, "tokenizer")
            tok.save_pretrained(tok_dir)
        for _ in range(rounds):
            loop.append(encode_loop())
            job.append(tokenize_run(tok_dir))
    cmd = "python benchmarks/tokenize_speed.py " + " ".join(argv)
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
    main(sys.argv[1:])
