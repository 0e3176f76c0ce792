"""Tests of kdkit.schedulers: timm, OneCycleLR, plateau and no schedule behind one interface."""

from __future__ import annotations

import pytest
import torch

from kdkit.schedulers import LRSchedule
from kdkit.train_config import TrainConfig


def make(sched: str, **overrides) -> tuple[LRSchedule, torch.optim.Optimizer]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    config = TrainConfig(epochs=4, lr=0.1, sched=sched, **{"warmup_epochs": 0, **overrides})
    return LRSchedule(config, optimizer, updates_per_epoch=3), optimizer


def lr(optimizer: torch.optim.Optimizer) -> float:
    return optimizer.param_groups[0]["lr"]


def test_timm_schedules_move_per_update_and_not_per_epoch() -> None:
    schedule, optimizer = make("cosine", min_lr=0.0)
    schedule.step_update(6)  # half of the 12 updates
    assert lr(optimizer) == pytest.approx(0.05)
    schedule.step_epoch(2, 0.9)
    assert lr(optimizer) == pytest.approx(0.05)
    restored, restored_optimizer = make("cosine", min_lr=0.0)
    restored.load_state_dict(schedule.state_dict())
    restored.step_update(6)
    assert lr(restored_optimizer) == lr(optimizer)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_onecycle_stops_at_its_last_step() -> None:
    schedule, optimizer = make("onecycle", warmup_epochs=1)
    lrs = []
    for step in range(1, 20):  # past its 12 steps: torch's OneCycleLR would raise
        schedule.step_update(step)
        lrs.append(lr(optimizer))
    assert schedule.scheduler.last_epoch == 12 and lrs[11:] == [lrs[11]] * 8
    assert max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) == 1  # torch peaks at pct_start * 12 - 1 = 2 steps


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
@pytest.mark.parametrize(("epochs", "warmup_epochs", "updates_per_epoch"), [(2, 1, 1), (4, 1, 1), (10, 3, 1)])
def test_onecycle_runs_whose_rise_ends_at_the_first_step_still_step(epochs, warmup_epochs, updates_per_epoch) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    config = TrainConfig(epochs=epochs, lr=0.1, sched="onecycle", warmup_epochs=warmup_epochs)
    schedule = LRSchedule(config, optimizer, updates_per_epoch=updates_per_epoch)  # torch divided by zero here
    lrs = []
    for step in range(1, epochs * updates_per_epoch + 1):
        schedule.step_update(step)
        lrs.append(lr(optimizer))
    assert max(lrs) <= 0.1 + 1e-12 and min(lrs) < 0.01  # it rose and decayed


@pytest.mark.filterwarnings("ignore:PlateauLRScheduler is deprecated:FutureWarning")
def test_plateau_moves_per_epoch_on_the_metric_and_keeps_its_counters() -> None:
    schedule, optimizer = make("plateau", sched_kwargs={"patience_epochs": 1, "decay_rate": 0.5})
    schedule.step_update(3)
    schedule.step_epoch(1, None)  # no validation metric: no step
    for epoch in (1, 2):
        schedule.step_epoch(epoch, 0.5)  # no improvement after the first
    state = schedule.state_dict()
    assert state["reduce_on_plateau"]["num_bad_epochs"] == 1  # what timm's own state_dict loses
    restored, restored_optimizer = make("plateau", sched_kwargs={"patience_epochs": 1, "decay_rate": 0.5})
    restored.load_state_dict(state)
    schedule.step_epoch(3, 0.5)
    restored.step_epoch(3, 0.5)
    assert lr(restored_optimizer) == lr(optimizer) == pytest.approx(0.05)


def test_none_is_a_constant_learning_rate_without_state() -> None:
    schedule, optimizer = make("none")
    schedule.step_update(5)
    schedule.step_epoch(1, 0.3)
    assert not schedule.active and schedule.scheduler is None and schedule.state_dict() == {}
    schedule.load_state_dict({})
    assert lr(optimizer) == 0.1
