"""Tokenize integrity: unreadable webdataset input, an image folder changed between runs, unlabelled samples."""
import io
import json
import os
import tarfile
import zlib

import numpy as np
import pytest
from conftest import make_tiny_tokenizer
from PIL import Image

import stellar_tok.tokenize as tokmod
import stellar_tok.latents.writer as tokenizing
from stellar_tok.config import load_config
from stellar_tok.errors import UserError
from stellar_tok.latents.dataset import LatentDataset
from stellar_tok.latents.writer import TokenizeConfig, tokenize


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok"
    return make_tiny_tokenizer(path), str(path)


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_tar(path, samples):
    """samples: (key, label or None); the image is a 40x40 noise PNG, the label a .cls member when given."""
    with tarfile.open(path, "w") as tar:
        for key, label in samples:
            members = [(f"{key}.png", _png(zlib.crc32(key.encode())))] + ([(f"{key}.cls", str(label).encode())] if label is not None else [])
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _args(tok_path, out, *extra):
    return [f"tokenizer={tok_path}", f"out={out}", "batch_size=3", "progress=false", *extra]


# ----------------------------------------------------------------------------------------------
# 9: an unreadable input tar is a failed unit, never a partial shard; a rerun redoes exactly the failures
# ----------------------------------------------------------------------------------------------


def test_unreadable_wds_input_fails_the_run_and_a_rerun_redoes_only_it(tmp_path, tok_dir, capsys):
    _, tok_path = tok_dir
    src, out = tmp_path / "src", tmp_path / "lat"
    src.mkdir()
    keys = [[f"s{t}_{i}" for i in range(4)] for t in range(3)]
    tars = [src / f"train-{t:06d}.tar" for t in range(3)]
    for t in range(3):
        _write_tar(tars[t], [(k, i % 2) for i, k in enumerate(keys[t])])
    whole = [p.read_bytes() for p in tars]
    with tarfile.open(tars[1]) as tar:
        last = tar.getmembers()[-2]  # the last image: cut inside its data (fails part-way)
    tars[1].write_bytes(whole[1][: last.offset_data + last.size // 2])
    tars[2].unlink()  # fails to open
    args = _args(tok_path, out, "data.name=wds", f"data.path={src}/train-{{000000..000002}}.tar")

    for attempt in range(2):  # still unreadable on the second run: still incomplete, nothing counted done
        with pytest.raises(SystemExit) as e:
            tokmod.main(args)
        assert e.value.code == 1
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert line.startswith("tokenize: INCOMPLETE: 2 of 3 input shards failed"), line
        assert "train-000001.tar" in line and "train-000002.tar" in line and "rerun" in line, line
        written = sorted(f for f in os.listdir(out / "shards") if f.endswith(".safetensors"))
        assert written == ["train-000000.safetensors"]  # no partial shard of the cut tar
        manifest = json.load(open(out / "manifest.json"))
        assert manifest["complete"] is False and [f["shard"] for f in manifest["failed"]] == ["train-000001", "train-000002"]
        assert manifest["summary"]["shards_already_done"] == attempt
        with pytest.raises(UserError, match="2 input shards failed") as err:
            LatentDataset(str(out))
        assert "\n" not in str(err.value)

    done = os.stat(out / "shards" / "train-000000.safetensors").st_mtime_ns
    for p, data in zip(tars, whole):
        p.write_bytes(data)  # the input is readable again
    summary = tokmod.main(args)
    assert summary["shards_already_done"] == 1 and summary["images_this_run"] == 8 and summary["images"] == 12
    assert not summary["failed"]
    assert os.stat(out / "shards" / "train-000000.safetensors").st_mtime_ns == done  # redone: exactly the failed units
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("tokenize: 12 images in 3 shards (1 already done)")
    ds = LatentDataset(str(out))
    assert ds.keys() == keys[0] + keys[1] + keys[2] and ds.labels().tolist() == [0, 1, 0, 1] * 3


# ----------------------------------------------------------------------------------------------
# 10: the identity of an image folder includes its file list
# ----------------------------------------------------------------------------------------------


def test_a_folder_changed_between_runs_is_refused(tmp_path, tok_dir, monkeypatch):
    tok, _ = tok_dir
    folder, out = tmp_path / "images", str(tmp_path / "lat")
    for c in ("cat", "dog"):
        os.makedirs(folder / c)
        for i in range(1, 4):
            (folder / c / f"{i}.png").write_bytes(_png(i + (10 if c == "dog" else 0)))

    def cfg(*extra):
        return load_config([f"out={out}", "data.name=folder", f"data.path={folder}", "shard_size=2", "batch_size=2",
                            "progress=false", *extra], schema=TokenizeConfig)

    real_write, calls = tokenizing.write_shard, []

    def dying_write(path, tensors, meta):
        if len(calls) == 1:
            raise KeyboardInterrupt  # killed after the first shard
        calls.append(path)
        real_write(path, tensors, meta)

    monkeypatch.setattr(tokenizing, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        tokenize(cfg(), tokenizer=tok)
    monkeypatch.setattr(tokenizing, "write_shard", real_write)

    (folder / "cat" / "0.png").write_bytes(_png(99))  # sorts first: every index range of the listing moves by one
    with pytest.raises(UserError, match="6 files then, 7 now") as e:
        tokenize(cfg(), tokenizer=tok)
    assert "overwrite=true" in str(e.value) and "\n" not in str(e.value)
    os.rename(folder / "dog" / "3.png", folder / "dog" / "4.png")
    (folder / "cat" / "0.png").unlink()  # the same count, another file
    with pytest.raises(UserError, match="6 files then, 6 now"):
        tokenize(cfg(), tokenizer=tok)

    summary = tokenize(cfg("overwrite=true"), tokenizer=tok)
    assert summary["images"] == 6
    assert LatentDataset(out).keys() == [f"cat/{i}.png" for i in (1, 2, 3)] + [f"dog/{i}.png" for i in (1, 2, 4)]
    assert tokenize(cfg(), tokenizer=tok)["shards_already_done"] == 3  # unchanged: resumes (nothing to do)


# ----------------------------------------------------------------------------------------------
# 11: a sample labelled -1 is named where a class is required
# ----------------------------------------------------------------------------------------------


def test_unlabelled_samples_are_refused_where_a_class_is_required(tmp_path, tok_dir, capsys):
    from generators.train import main as train_main

    tok, _ = tok_dir
    src, out = tmp_path / "src", str(tmp_path / "lat")
    src.mkdir()
    _write_tar(src / "train-000000.tar", [("a", 0), ("b", 1), ("nolabel", None), ("d", 1)])
    summary = tokenize(load_config([f"out={out}", "data.name=wds", f"data.path={src}", "batch_size=4", "progress=false"],
                                   schema=TokenizeConfig), tokenizer=tok)
    assert summary["images"] == 4 and summary["unlabelled"] == 1
    assert "1 unlabelled" in capsys.readouterr().out  # told at tokenize time already

    ds = LatentDataset(out)
    assert ds.labels().tolist() == [0, 1, -1, 1]  # reading is fine: tokenize allows unlabelled data
    with pytest.raises(UserError, match="nolabel") as e:
        ds.num_classes  # a class is required
    assert "\n" not in str(e.value)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    del manifest["unlabelled"]  # a folder written before tokenize counted them: the labels are read
    json.dump(manifest, open(os.path.join(out, "manifest.json"), "w"))
    with pytest.raises(UserError, match=r"1 of 4 samples have no class \(label -1; first: nolabel\)"):
        LatentDataset(out).num_classes
    with pytest.raises(SystemExit) as e:
        train_main(["config=configs/generator/tiny.yaml", f"data.latents={out}", "model.width=32", "model.depth=1", "model.heads=2",
                    "train.progress=false", "train.steps=1", f"train.output_dir={tmp_path / 'run'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nolabel" in err[0] and "label -1" in err[0], err
