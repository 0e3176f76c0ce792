"""The runs an HDKD experiment plans, and the checks that they can all train before any does.

Phase 2 trains, for every size and seed, one balanced subset of the training pool, on which the
student alone, HDKD and any baselines train (:func:`plan_runs`). Before anything trains, every
planned run must get an optimizer step on every process (:func:`check_runs_fit`) and every
baseline must take the image size (:func:`check_baselines_take`): a failure is reported at the
start, not at the twentieth run, hours in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import timm
import torch

from kdkit.data import ImageTensorDataset, balanced_subset_indices
from kdkit.distiller import Distiller
from kdkit.explain import feature_stage
from kdkit.plan import PlannedTraining, check_plan
from kdkit.taps import resolve_selector
from torch import nn

from .config import ARMS, HDKD_STAGES, ExperimentConfig
from .report import size_label
from .training import hdkd_losses

__all__ = [
    "PlannedRun",
    "check_baselines_take",
    "check_models",
    "check_runs_fit",
    "figure_tap",
    "model_kwargs",
    "plan_runs",
    "teacher_set_size",
]


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
            baselines = config.baselines if config.baseline_seeds is None or seed in config.baseline_seeds else []
            for arm in (*ARMS, *baselines):
                planned.append(PlannedRun(f"{arm.lower()}_{size_label(size)}_seed{seed}", arm, size, seed, subset))
    return planned


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
        + [PlannedTraining(run.name, len(run.subset)) for run in planned],
        batch_size=config.batch_size,
        num_processes=num_processes,
    )


def _model_on_meta(name: str, image_size: int, what: str, num_classes: int = 2) -> nn.Module:
    """``name`` built on the ``meta`` device and run once on ``image_size`` images: shapes only, no memory or compute.

    Raises:
        ValueError: The model fails on ``image_size`` images; the message names ``what`` it is and its error.
    """
    with torch.device("meta"):  # eval: batch norm over one image trains on nothing
        model = timm.create_model(name, num_classes=num_classes, **model_kwargs(name, image_size)).eval()
    try:
        model(torch.empty(1, 3, image_size, image_size, device="meta"))
    except Exception as error:  # whatever the model raises on the wrong size
        raise ValueError(
            f"{what} {name!r} cannot take {image_size} x {image_size} images ({type(error).__name__}: {error}); "
            "choose a model without a fixed input size, or another --image-size"
        ) from error
    return model


def check_baselines_take(baselines: Sequence[str], image_size: int) -> None:
    """Fails before anything trains if a baseline cannot take ``image_size`` images (a ViT built for 224 px).

    Raises:
        ValueError: A baseline fails on ``image_size`` images; the message names it and its error.
    """
    for name in baselines:
        _model_on_meta(name, image_size, "baseline")


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


def check_models(config: ExperimentConfig, num_classes: int) -> None:
    """Builds the teacher, both students and the Distiller on the ``meta`` device, and runs them once.

    Shapes only, no memory or compute: a model that cannot take the image size (a ViT built for
    224 px), a tap that names no module or cannot be aligned, and a figure tap that names no
    single module fail here, naming the setting, not after the teacher has trained.

    Raises:
        ValueError: What fails, with the setting to change.
    """
    names = {"teacher": config.teacher_model, "student": config.student_model, "alone": config.alone_model_name}
    models = {role: _model_on_meta(name, config.image_size, f"the {role} model", num_classes) for role, name in names.items()}
    try:
        Distiller(models["teacher"], models["student"], losses=hdkd_losses(config), taps=config.feature_taps,
                  input_size=config.image_size).remove_hooks()
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"the distilled taps {config.feature_taps} do not fit {names['teacher']} -> {names['student']}: {error}") from error
    for role, model in models.items():
        tap = figure_tap(config, role, model)
        try:
            paths = resolve_selector(model, tap)
        except (ValueError, KeyError) as error:
            raise ValueError(f"--figure-tap: {tap!r} for the {role} model {names[role]!r}: {error}") from None
        if len(paths) != 1:
            raise ValueError(f"--figure-tap: {tap!r} names {len(paths)} modules of the {role} model {names[role]!r}, not one: {paths[:5]}")
