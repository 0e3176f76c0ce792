"""The runs an HDKD experiment plans, and the checks that they can all train before any does.

Phase 2 trains, for every size and seed, one balanced subset of the training pool, on which the
student alone, HDKD and any baselines train (:func:`plan_runs`). Before anything trains, every
model, tap and setting must survive one training step on the ``meta`` device (:func:`check_models`,
through :func:`kdkit.plan.check_distillation`), a fresh start must not replace finished runs
unless asked to (:func:`check_fresh_start`), and every planned run must get an optimizer step on
every process (:func:`check_runs_fit`): a failure is reported at the start, not at the twentieth
run, hours in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from kdkit.data import ImageTensorDataset, balanced_subset_indices
from kdkit.explain import feature_stage
from kdkit.plan import PlannedModel, PlannedTraining, check_distillation, check_fresh_starts, check_plan, probe_model
from kdkit.taps import resolve_selector

from .config import ARMS, HDKD_STAGES, ExperimentConfig
from .report import size_label
from .training import hdkd_losses

__all__ = [
    "SETTING_FLAGS",
    "PlannedRun",
    "check_baselines_take",
    "check_fresh_start",
    "check_models",
    "check_runs_fit",
    "figure_tap",
    "model_kwargs",
    "plan_runs",
    "planned_run_names",
    "teacher_set_size",
]

SETTING_FLAGS = {
    "image_size": "--image-size",
    "batch_size": "--batch-size",
    "epochs": "--student-epochs",
    "teacher_epochs": "--teacher-epochs",
    "val_fraction": "--val-fraction",
    "losses": "the HDKD objective (alpha, temperature, feature_weight, stage_alpha)",
    "taps": "--taps",
    "resume": "--resume",
    "overwrite": "--overwrite",
    "output_dir": "--output-dir",
}
"""How the plan checks name the experiment's settings: by the flags of :mod:`kdkit_zoo.hdkd.cli`."""


@dataclass
class PlannedRun:
    """One phase-2 run: an arm trained on the subset of one size and seed.

    Attributes:
        name: Its output folder and claim, e.g. ``"hdkd_50_seed0"``.
        arm: :data:`~kdkit_zoo.hdkd.config.STUDENT`, :data:`~kdkit_zoo.hdkd.config.HDKD` or a
            baseline's timm name.
        size: Training images per class; ``None``: the whole pool.
        seed: Seed of the subset and of the run.
        subset: Its training images.
    """

    name: str
    arm: str
    size: int | None
    seed: int
    subset: ImageTensorDataset


def plan_runs(config: ExperimentConfig, pool: ImageTensorDataset) -> list[PlannedRun]:
    """Phase 2's runs, in the order they train and are reported: per size, per seed, the arms then the baselines.

    The subsets of one seed are nested across sizes (:func:`kdkit.data.balanced_subset_indices`),
    and every arm of a size and seed trains on the same images.
    """
    planned: list[PlannedRun] = []
    for size in config.sizes:
        for seed in config.seeds:
            subset = pool.subset(balanced_subset_indices(pool.labels.numpy(), size, seed))
            planned += [PlannedRun(name, arm, size, seed, subset) for name, arm in _arms(config, size, seed)]
    return planned


def _arms(config: ExperimentConfig, size: int | None, seed: int) -> list[tuple[str, str]]:
    """``(run name, arm)`` of the runs of one size and seed: the arms, then the baselines trained at that seed."""
    baselines = config.baselines if config.baseline_seeds is None or seed in config.baseline_seeds else []
    return [(f"{arm.lower()}_{size_label(size)}_seed{seed}", arm) for arm in (*ARMS, *baselines)]


def planned_run_names(config: ExperimentConfig) -> list[str]:
    """The output folders of phase 2's runs, in :func:`plan_runs`' order; known before the data is loaded."""
    return [name for size in config.sizes for seed in config.seeds for name, _ in _arms(config, size, seed)]


def check_fresh_start(config: ExperimentConfig, output_dir: Path) -> dict[str, str]:
    """Refuses a start without ``resume`` over the results of the runs it plans, unless ``overwrite``.

    Every run folder the experiment will write (the teacher's, unless reused, and every planned
    run's) is looked at before anything trains, and all that hold results are named at once
    (:func:`kdkit.plan.check_fresh_starts`). A folder without run results (only the settings
    record, or a run stopped before it saved a checkpoint or a best model) starts afresh as before.

    Returns:
        ``{run name: what its folder holds}`` for the runs ``overwrite`` replaces.

    Raises:
        kdkit.train.RunExistsError: Runs with results, neither ``resume`` nor ``overwrite`` given.
    """
    runs = ([] if config.teacher_checkpoint else ["teacher"]) + planned_run_names(config)
    return check_fresh_starts({name: output_dir / name for name in runs}, resume=config.resume,
                              overwrite=config.overwrite, names=SETTING_FLAGS)


def teacher_set_size(pool: ImageTensorDataset, config: ExperimentConfig) -> int:
    """The teacher's training images per epoch, known before SMOTE makes them (every class at the largest's size)."""
    labels = pool.labels.numpy()
    if config.teacher_per_class is not None:
        labels = labels[balanced_subset_indices(labels, config.teacher_per_class, 0)]
    counts = np.bincount(labels)
    return int(counts.max()) * int((counts > 0).sum()) if config.smote else len(labels)


def check_runs_fit(config: ExperimentConfig, pool: ImageTensorDataset, planned: Sequence[PlannedRun], num_processes: int) -> None:
    """Checks that the teacher (unless reused) and every planned run get a step on every process.

    Raises:
        kdkit.plan.PlanError: A run too small for the processes, or a batch that does not split
            across them (:func:`kdkit.plan.check_plan`).
    """
    check_plan(
        ([] if config.teacher_checkpoint else [PlannedTraining("teacher", teacher_set_size(pool, config))])
        + [PlannedTraining(run.name, len(run.subset), batch_size=config.student_batch) for run in planned],
        batch_size=config.batch_size,
        num_processes=num_processes,
    )


def check_baselines_take(baselines: Sequence[str], image_size: int, batch_size: int = 2) -> None:
    """Fails before anything trains if a baseline cannot train on ``image_size`` images (a ViT built for 224 px).

    Raises:
        kdkit.plan.PlanError: A baseline fails a training step on ``image_size`` images; the
            message names it and its error.
    """
    for name in baselines:
        probe_model(PlannedModel.timm(name, 2, role="baseline"), image_size, batch_size=batch_size, names=SETTING_FLAGS)


def model_kwargs(model_name: str, image_size: int) -> dict[str, int]:
    """The HDKD students size their position embeddings by the input: they are built for the experiment's size."""
    return {"img_size": image_size} if model_name.startswith("hdkd_student") else {}


def figure_tap(config: ExperimentConfig, role: str, model: nn.Module) -> str:
    """The Figure 5 tap of the ``role`` model: ``"teacher"``, ``"student"`` (distilled) or ``"alone"``.

    ``figure_tap`` is one module path for every model, or one per role
    (``"teacher=layer3,student=stages.2,alone=stages.2"``; ``alone`` defaults to ``student``'s);
    without one: the HDKD models' last shared stage, else the model's stride-16 stage.
    """
    given = config.figure_tap
    if given is not None and "=" in given:
        per_role = dict(item.split("=", 1) for item in given.split(",") if "=" in item)
        given = per_role.get(role, per_role.get("student") if role == "alone" else None)
    if given is not None:
        return given
    if type(model).__module__.startswith("kdkit_zoo.hdkd"):
        return HDKD_STAGES[-1]
    return feature_stage(model, max_reduction=16)


def check_models(config: ExperimentConfig, num_classes: int = 2, num_processes: int = 1) -> None:
    """Checks every model of the experiment, its settings and one training step of each, before anything trains.

    The teacher (one training step, or an evaluation pass when reused from ``teacher_checkpoint``),
    the student alone, every baseline and the HDKD Distiller run one step on the ``meta`` device
    at the image size and each process's batch (:func:`kdkit.plan.check_distillation`): shapes
    only, no memory or compute. A model that cannot take the image size (a ViT built for 224 px,
    an HDKD student below 16 px), a tap that names no module or cannot be aligned, and a figure
    tap that names no single module fail here, naming the setting, not after the teacher has
    trained.

    Args:
        config: The experiment.
        num_classes: Classes of the models; they shape only the heads, so the check may run
            before the data is loaded.
        num_processes: Data-parallel processes, which share the global batch.

    Raises:
        kdkit.plan.PlanError: What cannot train, with the setting to change.
        ValueError: A figure tap that names no single module.
    """
    names = {"teacher": config.teacher_model, "student": config.student_model, "alone": config.alone_model_name}

    def planned(role: str) -> PlannedModel:
        return PlannedModel.timm(names[role], num_classes, role=f"the {role} model", **model_kwargs(names[role], config.image_size))

    probed = check_distillation(
        planned("teacher"),
        planned("student"),
        image_size=config.image_size,
        losses=hdkd_losses(config),
        taps=config.feature_taps,
        # Each process's share of the global batches; one that does not divide is check_runs_fit's to report.
        batch_size=max(1, config.student_batch // max(1, num_processes)),
        teacher_batch_size=max(1, config.batch_size // max(1, num_processes)),
        epochs=config.student_epochs,
        teacher_epochs=None if config.teacher_checkpoint else config.teacher_epochs,
        # Baselines are built as the experiment builds them: for timm's default size.
        trained_alone=[planned("alone"), *(PlannedModel.timm(name, num_classes, role="baseline") for name in config.baselines)],
        val_fraction=config.val_fraction,
        names={**SETTING_FLAGS, "teacher_batch_size": "--batch-size",
               "batch_size": "--student-batch-size" if config.student_batch_size else "--batch-size"},
    )
    models = {"teacher": probed.teachers[0], "student": probed.student, "alone": probed.trained_alone[0]}
    for role, model in models.items():
        tap = figure_tap(config, role, model)
        try:
            paths = resolve_selector(model, tap)
        except (ValueError, KeyError) as error:
            raise ValueError(f"--figure-tap: {tap!r} for the {role} model {names[role]!r}: {error}") from None
        if len(paths) != 1:
            raise ValueError(f"--figure-tap: {tap!r} names {len(paths)} modules of the {role} model {names[role]!r}, not one: {paths[:5]}")
