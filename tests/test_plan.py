"""The plan check before training (kdkit.plan) and the device defaults (kdkit.devices)."""

from __future__ import annotations

import pytest
import torch

from kdkit import devices
from kdkit.plan import PlanError, PlannedTraining, check_plan, steps_per_process


@pytest.mark.parametrize("processes", [1, 2, 8])
def test_every_run_of_the_paper_plan_gets_a_step_on_every_process(processes):
    # 50 per class of 4 classes, minus nothing: 200 images, the paper's global batch 32.
    runs = [PlannedTraining("teacher", 5137), PlannedTraining("hdkd_50_seed0", 200), PlannedTraining("student_all_seed0", 4623)]
    steps = check_plan(runs, batch_size=32, num_processes=processes)
    assert set(steps) == {run.name for run in runs}
    assert all(value >= 1 for value in steps.values())
    # The global batch is split, not multiplied: 200 images at batch 32 are 6 updates per epoch,
    # whatever the number of processes.
    assert steps["hdkd_50_seed0"] == 200 // 32


def test_a_batch_that_does_not_divide_is_refused_with_both_numbers():
    with pytest.raises(PlanError, match=r"32.*3|3.*32"):
        check_plan([PlannedTraining("teacher", 1000)], batch_size=32, num_processes=3)


def test_runs_that_cannot_train_are_all_named_with_size_and_process_count():
    runs = [PlannedTraining("teacher", 5000), PlannedTraining("student_1_seed0", 4), PlannedTraining("hdkd_1_seed0", 4)]
    with pytest.raises(PlanError) as error:
        check_plan(runs, batch_size=64, num_processes=8)
    message = str(error.value)
    assert "student_1_seed0" in message and "hdkd_1_seed0" in message and "teacher" not in message.split("\n", 1)[1]
    assert "4 training image" in message and "8 process" in message
    assert len(error.value.problems) == 2


def test_gradient_accumulation_counts_updates_not_batches():
    assert steps_per_process(320, 32, 1, grad_accum_steps=4) == 3  # 10 batches, ceil(10 / 4)
    assert steps_per_process(320, 32, 2, grad_accum_steps=1) == 10


def test_launcher_precision_wins_over_the_preset(monkeypatch):
    monkeypatch.setenv(devices.LAUNCHER_PRECISION_ENV, "fp16")
    assert devices.resolve_mixed_precision("bf16") == "fp16"
    assert devices.resolve_mixed_precision("no") == "fp16"
    monkeypatch.setenv(devices.LAUNCHER_PRECISION_ENV, "no")  # accelerate's default: the preset decides
    assert devices.resolve_mixed_precision("bf16") == "bf16"
    monkeypatch.delenv(devices.LAUNCHER_PRECISION_ENV)
    assert devices.resolve_mixed_precision("no") == "no"
    with pytest.raises(ValueError, match="mixed precision"):
        devices.resolve_mixed_precision("fp32")


def test_auto_precision_follows_the_device(monkeypatch):
    monkeypatch.delenv(devices.LAUNCHER_PRECISION_ENV, raising=False)
    monkeypatch.setattr(devices, "accelerator_available", lambda: False)
    assert devices.resolve_mixed_precision("auto") == "no"
    assert devices.default_workers() == 0 and not devices.augment_on_device("auto")
    monkeypatch.setattr(devices, "accelerator_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert devices.resolve_mixed_precision("auto") == "bf16"
    # A GPU that only emulates bf16 (a V100, a T4) gets fp16, which it runs natively.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert devices.resolve_mixed_precision("auto") == "fp16"
    assert devices.default_workers() >= 1 and devices.augment_on_device("auto")
    assert not devices.augment_on_device("loader")
