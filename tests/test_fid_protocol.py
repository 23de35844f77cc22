"""The FID protocol: which images the reference statistics and the probes read (centre crops of every image of a
split read once, or a seeded subset spread over the classes), the cache key, the ADM reference batch, gFID at the
samples' size, samples read in batches without a second copy, worker processes, and n_eval / split beside rFID.

A small random stand-in for Inception (`FakeInception`: pooled colours, 15-d) keeps these tests fast; the real
extractor is exercised in test_fid.py and test_evaluate.py."""
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import data_cfg
from PIL import Image


class FakeInception(nn.Module):
    """The interface of fid.build_inception's extractor with 15-d features: mean colour of 2x2 cells + colour std
    (of every 4th pixel)."""

    features_list = ["2048"]
    has_logits = False

    def __init__(self, weights_file=None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.weights_source, self.weights_file = "fake", weights_file

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3
        x = x[..., ::4, ::4].float() / 255  # a coarse look: cheap on large samples
        return [torch.cat([F.adaptive_avg_pool2d(x, 2).flatten(1), x.flatten(2).std(-1)], 1) * self.scale]


@pytest.fixture
def fake_inception(monkeypatch, tmp_path):
    from stellar_tok.evaluation import fid

    monkeypatch.setenv("STELLAR_TOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fid, "build_inception", lambda weights=None, device="cpu": FakeInception(weights))


def _picture(rng, cls, w, h):
    base = np.array([(60 * cls) % 256, 255 - 40 * cls, (90 * cls + 30) % 256], dtype=np.float64)
    return np.clip(base + rng.normal(0, 60, (h, w, 3)), 0, 255).astype(np.uint8)


def make_folder(root, classes=4, per_class=6, size=(40, 24), seed=0):
    """root/{train,val}/c<k>/<i>.png: non-square noisy pictures, class-sorted listing."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(_picture(rng, c, *size)).save(d / f"{i:02d}.png")
    return root


def make_shards(root, split, shards=2, per_shard=6, classes=3, size=(36, 20), seed=0):
    """root/<split>-00000k.tar: key.png + key.cls, classes in blocks (class-sorted stream). Returns the PNG bytes."""
    rng = np.random.default_rng(seed)
    root.mkdir(exist_ok=True)
    out, i = [], 0
    for s in range(shards):
        with tarfile.open(root / f"{split}-{s:06d}.tar", "w") as tar:
            for _ in range(per_shard):
                c = i * classes // (shards * per_shard)
                buf = io.BytesIO()
                Image.fromarray(_picture(rng, c, *size)).save(buf, format="PNG")
                for name, data in ((f"{i:06d}.png", buf.getvalue()), (f"{i:06d}.cls", str(c).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                out.append((buf.getvalue(), c))
                i += 1
    return out


def centre_crop(source, res):
    from stellar_tok.data import load_rgb, resize_and_crop

    return resize_and_crop(load_rgb(source), res, False)


def rows(t):
    return sorted(bytes(x.numpy().tobytes()) for x in t)


# ------------------------------------------------------------------ item 2: which images the reference reads
def test_reference_train_split_is_centre_crops_of_every_image(tmp_path):
    from stellar_tok.data.reference import image_batches

    root = make_folder(tmp_path / "imgs")
    cfg = data_cfg(name="folder", path=str(root), resolution=16)
    files = sorted((root / "train").rglob("*.png"))
    expected = torch.stack([centre_crop(str(p), 16) for p in files])
    for _ in range(2):  # the same images every time: not the random crops of training
        got = torch.cat([x for x, _ in image_batches(cfg, "train", 0, 5)])
        assert got.shape == expected.shape and rows(got) == rows(expected)


@pytest.mark.parametrize("workers", [0, 2])
def test_reference_wds_reads_each_shard_once(tmp_path, workers):
    """The train shards are read once, in order, centre-cropped: never the resampled training stream."""
    from stellar_tok.data.reference import image_batches

    made = make_shards(tmp_path / "wds", "train")
    make_shards(tmp_path / "wds", "val", shards=1)
    cfg = data_cfg(name="wds", path=str(tmp_path / "wds"), resolution=16, epoch_size=40)
    batches = list(image_batches(cfg, "train", 0, 4, **({"num_workers": workers} if workers else {})))
    got, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert len(got) == len(made) == 12  # every sample once (not epoch_size samples drawn with replacement)
    assert rows(got) == rows(torch.stack([centre_crop(png, 16) for png, _ in made]))
    assert sorted(labels.tolist()) == sorted(c for _, c in made)


def test_reference_subset_is_seeded_and_spread_over_classes(tmp_path):
    from stellar_tok.data.reference import image_batches
    from stellar_tok.data.reference import spread_subset

    root = make_folder(tmp_path / "imgs")  # 4 classes x 6, listed class by class
    cfg = data_cfg(name="folder", path=str(root), resolution=16)
    labels = torch.cat([y for _, y in image_batches(cfg, "val", 8, 3)])
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]  # not the first 8 of the listing (classes 0 and 1)
    files = sorted((root / "val").rglob("*.png"))
    pick = spread_subset([int(p.parent.name[1:]) for p in files], 8, seed=3)
    got = torch.cat([x for x, _ in image_batches(cfg, "val", 8, 3, seed=3)])
    assert rows(got) == rows(torch.stack([centre_crop(str(files[i]), 16) for i in pick]))
    again = torch.cat([x for x, _ in image_batches(cfg, "val", 8, 3, seed=3)])
    assert torch.equal(got, again)
    made = make_shards(tmp_path / "wds", "val", shards=3, per_shard=4, classes=3)  # wds: spread too
    wcfg = data_cfg(name="wds", path=str(tmp_path / "wds"), resolution=16)
    wl = torch.cat([y for _, y in image_batches(wcfg, "val", 6, 4)])
    assert sorted(wl.tolist()) == [0, 0, 1, 1, 2, 2] and len(made) == 12


def test_reference_cache_key_covers_what_changes_the_pixels(tmp_path, monkeypatch):
    from stellar_tok.evaluation import fid_reference

    monkeypatch.setenv("STELLAR_TOK_CACHE", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "imgs")
    cfg = data_cfg(name="folder", path=str(root), resolution=16)
    w1, w2 = tmp_path / "w1.bin", tmp_path / "w2.bin"
    w1.write_bytes(b"one")
    w2.write_bytes(b"two")
    ext = FakeInception(str(w1))
    s0, p0 = fid_reference.reference_stats(ext, cfg, "val", 0, progress=False)
    assert s0["n"] == 24 and s0["meta"]["data"]["crop"] == "centre"
    assert fid_reference.reference_stats(ext, cfg, "val", 0, progress=False)[1] == p0  # cached
    paths = {p0}
    for stats, path in [fid_reference.reference_stats(FakeInception(str(w2)), cfg, "val", 0, progress=False),  # other weights
                        fid_reference.reference_stats(ext, data_cfg(name="folder", path=str(root), resolution=20), "val", 0, progress=False),
                        fid_reference.reference_stats(ext, cfg, "train", 0, progress=False),
                        fid_reference.reference_stats(ext, cfg, "val", 8, progress=False, seed=0),
                        fid_reference.reference_stats(ext, cfg, "val", 8, progress=False, seed=1)]:
        assert path not in paths
        paths.add(path)
    Image.fromarray(np.zeros((24, 40, 3), np.uint8)).save(root / "val" / "c0" / "zz.png")  # one more file
    s1, p1 = fid_reference.reference_stats(ext, cfg, "val", 0, progress=False)
    assert p1 not in paths and s1["n"] == 25


def _adm_batch(path, dim, mu, sigma, side=16):
    """The layout of ADM's VIRTUAL_imagenet256_labeled.npz: arr_0 (the 10k reference images, here 4 of side x side),
    mu, sigma, mu_s, sigma_s."""
    np.savez(path, arr_0=np.zeros((4, side, side, 3), np.uint8), mu=mu, sigma=sigma, mu_s=np.zeros(3), sigma_s=np.eye(3))


def test_adm_reference_batch_used_as_given(tmp_path, fake_inception, monkeypatch):
    import zipfile

    from generators.evaluate import main
    from stellar_tok.data import reference
    from stellar_tok.evaluation import fid

    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (30, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    with torch.no_grad():
        feats = FakeInception()(torch.from_numpy(samples).permute(0, 3, 1, 2))[0].double().numpy()
    ref = {"mu": feats.mean(0) + 0.1, "sigma": np.cov(feats, rowvar=False) * 2}
    _adm_batch(tmp_path / "VIRTUAL.npz", feats.shape[1], ref["mu"], ref["sigma"])
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *a, **k: opened.append((os.path.basename(str(self.filename)), getattr(name, "filename", name))) or real_open(self, name, *a, **k))
    monkeypatch.setattr(reference, "image_batches", lambda *a, **k: pytest.fail("statistics computed although fid.ref was given"))
    rep = main([f"samples={tmp_path / 'samples.npz'}", f"out={tmp_path / 'out'}", "data.name=wds", "data.path=/nowhere/x.tar",
                f"fid.ref={tmp_path / 'VIRTUAL.npz'}", "class_accuracy=false", "progress=false"])
    assert ("VIRTUAL.npz", "arr_0.npy") not in opened  # the 10k reference images are never loaded
    assert rep["results"]["fid"] == pytest.approx(fid.fid_from_stats(fid.feature_stats(feats), ref), rel=1e-6)
    assert "kid" not in rep["results"]


# ------------------------------------------------------------------ item 1: the reference at the samples' size
def test_gfid_reference_at_the_samples_size(tmp_path, fake_inception, capsys):
    from generators.evaluate import main

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", arr_0=rng.integers(0, 256, (20, 24, 24, 3), dtype=np.uint8))
    common = [f"samples={tmp_path / 's.npz'}", "data.name=shapes", "data.train_size=16", "data.val_size=16", "split=val",
              "class_accuracy=false", "progress=false"]
    rep = main([*common, f"out={tmp_path / 'a'}"])
    assert rep["reference"]["data"]["resolution"] == 24  # not data.resolution's default (32)
    with pytest.raises(SystemExit) as e:
        main([*common, f"out={tmp_path / 'b'}", "data.resolution=32"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "24" in err and "32" in err and "\n" not in err


def test_gfid_at_the_adm_batch_size_resized_on_request(tmp_path, fake_inception, capsys, monkeypatch):
    """ADM's reference batch says its size in arr_0 (N,H,W,3), read from the header alone: 14-px samples against a
    16-px batch (the ViT-H/14 tokenizer's 252 against ADM's 256) are refused in one line; with resize=bicubic they are
    scored resized to 16 px (torch bicubic on the uint8 samples, rounded), and the report gives both sizes."""
    import zipfile

    from generators.evaluate import main
    from stellar_tok.evaluation import fid

    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (30, 14, 14, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    resized = F.interpolate(torch.from_numpy(samples).permute(0, 3, 1, 2).float(), size=(16, 16), mode="bicubic", align_corners=False)
    with torch.no_grad():
        feats = FakeInception()(resized.round().clamp(0, 255).to(torch.uint8))[0].double().numpy()
    ref = {"mu": feats.mean(0) + 0.1, "sigma": np.cov(feats, rowvar=False) * 2}
    _adm_batch(tmp_path / "VIRTUAL.npz", feats.shape[1], ref["mu"], ref["sigma"], side=16)
    common = [f"samples={tmp_path / 'samples.npz'}", f"out={tmp_path / 'out'}", f"fid.ref={tmp_path / 'VIRTUAL.npz'}",
              "class_accuracy=false", "progress=false"]
    with pytest.raises(SystemExit) as e:
        main(common)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err, err
    assert "the samples are 14 px but the reference" in err and "was made at 16 px: pass resize=bicubic" in err, err
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *a, **k: opened.append((os.path.basename(str(self.filename)), getattr(name, "filename", name))) or real_open(self, name, *a, **k))
    rep = main([*common, "resize=bicubic"])
    assert ("VIRTUAL.npz", "arr_0.npy") not in opened  # its size comes from the header, its images are never read
    assert (rep["sample_size"], rep["scored_size"], rep["resize"], rep["reference"]["data"]["resolution"]) == (14, 16, "bicubic", 16)
    assert rep["results"]["fid"] == pytest.approx(fid.fid_from_stats(fid.feature_stats(feats), ref), rel=1e-6)
    out = capsys.readouterr().out
    assert "| 30 (14 px, bicubic to 16) |" in out and "Sizes: samples 14 px, scored at 16 px" in out, out


# ------------------------------------------------------------------ item 4: 50k samples fit in memory
RSS_SCRIPT = r"""
import json, os, resource, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from test_fid_protocol import FakeInception
from stellar_tok import fid
import generators.evaluate as ge

fid.build_inception = lambda weights=None, device="cpu": FakeInception()
def rss(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
ge.main([f"samples={sys.argv[2]}", f"out={sys.argv[3]}", "data.name=shapes", f"fid.ref={sys.argv[4]}", "class_accuracy=false",
         "progress=false"])  # warm-up: imports, allocator
base = rss("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
    f.write("5")
ge.main([f"samples={sys.argv[2]}", f"out={sys.argv[3]}", "data.name=shapes", f"fid.ref={sys.argv[4]}", "class_accuracy=false",
         "progress=false"])
print(json.dumps({"base": base, "peak": rss("VmHWM:")}))
"""


def test_samples_are_read_in_batches_without_a_copy(tmp_path):
    """A samples.npz as generators.sample streams it: scoring it must not hold arr_0 in memory (RSS measured)."""
    from generators.sampling import save_npz_streamed

    n, side = 1600, 128  # 78.6 MB
    rng = np.random.default_rng(0)
    chunk = rng.integers(0, 256, (100, side, side, 3), dtype=np.uint8)
    save_npz_streamed(str(tmp_path / "s.npz"), (n, side, side, 3), (chunk for _ in range(n // 100)), np.zeros(n, np.int64))
    _adm_batch(tmp_path / "ref.npz", 15, np.zeros(15), np.eye(15), side=side)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, os.path.dirname(__file__), str(tmp_path / "s.npz"), str(tmp_path / "o"),
                          str(tmp_path / "ref.npz")], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    size = n * side * side * 3
    assert m["peak"] - m["base"] < 0.25 * size, f"peak RSS grew by {(m['peak'] - m['base']) / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB arr_0"


# ------------------------------------------------------------------ item 12: worker processes
def test_fid_stats_reads_with_worker_processes(tmp_path, fake_inception, monkeypatch):
    from stellar_tok import fid_stats
    from stellar_tok.data import folder

    root = make_folder(tmp_path / "imgs")
    log = tmp_path / "pids.txt"
    load = folder.load_rgb

    def logged(*a, **k):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return load(*a, **k)

    monkeypatch.setattr(folder, "load_rgb", logged)  # where FolderDataset looks it up
    common = ["data.name=folder", f"data.path={root}", "data.resolution=16", "split=train", "progress=false"]
    fid_stats.main([*common, "num_workers=2", f"out={tmp_path / 'a.npz'}"])
    pids = set(log.read_text().split())
    assert str(os.getpid()) not in pids and len(pids) == 2  # decoded in two worker processes
    assert len(log.read_text().split()) == 24  # each image once
    log.unlink()
    fid_stats.main([*common, "num_workers=0", f"out={tmp_path / 'b.npz'}"])
    assert set(log.read_text().split()) == {str(os.getpid())}
    a, b = (np.load(tmp_path / f) for f in ("a.npz", "b.npz"))
    assert int(a["n"]) == int(b["n"]) == 24
    np.testing.assert_allclose(a["mu"], b["mu"], rtol=1e-6)


# ------------------------------------------------------------------ items 3 and 5: stellar_tok.evaluate
def test_probes_use_seeded_spread_subsets_of_centre_crops(tmp_path, tokenizer_dir):
    from safetensors.torch import load_file

    from stellar_tok.evaluate import main
    from stellar_tok.data.reference import spread_subset

    root = make_folder(tmp_path / "imgs")  # 4 classes x 6 per split, listed class by class
    out = tmp_path / "eval"
    rep = main([f"tokenizer={tokenizer_dir}", f"out={out}", "data.name=folder", f"data.path={root}", "tasks=knn", "n_train=8", "n_eval=8",
                "progress=false", "seed=0"])
    assert rep["data"]["n_train"] == 8 and rep["data"]["n_eval"] == 8
    tr = load_file(str(out / "cache" / "features-train.safetensors"))
    assert sorted(tr["labels"].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]  # not the first 8 files (classes 0 and 1)
    files = sorted((root / "train").rglob("*.png"))
    pick = spread_subset([int(p.parent.name[1:]) for p in files], 8, seed=0)
    expected = torch.stack([centre_crop(str(files[i]), 32) for i in pick]).float() / 127.5 - 1
    got = tr["pixels"].view(-1, 3, 32, 32)
    assert rows(((got + 1) * 127.5).round().to(torch.uint8)) == rows(((expected + 1) * 127.5).round().to(torch.uint8))


def test_rfid_printed_with_its_n_eval_and_split(tmp_path, tokenizer_dir, fake_inception, capsys):
    from stellar_tok.evaluate import main

    out = tmp_path / "eval"
    rep = main([f"tokenizer={tokenizer_dir}", f"out={out}", "data.name=shapes", "data.train_size=16", "data.val_size=24", "tasks=recon",
                "n_eval=12", "lpips=none", "progress=false", "batch_size=6"])
    for row in ("stellar", "pixels_down"):
        r = rep["results"][row]
        assert r["rfid_n_eval"] == 12 and r["rfid_split"] == "val"
    # an untrained tokenizer's colours are further from the originals' than those of the downsampled images
    assert 0 < rep["results"]["pixels_down"]["rfid"] < rep["results"]["stellar"]["rfid"]
    assert json.loads((out / "metrics.json").read_text())["results"]["stellar"]["rfid_n_eval"] == 12
    printed = capsys.readouterr().out
    for text in (printed, (out / "metrics.md").read_text()):
        assert "rFID (val, n=12)" in text


def test_streamed_feature_stats_equal_the_stacked_ones():
    """The reference and the samples are accumulated batch by batch (memory independent of their number)."""
    from stellar_tok.evaluation.fid import FeatureStats, feature_stats

    rng = np.random.default_rng(0)
    batches = [np.abs(rng.normal(3, 1, (k, 6))) for k in (1, 7, 3, 50, 2)]
    acc = FeatureStats(block=8)
    for b in batches:
        acc.add(b)
    assert acc.count == 63
    got, want = acc.stats(), feature_stats(np.concatenate(batches))
    assert got["n"] == 63
    np.testing.assert_allclose(got["mu"], want["mu"], rtol=1e-12)
    np.testing.assert_allclose(got["sigma"], want["sigma"], rtol=1e-10, atol=1e-12)


def test_labelled_samples_against_adm_statistics_are_not_judged_on_shapes(tmp_path, fake_inception, monkeypatch):
    """Class-labelled samples scored against ADM's mu/sigma with data.* left at its default (shapes): the class
    accuracy judge (an embedded set's classifier) does not run; the notes say why."""
    from generators import judge
    from generators.evaluate import main

    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=samples, arr_1=np.arange(12) % 4)
    _adm_batch(tmp_path / "VIRTUAL.npz", 15, np.zeros(15), np.eye(15))
    monkeypatch.setattr(judge, "judge", lambda *a, **k: pytest.fail("judged on shapes against an ImageNet reference"))
    rep = main([f"samples={tmp_path / 'samples.npz'}", f"out={tmp_path / 'out'}", f"fid.ref={tmp_path / 'VIRTUAL.npz'}", "progress=false"])
    assert "class_accuracy" not in rep["results"] and any("class accuracy left out" in n for n in rep["notes"])
