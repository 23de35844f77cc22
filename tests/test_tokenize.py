"""Tokenizing a data set to latent shards: round trip, statistics, resume, refusal, multi-process."""
import json
import os

import pytest
import torch
from conftest import TINY_MODEL, launch_two_processes, make_tiny_tokenizer

import stellar_tok.tokenize as tokmod
import stellar_tok.latents.writer as tokenizing
from stellar_tok import Latent, StellarTokenizer
from stellar_tok.config import load_config
from stellar_tok.data import build_dataset
from stellar_tok.errors import UserError
from stellar_tok.latents.dataset import LatentDataset, collate_latents, read_shard_meta
from stellar_tok.latents.writer import TokenizeConfig, tokenize

N = 72  # shapes images in the tests' train split


def _cfg(out, *extra):
    return load_config([f"out={out}", "data.name=shapes", f"data.train_size={N}", "data.val_size=8", "shard_size=20",
                        "batch_size=16", "progress=false", *extra], schema=TokenizeConfig)


def _images():
    ds = build_dataset({"name": "shapes", "resolution": 32, "train_size": N, "val_size": 8}, "train")
    x = torch.from_numpy(ds.images.copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.from_numpy(ds.labels.copy())


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def written(tmp_path_factory, tok):
    out = str(tmp_path_factory.mktemp("lat") / "float32")
    summary = tokenize(_cfg(out, "dtype=float32", "flip=true"), tokenizer=tok)
    return out, summary


def test_round_trip_equals_direct_encode_decode(written, tok):
    out, summary = written
    assert summary == {**summary, "images": N, "shards": 4, "skipped": 0}  # 72 images, 20 per shard
    x, y = _images()
    direct = tok.encode(x)
    for flip_p, ref in ((0.0, direct), (1.0, tok.encode(x.flip(-1)))):
        ds = LatentDataset(out, normalize=True, flip_p=flip_p)
        assert len(ds) == N and ds.classes[0] == "circle"
        batch = collate_latents([ds[i] for i in range(N)])
        assert torch.equal(batch["label"], y)
        lat = ds.to_latent(batch)
        assert lat.normalized and lat.stats is ds.stats
        raw = lat.denormalize()
        torch.testing.assert_close(raw.z, ref.z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(raw.log_loc, ref.log_loc, atol=1e-5, rtol=1e-5)
        # decode takes the normalised latent and undoes the data set's normalisation (not the tokenizer's)
        torch.testing.assert_close(tok.decode(lat), tok.decode(ref), atol=1e-5, rtol=1e-5)
    raw_ds = LatentDataset(out, normalize=False, flip_p=0.0, in_memory=True)
    assert torch.equal(raw_ds[5]["z"], direct.z[5]) and torch.equal(raw_ds[5]["log_loc"], direct.log_loc[5])
    assert raw_ds.keys() == [f"train/{i:08d}" for i in range(N)]


def test_statistics_match_direct_computation(written, tok):
    out, _ = written
    x, _ = _images()
    both = Latent.cat([tok.encode(x), tok.encode(x.flip(-1))])  # flip=true: the flipped copies count too
    with open(os.path.join(out, "stats.json")) as f:
        stats = json.load(f)
    t = both.z.double().flatten(0, 1)
    torch.testing.assert_close(torch.tensor(stats["z_mean"]), t.mean(0).float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(stats["z_std"]), t.std(0, unbiased=False).float(), atol=1e-5, rtol=1e-4)
    assert stats["log_loc_mean"] == pytest.approx(both.log_loc.double().mean().item(), rel=1e-5)
    assert stats["log_loc_std"] == pytest.approx(both.log_loc.double().std(unbiased=False).item(), rel=1e-5)
    assert stats["images"] == N and stats["includes_flipped"] is True
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["complete"] and manifest["shapes"] == {"z": [16, 8], "log_loc": [64, 16], "label": []}
    assert [s["count"] for s in manifest["shards"]] == [20, 20, 20, 12]


def test_float16_storage_decodes_close(tmp_path, tok):
    out = str(tmp_path / "f16")
    tokenize(_cfg(out), tokenizer=tok)  # default dtype float16
    ds = LatentDataset(out, normalize=True)
    assert ds.flip_p == 0.0
    x, _ = _images()
    lat = ds.to_latent(collate_latents([ds[i] for i in range(8)]))
    err = (tok.decode(lat) - tok.decode(tok.encode(x[:8]))).abs().max().item()
    assert err < 0.05, err


def test_resume_after_kill_writes_each_image_once(tmp_path, tok, monkeypatch):
    out = str(tmp_path / "resume")
    real_write, calls = tokenizing.write_shard, []

    def dying_write(path, tensors, meta):
        if len(calls) == 2:  # killed while the third shard is being written: a half-written temporary file
            open(path + ".tmp", "wb").write(b"partial")
            raise KeyboardInterrupt
        calls.append(path)
        real_write(path, tensors, meta)

    monkeypatch.setattr(tokenizing, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        tokenize(_cfg(out), tokenizer=tok)
    with pytest.raises(UserError, match="incomplete"):
        LatentDataset(out)  # the manifest says the run did not finish
    before = {p: os.stat(p).st_mtime_ns for p in calls}
    monkeypatch.setattr(tokenizing, "write_shard", real_write)
    summary = tokenize(_cfg(out), tokenizer=tok)
    assert summary["shards_already_done"] == 2 and summary["images_this_run"] == N - 40
    assert {p: os.stat(p).st_mtime_ns for p in calls} == before  # finished shards were not rewritten
    assert not [f for f in os.listdir(os.path.join(out, "shards")) if f.endswith(".tmp")]
    keys = LatentDataset(out).keys()
    assert keys == [f"train/{i:08d}" for i in range(N)]  # every image exactly once, in order


def test_another_tokenizer_is_refused(written, tok):
    out, _ = written
    torch.manual_seed(1)
    other = StellarTokenizer(**TINY_MODEL).eval()
    with pytest.raises(UserError, match="another tokenizer"):
        tokenize(_cfg(out, "dtype=float32", "flip=true"), tokenizer=other)
    with pytest.raises(UserError, match="another flip"):
        tokenize(_cfg(out, "dtype=float32"), tokenizer=tok)
    meta = read_shard_meta(os.path.join(out, "shards", "train-000000.safetensors"))
    assert meta["count"] == 20  # the refused runs touched nothing


def test_cli_errors_are_one_line(tmp_path, capsys, tok):
    tok.save_pretrained(str(tmp_path / "tok"))
    with pytest.raises(SystemExit) as e:
        tokmod.main([f"tokenizer={tmp_path / 'missing'}", f"out={tmp_path / 'o'}"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        tokmod.main([f"tokenizer={tmp_path / 'tok'}", f"out={tmp_path / 'o'}", "dtype=int8", "data.train_size=8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(l.startswith("error: ") for l in err) and "dtype" in err[1]


def test_two_processes_split_the_work(tmp_path, tok):
    """`accelerate launch --num_processes 2`: each process writes its own shards; the result equals one process."""
    tok.save_pretrained(str(tmp_path / "tok"))
    args = [f"tokenizer={tmp_path / 'tok'}", "data.name=shapes", f"data.train_size={N}", "shard_size=20", "dtype=float32", "progress=false"]
    r = launch_two_processes("stellar_tok.tokenize", [f"out={tmp_path / 'two'}", *args], 29534)
    # gloo sometimes aborts at interpreter exit after all work is done; the outputs decide
    assert "tokenize: 72 images in 4 shards (0 already done)" in r.stdout, r.stderr[-3000:]
    assert r.stdout.lstrip().startswith("running: 2 processes (multi_cpu, gloo), device cpu, precision no"), r.stdout[:300]
    tokmod.main([f"out={tmp_path / 'one'}", "mixed_precision=no", *args])  # a bare `no` (YAML false) is accepted
    one, two = LatentDataset(str(tmp_path / "one"), normalize=False), LatentDataset(str(tmp_path / "two"), normalize=False)
    assert one.keys() == two.keys()
    a, b = collate_latents([one[i] for i in range(N)]), collate_latents([two[i] for i in range(N)])
    assert torch.equal(a["z"], b["z"]) and torch.equal(a["log_loc"], b["log_loc"])
    torch.testing.assert_close(one.stats.z_mean, two.stats.z_mean)


def test_sets_of_the_first_format_still_read(written, tmp_path):
    """A set written before z and log L got their names (format 1: tensors `tokens`/`loc`, stats `token_mean`...)
    reads item for item as the same set in the current format, and a generator sizes itself from either manifest."""
    import shutil

    from safetensors.torch import load_file, save_file

    from stellar_tok.latents.dataset import latent_shapes

    new, old = written[0], tmp_path / "old"
    shutil.copytree(new, old)
    renames = {"z": "tokens", "log_loc": "loc", "z_flip": "tokens_flip", "log_loc_flip": "loc_flip"}
    for shard in (old / "shards").glob("*.safetensors"):
        meta = {**read_shard_meta(str(shard)), "format": "stellar-latents/1"}
        meta["count"] = str(meta["count"])
        save_file({renames.get(k, k): v for k, v in load_file(str(shard)).items()}, str(shard), metadata=meta)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest.update(format="stellar-latents/1", shapes={renames.get(k, k): v for k, v in manifest["shapes"].items()})
    (old / "manifest.json").write_text(json.dumps(manifest))
    stats = json.loads((old / "stats.json").read_text())
    (old / "stats.json").write_text(json.dumps({{"z_mean": "token_mean", "z_std": "token_std", "log_loc_mean": "loc_mean",
                                                  "log_loc_std": "loc_std"}.get(k, k): v for k, v in stats.items()}))
    assert "tokens" in load_file(str(next((old / "shards").glob("*.safetensors"))))
    new_ds, old_ds = LatentDataset(new, flip_p=0.0), LatentDataset(str(old), flip_p=0.0)
    a, b = collate_latents([new_ds[i] for i in range(N)]), collate_latents([old_ds[i] for i in range(N)])
    assert torch.equal(a["z"], b["z"]) and torch.equal(a["log_loc"], b["log_loc"]) and torch.equal(a["label"], b["label"])
    assert latent_shapes(old_ds.manifest) == latent_shapes(new_ds.manifest) == (16, 8, 64)
    with pytest.warns(FutureWarning, match="Latent.z"):
        assert torch.equal(old_ds.to_latent(b).tokens, b["z"])
