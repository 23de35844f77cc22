"""Sampling knobs (precision, scheduler, timestep shift, per-sample seeds, PNGs), the generator's EMA/AdamW settings,
and the tokenizer check that follows the latent rather than the decoder."""
import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, tokenize_shapes

from generators import LatentDiT
from stellar_tok import StellarTokenizer
from stellar_tok.model.latent import LatentStats

R, C, G = 16, 8, 8  # the tests' tokenizer: 16 tokens x 8 channels, 8x8 patch grid


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A random tiny tokenizer and a random (untrained, every branch open) generator over its latent, both exported."""
    root = tmp_path_factory.mktemp("sampling")
    torch.manual_seed(0)
    StellarTokenizer(**TINY_MODEL).eval().save_pretrained(str(root / "tok"))
    torch.manual_seed(0)
    m = LatentDiT(num_tokens=R, token_channels=C, grid=G, loc_patch=2, width=32, depth=1, heads=2, num_classes=4,
                  class_names=["a", "b", "c", "d"])
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.set_latent_stats(LatentStats(torch.rand(C) - 0.5, torch.rand(C) + 0.5, torch.tensor(-3.0), torch.tensor(2.0)))
    m.save_pretrained(str(root / "gen"))
    return root


def _sample(root, out, *extra):
    from generators.sample import main as sample_main

    sample_main([f"generator={root / 'gen'}", f"tokenizer={root / 'tok'}", "steps=2", "cfg=2", "progress=false", f"out={root / out}", *extra])
    return np.load(root / out / "samples.npz")["arr_0"], json.load(open(root / out / "summary.json"))


# --- item 6: seeds, PNGs, precision, scheduler and shift -----------------------------------------------------------

def test_two_seeds_share_no_sample_and_noise_depends_only_on_seed_and_index(folders):
    a, _ = _sample(folders, "seed0", "classes=a", "n=3", "seed=0")
    b, _ = _sample(folders, "seed1", "classes=a", "n=3", "seed=1")
    assert not any(np.array_equal(x, y) for x in a for y in b)  # seed + i gave seed 1's sample 0 = seed 0's sample 1
    from generators.sampling import sample_noise

    dim = R * C + G * G * R
    full = sample_noise(0, range(6), dim)
    torch.testing.assert_close(sample_noise(0, [4, 1], dim), full[[4, 1]], rtol=0, atol=0)  # any order, any batch
    assert not torch.equal(sample_noise(1, [0], dim)[0], full[1]) and full.dtype == torch.float32


def test_png_auto_skips_large_sets_and_precision_is_fp32_on_the_cpu(folders, monkeypatch):
    import generators.sample as gs
    import generators.sampling as sampling

    monkeypatch.setattr(sampling, "PNG_AUTO_MAX", 4, raising=False)  # stands in for 1000: a 6-image set is "large"
    _, s = _sample(folders, "auto", "classes=a,b", "n=3")
    assert not os.path.exists(folders / "auto" / "images") and os.path.exists(folders / "auto" / "grid.png")
    assert s["png"] is False and s["mixed_precision"] == "no"  # auto on the CPU: fp32
    _sample(folders, "forced", "classes=a,b", "n=3", "png=true")
    assert len(os.listdir(folders / "forced" / "images")) == 6
    from generators.flow import autocast_dtype

    assert gs.SampleConfig().mixed_precision == "auto" and gs.SampleConfig().png == "auto"
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16 and autocast_dtype("auto", "cpu") is None
    assert autocast_dtype("no", "cuda") is None and autocast_dtype("fp16", "cuda") is torch.float16


class _Linear(torch.nn.Module):
    """A stand-in generator whose velocity is v = x (dx/dt = x: x(0) = x(1) / e exactly); records every t it sees."""

    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"num_tokens": R, "token_channels": C, "grid": G})()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward_with_cfg(self, tok, loc, t, y, scale):
        self.seen.append(float(t[0]))
        return tok, loc


def test_heun_and_timestep_shift(folders):
    from generators.flow import flatten_latent, make_scheduler, sample_latents

    y = torch.zeros(2, dtype=torch.long)
    x1 = torch.randn(2, R * C + G * G * R, generator=torch.Generator().manual_seed(0))
    err, calls = {}, {}
    for kind in ("euler", "heun"):
        m = _Linear()
        out = flatten_latent(*sample_latents(m, y, steps=8, noise=x1.clone(), scheduler=make_scheduler(kind)))
        err[kind], calls[kind] = float((out - x1 / math.e).abs().max() / (x1 / math.e).abs().max()), len(m.seen)
    assert calls == {"euler": 8, "heun": 15} and err["heun"] < err["euler"] / 10, err
    # shift: t = s u / (1 + (s - 1) u) of an evenly spaced grid u from 1; s > 1 puts the steps nearer the noise (t = 1)
    m1, m3 = _Linear(), _Linear()
    sample_latents(m1, y, steps=8, noise=x1.clone(), scheduler=make_scheduler("euler", 1.0))
    sample_latents(m3, y, steps=8, noise=x1.clone(), scheduler=make_scheduler("euler", 3.0))
    t3 = np.array(m3.seen)
    u = t3 / (3 - 2 * t3)  # the inverse map
    assert abs(u[0] - 1) < 1e-6 and np.allclose(np.diff(u), np.diff(u)[0], atol=1e-5)
    assert (t3[1:] > np.array(m1.seen)[1:]).all() and (t3 > 0.5).sum() > (np.array(m1.seen) > 0.5).sum()
    # the CLI: scheduler and shift reach the sampler and the summary
    a, _ = _sample(folders, "euler", "classes=b", "n=2")
    b, s = _sample(folders, "heun3", "classes=b", "n=2", "scheduler=heun", "shift=3")
    assert s["scheduler"] == "heun" and s["shift"] == 3.0 and not np.array_equal(a, b)


# --- items 7 and 8: a short generator run on the latents of a tokenizer --------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Tokenize 64 shapes with a random tiny tokenizer; train a small generator 3 steps with the DiT-B config."""
    from generators.train import main as train_main

    root = tmp_path_factory.mktemp("genrun")
    tok = tokenize_shapes(root, 64)
    train_main(["config=configs/generator/b.yaml", f"data.latents={root / 'lat'}", "data.in_memory=true", "data.num_workers=0",
                "model.width=32", "model.depth=1", "model.heads=2", "optim.batch_size=16", "train.mixed_precision=no",
                "train.steps=3", "train.log_every=1", "train.sample_every=1000", "train.ckpt_every=1000", "train.progress=false",
                "sample.steps=1", "sample.per_class=1", f"train.output_dir={root / 'run'}"])
    return root, tok


def test_ema_decay_and_betas_are_what_the_configs_say(run):
    from omegaconf import OmegaConf

    from generators.config import GenConfig
    from stellar_tok.config import load_config

    root, _ = run
    decays = [json.loads(l)["ema_decay"] for l in open(root / "run" / "metrics.jsonl")]
    assert decays == [0.0, 0.9999, 0.9999], decays  # the first update copies the weights; then b.yaml's 0.9999, no warm-up
    assert list(OmegaConf.load(root / "run" / "config.yaml").optim.betas) == [0.9, 0.999]
    for name in ("b", "l", "xl"):
        cfg = load_config([f"config=configs/generator/{name}.yaml"], schema=GenConfig)
        assert list(cfg.optim.betas) == [0.9, 0.999] and cfg.train.ema == 0.9999 and not cfg.train.ema_warmup, name
    tiny = load_config(["config=configs/generator/tiny.yaml"], schema=GenConfig)  # documented exceptions (short CPU runs)
    assert tiny.train.ema_warmup and list(tiny.optim.betas) == [0.9, 0.99]
    assert list(GenConfig().optim.betas) == [0.9, 0.999] and GenConfig().train.ema == 0.9999


def test_a_retrained_decoder_decodes_the_generator_a_new_encoder_does_not(run, capsys):
    from generators.sample import main as sample_main
    from stellar_tok.latents.dataset import tokenizer_fingerprint
    from stellar_tok.training.tokenizer_weights import load_frozen_encoder

    root, tok = run
    gen = root / "run" / "generator"
    # train.decoder_from's start: the encoder of tok, a fresh decoder of another depth; its statistics are re-measured
    torch.manual_seed(1)
    redec = StellarTokenizer(**{**TINY_MODEL, "decoder_depth": 2})
    load_frozen_encoder(redec, str(root / "tok"))
    redec.set_latent_stats(LatentStats(torch.rand(C), torch.rand(C) + 0.5, torch.tensor(-2.0), torch.tensor(1.5)))
    redec.save_pretrained(str(root / "redec"))
    torch.manual_seed(2)
    StellarTokenizer(**TINY_MODEL).save_pretrained(str(root / "other"))  # another encoder
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(tok.encode(x).z, redec.eval().encode(x).z) and tokenizer_fingerprint(redec) != tokenizer_fingerprint(tok)
    common = [f"generator={gen}", "classes=0", "n=2", "steps=1", "progress=false"]
    sample_main(common + [f"tokenizer={root / 'redec'}", f"out={root / 's_redec'}"])
    sample_main(common + [f"tokenizer={root / 'tok'}", f"out={root / 's_tok'}"])
    a, b = np.load(root / "s_redec" / "samples.npz")["arr_0"], np.load(root / "s_tok" / "samples.npz")["arr_0"]
    assert a.shape == b.shape and not np.array_equal(a, b)  # the same latents, painted by another decoder
    capsys.readouterr()
    with pytest.raises(SystemExit):
        sample_main(common + [f"tokenizer={root / 'other'}", f"out={root / 's_other'}"])
    assert "another tokenizer" in capsys.readouterr().err
    from stellar_tok.model.latent import latent_fingerprint

    assert LatentDiT.from_pretrained(str(gen)).config.tokenizer_hash == latent_fingerprint(tok) == latent_fingerprint(redec)
    # a generator folder from before: it carries the whole tokenizer's fingerprint; the tokenizer itself still fits
    old = LatentDiT.from_pretrained(str(gen))
    old.register_to_config(tokenizer_hash=tokenizer_fingerprint(tok))
    old.save_pretrained(str(root / "old_gen"))
    sample_main([f"generator={root / 'old_gen'}", *common[1:], f"tokenizer={root / 'tok'}", f"out={root / 's_old'}"])
    np.testing.assert_array_equal(np.load(root / "s_old" / "samples.npz")["arr_0"], b)


def test_latents_record_their_latent_fingerprint_so_a_generator_needs_no_tokenizer_at_hand(run, capsys):
    from generators.trainer import latent_hash
    from stellar_tok.model.latent import latent_fingerprint
    from stellar_tok.latents.dataset import tokenizer_fingerprint

    root, tok = run
    manifest = json.load(open(root / "lat" / "manifest.json"))
    assert manifest["latent_hash"] == latent_fingerprint(tok) != manifest["tokenizer_hash"] == tokenizer_fingerprint(tok)
    away = {**manifest, "tokenizer_path": str(root / "gone")}  # the tokenizer folder moved or was never copied
    assert latent_hash(away) == latent_fingerprint(tok)  # a retrained decoder will still be accepted by the sampler
    capsys.readouterr()
    older = {k: v for k, v in away.items() if k != "latent_hash"}  # a latent folder written before latent_hash
    assert latent_hash(older) == tokenizer_fingerprint(tok) and "not at hand" in capsys.readouterr().out
    assert latent_hash(older, tok) == latent_fingerprint(tok)
