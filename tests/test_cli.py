"""One command-line style (every command parses key=value through stellar_tok.config and refuses an unknown key with
one line), and atomic file writing (stellar_tok.files)."""
from __future__ import annotations

import json
import os
import stat
import warnings

import pytest

from stellar_tok.files import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text


def _mains():
    from benchmarks import imagenet_like, view_memory
    from generators import class_accuracy
    from stellar_tok import make_shards, probe

    return {"probe": probe.main, "class_accuracy": class_accuracy.main, "make_shards": make_shards.main,
            "view_memory": view_memory.main, "imagenet_like": imagenet_like.main}


# (command, arguments with one misspelt key, the key)
TYPOS = [
    ("probe", ["features=pixels", "epoch=3"], "epoch"),
    ("class_accuracy", ["samples=missing.npz", "epoch=3"], "epoch"),
    ("make_shards", ["src=SRC", "out=OUT", "shardsize=3"], "shardsize"),
    ("make_shards", ["SRC", "OUT", "--shardsize", "3"], "--shardsize"),  # the older flag form (deprecated)
    ("view_memory", ["batch=2", "batchsize=2"], "batchsize"),
    ("imagenet_like", ["stage=images", "out=DIR", "tran=8"], "tran"),
]


@pytest.mark.parametrize("name,argv,key", TYPOS, ids=[f"{t[0]}-{t[2]}" for t in TYPOS])
def test_unknown_key_stops_with_one_line(name, argv, key, capsys):
    with pytest.raises(SystemExit) as exc:
        _mains()[name](argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and f"'{key}'" in lines[0], captured.err
    assert captured.out == ""  # nothing ran


@pytest.mark.parametrize("name,argv", [("probe", ["--help"]), ("class_accuracy", ["--help"]), ("make_shards", ["--help"]),
                                       ("view_memory", ["--help"]), ("imagenet_like", ["stage=run", "--help"])])
def test_help_lists_every_key(name, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        _mains()[name](argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "Every key and its default" in out and "[overrides ...]" in out


def test_make_shards_flag_form_is_the_key_value_form_with_a_future_warning(tmp_path, capsys):
    from stellar_tok.make_shards import from_flags, main

    flags = ["in/", "out/", "--prefix", "val", "--shard-size=3", "--no-progress", "--overwrite", "seed=2"]
    args, positional = from_flags(flags)
    assert positional == ["in/", "out/"]
    assert args == ["prefix=val", "shard_size=3", "progress=false", "overwrite=true", "seed=2"]
    # it still runs for one release, warned once with the key=value equivalent; the key=value form is not warned
    src, out = str(tmp_path / "missing"), str(tmp_path / "out")
    equivalent = f"python -m stellar_tok.make_shards src={src} out={out} prefix=val shard_size=3 progress=false overwrite=true seed=2"
    with pytest.warns(FutureWarning) as warned:
        assert main([src, out, *flags[2:]]) == 2  # SRC_FOLDER does not exist: the same error as key=value
    assert [str(w.message).rpartition("key=value form: ")[2] for w in warned] == [equivalent]
    flag_err = capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert main(equivalent.split()[3:]) == 2
    assert capsys.readouterr().err == flag_err and "SRC_FOLDER" in flag_err


def test_benchmark_values_come_back_typed():
    from benchmarks.common import parse_args
    from benchmarks.fid_memory import FIDMemoryArgs
    from benchmarks.train_speed import TrainSpeedArgs
    from benchmarks.view_memory import ViewMemoryArgs
    from stellar_tok.errors import UserError

    fid = parse_args("prog", "doc", FIDMemoryArgs, ["keep=true"], "")
    assert fid.n == "2000,10000" and fid.keep is True and fid.size == 256
    speed = parse_args("prog", "doc", TrainSpeedArgs, ["batch.tiny=8", "overrides=align.match=argmax;recon.pixel=l2"], "")
    assert speed.batch.tiny == 8 and speed.batch.vit_b16 == 2 and speed.overrides == "align.match=argmax;recon.pixel=l2"
    assert parse_args("prog", "doc", ViewMemoryArgs, ["config=tiny"], "").config == "tiny"  # a name, not a file to merge
    with pytest.raises(UserError, match="'size'"):
        parse_args("prog", "doc", FIDMemoryArgs, ["size=big"], "")


# ----------------------------------------------------------------------------------------------
# atomic writing
# ----------------------------------------------------------------------------------------------


def test_atomic_write_leaves_no_partial_file_when_the_writer_raises(tmp_path):
    path = tmp_path / "out.bin"
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(str(path)) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half of it")
            raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == []  # neither the file nor its temporary

    path.write_bytes(b"the old file")
    with pytest.raises(KeyboardInterrupt):  # a kill-like interruption too
        with atomic_path(str(path)) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"new")
            raise KeyboardInterrupt
    assert path.read_bytes() == b"the old file" and os.listdir(tmp_path) == ["out.bin"]


def test_atomic_write_replaces_an_existing_file_whole(tmp_path):
    path = tmp_path / "sub" / "x.json"  # the folder is created
    atomic_write_json(str(path), {"a": list(range(1000))})
    atomic_write_json(str(path), {"b": 1})  # shorter: no tail of the old content survives
    assert json.loads(path.read_text()) == {"b": 1}
    atomic_write_text(str(path), "short")
    assert path.read_text() == "short"
    atomic_write_bytes(str(path), b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01" and os.listdir(path.parent) == ["x.json"]


def test_atomic_files_get_the_users_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(str(tmp_path / "a.txt"), "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o644  # not mkstemp's 0600
