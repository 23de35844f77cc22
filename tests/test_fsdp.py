"""FSDP2 on the CPU: `accelerate launch --config_file configs/accelerate/fsdp_h14.yaml` with two gloo processes trains
the tiny tokenizer, writes sharded checkpoints, exports a whole tokenizer and resumes (accelerate's own FSDP2 path:
`stellar_tok.training.engine.fsdp_on_cpu` switches it on where accelerate would fall back to DDP without GPUs)."""
import json
import os

import torch

from stellar_tok import StellarTokenizer
from stellar_tok.training.checkpoint import find_checkpoints, verify_checkpoint
from conftest import launch_two_processes

FSDP_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "accelerate", "fsdp_h14.yaml")
ARGS = [
    "config=configs/tokenizer/tiny.yaml",
    "model.width=64", "model.depth=2", "model.heads=2", "model.decoder_width=64", "model.decoder_depth=1", "model.decoder_heads=2",
    "data.train_size=64", "data.val_size=32", "optim.batch_size=8", "optim.warmup_steps=1",
    "train.log_every=2", "train.progress=false", "train.stats_batches=2", "train.ckpt_every=2", "train.image_every=2",
]


def _gathered(ckpt: str, tmp_path) -> dict:
    """The model weights of an FSDP checkpoint (sharded, torch.distributed.checkpoint), gathered into one state dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dst = tmp_path / f"{os.path.basename(ckpt)}.pt"
    dcp_to_torch_save(os.path.join(ckpt, "pytorch_model_fsdp_0"), str(dst))
    return torch.load(dst, weights_only=True)["model"]


def _check_export(out: str, step: int, tmp_path, log: str) -> StellarTokenizer:
    """The export loads, and holds exactly the tokenizer weights of the final (sharded) checkpoint."""
    ckpts = find_checkpoints(os.path.join(out, "checkpoints"))
    assert ckpts and os.path.basename(ckpts[-1]) == f"step-{step:07d}", log
    final = ckpts[-1]
    assert verify_checkpoint(final) is None  # the SHA-256 manifest covers the shard files
    assert os.path.isdir(os.path.join(final, "pytorch_model_fsdp_0")), os.listdir(final)  # FSDP, not a DDP fallback
    assert os.path.exists(os.path.join(final, "random_states_1.pkl"))
    tok = StellarTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    full = _gathered(final, tmp_path)
    weights = {k: v for k, v in tok.state_dict().items() if not k.startswith("latent_")}
    assert weights.keys() == {k[len("tokenizer."):] for k in full if k.startswith("tokenizer.") and "latent_" not in k}
    for k, v in weights.items():
        assert torch.equal(v, full["tokenizer." + k]), k
    assert not torch.allclose(tok.latent_token_std, torch.ones_like(tok.latent_token_std))  # statistics were computed
    return tok


def test_fsdp2_trains_exports_and_resumes(tmp_path):
    out = str(tmp_path / "run")
    args = [*ARGS, f"train.output_dir={out}"]
    first = launch_two_processes("stellar_tok.train", [*args, "train.steps=2"], 29541, config_file=FSDP_CONFIG, timeout=150)
    tok = _check_export(out, 2, tmp_path, first.stdout[-2000:] + first.stderr[-3000:])

    # the export is the unsharded tokenizer with those weights: same statistics from the same held-out images
    from omegaconf import OmegaConf

    from stellar_tok.config import load_config
    from stellar_tok.data import build_loader
    from stellar_tok.training.tokenizer_weights import compute_latent_stats

    cfg = load_config(ARGS)
    loader = build_loader(OmegaConf.merge(cfg.data, {"resolution": cfg.model.image_size}), cfg.optim.batch_size, "val")
    stats = compute_latent_stats(tok.eval(), loader, "cpu", cfg.train.stats_batches)
    torch.testing.assert_close(tok.latent_token_mean, stats.z_mean)
    torch.testing.assert_close(tok.latent_token_std, stats.z_std)

    second = launch_two_processes("stellar_tok.train", [*args, "train.steps=4", "train.resume=auto"], 29542,
                                  config_file=FSDP_CONFIG, timeout=150)
    log = second.stdout[-2000:] + second.stderr[-3000:]
    assert f"resumed from {out}/checkpoints/step-0000002 at step 2" in second.stdout, log
    _check_export(out, 4, tmp_path, log)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["step"] == 4 and summary["images_seen"] == 4 * 8 * 2
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))] == [2, 4]  # resumed at 2, not 0
