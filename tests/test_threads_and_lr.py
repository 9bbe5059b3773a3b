"""The learning-rate schedule's values and the CPU thread governor's decisions (the governor
is driven by fake clocks here; whether it helps on a busy machine is `bench/contention.py`'s)."""

from __future__ import annotations

import math

import pytest
import torch

from difforge.errors import DifforgeError
from difforge.runs import threads as threads_module
from difforge.runs.threads import ThreadGovernor, parse_threads, threads_for
from difforge.training.trainer import learning_rate


def test_constant_schedule_is_warmup_then_flat() -> None:
    values = [learning_rate(1e-3, step, 4, 10, "constant") for step in range(10)]
    assert values[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert values[4:] == [1e-3] * 6
    assert learning_rate(1e-3, 0, 0, 10, "constant") == 1e-3


def test_cosine_schedule_closed_form() -> None:
    lr, warmup, total = 2e-3, 100, 1500
    assert learning_rate(lr, 49, warmup, total, "cosine") == pytest.approx(lr * 0.5)  # still warming up
    assert learning_rate(lr, warmup, warmup, total, "cosine") == pytest.approx(lr)  # the peak
    halfway = warmup + (total - warmup) // 2
    assert learning_rate(lr, halfway, warmup, total, "cosine") == pytest.approx(lr / 2)
    last = learning_rate(lr, total - 1, warmup, total, "cosine")
    assert last == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * (total - 1 - warmup) / (total - warmup))))
    assert 0 < last < lr * 1e-5  # the last step still moves, barely
    decay = [learning_rate(lr, s, warmup, total, "cosine") for s in range(warmup, total)]
    assert all(a > b for a, b in zip(decay[:-1], decay[1:], strict=True))
    # a resumed run that runs past its old plan keeps the floor rather than climbing back
    assert learning_rate(lr, total + 10, warmup, total, "cosine") == 0.0
    assert learning_rate(lr, 5, 10, 10, "cosine") == pytest.approx(lr * 0.6)  # all warm-up: no decay


def test_threads_for_counts_cores_others_keep_busy() -> None:
    assert threads_for(2, 0.0) == 2
    assert threads_for(2, 0.45) == 2  # a background blip does not cost a core
    assert threads_for(2, 0.67) == 1  # one busy competitor sharing with our two threads
    assert threads_for(2, 1.0) == 1
    assert threads_for(2, 3.0) == 1  # never fewer than one
    assert threads_for(16, 2.6) == 13
    assert threads_for(1, 0.9) == 1


def test_parse_threads() -> None:
    assert parse_threads("auto") is None
    assert parse_threads("3") == 3
    for bad in ("0", "-2", "x", "", "1.5"):
        with pytest.raises(DifforgeError, match="--threads"):
            parse_threads(bad)


class FakeMachine:
    """Clocks for the governor: wall seconds, the machine's busy CPU seconds, ours."""

    def __init__(self) -> None:
        self.wall = self.busy = self.own = 0.0

    def run(self, seconds: float, ours: float, others: float) -> None:
        self.wall += seconds
        self.own += ours * seconds
        self.busy += (ours + others) * seconds


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> FakeMachine:
    fake = FakeMachine()
    monkeypatch.setattr(threads_module.time, "monotonic", lambda: fake.wall)
    monkeypatch.setattr(threads_module, "machine_busy_seconds", lambda: fake.busy)
    monkeypatch.setattr(threads_module, "own_cpu_seconds", lambda: fake.own)
    before = torch.get_num_threads()
    yield fake
    torch.set_num_threads(before)


def test_governor_gives_a_core_back_and_takes_it_again(machine: FakeMachine) -> None:
    torch.set_num_threads(2)
    governor = ThreadGovernor(interval_s=2.0, cores=2)
    assert governor.enabled and governor.threads == 2
    machine.run(1.0, ours=1.33, others=0.67)
    assert governor.tick() == 2  # not yet interval_s: no decision on one second
    machine.run(1.5, ours=1.33, others=0.67)
    assert governor.tick() == 1 and torch.get_num_threads() == 1
    machine.run(2.0, ours=1.0, others=1.0)
    assert governor.tick() == 1
    machine.run(2.0, ours=1.0, others=0.05)  # the competitor has gone
    assert governor.tick() == 2 and torch.get_num_threads() == 2
    assert governor.changes == 2


def test_governor_leaves_an_idle_machine_alone(machine: FakeMachine) -> None:
    torch.set_num_threads(2)
    governor = ThreadGovernor(interval_s=2.0, cores=2)
    for _ in range(10):
        machine.run(2.5, ours=2.0, others=0.1)
        assert governor.tick() == 2
    assert governor.changes == 0


def test_governor_never_runs_more_threads_than_torch_started_with(machine: FakeMachine) -> None:
    torch.set_num_threads(4)  # e.g. torch's physical-core default on 8 hyper-threads
    governor = ThreadGovernor(interval_s=2.0, cores=8)
    machine.run(2.5, ours=4.0, others=0.0)
    assert governor.tick() == 4
    machine.run(2.5, ours=4.0, others=5.0)  # five of the eight taken: three left
    assert governor.tick() == 3
    machine.run(2.5, ours=3.0, others=0.0)
    assert governor.tick() == 4 and torch.get_num_threads() == 4


def test_disabled_governor_does_nothing(machine: FakeMachine, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(2)
    governor = ThreadGovernor(enabled=False, cores=2)
    machine.run(5.0, ours=1.0, others=1.0)
    assert governor.tick() == 2 and torch.get_num_threads() == 2
    monkeypatch.setattr(threads_module, "machine_busy_seconds", lambda: None)  # no /proc/stat
    assert not ThreadGovernor(cores=2).enabled
    assert not ThreadGovernor(cores=1).enabled


def test_machine_busy_seconds_reads_proc_stat() -> None:
    busy = threads_module.machine_busy_seconds()
    if busy is None:
        pytest.skip("no /proc/stat on this system")
    assert busy > 0


def test_trainer_fixes_or_adapts_threads_from_its_config(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("sklearn", reason="the digits dataset comes with the [datasets] extra")
    from tiny_settings import TINY

    from difforge.diffusion import DiffusionConfig
    from difforge.runs import TrainConfig
    from difforge.training import Trainer, prepare_run

    before = torch.get_num_threads()
    try:
        for threads, adapts in (("1", False), ("auto", True)):
            config = TrainConfig(**{**TINY, "steps": 1, "threads": threads})
            model, process, dataset, run_config = prepare_run(config, DiffusionConfig(num_timesteps=50))
            trainer = Trainer(
                model,
                process,
                dataset,
                run_config,
                tmp_path / threads,
                device=torch.device("cpu"),
                progress=False,
            )
            assert trainer.governor.enabled is (adapts and threads_module.available_cores() > 1)
            if not adapts:
                assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_linear_and_step_schedules_closed_forms() -> None:
    lr, warmup, total = 1e-3, 10, 110
    assert learning_rate(lr, 9, warmup, total, "linear", lr_min=1e-4) == pytest.approx(lr)  # warm-up end
    assert learning_rate(lr, 60, warmup, total, "linear", lr_min=1e-4) == pytest.approx(lr - 0.9e-3 * 0.5)
    assert learning_rate(lr, 500, warmup, total, "linear", lr_min=1e-4) == pytest.approx(1e-4)  # the floor
    assert learning_rate(lr, 60, warmup, total, "cosine", lr_min=2e-4) == pytest.approx(2e-4 + 8e-4 * 0.5)
    step = [
        learning_rate(lr, s, warmup, total, "step", decay_every=25, decay_factor=0.1, lr_min=2e-6)
        for s in (10, 34, 35, 60, 85)
    ]
    assert step == pytest.approx([1e-3, 1e-3, 1e-4, 1e-5, 2e-6])


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"lr_schedule": "step"}, "--lr-decay-every"),
        ({"lr_schedule": "cosine", "lr_decay_every": 10}, "applies to --lr-schedule step"),
        ({"lr_min": 1e-4}, "--lr-min is the floor"),
        ({"lr_schedule": "linear", "lr_min": 1.0}, "--lr-min"),
        ({"lr_schedule": "step", "lr_decay_every": 5, "lr_decay_factor": 0.0}, "--lr-decay-factor"),
        ({"lr_schedule": "exponential"}, "constant, cosine, linear, step"),
    ],
)
def test_bad_lr_plans_are_refused(settings: dict, words: str) -> None:
    from difforge.errors import DifforgeError
    from difforge.runs.config import TrainConfig

    with pytest.raises(DifforgeError, match=words):
        TrainConfig(**settings).validate()
