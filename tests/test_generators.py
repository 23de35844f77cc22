"""The latent DiT, its flow-matching sampler, the diffusers pipeline, the sampler CLI and a short training run."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, launch_two_processes, make_tiny_tokenizer, tokenize_shapes

from generators import LatentDiT, StellarDiTPipeline
from generators.flow import flatten_latent, flow_loss, sample_latents, split_latent
from stellar_tok.model.latent import LatentStats

# the tests' tokenizer: 16 tokens x 8 channels, 8x8 patch grid
R, C, G = TINY_MODEL["num_tokens"], TINY_MODEL["latent_channels"], TINY_MODEL["image_size"] // TINY_MODEL["patch_size"]


def _dit(seed=0, randomize=False, **kw):
    torch.manual_seed(seed)
    m = LatentDiT(num_tokens=R, token_channels=C, grid=G, loc_patch=2, width=64, depth=2, heads=2, num_classes=4, **kw).eval()
    if randomize:  # leave adaLN-Zero's zero init: every branch open, outputs depend on everything
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return m


def _latent(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, R, C, generator=g), torch.randn(b, G * G, R, generator=g)


def test_loc_patchify_round_trip_and_layout():
    m = _dit()
    _, loc = _latent()
    packed = m.patchify_loc(loc)
    assert packed.shape == (3, (G // 2) ** 2, 2 * 2 * R)
    assert torch.equal(m.unpatchify_loc(packed), loc)
    # position k of the sequence holds the 2x2 block of patches at (row 2i.., col 2j..) of the grid
    grid = loc.view(3, G, G, R)
    i, j = 1, 3
    block = grid[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2, :].reshape(3, -1)
    assert torch.equal(packed[:, i * (G // 2) + j], block)
    tok, loc2 = split_latent(flatten_latent(*_latent()), R, C, G * G)
    assert torch.equal(tok, _latent()[0]) and torch.equal(loc2, _latent()[1])
    assert m.seq_len == R + (G // 2) ** 2 and m.embed(*_latent()).shape == (3, m.seq_len, 64)


def test_adaln_zero_starts_as_identity():
    m = _dit()
    x = torch.randn(2, m.seq_len, 64)
    c = torch.randn(2, 64)
    for blk in m.blocks:
        assert torch.equal(blk(x, c), x)
    vt, vl = m(*_latent(2), torch.rand(2), torch.tensor([0, 1]))
    assert not vt.abs().any() and not vl.abs().any()  # zero-initialised heads


def test_guidance_on_every_channel_and_scale_one_is_conditional():
    m = _dit(randomize=True)
    tok, loc = _latent()
    t, y = torch.tensor([0.3, 0.6, 0.9]), torch.tensor([0, 2, 3])
    cond = m(tok, loc, t, y)
    uncond = m(tok, loc, t, torch.full_like(y, m.null_class))
    for a, b in zip(m.forward_with_cfg(tok, loc, t, y, 1.0), cond):
        torch.testing.assert_close(a, b)
    guided = m.forward_with_cfg(tok, loc, t, y, 3.0)
    for g, c, u in zip(guided, cond, uncond):
        torch.testing.assert_close(g, u + 3.0 * (c - u), atol=1e-5, rtol=1e-4)
        moved = (g - c).abs().flatten(0, -2).amax(0)  # per channel
        assert (moved > 1e-6).all()  # guidance reaches every channel (DiT's sampler guided 3 of 4)


def test_sampler_is_deterministic_with_a_seed():
    m = _dit(randomize=True)
    y = torch.tensor([0, 1])
    run = lambda s: sample_latents(m, y, steps=4, cfg_scale=2.0, generator=torch.Generator().manual_seed(s))  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], c[0])
    assert a[0].shape == (2, R, C) and a[1].shape == (2, G * G, R)


def test_flow_loss_target_is_velocity():
    """A model that returns the true velocity e - x has zero loss."""
    tok, loc = _latent()
    g = torch.Generator().manual_seed(5)
    e_tok, e_loc = torch.randn(tok.shape, generator=g), torch.randn(loc.shape, generator=g)

    class Oracle(torch.nn.Module):
        def forward(self, xt_tok, xt_loc, t, y):
            return e_tok - tok, e_loc - loc

    loss, _ = flow_loss(Oracle(), tok, loc, torch.zeros(3, dtype=torch.long), torch.rand(3), torch.Generator().manual_seed(5))
    assert loss.item() < 1e-10


def test_pipeline_save_load_round_trip(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    tok = make_tiny_tokenizer()
    m = _dit(randomize=True, class_names=["a", "b", "c", "d"])
    m.set_latent_stats(LatentStats(torch.rand(C) - 0.5, torch.rand(C) + 0.5, torch.tensor(-3.0), torch.tensor(2.0)))
    pipe = StellarDiTPipeline(tokenizer=tok, transformer=m, scheduler=FlowMatchEulerDiscreteScheduler())
    kw = dict(class_labels=["b", 3], num_inference_steps=3, guidance_scale=2.0, output_type="np")
    before = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.save_pretrained(str(tmp_path / "pipe"))
    assert not [f for _, _, fs in os.walk(tmp_path / "pipe") for f in fs if f.endswith((".bin", ".pt", ".pkl"))]  # safetensors only
    loaded = StellarDiTPipeline.from_pretrained(str(tmp_path / "pipe"))
    after = loaded(generator=torch.Generator().manual_seed(0), **kw).images
    assert before.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(before, after)
    torch.testing.assert_close(loaded.transformer.latent_token_std, m.latent_token_std)
    pil = loaded(class_labels=[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert pil[0].size == (32, 32)
    with pytest.raises(ValueError, match="unknown class"):
        loaded(class_labels=["zebra"], num_inference_steps=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tokenize 256 shapes with a random tiny tokenizer, train the generator 80 steps. Shared by the tests below,
    which only read it: a test that writes (resumes, samples) does so in its own tmp_path."""
    from generators.train import main as train_main

    root = tmp_path_factory.mktemp("gen")
    tokenize_shapes(root, 256, "flip=true")
    args = ["config=configs/generator/tiny.yaml", f"data.latents={root / 'lat'}", "model.width=64", "model.depth=2", "model.heads=2",
            "optim.batch_size=32", "optim.warmup_steps=10", "train.log_every=10", "train.progress=false", "train.sample_every=40",
            "train.ckpt_every=40", "sample.steps=3", "sample.per_class=2", f"train.output_dir={root / 'run'}"]
    summary = train_main(args + ["train.steps=80"])
    return root, args, summary


def test_training_loss_falls_and_exports(trained):
    root, _, summary = trained
    assert summary["step"] == 80
    m = [json.loads(l) for l in open(root / "run" / "metrics.jsonl")]
    assert m[-1]["loss"] < 0.8 * m[0]["loss"], (m[0], m[-1])
    assert os.path.exists(root / "run" / "images" / "step-0000040.png") and os.path.exists(root / "run" / "images" / "step-0000080.png")
    gen = LatentDiT.from_pretrained(str(root / "run" / "generator"))
    assert gen.config.num_classes == 8 and gen.config.class_names[0] == "circle"
    stats = json.load(open(root / "lat" / "stats.json"))
    torch.testing.assert_close(gen.latent_token_mean, torch.tensor(stats["z_mean"]))
    StellarDiTPipeline.from_pretrained(str(root / "run" / "pipeline"))


def test_resume_from_a_checkpoint_is_exact(trained, tmp_path):
    """Resumed from the step-40 checkpoint into a new folder, the run ends with the same EMA weights at step
    80 as the uninterrupted run (model, optimizer, EMA, scheduler, data position, RNGs all restored)."""
    from generators.dit import LatentDiT
    from generators.train import main as train_main

    root, args, _ = trained
    out = tmp_path / "resumed"
    s = train_main(args + ["train.steps=80", f"train.resume={root / 'run' / 'checkpoints' / 'step-0000040'}", f"train.output_dir={out}"])
    assert s["step"] == 80
    a = LatentDiT.from_pretrained(str(root / "run" / "generator")).state_dict()
    b = LatentDiT.from_pretrained(str(out / "generator")).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6, msg=k)


def test_training_resumes_step_count(trained, tmp_path):
    """train.resume=auto in a copy of the finished run: 10 more steps, appended to its metrics."""
    from generators.train import main as train_main

    root, args, _ = trained
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    s = train_main(args + ["train.steps=90", "train.resume=auto", f"train.output_dir={run}"])
    assert s["step"] == 90
    steps = [json.loads(l)["step"] for l in open(run / "metrics.jsonl")]
    assert steps[-2:] == [80, 90] and steps.count(80) == 1
    assert [json.loads(l)["step"] for l in open(root / "run" / "metrics.jsonl")][-1] == 80  # the shared run is untouched


def test_sample_cli_is_batch_independent(trained, tmp_path, capsys):
    from generators.sample import main as sample_main

    root, _, _ = trained
    common = [f"generator={root / 'run' / 'generator'}", f"tokenizer={root / 'tok'}", "classes=circle,3", "n=3", "steps=3", "cfg=2", "progress=false"]
    sample_main(common + [f"out={tmp_path / 's1'}", "batch_size=6"])
    sample_main(common + [f"out={tmp_path / 's2'}", "batch_size=2", "save_png=false"])
    a, b = np.load(tmp_path / "s1" / "samples.npz"), np.load(tmp_path / "s2" / "samples.npz")
    assert a["arr_0"].shape == (6, 32, 32, 3) and a["arr_0"].dtype == np.uint8
    assert a["arr_1"].tolist() == [0, 0, 0, 3, 3, 3]
    # other batch shapes, other float rounding: a value may flip by one level, rarely
    diff = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    assert len(os.listdir(tmp_path / "s1" / "images")) == 6 and os.path.exists(tmp_path / "s1" / "grid.png")
    with pytest.raises(SystemExit):
        sample_main(common[:1] + [f"tokenizer={root / 'run'}", f"out={tmp_path / 's3'}"])  # not a tokenizer folder
    assert capsys.readouterr().err.strip().startswith("error: tokenizer=DIR")


def test_sample_cli_two_processes_equal_one(trained, tmp_path):
    """`accelerate launch --num_processes 2` (gloo): each process writes its part and PNGs; samples.npz is the one-process result."""
    from generators.sample import main as sample_main

    root, _, _ = trained
    common = [f"generator={root / 'run' / 'generator'}", f"tokenizer={root / 'tok'}", "classes=circle,3", "n=3", "steps=3", "cfg=2",
              "progress=false", "batch_size=2"]
    r = launch_two_processes("generators.sample", [f"out={tmp_path / 'p2'}", *common], 29536)
    # gloo sometimes aborts at interpreter exit after all work is done; the outputs decide
    assert "sample: 6 images of 2 classes" in r.stdout, r.stderr[-3000:]
    assert "running: 2 processes (multi_cpu, gloo), device cpu, precision no, batch" in r.stdout
    sample_main(common + [f"out={tmp_path / 'p1'}"])
    one, two = np.load(tmp_path / "p1" / "samples.npz"), np.load(tmp_path / "p2" / "samples.npz")
    diff = np.abs(one["arr_0"].astype(int) - two["arr_0"].astype(int))  # 1 thread there, 2 here: a rare 1-level rounding flip
    assert one["arr_0"].shape == two["arr_0"].shape and diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert two["arr_1"].tolist() == [0, 0, 0, 3, 3, 3]
    assert sorted(os.listdir(tmp_path / "p2" / "images")) == sorted(os.listdir(tmp_path / "p1" / "images"))
    assert not os.path.exists(tmp_path / "p2" / "parts") and json.load(open(tmp_path / "p2" / "summary.json"))["processes"] == 2


def test_save_npz_streamed_is_np_savez(tmp_path):
    from generators.sampling import save_npz_streamed

    arr, labels = np.random.default_rng(0).integers(0, 256, (7, 5, 4, 3), dtype=np.uint8), np.arange(7)
    save_npz_streamed(str(tmp_path / "a.npz"), arr.shape, (arr[i : i + 3] for i in range(0, 7, 3)), labels)
    a = np.load(tmp_path / "a.npz")
    assert sorted(a.files) == ["arr_0", "arr_1"] and a["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(a["arr_0"], arr)
    np.testing.assert_array_equal(a["arr_1"], labels)
    with pytest.raises(RuntimeError, match="expected 420"):  # too few rows: refused, no file left
        save_npz_streamed(str(tmp_path / "b.npz"), arr.shape, iter([arr[:3]]), labels)
    assert os.listdir(tmp_path) == ["a.npz"]


def test_class_accuracy_and_cached_judge(tmp_path):
    from generators.judge import class_accuracy, judge

    class Fixed(torch.nn.Module):  # predicts class 0 for dark images, 1 for bright ones
        def forward(self, x):
            bright = (x.mean((1, 2, 3)) > 0).long()
            return torch.nn.functional.one_hot(bright, 2).float()

    imgs = np.zeros((4, 8, 8, 3), np.uint8)
    imgs[2:] = 255
    res = class_accuracy(imgs, np.array([0, 1, 1, 1]), Fixed(), ["dark", "bright"])
    assert res == {"accuracy": 75.0, "per_class": {"dark": 100.0, "bright": 66.67}, "n": 4}
    cfg = {"name": "shapes", "resolution": 32, "train_size": 256, "val_size": 64}
    m1, acc1, classes = judge(cfg, str(tmp_path), epochs=1, progress=False)
    m2, acc2, _ = judge(cfg, str(tmp_path), epochs=1, progress=False)  # loaded from the cache, not retrained
    assert len(os.listdir(tmp_path)) == 1 and acc1 == acc2 and classes[0] == "circle"
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(m1.eval()(x), m2(x))


def test_class_accuracy_ceiling_of_a_tokenizer(tmp_path, capsys):
    """tokenizer=DIR: the judge on real val images, reconstructions and S/L swaps, from one command."""
    from generators.judge import ceiling, class_accuracy
    from generators.class_accuracy import main as ca_main
    from stellar_tok.data import build_dataset
    from stellar_tok.evaluation.metrics import to_uint8

    class Bright(torch.nn.Module):  # class 1 when the top half is brighter than the bottom half
        def forward(self, x):
            up = (x[:, :, :16].mean((1, 2, 3)) > x[:, :, 16:].mean((1, 2, 3))).long()
            return torch.nn.functional.one_hot(up, 10).float()

    tok = make_tiny_tokenizer(tmp_path / "tok")
    data_cfg = {"name": "digits", "resolution": 32}
    names = [str(d) for d in range(10)]
    res = ceiling(str(tmp_path / "tok"), data_cfg, Bright(), names, n=40)
    ds = build_dataset(data_cfg, "val")
    assert res["n"] == 40
    # "real" is the judge's accuracy on the first 40 real val images, computed the same way
    assert res["real"] == class_accuracy(np.ascontiguousarray(ds.images[:40]), ds.labels[:40], Bright(), names)["accuracy"]
    # "reconstruction": the same judge on decode(encode(x)) of those images
    images = torch.from_numpy(np.array(ds.images[:40])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        recon = to_uint8(tok.decode(tok.encode(images))).permute(0, 2, 3, 1).numpy()
    assert res["reconstruction"] == class_accuracy(recon, ds.labels[:40], Bright(), names)["accuracy"]
    share_0_or_1 = float(np.isin(ds.labels[:40], (0, 1)).mean() * 100)
    assert res["reconstruction"] <= share_0_or_1 + 1e-6  # the judge only ever says 0 or 1
    assert set(res["own_L_other_S"]) == {"label_of_L", "label_of_S"} and set(res["own_S_other_L"]) == {"label_of_S", "label_of_L"}
    with pytest.raises(SystemExit):
        ca_main([f"tokenizer={tmp_path}", "data.name=digits"])  # not a tokenizer folder
    assert capsys.readouterr().err.strip().startswith("error: tokenizer=DIR")
