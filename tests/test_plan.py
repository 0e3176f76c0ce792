"""The plan check before training (kdkit.plan) and the device defaults (kdkit.devices)."""

from __future__ import annotations

import pytest
import torch

from kdkit import LossTerm, devices
from kdkit.checkpoint_manager import RunExistsError
from kdkit.losses import LOSSES, LogitLoss
from kdkit.plan import (
    PlanError,
    PlannedModel,
    PlannedTraining,
    check_distillation,
    check_fresh_starts,
    check_plan,
    probe_model,
    steps_per_process,
)


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


# --------------------------------------------------------------------------- the distillation plan


def _resnets(num_classes: int = 3) -> tuple[PlannedModel, PlannedModel]:
    return (PlannedModel.timm("resnet10t", num_classes, role="the teacher model"),
            PlannedModel.timm("resnet10t", num_classes, role="the student model"))


FLAGS = {"image_size": "--image-size", "batch_size": "--batch-size", "epochs": "--epochs", "teacher_epochs": "--teacher-epochs",
         "val_fraction": "--val-fraction", "losses": "--losses", "taps": "--taps"}  # fmt: skip


def test_a_plan_that_can_train_gives_its_models_on_the_meta_device():
    teacher, student = _resnets()
    probed = check_distillation(teacher, student, image_size=32, losses={"ce": 0.5, "kl": 0.5, "fitnet": 1.0},
                                taps=["layer3"], epochs=1, teacher_epochs=1, trained_alone=[student], val_fraction=0.1)  # fmt: skip
    assert len(probed.teachers) == 1 and len(probed.trained_alone) == 1
    assert all(next(model.parameters()).is_meta for model in (*probed.teachers, probed.student, *probed.trained_alone))
    assert not probed.student._forward_hooks and not any(m._forward_hooks for m in probed.student.modules())  # no tap left behind


def test_every_setting_below_one_and_every_bad_loss_is_named_at_once_by_its_flag():
    teacher, student = _resnets()
    with pytest.raises(PlanError) as error:
        check_distillation(teacher, student, image_size=0, batch_size=0, epochs=0, teacher_epochs=-1, val_fraction=1.0,
                           losses={"ce": -1.0, "klx": 0.5}, names=FLAGS)  # fmt: skip
    assert error.value.problems == [
        "--image-size must be a whole number of at least 1, got 0",
        "--batch-size must be a whole number of at least 1, got 0",
        "--epochs must be a whole number of at least 1, got 0",
        "--teacher-epochs must be a whole number of at least 1, got -1",
        "--val-fraction must lie strictly between 0 and 1, got 1.0",
        *error.value.problems[5:],
    ]
    losses = error.value.problems[5:]
    assert len(losses) == 2 and all(line.startswith("--losses: ") for line in losses)
    assert "'ce'" in losses[0] and "unknown loss 'klx'" in losses[1]
    assert str(error.value).startswith("7 problem(s) with the plan; nothing was started:\n  --image-size")


@pytest.mark.parametrize(
    ("losses", "taps", "expected"),
    [
        ({"ce": 0.5, "fitnet": 1.0}, None, r"feature loss\(es\) \['fitnet'\] of --losses .* no --taps are given"),
        ({"ce": 1.0}, ["layer3"], r"--taps are given, but no feature loss of --losses uses them"),
        (None, ["layer3"], r"--taps are given, but no feature loss in the default objective"),
        ({"ce": 0.0, "kl": 0.0}, None, r"--losses: every weight is 0"),
        ({}, None, r"--losses names no loss"),
        ({"ce": 0.5, "fitnet": 1.0}, {"teacher": ["layer3"], "student": ["layer9"]},
         r"the distilled taps \{'teacher': \['layer3'\], 'student': \['layer9'\]\} do not fit resnet10t -> resnet10t: .*layer9.*--taps"),
    ],
)
def test_losses_and_taps_that_do_not_go_together_are_refused(losses, taps, expected):
    with pytest.raises(PlanError, match=expected):
        check_distillation(*_resnets(), image_size=32, losses=losses, taps=taps, names=FLAGS)


def test_the_models_must_take_the_image_size_in_a_training_step():
    teacher, student = _resnets()
    hdkd = PlannedModel.timm("hdkd_student", 3, role="the student model", img_size=8)
    with pytest.raises(PlanError, match=r"the student model 'hdkd_student' cannot be built for 8 x 8 images \(ValueError: .*--image-size"):
        check_distillation(teacher, hdkd, image_size=8, names=FLAGS)
    vit = PlannedModel.timm("deit_tiny_patch16_224", 3, role="baseline")
    with pytest.raises(PlanError, match=r"baseline 'deit_tiny_patch16_224' cannot take 32 x 32 images \(AssertionError"):
        probe_model(vit, 32)
    # A 1 x 1 map of one image: batch norm fails in training, not in evaluation. A teacher
    # reused from a checkpoint (no teacher_epochs) only evaluates.
    with pytest.raises(PlanError) as error:
        check_distillation(teacher, student, image_size=32, batch_size=1, teacher_epochs=1, names=FLAGS)
    assert [line.split(" cannot")[0] for line in error.value.problems] == ["the teacher model 'resnet10t'", "the student model 'resnet10t'"]
    assert "in a training step of 1 image(s)" in error.value.problems[0] and "a larger --batch-size" in error.value.problems[0]
    with pytest.raises(PlanError) as error:
        check_distillation(teacher, student, image_size=32, batch_size=1, names=FLAGS)
    assert [line.split(" cannot")[0] for line in error.value.problems] == ["the student model 'resnet10t'"]


def test_a_distillation_step_that_fails_is_reported():
    class Broken(LogitLoss):
        def forward(self, student_logits, teacher_logits, labels=None):
            raise RuntimeError("cannot compare")

    with pytest.raises(PlanError, match=r"a distillation step resnet10t -> resnet10t fails on 32 x 32 images \(RuntimeError: cannot compare\)"):
        check_distillation(*_resnets(), image_size=32, losses=[LossTerm("ce", 0.5), LossTerm(Broken(), 0.5, name="broken")])


def test_a_fresh_start_over_runs_with_results_is_refused_listing_them_all(tmp_path):
    folders = {name: tmp_path / name for name in ("teacher", "student", "empty")}
    for name in ("teacher", "student"):
        folders[name].mkdir()
        (folders[name] / "best_model.safetensors").write_bytes(b"weights")
    folders["empty"].mkdir()
    names = {"resume": "--resume", "overwrite": "--overwrite", "output_dir": "--output-dir"}
    with pytest.raises(RunExistsError) as error:
        check_fresh_starts(folders, resume=False, overwrite=False, names=names)
    message = str(error.value)
    assert "2 run folder(s)" in message and "teacher: its best model" in message and "student: its best model" in message
    assert "empty" not in message and "--resume" in message and "--overwrite" in message and "--output-dir" in message
    assert set(check_fresh_starts(folders, resume=False, overwrite=True)) == {"teacher", "student"}
    assert check_fresh_starts(folders, resume=True, overwrite=False) == {}
    assert check_fresh_starts({"empty": folders["empty"], "none": tmp_path / "none"}, resume=False, overwrite=False) == {}
    with pytest.raises(PlanError, match="--resume continues .* --overwrite replaces them"):
        check_fresh_starts(folders, resume=True, overwrite=True, names=names)


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_registered_loss_passes_the_plan_check_on_the_meta_device(name):
    teacher, student = _resnets()
    feature = LOSSES.build(name).inputs == "features"
    check_distillation(teacher, student, image_size=32, batch_size=4, losses={"ce": 0.5, name: 1.0},
                       taps=["layer3"] if feature else None)
