"""A process of a multi-process run lost (killed, its machine gone): the others stop with one line naming it.

    register_process(accelerator, out_dir)                  # every process: out_dir/.processes/rank-R.json (host, pid)
    with report_lost_process(accelerator, out_dir, 600):     # around the loop and the checkpoints
        ...

When one process dies, the others learn it at their next collective: gloo at once ("Connection reset by peer"),
NCCL when the peer's network connection closes or, at the latest, when `train.collective_timeout` seconds pass (the
process group's timeout, set in `stellar_tok.training.engine.make_accelerator`; torch's NCCL watchdog then ends the
process). A survivor that gets the error looks up which processes are gone: those on its own machine whose pid no
longer runs (or is a zombie waiting for its launcher), from the files each process wrote at start. The error becomes
`stellar_tok.errors.LostProcess`, which the command wrapper prints as one line with exit status 1:

    error: process 1 of 2 was lost (pid 5795 on node3 is gone; Connection reset by peer): the others stopped;
    resume with train.resume=auto

A process on another machine cannot be checked from here: the line then says "a process of N"; that machine's
launcher (torchrun, accelerate launch) names the rank that failed.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time

import torch

from stellar_tok.errors import LostProcess
from stellar_tok.files import atomic_write_json

FOLDER = ".processes"
# what gloo and NCCL say when a peer is gone or silent (the message of a plain RuntimeError for gloo)
SIGNS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Timed out", "timed out", "Timeout",
         "NCCL communicator was aborted", "remote process exited", "ncclRemoteError", "Socket Timeout")


def process_file(out_dir: str, rank: int) -> str:
    return os.path.join(out_dir, FOLDER, f"rank-{rank}.json")


def register_process(accelerator, out_dir: str) -> None:
    """This process's rank, host and pid in out_dir/.processes/rank-R.json (a multi-process run only)."""
    if accelerator.num_processes > 1:
        atomic_write_json(process_file(out_dir, accelerator.process_index),
                          {"rank": accelerator.process_index, "world": accelerator.num_processes, "host": socket.gethostname(), "pid": os.getpid()})


def gone(pid: int) -> bool:
    """True when `pid` no longer runs on this machine (a zombie counts as gone: it only waits to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def lost_ranks(out_dir: str, world: int, me: int, wait: float = 3.0) -> list[tuple[int, int, str]]:
    """(rank, pid, host) of the processes of this run on this machine that are gone. A killed process closes its
    connections while it exits, so the error can come first: look again for up to `wait` seconds."""
    host, peers = socket.gethostname(), []
    for rank in range(world):
        try:
            with open(process_file(out_dir, rank)) as f:
                info = json.load(f)
        except (OSError, ValueError):
            continue
        if rank != me and info.get("world") == world and info.get("host") == host:
            peers.append((rank, int(info["pid"]), host))
    until = time.monotonic() + wait
    while True:
        lost = [p for p in peers if gone(p[1])]
        if lost or not peers or time.monotonic() > until:
            return lost
        time.sleep(0.05)


def peer_error(error: BaseException) -> str | None:
    """The short reason when `error` is a collective failing because a peer is gone or silent, else None."""
    if not isinstance(error, RuntimeError):  # torch.distributed.DistError is a RuntimeError; gloo raises plain ones
        return None
    text = str(error)
    sign = next((s for s in SIGNS if s in text), None)
    if sign is None and not isinstance(error, torch.distributed.DistError):
        return None
    return sign or text.splitlines()[0][:120]


def lost_message(out_dir: str, world: int, me: int, reason: str, timeout: float) -> str:
    """The one line: which process was lost (when this machine can tell), why the others stopped, what to do."""
    if "imed out" in reason or "Timeout" in reason:
        reason = f"{reason}: no answer within train.collective_timeout={timeout:g}s"
    lost = lost_ranks(out_dir, world, me)
    if lost:
        who = (f"process {lost[0][0]} of {world} was" if len(lost) == 1 else
               f"processes {', '.join(str(r) for r, _, _ in lost)} of {world} were")
        pids = ", ".join(str(p) for _, p, _ in lost)
        return f"{who} lost (pid {pids} on {lost[0][2]} is gone; {reason}): the others stopped; resume with train.resume=auto"
    return f"a process of {world} was lost or stopped answering ({reason}): the others stopped; resume with train.resume=auto"


def raise_if_lost(accelerator, out_dir: str, timeout: float, error: BaseException) -> None:
    """`LostProcess` with the one line, from `error`, when `error` is a collective failing because a peer is gone."""
    reason = peer_error(error) if accelerator.num_processes > 1 else None
    if reason is not None:
        raise LostProcess(lost_message(out_dir, accelerator.num_processes, accelerator.process_index, reason, timeout)) from error


@contextlib.contextmanager
def report_lost_process(accelerator, out_dir: str, timeout: float):
    """Within the block, a collective that fails because a peer is gone raises `LostProcess` with the one line."""
    try:
        yield
    except Exception as e:
        raise_if_lost(accelerator, out_dir, timeout, e)
        raise
