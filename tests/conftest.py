import os
import subprocess
import sys

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


TINY_MODEL = dict(image_size=32, patch_size=4, width=64, depth=2, heads=2, num_tokens=16, latent_channels=8,
                  decoder_width=64, decoder_depth=1, decoder_heads=2)


@pytest.fixture
def tiny_tokenizer():
    from stellar_tok import StellarTokenizer

    torch.manual_seed(0)
    return StellarTokenizer(**TINY_MODEL).eval()


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    return torch.rand(4, 3, 32, 32, generator=g) * 2 - 1


def launch_two_processes(module: str, args: list, port: int, config_file=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`accelerate launch` of `python -m module args` with two gloo processes on the CPU (one thread each);
    `config_file`: an accelerate config (e.g. FSDP) instead of `--multi_gpu`.

    gloo sometimes aborts at interpreter exit after all work is done: callers judge the outputs, not the exit code."""
    mode = ["--config_file", str(config_file)] if config_file else ["--multi_gpu"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m", module, *map(str, args)]
    # unbuffered: what a process printed survives an abort at exit
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def tokenize_shapes(root, n: int, *extra: str):
    """A random tiny tokenizer saved at root/tok and the latents of n shapes at root/lat (more tokenize keys in `extra`)."""
    from stellar_tok import StellarTokenizer
    from stellar_tok.config import load_config
    from stellar_tok.tokenize import TokenizeConfig, tokenize

    torch.manual_seed(0)
    tok = StellarTokenizer(**TINY_MODEL).eval()
    tok.save_pretrained(str(root / "tok"))
    tokenize(load_config([f"tokenizer={root / 'tok'}", f"out={root / 'lat'}", "data.name=shapes", f"data.train_size={n}",
                          "progress=false", *extra], schema=TokenizeConfig), tokenizer=tok)
    return tok
