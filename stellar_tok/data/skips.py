"""Bad samples: the reasons a sample is skipped, the exception that carries one, and the counter of them all.

Decoders raise `BadSample` (reason + message) for an image they cannot use; the data sets catch it, skip the
sample and report it to the process-wide `SkipCounter` (`skip_counter()`), which keeps its counts in shared memory
so that samples skipped inside DataLoader worker processes are counted too. `skipped_samples()` and
`skipped_summary()` read the counts, `reset_skipped_samples()` zeroes them; a skip is never fatal.
"""
from __future__ import annotations

import warnings

import torch
from torch.utils.data import get_worker_info

# Why a sample was skipped. "bad_shard" counts shard-level read errors (a missing or truncated tar,
# duplicate members), each of which may lose several samples; the other reasons count samples.
SKIP_REASONS = ("decode_error", "too_small", "missing_image", "bad_label", "bad_shard")


class BadSample(Exception):
    """Raised by the decoders for a sample to skip; ``reason`` is one of `SKIP_REASONS`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class SkipCounter:
    """Counts skipped bad samples by reason (one of `SKIP_REASONS`), across DataLoader workers.

    The counts are a small int64 tensor in shared memory with one row per process slot (slot 0: the
    process that made the loader, slot 1 + i: DataLoader worker i). Workers, forked or spawned, receive
    the same shared tensor with the data set and each writes only its own row, so there are no lost
    updates within a loader, and `counts()` in the main process sums what every worker skipped.
    (Two loaders whose workers run at the same time share worker slots; a simultaneous increment in
    both could in principle be lost. It does not matter for a diagnostic count.)
    """

    _SLOTS = 257

    def __init__(self) -> None:
        counts = torch.zeros(self._SLOTS, len(SKIP_REASONS), dtype=torch.int64)
        try:
            counts.share_memory_()
        except Exception:  # pragma: no cover - no shared memory: counts from workers stay in the workers
            warnings.warn("SkipCounter: shared memory unavailable; samples skipped in DataLoader workers are not counted")
        self._counts = counts
        self._warned: set[str] = set()

    def add(self, reason: str, detail: str = "", n: int = 1, warn: bool = True) -> None:
        """Count ``n`` skipped samples for ``reason``; warn once per reason and process (if ``warn``)."""
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {', '.join(SKIP_REASONS)}")
        info = get_worker_info()
        slot = 0 if info is None else 1 + info.id % (self._SLOTS - 1)
        self._counts[slot, SKIP_REASONS.index(reason)] += n
        if warn and reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(
                f"skipping a bad sample ({reason}{': ' + detail if detail else ''}); further skips are counted "
                "silently, see stellar_tok.data.skipped_samples()",
                stacklevel=2,
            )

    def counts(self) -> dict[str, int]:
        """Skipped samples per reason, summed over all process slots; reasons with no skips are left out."""
        totals = self._counts.sum(0).tolist()
        return {reason: int(c) for reason, c in zip(SKIP_REASONS, totals) if c}

    def total(self) -> int:
        """Total number of skipped samples."""
        return int(self._counts.sum())

    def reset(self) -> None:
        """Zero all counts."""
        self._counts.zero_()

    def __getstate__(self) -> dict:
        return {"_counts": self._counts}  # the once-per-reason warning state stays per process

    def __setstate__(self, state: dict) -> None:
        self._counts = state["_counts"]
        self._warned = set()


_SKIPS: SkipCounter | None = None


def skip_counter() -> SkipCounter:
    """The process-wide counter every data set here reports to (created on first use)."""
    global _SKIPS
    if _SKIPS is None:
        _SKIPS = SkipCounter()
    return _SKIPS


def skipped_samples() -> dict[str, int]:
    """Bad samples skipped so far in this process and its DataLoader workers, by reason (non-zero only)."""
    return skip_counter().counts()


def reset_skipped_samples() -> None:
    """Zero the process-wide skip counts."""
    skip_counter().reset()


def skipped_summary() -> str:
    """A one-line report such as ``"skipped 3 bad samples (decode_error=2, too_small=1)"``."""
    counts = skipped_samples()
    if not counts:
        return "skipped 0 bad samples"
    detail = ", ".join(f"{k}={v}" for k, v in counts.items())
    return f"skipped {sum(counts.values())} bad samples ({detail})"
