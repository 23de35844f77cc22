"""A process of a two-process run killed with SIGKILL mid-run: the other leaves at once with one line naming it
(not a traceback, not a hang), and `train.resume=auto` then runs to the end (stellar_tok.training.lost_process)."""
import json
import os
import signal
import subprocess
import time

import pytest

from stellar_tok.errors import LostProcess
from stellar_tok.training.checkpoint import find_checkpoints, verify_checkpoint
from stellar_tok.training.lost_process import lost_message, process_file, report_lost_process
from stellar_tok.files import atomic_write_json
from conftest import launch_two_processes, two_process_launch

STEPS = 6
ARGS = [
    "config=configs/tokenizer/tiny.yaml",
    "model.width=64", "model.depth=2", "model.heads=2", "model.decoder_width=64", "model.decoder_depth=1", "model.decoder_heads=2",
    "data.train_size=64", "data.val_size=32", "optim.batch_size=8", "optim.warmup_steps=1", f"train.steps={STEPS}",
    "train.log_every=1", "train.progress=false", "train.stats_batches=1", "train.ckpt_every=2", "train.image_every=1000",
    "train.collective_timeout=20",
]


def _wait_for(ready, proc, what: str, limit: float = 240):
    """Poll `ready()` until true; the launch ending first, or `limit` seconds, fails the test (a guard, not a timing)."""
    end = time.monotonic() + limit
    while not ready():
        assert proc.poll() is None, f"the launch ended before {what}: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < end, f"no {what}"
        time.sleep(0.05)


def _logged_steps(out: str) -> int:
    path = os.path.join(out, "metrics.jsonl")
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


def test_a_killed_process_stops_the_other_with_one_line_and_resume_finishes(tmp_path):
    out = str(tmp_path / "run")
    launch = two_process_launch("stellar_tok.train", [*ARGS, f"train.output_dir={out}"], 29561)
    proc = subprocess.Popen(**launch, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(lambda: os.path.exists(process_file(out, 1)) and _logged_steps(out) >= 3, proc, "third step")
        victim = json.load(open(process_file(out, 1)))["pid"]  # the file each process writes at start
        os.kill(victim, signal.SIGSTOP)  # frozen mid-run: the other process waits for it at its next collective
        assert not os.path.exists(os.path.join(out, "summary.json"))  # the run had not finished
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)  # the old code: a traceback from the survivor, no line naming the rank
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    lines = [line for line in err.splitlines() if "was lost" in line]
    assert lines and lines[0].startswith(f"error: process 1 of 2 was lost (pid {victim} on "), err[-3000:]
    assert lines[0].endswith("the others stopped; resume with train.resume=auto"), lines
    assert "[rank0]: Traceback" not in err, err[-3000:]  # one line, not the survivor's traceback
    last = find_checkpoints(os.path.join(out, "checkpoints"))[-1]
    assert verify_checkpoint(last) is None  # no byte of the last verified checkpoint lost
    assert 0 <= _logged_steps(out) - int(last[-7:]) <= 2  # the steps redone: those since it (train.ckpt_every=2)
    last = os.path.basename(last)

    res = launch_two_processes("stellar_tok.train", [*ARGS, f"train.output_dir={out}", "train.resume=auto"], 29562, timeout=240)
    log = res.stdout[-2000:] + res.stderr[-3000:]
    assert f"resumed from {out}/checkpoints/{last}" in res.stdout, log
    assert os.path.basename(find_checkpoints(os.path.join(out, "checkpoints"))[-1]) == f"step-{STEPS:07d}", log
    assert json.load(open(os.path.join(out, "summary.json")))["step"] == STEPS


class _Acc:
    """The two attributes of an accelerator the report reads: process 0 of 2."""
    num_processes, process_index = 2, 0


def test_the_line_names_a_gone_process_and_leaves_other_errors_alone(tmp_path):
    """A finished pid on this machine is named; a timeout says which setting bounds it; a step's own error passes."""
    import socket

    done = subprocess.Popen(["true"])
    done.wait()
    for rank, pid in ((0, os.getpid()), (1, done.pid)):
        atomic_write_json(process_file(str(tmp_path), rank), {"rank": rank, "world": 2, "host": socket.gethostname(), "pid": pid})
    with pytest.raises(LostProcess, match=rf"^process 1 of 2 was lost \(pid {done.pid} on .* is gone; Connection reset by peer\)"):
        with report_lost_process(_Acc(), str(tmp_path), 20):
            raise RuntimeError("[pair.cc:545] Read error [127.0.0.1]:5321: Connection reset by peer. GLHF!")
    with pytest.raises(ValueError):  # not a collective's failure: unchanged
        with report_lost_process(_Acc(), str(tmp_path), 20):
            raise ValueError("a bug in the step")
    os.remove(process_file(str(tmp_path), 1))  # a process on another machine: unnamed, the bound is
    assert lost_message(str(tmp_path), 2, 0, "Timed out waiting 20000ms for recv", 20) == (
        "a process of 2 was lost or stopped answering (Timed out waiting 20000ms for recv: no answer within "
        "train.collective_timeout=20s): the others stopped; resume with train.resume=auto")
