"""Fault injection: kills, signals, broken checkpoints, bad data, bad configs, non-finite losses and crafted
pickles. docs/RELIABILITY.md lists what each test guarantees."""
import builtins
import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tokenize_shapes
from stellar_tok import StellarTokenizer
from stellar_tok.training.checkpoint import MANIFEST, find_checkpoints, latest_valid_checkpoint, verify_checkpoint
from stellar_tok.errors import UserError
from stellar_tok.train import main

FAST = [
    "config=configs/tokenizer/tiny.yaml",
    "model.width=32", "model.depth=1", "model.heads=2", "model.decoder_width=32", "model.decoder_depth=1", "model.decoder_heads=2",
    "align.head_hidden=64", "data.train_size=256", "data.val_size=64", "optim.batch_size=16", "optim.warmup_steps=2",
    "train.log_every=1", "train.progress=false", "train.stats_batches=1", "train.image_every=1000",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}


def _cmd(out, *extra):
    return [sys.executable, "-m", "stellar_tok.train", *FAST, f"train.output_dir={out}", *extra]


def _metrics(out) -> list[dict]:
    rows = []
    path = os.path.join(out, "metrics.jsonl")
    if os.path.exists(path):
        for line in open(path):
            try:
                rows.append(json.loads(line))
            except ValueError:  # being written
                pass
    return rows


def _refused(capsys, argv, match: str) -> None:
    """`main(argv)` stops with exit status 2 and one `error:` line (a UserError) that matches `match`."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert e.value.code == 2 and len(err) == 1 and re.search(match, err[0]), err


def _last_step(out) -> int:
    rows = _metrics(out)
    return rows[-1]["step"] if rows else 0


def _wait_for_step(proc, out, step: int, timeout: float = 120) -> int:
    t0 = time.time()
    while time.time() - t0 < timeout:
        s = _last_step(out)
        if s >= step:
            return s
        if proc.poll() is not None:
            raise AssertionError(f"training exited (rc {proc.returncode}) before step {step}")
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached in {timeout}s")


# ----------------------------------------------------------------------------------------------
# exact resume after SIGKILL, and a kill in the middle of writing a checkpoint
# ----------------------------------------------------------------------------------------------

# in a subprocess: the run SIGKILLs itself once checkpoint step-$KILL_AT is fully written but before its
# manifest exists (the worst moment: every file there, the folder not yet complete)
KILL_INSIDE_SAVE = """
import os, signal, sys
import stellar_tok.training.checkpoint as c
orig = c.fsync_tree
def fsync_then_die(root):
    files = orig(root)
    if root.endswith(f"step-{int(os.environ['KILL_AT']):07d}.tmp"):
        os.kill(os.getpid(), signal.SIGKILL)
    return files
c.fsync_tree = fsync_then_die
from stellar_tok.train import main
main(sys.argv[1:])
"""


def test_sigkill_at_five_random_points_resumes_exactly(tmp_path):
    """Killed with SIGKILL at 5 random steps and once while writing a checkpoint, resumed each time with
    train.resume=auto: same final step, the same loss at every step and the same weights as a run that was
    never interrupted (CPU, one thread: equal to 1e-6)."""
    steps, every = 36, 3
    common = [f"train.steps={steps}", f"train.ckpt_every={every}", "train.keep_ckpts=2"]
    base, run = str(tmp_path / "base"), str(tmp_path / "killed")
    subprocess.run(_cmd(base, *common), env=ENV, check=True, timeout=300, capture_output=True)

    points = sorted(random.Random(20261127).sample(range(2, steps - every), 5))
    log = open(tmp_path / "killed.log", "w")
    resumed_from = []
    for i, target in enumerate(points):
        ckpts = find_checkpoints(os.path.join(run, "checkpoints"))
        start = int(os.path.basename(ckpts[-1])[5:]) if ckpts else 0
        resumed_from.append(start)
        proc = subprocess.Popen(_cmd(run, *common, *(["train.resume=auto"] if i else [])), env=ENV, stdout=log, stderr=log)
        _wait_for_step(proc, run, max(target, start + 1))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
    # a sixth kill inside the next checkpoint write: the resume below starts from the newest complete one
    kill_at = int(os.path.basename(find_checkpoints(os.path.join(run, "checkpoints"))[-1])[5:]) + every
    proc = subprocess.run([sys.executable, "-c", KILL_INSIDE_SAVE, *_cmd(run, *common, "train.resume=auto")[3:]],
                          env={**ENV, "KILL_AT": str(kill_at)}, stdout=log, stderr=log, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert os.path.isdir(os.path.join(run, "checkpoints", f"step-{kill_at:07d}.tmp"))
    assert not os.path.isdir(os.path.join(run, "checkpoints", f"step-{kill_at:07d}"))
    subprocess.run(_cmd(run, *common, "train.resume=auto"), env=ENV, check=True, timeout=300, stdout=log, stderr=log)

    assert len(set(resumed_from)) >= 3, resumed_from  # the kills landed at different places
    sa, sb = (json.load(open(os.path.join(d, "summary.json"))) for d in (base, run))
    assert sa["step"] == sb["step"] == steps and sa["images_seen"] == sb["images_seen"]
    ma, mb = _metrics(base), _metrics(run)
    assert [r["step"] for r in mb] == list(range(1, steps + 1))  # each step logged once, in order
    for ra, rb in zip(ma, mb):
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-9), ra["step"]
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6, abs=1e-6), (ra["step"], ra["loss"], rb["loss"])
    ta = StellarTokenizer.from_pretrained(os.path.join(base, "tokenizer"))
    tb = StellarTokenizer.from_pretrained(os.path.join(run, "tokenizer"))
    for (k, x), (_, y) in zip(ta.state_dict().items(), tb.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6, msg=k)
    # only complete checkpoints, the last two kept (the .tmp folder of the killed save was cleared)
    names = sorted(os.listdir(os.path.join(run, "checkpoints")))
    assert names == [f"step-{steps - every:07d}", f"step-{steps:07d}"], names


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_a_final_checkpoint_and_export(tmp_path, sig):
    out = str(tmp_path / "run")
    proc = subprocess.Popen(_cmd(out, "train.steps=100000", "train.ckpt_every=100000"), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_step(proc, out, 3)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    _assert_stopped_with_checkpoint_and_export(proc, output, out, sig)


def _assert_stopped_with_checkpoint_and_export(proc, output: str, out: str, sig) -> None:
    """Exit 0, a verified checkpoint of the last finished step, a loadable export, the stop line printed."""
    assert proc.returncode == 0, output[-2000:]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["stopped_by"] == sig.name
    ckpt = find_checkpoints(os.path.join(out, "checkpoints"))[-1]
    assert ckpt.endswith(f"step-{summary['step']:07d}") and verify_checkpoint(ckpt) is None
    StellarTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    assert f"{sig.name}: stopping after this step" in output


# ----------------------------------------------------------------------------------------------
# checkpoints: keep K, incomplete and corrupt ones, safe loading
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("short") / "run")
    main(FAST + ["train.steps=6", "train.ckpt_every=2", "train.keep_ckpts=2", f"train.output_dir={out}"])
    return out


def _copy_run(short_run, tmp_path) -> str:
    out = str(tmp_path / "run")
    shutil.copytree(short_run, out)
    return out


def test_incomplete_and_corrupt_checkpoints_are_skipped(short_run, tmp_path, capsys):
    out = _copy_run(short_run, tmp_path)
    cdir = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(cdir)) == ["step-0000004", "step-0000006"]  # keep_ckpts=2
    good = os.path.join(cdir, "step-0000006")
    # a kill before the rename leaves a .tmp folder; one without a manifest is not complete either
    shutil.copytree(good, os.path.join(cdir, "step-0000008.tmp"))
    shutil.copytree(good, os.path.join(cdir, "step-0000010"))
    os.remove(os.path.join(cdir, "step-0000010", MANIFEST))
    # a complete one whose weights were damaged afterwards (one flipped byte, then a truncation)
    bad = os.path.join(cdir, "step-0000012")
    shutil.copytree(good, bad)
    weights = os.path.join(bad, "model.safetensors")
    data = bytearray(open(weights, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(weights, "wb").write(bytes(data))
    assert "SHA-256" in verify_checkpoint(bad)
    with pytest.warns(UserWarning, match="step-0000012"):
        assert latest_valid_checkpoint(cdir) == good
    open(weights, "wb").write(bytes(data[:100]))
    assert "bytes" in verify_checkpoint(bad)
    # an explicit resume from it is refused with one line; auto resumes from step 6
    _refused(capsys, FAST + ["train.steps=8", f"train.output_dir={out}", f"train.resume={bad}"], "does not match|bytes")
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        s = main(FAST + ["train.steps=8", "train.ckpt_every=2", f"train.output_dir={out}", "train.resume=auto"])
    assert s["step"] == 8
    assert [r["step"] for r in _metrics(out)] == list(range(1, 9))


class _Evil:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('executed')",))


def test_crafted_pickle_in_an_export_is_never_executed(short_run, tmp_path):
    export = str(tmp_path / "tokenizer")
    shutil.copytree(os.path.join(short_run, "tokenizer"), export)
    marker = str(tmp_path / "marker")
    torch.save({"w": _Evil(marker)}, os.path.join(export, "diffusion_pytorch_model.bin"))
    StellarTokenizer.from_pretrained(export)  # the safetensors file is used, the .bin never opened
    os.remove(os.path.join(export, "diffusion_pytorch_model.safetensors"))
    with pytest.raises(UserError, match="never unpickles"):
        StellarTokenizer.from_pretrained(export)
    with pytest.raises(ValueError, match="safetensors"):
        StellarTokenizer.from_pretrained(export, use_safetensors=False)
    assert not os.path.exists(marker)


def test_checkpoint_files_are_loaded_weights_only(short_run, tmp_path, monkeypatch, capsys):
    out = _copy_run(short_run, tmp_path)
    ckpt = find_checkpoints(os.path.join(out, "checkpoints"))[-1]
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    s = main(FAST + ["train.steps=7", f"train.output_dir={out}", "train.resume=auto"])
    assert s["step"] == 7 and calls and all(w is True for w in calls), calls
    # a crafted optimizer file: refused by the manifest; with a forged manifest, torch refuses to run it
    marker = str(tmp_path / "marker")
    evil = os.path.join(ckpt, "optimizer.bin")
    torch.save({"state": _Evil(marker)}, evil)
    _refused(capsys, FAST + ["train.steps=8", f"train.output_dir={out}", f"train.resume={ckpt}"], "SHA-256|bytes")
    import hashlib

    manifest = json.load(open(os.path.join(ckpt, MANIFEST)))
    manifest["files"]["optimizer.bin"] = {"size": os.path.getsize(evil), "sha256": hashlib.sha256(open(evil, "rb").read()).hexdigest()}
    json.dump(manifest, open(os.path.join(ckpt, MANIFEST), "w"))
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        main(FAST + ["train.steps=8", f"train.output_dir={out}", f"train.resume={ckpt}"])
    assert not os.path.exists(marker)


# ----------------------------------------------------------------------------------------------
# non-finite losses
# ----------------------------------------------------------------------------------------------


def _nan_at(monkeypatch, calls_to_poison):
    """Make the alignment loss NaN on the given forward calls (0-based)."""
    from stellar_tok.training.objective import TokenizerWithHeads

    real = TokenizerWithHeads.forward
    count = {"n": 0}

    def forward(self, views):
        out = real(self, views)
        if count["n"] in calls_to_poison or "all" in calls_to_poison:
            out["align_loss"] = out["align_loss"] * float("nan")
        count["n"] += 1
        return out

    monkeypatch.setattr(TokenizerWithHeads, "forward", forward)


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    _nan_at(monkeypatch, {2, 3, 7})
    out = str(tmp_path / "run")
    s = main(FAST + ["train.steps=8", "train.ckpt_every=100", f"train.output_dir={out}"])
    assert s["step"] == 8 and s["nonfinite_skipped"] == 3
    assert _metrics(out)[-1]["nonfinite_skipped"] == 3
    assert all(np.isfinite(r["loss"]) for r in _metrics(out))
    assert s["images_seen"] == 8 * 16  # skipped steps do not count as trained


def test_too_many_nonfinite_in_a_row_stop_with_a_checkpoint(tmp_path, monkeypatch, capsys):
    _nan_at(monkeypatch, {"all"})
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        main(FAST + ["train.steps=8", "train.max_nonfinite=4", f"train.output_dir={out}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: 4 non-finite losses in a row at step 0") and "checkpoint was saved" in err[-1]
    ckpt = find_checkpoints(os.path.join(out, "checkpoints"))
    assert len(ckpt) == 1 and verify_checkpoint(ckpt[0]) is None


# ----------------------------------------------------------------------------------------------
# bad data
# ----------------------------------------------------------------------------------------------


def _bad_data_folder(root, n=100, bad_every=10):
    """n images in two classes; every `bad_every`-th is unreadable, too small or empty, and as many others
    are grayscale, CMYK, 16-bit, RGBA or palette images (converted, not skipped)."""
    rng = np.random.default_rng(0)
    bad = odd = 0
    for i in range(n):
        cls = os.path.join(root, "ab"[i % 2])
        os.makedirs(cls, exist_ok=True)
        arr = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        kind = i % bad_every
        if kind == 0:  # bad: three kinds in turn
            bad += 1
            which = (i // bad_every) % 3
            if which == 0:
                buf = open(os.path.join(cls, f"{i}.jpg"), "wb")
                Image.fromarray(arr).save(buf, "JPEG")
                buf.close()
                data = open(os.path.join(cls, f"{i}.jpg"), "rb").read()
                open(os.path.join(cls, f"{i}.jpg"), "wb").write(data[: len(data) // 3])  # truncated
            elif which == 1:
                Image.fromarray(arr[:4, :4]).save(os.path.join(cls, f"{i}.png"))  # smaller than 8 px
            else:
                open(os.path.join(cls, f"{i}.png"), "wb").write(b"not an image at all")
        elif kind == 5:  # odd, converted
            odd += 1
            which = (i // bad_every) % 5
            img = [Image.fromarray(arr[..., 0], "L"), Image.fromarray(arr).convert("CMYK"),
                   Image.fromarray(arr[..., 0].astype(np.uint16) * 257), Image.fromarray(arr).convert("RGBA"),
                   Image.fromarray(arr).convert("P")][which]
            img.save(os.path.join(cls, f"{i}.{'jpg' if img.mode == 'CMYK' else 'png'}"))
        else:
            Image.fromarray(arr).save(os.path.join(cls, f"{i}.png"))
    return bad, odd


def test_ten_percent_bad_images_train_to_completion_and_are_counted(tmp_path):
    bad, odd = _bad_data_folder(str(tmp_path / "data"))
    assert (bad, odd) == (10, 10)
    out = str(tmp_path / "run")
    # 100 images, batch 10: every image is read once per epoch; 2 epochs
    s = main(FAST + ["data.name=folder", f"data.path={tmp_path / 'data'}", "optim.batch_size=10", "train.steps=20",
                     "train.ckpt_every=100", f"train.output_dir={out}"])
    assert s["step"] == 20
    assert sum(s["skipped_samples"].values()) == 2 * bad  # each bad file skipped once per epoch
    assert s["skipped_samples"] == {"decode_error": 14, "too_small": 6}
    assert _metrics(out)[-1]["data_skipped"] == 2 * bad


# ----------------------------------------------------------------------------------------------
# bad configs: 30 mutations, each runs or fails before any work with one line naming the key
# ----------------------------------------------------------------------------------------------

MUTATIONS = [
    # (override, the key the one-line error must name; None: the run must work)
    ("model.num_tokens=0", "model.num_tokens"),
    ("model.num_tokens=-3", "model.num_tokens"),
    ("model.num_tokens=abc", "model.num_tokens"),
    ("model.num_tokens=8", None),
    ("model.image_size=30", "model.image_size"),
    ("model.patch_size=0", "model.patch_size"),
    ("model.patch_size=3", "model.patch_size"),
    ("model.width=33", "model.width"),
    ("model.heads=5", "model.width"),
    ("model.tau=0", "model.tau"),
    ("model.stem=resnet", "model.stem"),
    ("model.decoder_input=sparse", "model.decoder_input"),
    ("model.nonexistent=1", "model.nonexistent"),
    ("views.mask_ratio=1.0", "views.mask_ratio"),
    ("views.mask_ratio=0.5", None),
    ("views.local_size=18", "views.local_size"),
    ("views.global_scale=[0.5,0.2]", "views.global_scale"),
    ("views.blur_p=1.5", "views.blur_p"),
    ("data.name=imagenet", "data.name"),
    ("data.name=folder", "data.path"),
    ("data.path=/nonexistent/images", "data.path"),
    ("data.resolution=4", "data.resolution"),
    ("align.match=greedy", "align.match"),
    ("align.teacher_momentum=1.0", "align.teacher_momentum"),
    ("align.teacher_momentum=0.9", None),
    ("recon.pixel=l3", "recon.pixel"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.batch_size=1", "optim.batch_size"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("train.resume=/nonexistent/ckpt", "train.resume"),
    ("train.steps=0", "train.steps"),
    ("train.max_minutes=0.5", None),
]


@pytest.mark.parametrize("override,key", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_mutated_config_runs_or_names_the_key(override, key, tmp_path, capsys):
    out = str(tmp_path / "run")
    args = FAST + ["train.steps=2", "train.ckpt_every=100", f"train.output_dir={out}"]
    if override.startswith("data.path"):
        args.append("data.name=folder")
    if key is None:
        s = main(args + [override])
        assert s["step"] == 2
        return
    with pytest.raises(SystemExit) as e:
        main(args + [override])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and key in err, err
    assert not os.path.exists(out)  # failed before any work: nothing written


# ----------------------------------------------------------------------------------------------
# a stop signal to the whole process group (loader workers included); a full disk while saving
# ----------------------------------------------------------------------------------------------


def _image_folder(root, n: int) -> str:
    rng = np.random.default_rng(0)
    os.makedirs(root)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(os.path.join(root, f"{i:03d}.png"))
    return str(root)


def _popen_group(cmd, env=ENV):
    """A command in a process group of its own (its loader workers join it), as a cluster's job step."""
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _children(pid: int) -> list[str]:
    """The child processes of `pid` (Linux)."""
    with contextlib.suppress(OSError):
        return open(f"/proc/{pid}/task/{pid}/children").read().split()
    return []


def _end_group(proc) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _sigterm_group_after_step_2(cmd, out):
    """Start `cmd` in a process group of its own, SIGTERM the whole group once step 2 is logged: (proc, output)."""
    proc = _popen_group(cmd)
    try:
        _wait_for_step(proc, out, 2)
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        _end_group(proc)
    return proc, output


def test_sigterm_to_the_process_group_with_loader_workers_checkpoints_and_exports(tmp_path):
    """SIGTERM to every process of the group (scancel, preemption, `timeout`) while 2 loader workers decode an image
    folder: the workers ignore it, the run finishes its step, checkpoints and exports (they used to die first and
    take the main process with them: "DataLoader worker ... is killed by signal")."""
    images, out = _image_folder(tmp_path / "images", 64), str(tmp_path / "run")
    proc, output = _sigterm_group_after_step_2(_cmd(out, "data.name=folder", f"data.path={images}", "data.num_workers=2",
                                                    "train.steps=100000", "train.ckpt_every=100000"), out)
    _assert_stopped_with_checkpoint_and_export(proc, output, out, signal.SIGTERM)
    assert "DataLoader worker" not in output


def test_sigterm_to_the_process_group_of_tokenize_keeps_finished_shards(short_run, tmp_path):
    """`stellar_tok.tokenize` with 2 loader workers, SIGTERM to its group after the first shard: the shard being
    encoded is finished, the manifest lists the finished shards and marks the rest not done (exit 1); the same
    command then does exactly the rest."""
    from stellar_tok.tokenize import main as tokenize_main

    images, out = _image_folder(tmp_path / "images", 64), str(tmp_path / "latents")
    args = [f"tokenizer={os.path.join(short_run, 'tokenizer')}", "data.name=folder", f"data.path={images}", f"out={out}",
            "shard_size=16", "batch_size=2", "num_workers=2", "progress=false"]
    proc = _popen_group([sys.executable, "-m", "stellar_tok.tokenize", *args])
    try:
        t0, shards = time.time(), os.path.join(out, "shards")
        while not (os.path.isdir(shards) and any(n.endswith(".safetensors") for n in os.listdir(shards))
                   and len(_children(proc.pid)) >= 2):  # a shard written, the next one's loader workers running
            assert proc.poll() is None and time.time() - t0 < 120, "tokenize ended before its second shard"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        _end_group(proc)
    assert proc.returncode == 1 and "tokenize: STOPPED by SIGTERM" in output and "DataLoader worker" not in output, output[-2000:]
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    done, rest = manifest["shards"], manifest["failed"]
    assert not manifest["complete"] and done and rest and len(done) + len(rest) == 4
    assert all(f["error"] == "not done: stopped by SIGTERM" for f in rest)
    assert all(os.path.isfile(os.path.join(out, "shards", s["file"])) for s in done)
    summary = tokenize_main(args)
    assert summary["images"] == 64 and summary["shards_already_done"] == len(done) and not summary["failed"]


def test_sigterm_to_the_process_group_of_generators_train_checkpoints_and_exports(tmp_path):
    """`generators.train` with 2 loader workers: SIGTERM to its group ends in a verified checkpoint and the export."""
    tokenize_shapes(tmp_path, 64)
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "generators.train", "config=configs/generator/b.yaml", f"data.latents={tmp_path / 'lat'}",
           "data.num_workers=2", "model.width=32", "model.depth=1", "model.heads=2", "optim.batch_size=16",
           "train.mixed_precision=no", "train.steps=100000", "train.log_every=1", "train.sample_every=100000",
           "train.ckpt_every=100000", "train.progress=false", "sample.steps=1", "sample.per_class=1", f"train.output_dir={out}"]
    proc, output = _sigterm_group_after_step_2(cmd, out)
    assert proc.returncode == 0 and "DataLoader worker" not in output, output[-2000:]
    summary = json.load(open(os.path.join(out, "summary.json")))
    ckpt = find_checkpoints(os.path.join(out, "checkpoints"))[-1]
    assert summary["stopped_by"] == "SIGTERM" and ckpt.endswith(f"step-{summary['step']:07d}") and verify_checkpoint(ckpt) is None
    assert os.path.isfile(os.path.join(out, "generator", "config.json"))


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    """ENOSPC while writing the step-4 checkpoint: one line naming it and the space it needs, no half-written
    folder left, step 2 verified; resumed from it, ENOSPC while exporting: the same, the checkpoint kept."""
    import stellar_tok.training.checkpoint as checkpoint

    real = checkpoint.save_file

    def full_at_step_4(tensors, path):
        if "step-0000004" in path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path)

    out = str(tmp_path / "run")
    cdir = os.path.join(out, "checkpoints")
    monkeypatch.setattr(checkpoint, "save_file", full_at_step_4)
    _refused(capsys, FAST + ["train.steps=6", "train.ckpt_every=2", f"train.output_dir={out}"],
             r"no space left on the device writing \S*step-0000004: it needs about \d+\.\d [kMG]B, .* free")
    assert os.listdir(cdir) == ["step-0000002"] and verify_checkpoint(os.path.join(cdir, "step-0000002")) is None
    monkeypatch.setattr(checkpoint, "save_file", real)

    def full_export(self, folder, **kwargs):
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, "diffusion_pytorch_model.safetensors"), "wb").write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(StellarTokenizer, "save_pretrained", full_export)
    _refused(capsys, FAST + ["train.steps=4", "train.ckpt_every=2", f"train.output_dir={out}", "train.resume=auto"],
             r"no space left on the device writing \S*tokenizer: it needs about \d+\.\d [kMG]B")
    assert sorted(os.listdir(cdir)) == ["step-0000002", "step-0000004"]
    assert all(verify_checkpoint(os.path.join(cdir, n)) is None for n in os.listdir(cdir))
    assert not any(n.startswith("tokenizer") for n in os.listdir(out))  # neither an export nor its .tmp
