"""Peak memory of `generators.evaluate` on a large samples.npz: flat in the number of samples?

    python -m benchmarks.fid_memory [n=2000,10000] [size=256] [dir=/tmp/fid_memory] [keep=false]

For each n: writes a samples.npz of n random uint8 images (n, size, size, 3) with the sampler's streamed writer
(`generators.sampling.save_npz_streamed`, never whole in memory) and an ADM-style reference (`mu`, `sigma`, 2048-d),
then runs `python -m generators.evaluate samples=... fid.ref=...` in a fresh process with a cheap stand-in for
Inception-v3 (2048-d features of pooled colours: the reading path and the statistics are the real ones, only the
network is not) and reports that process's peak RSS. The files are deleted unless keep=true (50,000 images at
256 px take 9.8 GB of disk). Writes a table to docs/BENCHMARKS.md.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import numpy as np

from benchmarks.common import machine, parse_args, write_section
from generators.sampling import save_npz_streamed
from stellar_tok.errors import cli_entry


@dataclass
class FIDMemoryArgs:
    n: str = "2000,10000"  # comma-separated sample counts
    size: int = 256  # image side, px
    dir: str = "/tmp/fid_memory"  # where the files go
    keep: bool = False  # keep the files (50,000 images at 256 px take 9.8 GB)


# run in the child: the stand-in extractor, then the command generators.evaluate as a program; prints the child's peak RSS (KiB)
CHILD = """
import resource, sys, torch, torch.nn as nn, torch.nn.functional as F
import stellar_tok.evaluation.fid as fid

class StandIn(nn.Module):
    features_list, has_logits, weights_source, weights_file = ["2048"], False, "stand-in", None
    def __init__(self):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(48, 2048, generator=torch.Generator().manual_seed(0)), requires_grad=False)
    def forward(self, x):
        return [F.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1) @ self.proj]

fid.build_inception = lambda weights=None, device="cpu": StandIn()
import runpy
sys.argv = ["generators.evaluate", *sys.argv[1:]]
try:
    runpy.run_module("generators.evaluate", run_name="__main__", alter_sys=True)  # as `python -m generators.evaluate ...`
finally:
    print("PEAK_RSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_samples(path: str, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    chunk = 500
    chunks = (rng.integers(0, 256, (min(chunk, n - a), size, size, 3), dtype=np.uint8) for a in range(0, n, chunk))
    save_npz_streamed(path, (n, size, size, 3), chunks, np.zeros(n, dtype=np.int64))


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = parse_args("python -m benchmarks.fid_memory", __doc__, FIDMemoryArgs, argv, "n=2000,10000 size=256")
    size, root = args.size, args.dir
    os.makedirs(root, exist_ok=True)
    ref = os.path.join(root, "ref.npz")
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    rows = []
    for n in (int(x) for x in args.n.split(",")):
        samples = os.path.join(root, f"samples_{n}.npz")
        write_samples(samples, n, size)
        gb = os.path.getsize(samples) / 1e9
        cmd = [sys.executable, "-c", CHILD, f"samples={samples}", f"fid.ref={ref}", f"out={os.path.join(root, f'eval_{n}')}"]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        if res.returncode:
            sys.exit(f"generators.evaluate failed on n={n}:\n{res.stderr[-2000:]}")
        peak = int(res.stdout.rsplit("PEAK_RSS_KIB", 1)[1].split()[0]) / 2**20
        rows.append(f"| {n:,} | {gb:.2f} | {peak:.2f} |")
        print(rows[-1], flush=True)
        if not args.keep:
            os.remove(samples)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    body = (f"`python -m benchmarks.fid_memory n={args.n} size={size}` ({machine()}): peak RSS of `generators.evaluate` "
            f"reading samples.npz ({size} px) against an ADM-style `fid.ref`, with a stand-in for Inception-v3.\n\n"
            "| samples | file (GB) | peak RSS (GiB) |\n|---|---|---|\n" + "\n".join(rows))
    write_section("FID memory by number of samples", body)
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
