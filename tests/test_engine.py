"""The training engine (stellar_tok.training.engine) around a toy step: the LR follows the warm-up and cosine over the steps,
or over the time budget when that is further along, and the run stops when the budget is spent. The budget's clock
is faked: no test here depends on how fast the machine is."""
import json
import math
import types

import pytest
import torch
from omegaconf import OmegaConf

from stellar_tok.training import budget as budget_module
from stellar_tok.training.budget import Budget, lr_factor
from stellar_tok.training.checkpoint import TrainState
from stellar_tok.training.engine import TrainingRun, make_accelerator

WARMUP, MIN_RATIO, BASE_LR = 2, 0.1, 0.5


def cosine(frac: float) -> float:
    """The schedule written out: 1 -> MIN_RATIO as frac goes 0 -> 1."""
    return MIN_RATIO + (1 - MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


@pytest.fixture
def clock(monkeypatch):
    """The budget's clock, moved by hand: {"wall": seconds, "cpu": seconds}."""
    now = {"wall": 1000.0, "cpu": 50.0}
    monkeypatch.setattr(budget_module, "time", types.SimpleNamespace(time=lambda: now["wall"], process_time=lambda: now["cpu"]))
    return now


def _run(tmp_path, clock, steps: int, seconds_per_step: float, **train):
    """A toy model trained by the engine for up to `steps` steps, each taking `seconds_per_step` on the fake clock.
    -> (the LR of every logged step, the summary)."""
    train_cfg = OmegaConf.create({"output_dir": str(tmp_path / "run"), "mixed_precision": "no", "seed": 0, "resume": None,
                                  "max_minutes": 0.0, "max_cpu_minutes": 0.0, "max_nonfinite": 3, "keep_ckpts": 1,
                                  "log_every": 1, "ckpt_every": 1000, "progress": False, **train})
    optim_cfg = OmegaConf.create({"warmup_steps": WARMUP, "min_lr_ratio": MIN_RATIO, "grad_clip": 1.0})
    accelerator = make_accelerator(train_cfg, OmegaConf.create({"train": train_cfg}))
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=BASE_LR)
    run = TrainingRun(accelerator, train_cfg, optim_cfg, steps, "toy")
    sched = run.lr_scheduler(opt)
    model, opt = accelerator.prepare(model, opt)
    run.checkpoints(scheduler=sched)
    run.begin("toy", {})
    seen = []

    def step(x):
        seen.append(opt.param_groups[0]["lr"])  # the LR this step trains with
        loss = model(x).pow(2).mean()
        logs = {}
        if not run.update(loss, logs):
            return None
        clock["wall"] += seconds_per_step
        clock["cpu"] += seconds_per_step / 2
        return {**logs, "loss": float(loss.detach())}, x.shape[0]

    run.fit(step, [torch.randn(4, 3) for _ in range(5)], model, opt, skip=False)
    summary = run.finish(run.save(), {}, "toy")
    logged = {r["step"]: r["lr"] for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl"))}
    assert seen[1:] == pytest.approx([logged[s] for s in range(1, len(seen))], rel=1e-5)  # what is logged is what trains next
    return logged, summary


def test_step_count_lr_is_warmup_then_cosine_over_the_steps(tmp_path, clock):
    lrs, summary = _run(tmp_path, clock, 8, seconds_per_step=6.0)  # no time limit: the clock does not matter
    assert summary["step"] == 8 and summary["stopped_by"] is None
    expected = {s: BASE_LR * ((s + 1) / WARMUP if s < WARMUP else cosine((s - WARMUP) / (8 - WARMUP))) for s in range(1, 9)}
    assert lrs == pytest.approx(expected, rel=1e-5)
    assert lrs[1] == pytest.approx(BASE_LR) and lrs[8] == pytest.approx(BASE_LR * MIN_RATIO)


def test_time_budget_lr_follows_the_budget_and_stops_the_run(tmp_path, clock):
    """train.steps=1000 train.max_minutes=1, 6 s a step: after the warm-up the cosine follows the time spent (a tenth of
    the budget a step, far ahead of 1/998 of the steps), and the run stops at step 10 with the LR at its floor."""
    lrs, summary = _run(tmp_path, clock, 1000, seconds_per_step=6.0, max_minutes=1.0)
    assert summary["step"] == 10 and sorted(lrs) == list(range(1, 11))
    assert lrs[1] == pytest.approx(BASE_LR * 2 / WARMUP)  # still warming up: steps decide
    for s in range(WARMUP, 11):
        assert lrs[s] == pytest.approx(BASE_LR * cosine(s / 10), rel=1e-5), s  # s steps = s tenths of the budget
    assert lrs[5] == pytest.approx(BASE_LR * 0.55) and lrs[10] == pytest.approx(BASE_LR * MIN_RATIO)


def test_cpu_budget_and_the_further_along_of_steps_and_time(clock):
    """The schedule takes the further along of the steps and the budget; a CPU budget counts process time."""
    state = TrainState()
    budget = Budget(state, max_cpu_minutes=10)
    factor = budget.lr_schedule(WARMUP, 102, MIN_RATIO)
    clock["cpu"] += 150.0  # a quarter of the CPU budget
    budget.tick()
    assert budget.time_fraction() == 0.25 and not budget.exhausted()
    assert factor(1) == pytest.approx(1.0)  # warm-up: (1 + 1) / 2
    assert factor(12) == pytest.approx(cosine(0.25))  # 10 of 100 steps after the warm-up: time is further along
    assert factor(77) == pytest.approx(cosine(0.75))  # 75 of 100: steps are
    assert lr_factor(77, WARMUP, 102, MIN_RATIO) == pytest.approx(cosine(0.75))
    clock["cpu"] += 450.0
    budget.tick()
    assert budget.exhausted() and factor(12) == pytest.approx(MIN_RATIO)


def test_a_step_that_raises_leaves_the_signal_handlers_as_they_were(tmp_path):
    """fit installs SIGTERM/SIGINT handlers (finish the step, checkpoint); an error inside the loop restores them."""
    import signal

    train_cfg = OmegaConf.create({"output_dir": str(tmp_path / "run"), "mixed_precision": "no", "seed": 0, "resume": None,
                                  "max_minutes": 0.0, "max_cpu_minutes": 0.0, "max_nonfinite": 3, "keep_ckpts": 1,
                                  "log_every": 1, "ckpt_every": 1000, "progress": False})
    optim_cfg = OmegaConf.create({"warmup_steps": WARMUP, "min_lr_ratio": MIN_RATIO, "grad_clip": 1.0})
    accelerator = make_accelerator(train_cfg, OmegaConf.create({"train": train_cfg}))
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=BASE_LR)
    run = TrainingRun(accelerator, train_cfg, optim_cfg, 5, "toy")
    sched = run.lr_scheduler(opt)
    run.checkpoints(scheduler=sched)
    run.begin("toy", {})
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def step(x):
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]  # fit's own handler is in place
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run.fit(step, [torch.randn(4, 3)], model, opt, skip=False)
    assert {s: signal.getsignal(s) for s in before} == before
