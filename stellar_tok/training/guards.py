"""What stops a training run cleanly: signals, time budgets and non-finite losses, agreed on by every process.

    stop = GracefulStop()                   # SIGTERM/SIGINT set a flag instead of killing the process
    ...
    if stop.should_stop(accelerator, late=budget.exhausted()):   # once per step, the same answer everywhere
        break
    stop.restore()

Clusters send SIGTERM some time before they preempt a job: the run finishes its step, writes a checkpoint and
exports. A second Ctrl-C aborts at once. The DataLoader workers ignore these signals (`stellar_tok.data.stop_signals`),
so a signal to the whole process group stops the run the same way. The flags are summed over processes, so all of
them stop at the same step even when only one was signalled (a process that left the loop alone would hang the others).
"""
from __future__ import annotations

import torch

from stellar_tok.data.stop_signals import STOP_SIGNALS, StopSignals
from stellar_tok.errors import UserError


class GracefulStop(StopSignals):
    """SIGTERM/SIGINT (to this process or its whole group: the loader workers ignore them) request a stop after
    the current step; `should_stop` is the decision every process agrees on."""

    def __init__(self, signals=STOP_SIGNALS):
        super().__init__("stopping after this step (checkpoint and export follow)", signals)

    def should_stop(self, accelerator, late: bool = False, done: bool = False) -> bool:
        """True on every process when any process was signalled, is over its time budget, or is `done`."""
        flags = torch.tensor([float(self.requested or late or done)], device=accelerator.device)
        if accelerator.num_processes > 1:
            flags = accelerator.reduce(flags, "sum")
        return bool(flags.item() > 0)


class NonFiniteGuard:
    """Skips a step whose loss is NaN/inf on any process, counts it, and stops the run after `max_in_row`
    such steps in a row (after `on_abort()`, which saves a checkpoint)."""

    def __init__(self, accelerator, state, max_in_row: int, on_abort):
        self.accelerator = accelerator
        self.state = state
        self.max_in_row = max_in_row
        self.on_abort = on_abort

    def ok(self, loss: torch.Tensor) -> bool:
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, "sum")
        if bad.item() == 0:
            self.state.nonfinite = 0
            return True
        self.state.nonfinite += 1
        self.state.nonfinite_total += 1
        self.accelerator.print(f"step {self.state.step}: non-finite loss, step skipped ({self.state.nonfinite} in a row, "
                               f"{self.state.nonfinite_total} in this run)")
        if self.state.nonfinite >= self.max_in_row:
            self.on_abort()
            raise UserError(f"{self.state.nonfinite} non-finite losses in a row at step {self.state.step}: lower optim.lr, "
                            "raise train.max_nonfinite or use train.mixed_precision=no (a checkpoint was saved)")
        return False
