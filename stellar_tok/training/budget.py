"""Training budgets: a step count, and optionally wall-clock and CPU-time limits that survive resumes; the LR
schedule that follows them.

    budget = Budget(state, max_minutes=30)      # state: the TrainState saved with every checkpoint
    sched = LambdaLR(opt, budget.lr_schedule(warmup, total, min_ratio))   # the one thing that writes the LR
    budget.start()                              # the loop begins: time before it is not counted
    budget.tick()                               # once per step: adds the time spent since the last tick
    sched.step()                                # then: the LR of the next step, from the steps and the time spent
    budget.exhausted()                          # a time limit is reached

The LR is `lr_factor(step, ...)` times the base LR: a linear warm-up over steps, then a cosine that follows
whichever is further along, the steps or the time budget (`time_fraction`). Without a time limit the time
fraction is 0 and the cosine follows the steps alone.

The time already spent is kept in the TrainState (`wall_s`, `cpu_s`), so a run that is killed and resumed
continues its schedule instead of starting the clock again. CPU time is the process's time on all threads
(`time.process_time`): a fair budget for runs that share a machine.
"""
from __future__ import annotations

import math
import time

from tqdm.auto import tqdm


def cosine_factor(frac: float, min_ratio: float) -> float:
    """Cosine decay from 1 to min_ratio as frac goes from 0 to 1 (clamped)."""
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def lr_factor(step: int, warmup: int, total: int, min_ratio: float, time_fraction: float = 0.0) -> float:
    """The LR multiplier for step `step` (0-based) of `total`: (step + 1) / warmup during the warm-up, then a cosine
    from 1 to min_ratio over the further along of the steps after the warm-up and `time_fraction` (the time budget spent)."""
    if step < warmup:
        return (step + 1) / warmup
    return cosine_factor(max((step - warmup) / max(1, total - warmup), time_fraction), min_ratio)


class Budget:
    def __init__(self, state, max_minutes: float = 0.0, max_cpu_minutes: float = 0.0):
        self.state = state
        self.max_wall = max_minutes * 60
        self.max_cpu = max_cpu_minutes * 60
        self.start()

    def start(self) -> None:
        """Start the clock (again): the time until now is not the run's (set-up, loading a checkpoint)."""
        self._wall, self._cpu = time.time(), time.process_time()

    @property
    def timed(self) -> bool:
        return self.max_wall > 0 or self.max_cpu > 0

    def tick(self) -> None:
        """Add the wall and CPU seconds since the previous tick to the state's running totals."""
        wall, cpu = time.time(), time.process_time()
        self.state.wall_s += wall - self._wall
        self.state.cpu_s += cpu - self._cpu
        self._wall, self._cpu = wall, cpu

    def time_fraction(self) -> float:
        fracs = [0.0]
        if self.max_wall > 0:
            fracs.append(self.state.wall_s / self.max_wall)
        if self.max_cpu > 0:
            fracs.append(self.state.cpu_s / self.max_cpu)
        return max(fracs)

    def exhausted(self) -> bool:
        return self.timed and self.time_fraction() >= 1.0

    def lr_schedule(self, warmup: int, total: int, min_ratio: float):
        """The LR multiplier as a function of the step, for `torch.optim.lr_scheduler.LambdaLR`: `lr_factor` with
        this budget's time fraction at the moment the scheduler steps (a plain function: LambdaLR saves no state of it)."""
        def factor(step: int) -> float:
            return lr_factor(step, warmup, total, min_ratio, self.time_fraction())

        return factor


class RunProgress:
    """The run's tqdm bar. Without a time budget it counts steps; with one it counts percent of the run, the
    further along of steps and time, so that its ETA is the budget's and not that of a step count the budget
    will cut short (`train.steps=100000 train.max_minutes=4` shows about 4 minutes, not hours)."""

    def __init__(self, budget: Budget, total_steps: int, step: int, enabled: bool, desc: str):
        self.budget, self.total = budget, total_steps
        if budget.timed:
            self.bar = tqdm(total=100.0, initial=round(self.fraction(step) * 100, 1), disable=not enabled, dynamic_ncols=True,
                            desc=desc, unit="%", bar_format="{l_bar}{bar}| {n:.1f}/100% [{elapsed}<{remaining}{postfix}]")
        else:
            self.bar = tqdm(total=total_steps, initial=step, disable=not enabled, dynamic_ncols=True, desc=desc)

    def fraction(self, step: int) -> float:
        """How far along the run is: steps done, or the time budget spent, whichever is further."""
        return min(1.0, max(step / max(1, self.total), self.budget.time_fraction()))

    def update(self, step: int) -> None:
        """After each step (`step`: the steps done)."""
        if self.budget.timed:
            self.bar.update(round(self.fraction(step) * 100, 1) - self.bar.n)
        else:
            self.bar.update(1)

    def set_postfix(self, **kwargs) -> None:
        self.bar.set_postfix(**kwargs)

    def close(self) -> None:
        self.bar.close()
