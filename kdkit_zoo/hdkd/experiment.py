"""The HDKD experiment, end to end: :func:`run_experiment`, and the names it is configured and read with.

Phase 1 trains (or loads) the pure-CNN ``hdkd_teacher`` on the whole training set. Phase 2
trains, for every training-set size and seed, the hybrid student twice: alone
(``hdkd_student_nodistill``, cross-entropy only) and distilled (``hdkd_student`` with the
HDKD objective ``(1-a)*CE + a*T^2*KL + lambda * sum_j j * MSE_j`` over the three shared
convolutional stages). The results, tables and figures land in one output folder.

This module is the experiment's Python interface: it re-exports the configuration
(:class:`~kdkit_zoo.hdkd.config.ExperimentConfig`, :data:`~kdkit_zoo.hdkd.config.PRESETS`),
the claims that let workers share a folder, and the report helpers. The command line of
``examples/hdkd_brain.py`` and ``examples/hdkd_ham10000.py`` is :mod:`kdkit_zoo.hdkd.cli`.
Every run is resumable: finished runs are skipped and an interrupted run continues from its
last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
from accelerate import PartialState
from torch import nn

from kdkit import devices
from kdkit.checkpoint import atomic_write_text, load_model
from kdkit.data import ImageTensorDataset, balanced_subset_indices, smote_balance
from kdkit.distiller import Distiller
from kdkit.explain import channel_mean_maps
from kdkit.image_data import load_image_data
from kdkit.plots import plot_accuracy_vs_size, plot_activation_grid, plot_confusion_matrix, plot_training_curves
from kdkit.run_lock import main_decides
from kdkit.train import Supervised, TrainConfig, Trainer, distributed_without_accelerator

from .claims import RunClaims
from .config import ARMS, HDKD, PRESETS, STUDENT, ExperimentConfig
from .datasets import DATASETS, load_dataset
from .report import metric_summary, metric_values, paired_values, results_markdown, size_label, weak_teacher_notes
from .run_plan import PlannedRun, check_fresh_start, check_models, check_runs_fit, figure_tap, model_kwargs, plan_runs
from .settings import EXPERIMENT_FILE, check_same_data, check_same_settings
from .training import (
    FEATURE_TAPS,
    ExperimentData,
    fit_and_test,
    hdkd_losses,
    is_finished,
    loader,
    prepare_data,
    student_steps,
    student_train_config,
    teacher_train_config,
)

__all__ = [
    "ARMS",
    "CLAIM_POLL_SECONDS",
    "DATASETS",
    "EXPERIMENT_FILE",
    "FEATURE_TAPS",
    "HDKD",
    "PRESETS",
    "STUDENT",
    "ExperimentConfig",
    "RunClaims",
    "hdkd_losses",
    "metric_values",
    "paired_values",
    "results_markdown",
    "run_experiment",
    "size_label",
]

logger = logging.getLogger(__name__)

CLAIM_POLL_SECONDS = 30.0
"""How often a worker with nothing left to do looks again at the runs other workers hold."""


def run_experiment(config: ExperimentConfig) -> dict[str, object]:
    """Runs both phases and writes ``results.json``, ``results.md`` and the figures.

    Several workers may run the same experiment on one output folder at once (each started with
    ``resume``; on a CPU, two one-thread workers train faster than one two-thread process). They
    share out the runs through :class:`~kdkit_zoo.hdkd.claims.RunClaims`: a worker trains the runs
    nobody holds, does the runs that need no teacher while another worker trains it, then waits
    for the runs others hold and collects them, so every worker writes the same complete report.
    The settings that define the results are recorded in ``experiment.json``; a ``resume`` with
    other values is refused.

    Before anything is written or trained, every model, tap and setting runs one training step on
    the ``meta`` device (:func:`~kdkit_zoo.hdkd.run_plan.check_models`), and a start without
    ``resume`` over run folders that hold results is refused unless ``overwrite``.

    Returns:
        The content of ``results.json``: ``{"teacher": {...}, "runs": [...], "unfinished": [...], "config": {...}}``;
        ``unfinished`` names the runs a ``finished_only`` report left out.

    Raises:
        kdkit.plan.PlanError: A model, tap or setting that cannot train (``image_size`` too
            small for a model, a tap naming no module), or a run without a step on some process.
        kdkit.train.RunExistsError: No ``resume`` and no ``overwrite``, and planned runs' folders
            hold results; all are named.
        ResumeError: ``resume`` with settings other than those the folder's runs were trained with.
        RuntimeError: workers with and without ``resume`` on one folder.
    """
    # Like the Trainer's Accelerator: under torchrun on a CPU-only machine, ask for CPU DDP.
    state = PartialState(cpu=distributed_without_accelerator())
    # Every model, tap and figure tap, on the meta device, before the data is decoded and the
    # teacher trains for hours: the class count shapes only the heads.
    check_models(config, num_processes=state.num_processes)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    claims = RunClaims(output_dir / ".claims")
    claims.join(resume=config.resume)
    try:
        # Before the settings record is rewritten for a fresh start: a refused one leaves it as it was.
        main_decides(lambda: check_fresh_start(config, output_dir))
        main_decides(lambda: check_same_settings(config, output_dir))
        return _run_joined(config, claims, output_dir, state)
    finally:
        claims.release("experiment")  # a notebook or driver that carries on must not keep others out


def _run_joined(config: ExperimentConfig, claims: RunClaims, output_dir: Path, state: PartialState) -> dict[str, object]:
    """The body of :func:`run_experiment`, once this worker has joined the folder: plan, teacher, students, report."""
    started = time.perf_counter()
    splits, data_record = _load_splits(config)
    main_decides(lambda: check_same_data(config, output_dir, data_record))
    if config.select_metric is None:
        config = dataclasses.replace(config, select_metric=select_metric_for(splits["train"].labels.numpy()))
    data = prepare_data(config, splits)
    notes = _size_notes(config, data.pool)
    planned = plan_runs(config, data.pool)
    # Every run gets a step on every process, or nothing starts (not the twentieth run, hours in).
    check_runs_fit(config, data.pool, planned, state.num_processes)
    teacher = _Teacher(config, data, claims, output_dir, state, planned)
    notes += teacher.notes
    students = _train_students(planned, teacher, claims, config, data, output_dir)
    results = _results(config, data, teacher, planned, students, state, started)
    results["data"] = data_record
    for note in weak_teacher_notes(results, config):
        logger.warning("%s", note)
        notes.append(note)
    results["notes"] = notes
    if state.is_main_process:
        _write_report(results, config, data, teacher, students.figure_models, output_dir)
    return results


def _load_splits(config: ExperimentConfig) -> tuple[dict[str, ImageTensorDataset], dict[str, object]]:
    """The splits, and how they were made: the user's folder or CSV (`data`), or a preset data set."""
    if config.data is not None:
        loaded = load_image_data(config.data, config.image_size, test_fraction=config.test_fraction,
                                 val_fraction=config.val_fraction, seed=0)
        return loaded.splits, loaded.split
    return load_dataset(config.dataset, config.data_dir, config.image_size), {"dataset": config.dataset}


def select_metric_for(labels: np.ndarray) -> str:
    """``balanced_accuracy`` when the largest class has over 1.5 times the images of the smallest, else ``accuracy``.

    On an imbalanced set a model that learns the majority class scores a high plain accuracy.
    """
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    return "balanced_accuracy" if counts.max() > 1.5 * counts.min() else "accuracy"


def _size_notes(config: ExperimentConfig, pool: ImageTensorDataset) -> list[str]:
    """A note for each size above the smallest class of the pool, whose subsets that class caps."""
    counts = np.bincount(pool.labels.numpy(), minlength=len(pool.classes))
    smallest = int(counts.min())
    notes = [
        f"{size} images per class: class {pool.classes[int(counts.argmin())]!r} has {smallest} in the training pool, "
        f"so its subsets hold all {smallest} of them"
        for size in config.sizes if size is not None and size > smallest
    ]
    for note in notes:
        logger.warning("%s", note)
    return notes


# --------------------------------------------------------------------------- phase 1: the teacher


class _Teacher:
    """Phase 1: the teacher, loaded from ``teacher_checkpoint`` and tested, or trained (or
    collected from another worker's run) as soon as no other worker holds it.

    Attributes:
        model: The ``hdkd_teacher``; trained and in eval mode once :attr:`metrics` is set.
        metrics: Its test metrics, ``None`` until it is ready (:meth:`ready`).
    """

    def __init__(
        self, config: ExperimentConfig, data: ExperimentData, claims: RunClaims, output_dir: Path, state: PartialState,
        planned: Sequence[PlannedRun] = (),
    ) -> None:
        torch.manual_seed(0)  # the teacher's initial weights: the same in every worker and every run
        self.model = timm.create_model(config.teacher_model, num_classes=len(data.classes), **model_kwargs(config.teacher_model, config.image_size))
        self.metrics: dict[str, object] | None = None
        self.notes: list[str] = []
        self._config, self._data, self._claims, self._output_dir, self._state = config, data, claims, output_dir, state
        if config.teacher_checkpoint:
            self._test_checkpoint()
            return
        self._train_set = self._training_set()
        # Never fewer optimizer steps than the longest student run.
        longest = max(planned, key=lambda run: student_steps(config, len(run.subset), state.num_processes), default=None)
        at_least = student_steps(config, len(longest.subset), state.num_processes) if longest is not None else 0
        self._train_config = teacher_train_config(config, output_dir / "teacher", len(self._train_set), at_least_steps=at_least,
                                                  num_processes=state.num_processes)
        budgeted = config.teacher_epochs_for(len(self._train_set), state.num_processes)
        if self._train_config.epochs > budgeted:
            note = (f"the teacher trains {self._train_config.epochs} epochs instead of {budgeted}, "
                    f"so that it takes at least the {at_least} optimizer steps of the longest student run ({longest.name})")
            logger.warning("%s", note)
            self.notes.append(note)
        if config.finished_only and not main_decides(lambda: is_finished(self._train_config)):
            raise ValueError(f"finished_only: the teacher in {self._train_config.output_dir} has not finished training")

    def _test_checkpoint(self) -> None:
        config, data = self._config, self._data
        load_model(self.model, config.teacher_checkpoint, expected_classes=data.classes)
        # Only evaluates: the epochs (and so num_images) do not matter.
        evaluation = teacher_train_config(config, self._output_dir / "teacher", len(data.pool))
        trainer = Trainer(Supervised(self.model), evaluation, class_names=data.classes, **data.pipeline.trainer_kwargs())
        self._set_tested(trainer.evaluate(loader(data.test, self._config, train=False)))

    def _training_set(self) -> ImageTensorDataset:
        """The pool, or ``teacher_per_class`` of each class, balanced with SMOTE when ``smote``."""
        config, pool = self._config, self._data.pool
        train_set = pool
        if config.teacher_per_class is not None:
            train_set = pool.subset(balanced_subset_indices(pool.labels.numpy(), config.teacher_per_class, 0))
        if config.smote:
            images, labels = smote_balance(train_set.images, train_set.labels, seed=0)
            train_set = self._data.pipeline.training_view(ImageTensorDataset(images, labels, pool.classes))
        return train_set

    def ready(self) -> bool:
        """``True`` once the teacher is trained and loaded; trains or collects it if no other worker holds it."""
        if self.metrics is not None:
            return True
        if not self._claims.acquire("teacher"):
            return False
        try:
            outcome = fit_and_test(Supervised(self.model), self._train_config, self._train_set, self._data, self._config)
        finally:
            self._claims.release("teacher")
        self._set_tested(outcome.test)
        if self._state.is_main_process:
            plot_training_curves(outcome.fit.history, self._output_dir / "teacher_curves.png")
        return True

    def _set_tested(self, metrics: dict[str, object]) -> None:
        self.metrics = metrics
        self.model.eval()
        logger.info("teacher test accuracy %.4f", metrics["accuracy"])


# --------------------------------------------------------------------------- phase 2: the students


@dataclass
class _StudentsOutcome:
    """What phase 2 gave this worker: the records of the runs it trained or collected."""

    records: dict[str, dict[str, object]] = field(default_factory=dict)
    left_out: set[str] = field(default_factory=set)
    """Runs a ``finished_only`` report leaves out."""
    figure_models: dict[str, nn.Module] = field(default_factory=dict)
    """The first size and seed's student and HDKD, for the activation-map figure."""


def _wait_for_other_workers() -> None:
    time.sleep(CLAIM_POLL_SECONDS)


def _train_students(
    planned: list[PlannedRun], teacher: _Teacher, claims: RunClaims, config: ExperimentConfig, data: ExperimentData, output_dir: Path
) -> _StudentsOutcome:
    """Trains (or collects) every planned run; the HDKD runs wait for the teacher.

    Each pass takes every run no other worker holds; when a pass takes none, the worker waits
    for the others (:data:`CLAIM_POLL_SECONDS`) and looks again.
    """
    outcome = _StudentsOutcome()
    pending = list(planned)
    awaited: list[str] = []
    teacher.ready()
    while pending:
        held: list[str] = []
        progressed = False
        for run in list(pending):
            if run.arm == HDKD and not teacher.ready():
                held += [] if "teacher" in held else ["teacher"]
                continue
            train_config = student_train_config(config, output_dir / run.name, run.seed, len(run.subset), PartialState().num_processes)
            if config.finished_only and not main_decides(lambda: is_finished(train_config)):
                logger.info("%s has not finished: left out of the report", run.name)
                outcome.left_out.add(run.name)
            elif not claims.acquire(run.name):
                held.append(run.name)
                continue
            else:
                try:
                    outcome.records[run.name] = _train_planned_run(run, train_config, teacher.model, data, config, outcome.figure_models)
                finally:
                    claims.release(run.name)
            pending.remove(run)
            progressed = True
        if pending and not progressed:
            if held != awaited:  # one line per change, not one per poll
                logger.info("waiting for what other workers hold: %s", ", ".join(f"{n} ({claims.holder(n)})" for n in held))
                awaited = held
            _wait_for_other_workers()
    return outcome


def _task_of(run: PlannedRun, teacher: nn.Module, config: ExperimentConfig) -> tuple[nn.Module, nn.Module]:
    """The trained model of ``run`` and the task that trains it: distilled for HDKD, supervised otherwise."""
    num_classes = len(run.subset.classes)
    if run.arm == HDKD:
        name = config.student_model
        model = timm.create_model(name, num_classes=num_classes, **model_kwargs(name, config.image_size))
        return model, Distiller(teacher, model, losses=hdkd_losses(config), taps=config.feature_taps, input_size=config.image_size)
    if run.arm == STUDENT:
        name = config.alone_model_name
        model = timm.create_model(name, num_classes=num_classes, **model_kwargs(name, config.image_size))
        return model, Supervised(model)
    model = timm.create_model(run.arm, num_classes=num_classes)  # a baseline
    return model, Supervised(model)


def _train_planned_run(
    run: PlannedRun,
    train_config: TrainConfig,
    teacher: nn.Module,
    data: ExperimentData,
    config: ExperimentConfig,
    figure_models: dict[str, nn.Module],
) -> dict[str, object]:
    """Trains (or collects) one phase-2 run and returns its record for ``results.json``.

    The first size and seed's student and HDKD runs also draw their confusion matrix and
    curves, and join ``figure_models`` for the activation-map figure.
    """
    classes = run.subset.classes
    torch.manual_seed(run.seed)  # the model's initial weights
    model, task = _task_of(run, teacher, config)
    outcome = fit_and_test(task, train_config, run.subset, data, config, batch_size=config.student_batch)
    model.eval()
    if run.size == config.sizes[0] and run.seed == config.seeds[0] and run.arm in ARMS:
        figure_models[run.arm] = model
        if PartialState().is_main_process:
            output_dir = Path(config.output_dir)
            plot_confusion_matrix(outcome.test["confusion_matrix"], classes, output_dir / f"confusion_{run.name}.png", title=run.name)
            plot_training_curves(outcome.fit.history, output_dir / f"curves_{run.name}.png")
    logger.info("%s: test accuracy %.4f", run.name, outcome.test["accuracy"])
    return {
        "model": run.arm,
        "size": size_label(run.size),
        "seed": run.seed,
        "distill": run.arm == HDKD,
        "num_train": len(run.subset),
        "epochs": train_config.epochs,
        "train_seconds": round(sum(row.get("train_time", 0.0) for row in outcome.fit.history), 1),
        **metric_summary(outcome.test),
    }


# --------------------------------------------------------------------------- the report


def _results(
    config: ExperimentConfig,
    data: ExperimentData,
    teacher: _Teacher,
    planned: list[PlannedRun],
    students: _StudentsOutcome,
    state: PartialState,
    started: float,
) -> dict[str, object]:
    """The content of ``results.json``: the runs in planned order, whichever order they trained in."""
    return {
        "teacher": metric_summary(teacher.metrics),
        "runs": [students.records[run.name] for run in planned if run.name in students.records],
        "unfinished": [run.name for run in planned if run.name in students.left_out],
        "config": {
            **dataclasses.asdict(config),
            "classes": data.classes,
            "mixed_precision_used": devices.resolve_mixed_precision(config.mixed_precision),
            "augment_on_device": devices.augment_on_device(config.augment),
            "num_processes": state.num_processes,
            # What a rerun must match to repeat a seed's figures: the order of float sums follows them.
            "threads_per_process": torch.get_num_threads(),
            "torch": torch.__version__,
            "seconds": round(time.perf_counter() - started, 1),
        },
    }


def _write_report(
    results: dict[str, object],
    config: ExperimentConfig,
    data: ExperimentData,
    teacher: _Teacher,
    figure_models: dict[str, nn.Module],
    output_dir: Path,
) -> None:
    """Writes ``results.json``, ``results.md`` and the experiment's figures (main process only)."""
    runs = results["runs"]
    atomic_write_text(output_dir / "results.json", json.dumps(results, indent=2))
    atomic_write_text(output_dir / "results.md", results_markdown(results, config))
    if arm_runs := [run for run in runs if run["model"] in ARMS]:  # none yet in an early report
        plot_accuracy_vs_size(
            arm_runs, output_dir / "accuracy_vs_size.png", baselines=[run for run in runs if run["model"] in config.baselines],
            labels=(f"{config.alone_model_name} alone", f"{config.student_model} distilled"),
        )
    classes = data.classes
    plot_confusion_matrix(teacher.metrics["confusion_matrix"], classes, output_dir / "confusion_teacher.png", title=f"teacher ({config.teacher_model})")
    figure_set = data.figure_set
    images = torch.stack([figure_set[i][0] for i in range(min(config.num_figure_images, len(figure_set)))])
    # Rows in a fixed order, whichever order this worker trained or collected the runs in.
    labels = {STUDENT: f"{config.alone_model_name} alone", HDKD: f"{config.student_model} distilled"}
    models = {"teacher": teacher.model, **{arm: figure_models[arm] for arm in ARMS if arm in figure_models}}
    maps = {
        (f"teacher {config.teacher_model}" if role == "teacher" else labels[role]): list(
            channel_mean_maps(model, images, figure_tap(config, {STUDENT: "alone", HDKD: "student"}.get(role, role), model)))
        for role, model in models.items()
    }
    raw = [figure_set.with_transform(None)[i][0] for i in range(len(images))]
    plot_activation_grid(raw, maps, output_dir / "activation_maps.png")

