"""Short real training runs on the embedded `shapes` set: the loss falls, checkpoints resume, exports load."""
import json
import os

import pytest
import torch

from stellar_tok import StellarTokenizer
from stellar_tok.training.checkpoint import find_checkpoints
from stellar_tok.train import main
from conftest import launch_two_processes

SMALL = [
    "config=configs/tokenizer/tiny.yaml",
    "model.width=64", "model.depth=2", "model.heads=2", "model.decoder_width=64", "model.decoder_depth=1", "model.decoder_heads=2",
    "data.train_size=1024", "data.val_size=128",
    "optim.batch_size=32", "optim.warmup_steps=5", "train.log_every=5", "train.progress=false", "train.stats_batches=2",
]


def _metrics(out):
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]


def test_training_loss_falls_and_exports(tmp_path):
    out = str(tmp_path / "run")
    summary = main(SMALL + ["train.steps=40", "optim.lr=2e-3", f"train.output_dir={out}", "train.image_every=20", "train.ckpt_every=20"])
    assert summary["step"] == 40
    m = _metrics(out)
    first, last = m[0], m[-1]
    assert last["pixel"] < 0.8 * first["pixel"], (first, last)
    assert last["align"] < first["align"], (first, last)
    # outputs: checkpoints, grid PNGs, TensorBoard, export with latent statistics
    assert [os.path.basename(c) for c in find_checkpoints(os.path.join(out, "checkpoints"))] == ["step-0000020", "step-0000040"]
    assert os.path.exists(os.path.join(out, "images", "step-0000040.png"))
    assert any(f.startswith("events") for _, _, fs in os.walk(os.path.join(out, "logs")) for f in fs)
    tok = StellarTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    assert not torch.allclose(tok.latent_token_std, torch.ones_like(tok.latent_token_std))
    record = json.load(open(os.path.join(out, "tokenizer", "training.json")))
    assert record["steps"] == 40 and record["cls_trained"] is False  # tiny.yaml: contrastive on the mean of S, no loss on CLS
    lat = tok.encode(torch.zeros(2, 3, 32, 32), normalize=True)
    assert lat.normalized and tok.decode(lat).shape == (2, 3, 32, 32)


def test_decoder_from_trains_a_fresh_decoder_on_the_frozen_encoder(tmp_path, capsys):
    """train.decoder_from=DIR (the paper's reconstruction protocol): the latent stays the source's, the decoder is new and learns."""
    src, out = str(tmp_path / "src"), str(tmp_path / "dec")
    main(SMALL + ["train.steps=4", "recon.enabled=false", f"train.output_dir={src}", "train.image_every=1000"])  # alignment only
    args = SMALL + [f"train.decoder_from={src}/tokenizer", "model.decoder_depth=2", "optim.lr=2e-3", "train.image_every=1000"]
    main(args + ["train.steps=30", f"train.output_dir={out}"])
    a = StellarTokenizer.from_pretrained(os.path.join(src, "tokenizer")).eval()
    b = StellarTokenizer.from_pretrained(os.path.join(out, "tokenizer")).eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    la, lb = a.encode(x), b.encode(x)
    assert torch.equal(la.z, lb.z) and torch.equal(la.log_loc, lb.log_loc)  # the latent is untouched
    assert b.config.decoder_depth == 2 and a.config.decoder_depth == 1  # the decoder's shape is the run's
    m = _metrics(out)
    assert m[-1]["pixel"] < 0.8 * m[0]["pixel"] and m[-1]["align"] == 0.0, (m[0], m[-1])
    cfg = open(os.path.join(out, "config.yaml")).read()
    assert "decoder_from" in cfg and "enabled: false" in cfg
    capsys.readouterr()  # what the runs above printed (their config warnings among it)
    for bad in ([f"train.decoder_from={tmp_path / 'nowhere'}"], [f"train.decoder_from={src}/tokenizer", "recon.enabled=false"]):
        with pytest.raises(SystemExit):
            main(SMALL + bad + ["train.steps=1", f"train.output_dir={tmp_path / 'x'}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: config key") and ("decoder_from" in err[0] or "recon.enabled" in err[0]), err
    assert not os.path.exists(tmp_path / "x")


def test_resume_continues_step_count(tmp_path):
    out = str(tmp_path / "run")
    args = SMALL + ["data.train_size=256", f"train.output_dir={out}", "train.ckpt_every=10", "train.image_every=1000"]
    main(args + ["train.steps=10"])
    s = main(args + ["train.steps=20", "train.resume=auto"])
    assert s["step"] == 20
    steps = [r["step"] for r in _metrics(out)]
    assert steps == [5, 10, 15, 20]  # the second run started at step 10, not 0


def test_resume_is_exact(tmp_path):
    """An interrupted run, resumed, ends with the same weights as an uninterrupted one."""
    common = SMALL + ["data.train_size=256", "train.ckpt_every=6", "train.image_every=1000", "optim.warmup_steps=2"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    main(common + ["train.steps=12", f"train.output_dir={a}"])
    main(common + ["train.steps=12", "train.stop_after=6", f"train.output_dir={b}"])
    main(common + ["train.steps=12", f"train.output_dir={b}", "train.resume=auto"])
    ta = StellarTokenizer.from_pretrained(os.path.join(a, "tokenizer"))
    tb = StellarTokenizer.from_pretrained(os.path.join(b, "tokenizer"))
    for (k, x), (_, y) in zip(ta.state_dict().items(), tb.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=k)


def test_two_processes_with_accelerate(tmp_path):
    """accelerate launch with two gloo processes on CPU produces the same kind of checkpoint."""
    out = str(tmp_path / "ddp")
    res = launch_two_processes("stellar_tok.train", [*SMALL, "data.train_size=256", "optim.batch_size=16", "train.steps=6",
                                                     "train.ckpt_every=1000", "train.image_every=1000", f"train.output_dir={out}"], 29533)
    # gloo sometimes aborts at interpreter exit after all work is done; the outputs decide
    ckpts = find_checkpoints(os.path.join(out, "checkpoints"))
    assert ckpts and os.path.basename(ckpts[-1]) == "step-0000006", res.stderr[-3000:]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["step"] == 6 and summary["images_seen"] == 6 * 16 * 2
    assert os.path.exists(os.path.join(ckpts[-1], "random_states_1.pkl"))  # one RNG state per process
    StellarTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    # the first line says what runs: two gloo processes, and the global batch
    assert "running: 2 processes (multi_cpu, gloo), device cpu, precision no, batch 16 per process = 32 global" in res.stdout


def test_epochs_set_the_run_length(tmp_path):
    """train.epochs counts passes over the train split at the global batch: 0.25 x 1024 images / 32 = 8 steps."""
    summary = main(SMALL + ["train.epochs=0.25", "train.steps=1", f"train.output_dir={tmp_path / 'run'}"])
    assert summary["step"] == 8


def test_gan_step_sees_only_the_hinge_gradient(tmp_path, monkeypatch):
    """In the trainer, when the discriminator's loss is computed the discriminator holds no gradient from the
    generator's adversarial term (which would otherwise be added to its hinge gradient and stepped on)."""
    from stellar_tok.losses.reconstruction import ReconstructionLoss

    seen = []
    real = ReconstructionLoss.discriminator_loss

    def spy(self, disc, recon, target):
        seen.append([p.grad is None or not p.grad.any() for p in disc.parameters()])
        return real(self, disc, recon, target)

    monkeypatch.setattr(ReconstructionLoss, "discriminator_loss", spy)
    summary = main(SMALL + ["train.steps=3", "recon.gan_weight=0.5", "recon.gan_start=1", "recon.disc_channels=8",
                            "recon.disc_layers=2", f"train.output_dir={tmp_path / 'run'}"])
    assert summary["step"] == 3 and "gan_d" in summary["last"]
    assert len(seen) == 2 and all(all(step) for step in seen)


def test_gan_start_as_a_fraction_is_resolved_on_the_first_line(tmp_path, capsys, monkeypatch):
    """recon.gan_start=0.5 of a 4-step run: the first line says step 2 and the discriminator trains at steps 2 and 3
    only. With train.epochs the run's length is known at start: a step it never reaches stops it there, in one line."""
    from stellar_tok.losses.reconstruction import ReconstructionLoss

    calls = []
    real = ReconstructionLoss.discriminator_loss
    monkeypatch.setattr(ReconstructionLoss, "discriminator_loss", lambda self, *a: calls.append(1) or real(self, *a))
    gan = ["recon.gan_weight=0.5", "recon.disc_channels=8", "recon.disc_layers=2"]
    main(SMALL + gan + ["train.steps=4", "recon.gan_start=0.5", f"train.output_dir={tmp_path / 'run'}"])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("running: ") and first.endswith("4 steps; GAN from step 2 (recon.gan_start=0.5 of 4 steps)"), first
    assert len(calls) == 2
    with pytest.raises(SystemExit):  # 0.25 epochs of 1,024 images at batch 32: 8 steps, the GAN at step 8 never runs
        main(SMALL + gan + ["train.epochs=0.25", "recon.gan_start=8", f"train.output_dir={tmp_path / 'x'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: recon.gan_start=8 starts the GAN at step 8, which a run of 8 steps never reaches: give a fraction "
                       "of the run in [0, 1) (e.g. 0.5) or an earlier step, or recon.gan_weight=0"), err
    assert not os.path.exists(tmp_path / "x" / "checkpoints")


def test_a_step_leaves_its_scalars_on_the_device_and_log_steps_read_them(tmp_path, monkeypatch):
    """The step returns its losses and diagnostics as 0-d tensors (reading one would make the host wait for the GPU
    at every step); the engine reads them at log steps (one transfer) and writes exactly their values."""
    from stellar_tok.training.tokenizer_trainer import TokenizerStep

    returned = []
    real = TokenizerStep.__call__

    def spy(self, batch):
        taken = real(self, batch)
        returned.append(dict(taken[0]))
        return taken

    monkeypatch.setattr(TokenizerStep, "__call__", spy)
    out = tmp_path / "run"
    main(SMALL + ["train.steps=2", "train.log_every=2", "recon.gan_weight=0.5", "recon.gan_start=1", "recon.disc_channels=8",
                  "recon.disc_layers=2", f"train.output_dir={out}"])
    assert len(returned) == 2
    for key in ("loss", "align", "pixel", "psnr", "lpips", "token_self", "loc_max", "grad_norm", "gan_g", "gan_d"):
        value = returned[-1][key]
        assert torch.is_tensor(value) and value.dim() == 0, (key, value)
    logged = _metrics(str(out))[-1]
    assert logged["step"] == 2
    for key, value in returned[-1].items():
        assert logged[key] == pytest.approx(float(value), abs=1e-6), key


def test_latent_stats_at_the_model_size(tmp_path):
    """The exported statistics are those of held-out images at model.image_size, though training loads 48 px images."""
    from stellar_tok.data import build_loader
    from stellar_tok.training.tokenizer_weights import compute_latent_stats

    out = str(tmp_path / "run")
    main(SMALL + ["data.resolution=48", "data.train_size=64", "train.steps=2", "train.image_every=1000", f"train.output_dir={out}"])
    tok = StellarTokenizer.from_pretrained(os.path.join(out, "tokenizer")).eval()
    val = build_loader({"name": "shapes", "resolution": 32, "val_size": 128, "seed": 0}, 32, "val")
    stats = compute_latent_stats(tok, val, "cpu", 2)  # SMALL: train.stats_batches=2, optim.batch_size=32
    for name, value in (("z_mean", tok.latent_token_mean), ("z_std", tok.latent_token_std), ("log_loc_mean", tok.latent_loc_mean)):
        torch.testing.assert_close(value, getattr(stats, name), msg=name)


def test_latent_stats_on_val_path_images(tmp_path):
    """data.val_path: the statistics come from its images (centre crops at model.image_size); without a held-out
    split the run warns once, in one line, that they come from training images."""
    import warnings

    import numpy as np
    from PIL import Image

    from stellar_tok.config import load_config
    from stellar_tok.data import build_loader
    from stellar_tok.errors import UserError
    from stellar_tok.training.tokenizer_weights import compute_latent_stats

    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 16)):
        os.makedirs(tmp_path / split)
        for k in range(n):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / split / f"{k}.png")
    args = SMALL + ["data.name=folder", f"data.path={tmp_path / 'train'}", "data.resolution=40", "optim.batch_size=8",
                    "train.steps=1", "train.image_every=1000"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(args + [f"data.val_path={tmp_path / 'val'}", f"train.output_dir={tmp_path / 'a'}"])
    assert not [w for w in caught if "training images" in str(w.message)]
    tok = StellarTokenizer.from_pretrained(str(tmp_path / "a" / "tokenizer")).eval()
    val = build_loader({"name": "folder", "path": str(tmp_path / "val"), "resolution": 32}, 8, "val")
    stats = compute_latent_stats(tok, val, "cpu", 2)
    torch.testing.assert_close(tok.latent_token_mean, stats.z_mean)
    torch.testing.assert_close(tok.latent_token_std, stats.z_std)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(args + [f"train.output_dir={tmp_path / 'b'}"])  # a flat folder without val/: the train images
    lines = [str(w.message) for w in caught if "training images" in str(w.message)]
    assert len(lines) == 1 and "\n" not in lines[0] and "data.val_path" in lines[0], lines
    with pytest.raises(UserError, match="data.val_path"):
        load_config(["data.name=shapes", "data.val_path=/somewhere"])


def test_progress_follows_the_time_budget_not_the_step_count():
    """train.steps=100000 train.max_minutes=4: the bar counts percent of the budget, so its ETA is the budget's."""
    from stellar_tok.training.budget import Budget, RunProgress
    from stellar_tok.training.checkpoint import TrainState

    state = TrainState()
    bar = RunProgress(Budget(state, max_minutes=4), 100000, 0, True, "train")
    state.wall_s = 120.0  # half the budget spent after 10 of 100,000 steps
    bar.update(10)
    assert bar.bar.total == 100 and abs(bar.bar.n - 50) < 0.2
    bar.close()
    plain = RunProgress(Budget(TrainState()), 200, 5, True, "train")  # no budget: steps
    plain.update(6)
    assert plain.bar.total == 200 and plain.bar.n == 6
    plain.close()
