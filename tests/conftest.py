import os
import subprocess
import sys

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


TINY_MODEL = dict(image_size=32, patch_size=4, width=64, depth=2, heads=2, num_tokens=16, latent_channels=8,
                  decoder_width=64, decoder_depth=1, decoder_heads=2)
# the clustering heads that go with it (align.* keys)
TINY_ALIGN = dict(head_hidden=32, head_bottleneck=16, token_prototypes=16, cls_prototypes=8)


def make_tiny_tokenizer(path=None):
    """The tests' tokenizer: TINY_MODEL, seed 0, eval mode; also saved to `path` when given."""
    from stellar_tok import StellarTokenizer

    torch.manual_seed(0)
    tok = StellarTokenizer(**TINY_MODEL).eval()
    if path is not None:
        tok.save_pretrained(str(path))
    return tok


def tiny_align_config(**overrides):
    """AlignConfig with the tiny heads of TINY_ALIGN, and `overrides`."""
    from omegaconf import OmegaConf

    from stellar_tok.config import AlignConfig

    return OmegaConf.merge(OmegaConf.structured(AlignConfig), {**TINY_ALIGN, **overrides})


def data_cfg(**kw):
    """A DataConfig with the given fields (the rest at their defaults)."""
    from omegaconf import OmegaConf

    from stellar_tok.config import DataConfig

    return OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.create(kw))


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def tokenizer_dir(tmp_path) -> str:
    """make_tiny_tokenizer() saved in this test's tmp_path/tokenizer."""
    make_tiny_tokenizer(tmp_path / "tokenizer")
    return str(tmp_path / "tokenizer")


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    return torch.rand(4, 3, 32, 32, generator=g) * 2 - 1


def launch_two_processes(module: str, args: list, port: int, config_file=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`accelerate launch` of `python -m module args` with two gloo processes on the CPU (one thread each);
    `config_file`: an accelerate config (e.g. FSDP) instead of `--multi_gpu`.

    gloo sometimes aborts at interpreter exit after all work is done: callers judge the outputs, not the exit code."""
    return subprocess.run(**two_process_launch(module, args, port, config_file), capture_output=True, text=True, timeout=timeout)


def two_process_launch(module: str, args: list, port: int, config_file=None) -> dict:
    """The `args` and `env` of `launch_two_processes`, for `subprocess.run` or `subprocess.Popen`."""
    mode = ["--config_file", str(config_file)] if config_file else ["--multi_gpu"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m", module, *map(str, args)]
    # unbuffered: what a process printed survives an abort at exit
    return {"args": cmd, "env": {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}}


def tokenize_shapes(root, n: int, *extra: str):
    """A random tiny tokenizer saved at root/tok and the latents of n shapes at root/lat (more tokenize keys in `extra`)."""
    from stellar_tok.config import load_config
    from stellar_tok.latents.writer import TokenizeConfig, tokenize

    tok = make_tiny_tokenizer(root / "tok")
    tokenize(load_config([f"tokenizer={root / 'tok'}", f"out={root / 'lat'}", "data.name=shapes", f"data.train_size={n}",
                          "progress=false", *extra], schema=TokenizeConfig), tokenizer=tok)
    return tok
