"""Stop signals for a process group: the main process takes SIGTERM/SIGINT as a request, its DataLoader workers ignore them.

    stop = StopSignals("stopping after this shard")    # SIGTERM/SIGINT set stop.requested instead of killing
    loader = DataLoader(..., num_workers=n, **worker_options(n))   # workers that never die of them
    ...
    stop.restore()

A cluster stops a job by signalling its whole process group (SLURM's scancel and preemption, Kubernetes, systemd,
`timeout`, Ctrl-C in a terminal). Loader workers that died of that signal would make the main process raise
"DataLoader worker (pid ...) is killed by signal" from wherever it is, the final checkpoint or export included. So the
workers ignore the stop signals: the main process alone decides, finishes its work and shuts them down as usual
(they also leave when the main process is gone). A second Ctrl-C to the main process aborts at once.

A worker ignores them from its first instruction: its process is started with the signals blocked (a signal that
arrives meanwhile waits in the main process, and in the worker is dropped), and its `worker_init_fn` ignores,
then unblocks them. Without the block, a signal in the moment between the start and the `worker_init_fn` would
still kill the worker (torch's own SIGTERM handler is in place there). Such a worker is ended with SIGKILL where
multiprocessing would send SIGTERM, so a main process that exits on an error does not wait for it forever.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.context
import signal
from multiprocessing import popen_fork, popen_spawn_posix

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class IgnoreStopSignals:
    """A DataLoader `worker_init_fn`: SIGTERM and SIGINT are ignored in the worker, then `then(worker_id)` (the loader's
    own worker_init_fn, if any) runs. A class, not a closure, so that it pickles for the spawn start method."""

    def __init__(self, then=None):
        self.then = then

    def __call__(self, worker_id: int) -> None:
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)  # also drops one that arrived while they were blocked
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        if self.then is not None:
            self.then(worker_id)


class _KilledForkPopen(popen_fork.Popen):
    def terminate(self) -> None:  # the worker ignores SIGTERM: ending it takes SIGKILL
        self.kill()


class _KilledSpawnPopen(popen_spawn_posix.Popen):
    def terminate(self) -> None:
        self.kill()


class _StopSafe:
    """A process started with SIGTERM/SIGINT blocked (the parent's mask is restored once it is started) and ended
    with SIGKILL where multiprocessing would send SIGTERM: at the main process's exit (daemonic children) and when
    torch ends a worker that does not leave in time. It ignores SIGTERM, so SIGTERM would leave the exit waiting."""

    def start(self) -> None:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


class _ForkProcess(_StopSafe, multiprocessing.context.ForkProcess):
    @staticmethod
    def _Popen(process_obj):
        return _KilledForkPopen(process_obj)


class _SpawnProcess(_StopSafe, multiprocessing.context.SpawnProcess):
    @staticmethod
    def _Popen(process_obj):
        return _KilledSpawnPopen(process_obj)


class _ForkContext(multiprocessing.context.ForkContext):
    Process = _ForkProcess


class _SpawnContext(multiprocessing.context.SpawnContext):
    Process = _SpawnProcess


_CONTEXTS = {"fork": _ForkContext, "spawn": _SpawnContext}


def worker_options(num_workers: int, then=None) -> dict:
    """DataLoader keyword arguments for `num_workers` workers that never die of a stop signal: a multiprocessing
    context of the default start method whose processes start with the signals blocked, and the `worker_init_fn`
    (`IgnoreStopSignals`, then `then`). {} without workers, or for the forkserver start method (its processes
    are forked by a server: the block cannot reach them; they keep torch's default behaviour)."""
    context = _CONTEXTS.get(multiprocessing.get_start_method())
    if num_workers <= 0 or context is None:
        return {"worker_init_fn": then} if then is not None and num_workers > 0 else {}
    return {"worker_init_fn": IgnoreStopSignals(then), "multiprocessing_context": context()}


class StopSignals:
    """SIGTERM/SIGINT set `requested` (and `signal_name`) and print one line: `<SIGNAL>: <what>; Ctrl-C again aborts`.
    A second SIGINT raises KeyboardInterrupt. `restore()` puts the previous handlers back."""

    def __init__(self, what: str, signals=STOP_SIGNALS):
        self.what = what
        self.requested = False
        self.signal_name: str | None = None
        self._old = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name}: {self.what}; Ctrl-C again aborts", flush=True)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
