"""The HDKD experiment as one reusable recipe.

Phase 1 trains (or loads) the pure-CNN ``hdkd_teacher`` on the whole training set. Phase 2
trains, for every training-set size and seed, the hybrid student twice: alone
(``hdkd_student_nodistill``, cross-entropy only) and distilled (``hdkd_student`` with the
HDKD objective ``(1-a)*CE + a*T^2*KL + lambda * sum_j j * MSE_j`` over the three shared
convolutional stages). The results, tables and figures land in one output folder.

``examples/hdkd_brain.py`` and ``examples/hdkd_ham10000.py`` are thin command-line fronts to
:func:`main`. Every run is resumable: finished runs are skipped and an interrupted run
continues from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import json
import logging
import math
import os
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, one worker per output folder
    fcntl = None

import numpy as np
import timm
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from torch import nn
from torch.utils.data import DataLoader

from . import augment as kaugment
from . import data as kdata
from . import devices
from .checkpoint import atomic_write_text, load_model
from .distiller import Distiller, LossTerm
from .explain import channel_mean_maps
from .plan import PlannedTraining, check_plan
from .plots import plot_accuracy_vs_size, plot_activation_grid, plot_confusion_matrix, plot_training_curves
from .train import ResumeError, Supervised, TrainConfig, Trainer, checkpoint_epoch, distributed_without_accelerator

__all__ = [
    "DATASETS",
    "HDKD",
    "PRESETS",
    "STUDENT",
    "ExperimentConfig",
    "RunClaims",
    "build_parser",
    "config_from_args",
    "configure_logging",
    "main",
    "metric_values",
    "paired_values",
    "results_markdown",
    "run_experiment",
    "set_cpu_threads",
    "size_label",
]

logger = logging.getLogger(__name__)

DATASETS = ("brain_tumor_mri", "ham10000")
"""The data sets the recipe knows how to load."""
CLAIM_POLL_SECONDS = 30.0
"""How often a worker with nothing left to do looks again at the runs other workers hold."""
EXPERIMENT_FILE = "experiment.json"
"""The file in the output folder that records the settings an experiment's runs were trained with."""
# Fields free to change between the invocations of one experiment: where files are, how it runs,
# which runs it adds (sizes, seeds, baselines) and whether it only reports.
_INVOCATION_FIELDS = frozenset(
    {"output_dir", "data_dir", "sizes", "seeds", "baselines", "baseline_seeds", "resume", "finished_only", "workers",
     "num_figure_images", "checkpoint_every", "augment"}
)
STUDENT, HDKD = "student", "HDKD"
"""Names of the two arms every size and seed trains: the student alone, and distilled."""
FEATURE_TAPS = ["stages.0", "stages.1", "stages.2"]
"""The three convolutional stages that teacher and student share, distilled without adapters."""

PRESETS: dict[str, dict[str, object]] = {
    # Two CPU cores, about 45 minutes end to end: reduced resolution and epochs, bf16 autocast
    # (1.5x the float32 distillation step on an AVX512-BF16 CPU), and a one-cycle AdamW
    # teacher, which reaches a useful accuracy in few epochs where plain Adam does not.
    # channels_last is off: under bf16 at 64 px it made the teacher's step 5.8% slower and
    # helped neither student step (benchmarks/results/step_formats_64px).
    "cpu": dict(
        image_size=64,
        batch_size=32,
        teacher_epochs=8,
        # Brain Tumor MRI's pool (about 5,100 images) keeps its 8 epochs; the SMOTE-balanced
        # HAM10000 pool (about 38,700 images) trains 2 instead of 8, a quarter of the time.
        teacher_image_budget=45_000,
        student_epochs=30,
        sizes=[50, 100, 150],
        seeds=[0],
        mixed_precision="bf16",  # the launcher's bf16/fp16 still wins (kdkit.devices)
        channels_last=False,
        checkpoint_every=2,
        teacher_opt="adamw",
        teacher_lr=3e-3,
        teacher_sched="onecycle",
        teacher_weight_decay=0.05,
        student_lr=1e-3,
        student_min_lr=1e-4,
        student_warmup_epochs=2,
        # The 150-per-class run's 18,000 training images: the whole set (about 5,100 images)
        # then trains 4 epochs instead of 30, which two cores finish in minutes, not hours.
        student_image_budget=18_000,
    ),
    # The paper's setting (224 px, 200 epochs, global batch 32), for GPUs: bf16 where the GPU
    # has it (the launcher's choice wins), a resumable checkpoint every 10 epochs, not 200.
    "paper": dict(
        image_size=224,
        batch_size=32,
        teacher_epochs=200,
        teacher_image_budget=None,
        student_epochs=200,
        sizes=[50, 100, 150, None],
        seeds=[0, 1, 2],
        mixed_precision="auto",
        channels_last=False,
        checkpoint_every=10,
        teacher_opt="adam",
        teacher_lr=1e-3,
        teacher_sched="none",
        teacher_weight_decay=0.0,
        student_lr=5e-5,
        student_min_lr=2e-5,
        student_warmup_epochs=5,
        student_image_budget=None,
    ),
}
"""Named settings of :class:`ExperimentConfig`; ``cpu`` is the default without a GPU."""


@dataclass
class ExperimentConfig:
    """Everything one HDKD experiment depends on.

    Attributes:
        dataset: ``"brain_tumor_mri"`` or ``"ham10000"``.
        output_dir: Where runs, checkpoints, ``results.json``, ``results.md`` and plots go.
        data_dir: Data root (see :func:`kdkit.data.resolve_data_root`).
        image_size: Training and test resolution.
        batch_size: The global batch size, split evenly across the processes of ``accelerate
            launch`` (as the paper's 32 on one GPU); it must divide by their number.
        teacher_epochs: Epochs of phase 1.
        teacher_image_budget: Training images (epochs x set size, after SMOTE) after which the
            teacher may stop: it trains the fewest epochs that reach the budget, at least one and
            at most ``teacher_epochs``. ``None``: always ``teacher_epochs``.
        student_epochs: Epochs of each phase-2 run.
        sizes: Training images per class; ``None`` means the whole training pool.
        seeds: Seeds of the per-class subsets and of the student runs.
        mixed_precision: ``"auto"`` (bf16 on a GPU that has it, else fp16; none on the CPU),
            ``"no"``, ``"bf16"`` or ``"fp16"``; the launcher's ``--mixed_precision bf16``/``fp16``
            wins (:func:`kdkit.devices.resolve_mixed_precision`).
        channels_last: Train in channels-last memory format.
        checkpoint_every: Save each run's resumable checkpoint every this many epochs (and
            after its last).
        augment: Where the paper's training augmentation runs: ``"device"`` (batched on the
            training device, each image its own random draw), ``"loader"`` (per image in the
            loader) or ``"auto"`` (the device on a GPU, the loader on the CPU).
        teacher_opt: timm optimizer name of phase 1.
        teacher_lr: Peak learning rate of phase 1.
        teacher_sched: timm scheduler name of phase 1, ``"onecycle"`` or ``"none"``.
        teacher_weight_decay: Weight decay of phase 1.
        student_lr: Peak learning rate of the students (AdamW, cosine, as the paper).
        student_min_lr: Final learning rate of the cosine schedule.
        student_warmup_epochs: Linear warm-up epochs of the students.
        student_weight_decay: Weight decay of the students.
        student_image_budget: The same budget for each student run: the fewest epochs that
            reach it, at most ``student_epochs``. ``None`` trains every size for ``student_epochs``.
        alpha: Weight ``a`` of the logit KL against cross-entropy.
        temperature: KL temperature ``T``.
        feature_weight: ``lambda``, the weight of the stage-weighted feature MSE.
        stage_alpha: Stage ``j`` of the feature MSE weighs ``j ** stage_alpha``.
        kl_reduction: ``"batchmean"``, or ``"mean"`` to also divide by the number of
            classes as the HDKD authors' code does.
        baselines: timm model names trained from scratch beside the students (the paper's
            Table 5), on the same subsets with the non-distilled student's epochs, optimizer
            and schedule.
        baseline_seeds: The seeds at which the baselines train (a subset of ``seeds``);
            ``None``: every seed.
        teacher_per_class: Train the teacher on at most this many images per class (for quick
            trials); ``None`` uses the whole training pool.
        smote: Balance the teacher's training set with SMOTE (default: HAM10000 only).
        val_fraction: Share of the training set held out for model selection.
        teacher_checkpoint: Reuse a trained teacher (safetensors from a previous run).
        resume: Continue interrupted runs and skip finished ones.
        finished_only: Report only the runs that have finished and leave the others out,
            training nothing (a report of a benchmark still running or cut short). Needs
            ``resume`` and a finished teacher.
        workers: DataLoader worker processes; ``None``: none on the CPU, several on a GPU
            (:func:`kdkit.devices.default_workers`).
        num_figure_images: Test images shown in the activation-map figure.
    """

    dataset: str = "brain_tumor_mri"
    output_dir: str = "runs/hdkd_brain"
    data_dir: str | None = None
    image_size: int = 64
    batch_size: int = 32
    teacher_epochs: int = 8
    teacher_image_budget: int | None = None
    student_epochs: int = 30
    sizes: list[int | None] = field(default_factory=lambda: [50, 100, 150])
    seeds: list[int] = field(default_factory=lambda: [0])
    mixed_precision: str = "bf16"
    channels_last: bool = True
    checkpoint_every: int = 1
    augment: str = "auto"
    teacher_opt: str = "adamw"
    teacher_lr: float = 3e-3
    teacher_sched: str = "onecycle"
    teacher_weight_decay: float = 0.05
    student_lr: float = 1e-3
    student_min_lr: float = 1e-4
    student_warmup_epochs: int = 2
    student_weight_decay: float = 0.1
    student_image_budget: int | None = None
    alpha: float = 0.5
    temperature: float = 1.0
    feature_weight: float = 10.0
    stage_alpha: float = 1.0
    kl_reduction: str = "batchmean"
    baselines: list[str] = field(default_factory=list)
    baseline_seeds: list[int] | None = None
    teacher_per_class: int | None = None
    smote: bool | None = None
    val_fraction: float = 0.1
    teacher_checkpoint: str | None = None
    resume: bool = False
    finished_only: bool = False
    workers: int | None = None
    num_figure_images: int = 4

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.smote is None:
            self.smote = self.dataset == "ham10000"
        if self.mixed_precision not in devices.MIXED_PRECISION_CHOICES:
            raise ValueError(f"mixed_precision must be one of {devices.MIXED_PRECISION_CHOICES}, got {self.mixed_precision!r}")
        if self.augment not in devices.AUGMENT_PLACES:
            raise ValueError(f"augment must be one of {devices.AUGMENT_PLACES}, got {self.augment!r}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be at least 1, got {self.checkpoint_every}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")
        if not self.sizes or not self.seeds:
            raise ValueError("at least one size and one seed are needed")
        for name in ("sizes", "seeds", "baselines", "baseline_seeds"):
            values = getattr(self, name) or []
            if repeated := sorted({str(value) for value in values if values.count(value) > 1}):
                raise ValueError(f"{name} lists {', '.join(repeated)} more than once")
        if self.finished_only and not self.resume:
            raise ValueError("finished_only reports the runs already in output_dir: it needs resume=True")
        if unknown := [name for name in self.baselines if not timm.is_model(name)]:
            raise ValueError(f"unknown timm baseline model(s) {unknown}; see timm.list_models()")
        if self.baseline_seeds is not None:
            if not self.baselines or not self.baseline_seeds:
                raise ValueError("baseline_seeds needs baselines and at least one seed")
            if stray := sorted(set(self.baseline_seeds) - set(self.seeds)):
                raise ValueError(f"baseline_seeds {stray} are not among the seeds {self.seeds}")
        for name in ("teacher_image_budget", "student_image_budget"):
            if (budget := getattr(self, name)) is not None and budget < 1:
                raise ValueError(f"{name} must be positive or None, got {budget}")

    def teacher_epochs_for(self, num_images: int) -> int:
        """Epochs of the teacher on ``num_images`` images under :attr:`teacher_image_budget`."""
        return _epochs_reaching(self.teacher_image_budget, self.teacher_epochs, num_images)

    def student_epochs_for(self, num_images: int) -> int:
        """Epochs of a student run on ``num_images`` images under :attr:`student_image_budget`."""
        return _epochs_reaching(self.student_image_budget, self.student_epochs, num_images)


def _epochs_reaching(budget: int | None, epochs: int, num_images: int) -> int:
    """``epochs``, or fewer: the fewest whole passes over ``num_images`` that reach ``budget`` images.

    The last pass may overshoot the budget (5,137 images and a budget of 18,000: 4 epochs,
    20,548 images), so that no run sees fewer images than the budget.
    """
    if budget is None:
        return epochs
    return max(1, min(epochs, math.ceil(budget / num_images)))


# --------------------------------------------------------------------------- helpers


def size_label(size: int | None) -> int | str:
    """The label of a training-set size in records: images per class, or ``"all"`` for ``None``."""
    return "all" if size is None else size


def _load_splits(config: ExperimentConfig) -> dict[str, kdata.ImageTensorDataset]:
    if config.dataset == "brain_tumor_mri":
        return kdata.load_brain_tumor_mri(config.data_dir, config.image_size)
    return kdata.load_ham10000(config.data_dir, config.image_size)


def _loader(dataset: kdata.ImageTensorDataset, config: ExperimentConfig, *, train: bool) -> DataLoader:
    workers = devices.default_workers() if config.workers is None else config.workers
    return kdata.make_loader(dataset, config.batch_size, train=train, workers=workers)


@dataclass
class _Pipeline:
    """The datasets' per-image transforms and the Trainer's batched device transforms."""

    train_tf: Callable[[torch.Tensor], torch.Tensor] | None
    eval_tf: Callable[[torch.Tensor], torch.Tensor] | None
    device_train_tf: nn.Module | None = None
    device_eval_tf: nn.Module | None = None

    def trainer_kwargs(self) -> dict[str, object]:
        return {"train_transform": self.device_train_tf, "eval_transform": self.device_eval_tf}


def _pipeline(config: ExperimentConfig) -> _Pipeline:
    """The paper's augmentation, per image in the loader (CPU) or batched on the device (GPU)."""
    if devices.augment_on_device(config.augment):
        # uint8 batches (a quarter of float32's bytes) cross to the device, where every image
        # gets its own random draw of the same augmentations.
        return _Pipeline(None, None, kaugment.batch_train_transforms(config.image_size), kaugment.batch_eval_transforms(config.image_size))
    return _Pipeline(kdata.train_transforms(config.image_size), kdata.eval_transforms(config.image_size))


def _with_transform(dataset: kdata.ImageTensorDataset, transform: Callable[[torch.Tensor], torch.Tensor] | None) -> kdata.ImageTensorDataset:
    return dataset.with_transform(transform) if transform is not None else dataset.as_uint8()


def _train_config(config: ExperimentConfig, output_dir: Path, *, teacher: bool, seed: int, num_images: int) -> TrainConfig:
    shared = dict(
        mixed_precision=devices.resolve_mixed_precision(config.mixed_precision),
        channels_last=config.channels_last,
        checkpoint_every=config.checkpoint_every,
        seed=seed,
        output_dir=str(output_dir),
        select_metric="balanced_accuracy" if config.dataset == "ham10000" else "accuracy",
    )
    if teacher:
        return TrainConfig(
            epochs=config.teacher_epochs_for(num_images),
            opt=config.teacher_opt,
            lr=config.teacher_lr,
            sched=config.teacher_sched,
            weight_decay=config.teacher_weight_decay,
            **shared,
        )
    epochs = config.student_epochs_for(num_images)
    # A shortened run keeps the warm-up's share of the schedule (at least one epoch), and at
    # least one epoch of decay: a one-epoch run has no warm-up.
    warmup = config.student_warmup_epochs
    if epochs < config.student_epochs and warmup:
        warmup = min(max(1, round(warmup * epochs / config.student_epochs)), epochs - 1)
    return TrainConfig(
        epochs=epochs,
        opt="adamw",
        lr=config.student_lr,
        sched="cosine",
        min_lr=config.student_min_lr,
        warmup_epochs=warmup,
        weight_decay=config.student_weight_decay,
        **shared,
    )


def hdkd_losses(config: ExperimentConfig) -> list[LossTerm]:
    """The HDKD objective ``(1-a)*CE + a*T^2*KL + lambda * sum_j j^alpha * MSE_j``."""
    return [
        LossTerm("ce", 1 - config.alpha),
        LossTerm("kl", config.alpha, temperature=config.temperature, reduction=config.kl_reduction),
        LossTerm("stage_mse", config.feature_weight, alpha=config.stage_alpha),
    ]


def _fit_and_test(
    task: nn.Module,
    train_config: TrainConfig,
    splits: dict[str, kdata.ImageTensorDataset],
    train_set: kdata.ImageTensorDataset,
    config: ExperimentConfig,
    pipeline: _Pipeline,
) -> dict[str, object]:
    """Trains ``task``, reloads its best student and evaluates it on the test set."""
    trainer = Trainer(task, train_config, class_names=train_set.classes, **pipeline.trainer_kwargs())
    result = trainer.fit(
        _loader(train_set, config, train=True),
        _loader(splits["val"], config, train=False),
        resume=config.resume,
    )
    return {"fit": result, "test": trainer.test(_loader(splits["test"], config, train=False))}


def _finished(train_config: TrainConfig) -> bool:
    return (checkpoint_epoch(Path(train_config.output_dir) / "checkpoints") or 0) >= train_config.epochs


def _summary(metrics: dict[str, object]) -> dict[str, float]:
    return {key: float(metrics[key]) for key in ("accuracy", "balanced_accuracy", "macro_f1")}  # type: ignore[arg-type]


def _runs_of(
    runs: Sequence[dict[str, object]], model: str, size: int | str, seeds: Sequence[int] | None = None
) -> list[dict[str, object]]:
    """The runs of ``model`` at ``size`` (and at ``seeds``, if given)."""
    return [r for r in runs if r["model"] == model and r["size"] == size and (seeds is None or r["seed"] in seeds)]


def metric_values(
    runs: Sequence[dict[str, object]], model: str, size: int | str, metric: str, seeds: Sequence[int] | None = None
) -> list[float]:
    """``metric`` in percent of every run of ``model`` at ``size`` (and at ``seeds``, if given).

    Args:
        runs: The ``runs`` of a ``results.json``.
        model: An arm (:data:`STUDENT`, :data:`HDKD`) or a baseline's timm name.
        size: Images per class, or ``"all"``.
        metric: ``"accuracy"``, ``"balanced_accuracy"`` or ``"macro_f1"``.
        seeds: Keep only the runs of these seeds.
    """
    return [100 * float(r[metric]) for r in _runs_of(runs, model, size, seeds)]  # type: ignore[arg-type]


def paired_values(runs: Sequence[dict[str, object]], size: int | str, metric: str) -> tuple[list[int], list[float], list[float]]:
    """The seeds at ``size`` where both arms finished, with ``metric`` (percent) of each arm there.

    A seed gives the student alone and HDKD the same images, so the gain of distillation is the
    mean of the per-seed differences, over these seeds only.

    Returns:
        The seeds in increasing order, the student's values and HDKD's values in that order.
    """
    finished = [{run["seed"] for run in _runs_of(runs, arm, size)} for arm in (STUDENT, HDKD)]
    seeds = sorted(finished[0] & finished[1])
    student, hdkd = ([metric_values(runs, arm, size, metric, [seed])[0] for seed in seeds] for arm in (STUDENT, HDKD))
    return seeds, student, hdkd


def _summary_cell(values: Sequence[float], expected_runs: int) -> str:
    """``mean ± std`` over seeds, a lone run without a spread, and the count when runs are missing."""
    if not values:
        return "-"
    cell = f"{values[0]:.2f}" if len(values) == 1 else f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"
    if len(values) != expected_runs:
        cell += f" ({len(values)} seed{'s' if len(values) > 1 else ''})"
    return cell


def results_markdown(results: dict[str, object], config: ExperimentConfig) -> str:
    """The ``results.md`` tables: student vs HDKD per size and metric, then any baselines."""
    runs = results["runs"]  # type: ignore[index]
    teacher = results["teacher"]  # type: ignore[index]
    lines = [
        f"# HDKD on {config.dataset}: student alone vs distilled (test set)",
        "",
        f"Teacher (`hdkd_teacher`): accuracy {100 * teacher['accuracy']:.2f}%, "
        f"balanced accuracy {100 * teacher['balanced_accuracy']:.2f}%, macro F1 {100 * teacher['macro_f1']:.2f}%.",
        "",
        f"{config.image_size} px, {config.student_epochs} student epochs"
        + (f" or the fewest that reach {config.student_image_budget:,} training images" if config.student_image_budget else "")
        + f", seeds {config.seeds}; mean ± standard deviation over seeds; the gain over the seeds both arms finished.",
        "",
        "| images per class | metric | student | HDKD | gain |",
        "|---|---|---|---|---|",
    ]
    metrics = ("accuracy", "balanced_accuracy", "macro_f1")
    for size in map(size_label, config.sizes):
        for metric in metrics:
            student, hdkd = (metric_values(runs, arm, size, metric) for arm in (STUDENT, HDKD))
            if not student and not hdkd:
                continue  # no finished run at this size (finished_only)
            seeds, paired_student, paired_hdkd = paired_values(runs, size, metric)
            gain = f"{statistics.fmean(paired_hdkd) - statistics.fmean(paired_student):+.2f}" if seeds else "-"
            if seeds and len(seeds) < max(len(student), len(hdkd)):
                gain += f" (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})"
            cells = [_summary_cell(values, len(config.seeds)) for values in (student, hdkd)]
            lines.append(f"| {size} | {metric} | {cells[0]} | {cells[1]} | {gain} |")
    if unfinished := results.get("unfinished"):
        lines += ["", f"Not finished, left out ({len(unfinished)} runs): " + ", ".join(f"`{name}`" for name in unfinished) + "."]
    if config.baselines:
        arms = [*config.baselines, STUDENT, HDKD]
        seeds = config.seeds if config.baseline_seeds is None else config.baseline_seeds
        lines += [
            "",
            f"Baselines from scratch (timm) at seeds {seeds}, beside the student and HDKD runs of the same seeds (so on "
            "the same images), with the student's epochs, optimizer and schedule; training time is the mean per run.",
            "",
            "| images per class | metric | " + " | ".join(f"`{arm}`" if arm in config.baselines else arm for arm in arms) + " |",
            "|---|---|" + "---|" * len(arms),
        ]
        for size in map(size_label, config.sizes):
            for metric in metrics:
                cells = [_summary_cell(metric_values(runs, arm, size, metric, seeds), len(seeds)) for arm in arms]
                lines.append(f"| {size} | {metric} | " + " | ".join(cells) + " |")
            seconds = [
                [float(r["train_seconds"]) for r in _runs_of(runs, arm, size, seeds)] for arm in arms
            ]
            lines.append(
                f"| {size} | training time (s) | " + " | ".join(f"{statistics.fmean(v):.0f}" if v else "-" for v in seconds) + " |"
            )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the experiment


def _main_decides(decide: Callable[[], object]) -> object:
    """``decide()`` on the main process, its result (or its error) broadcast to every process.

    Decisions about files other workers may change at any moment (a lock, a finished checkpoint)
    must be the same on every process of one ``accelerate launch``, or their collectives hang.
    """
    state = PartialState()
    outcome: list[object] = [None]
    if state.is_main_process:
        try:
            outcome[0] = decide()
        except Exception as error:  # raised on every process below, not on the main one alone
            outcome[0] = error
    if state.num_processes > 1:
        broadcast_object_list(outcome)
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


class RunClaims:
    """Locks that let several processes (workers) share one experiment's output folder.

    Every worker first joins the folder (:meth:`join`), then claims each run before it trains or
    collects it (:meth:`acquire`). Both are POSIX record locks (``fcntl.lockf``) on files in
    ``<output_dir>/.claims/``: the kernel drops them when the holder exits, so a killed worker
    leaves no stale claim, and the processes a worker forks (DataLoader workers) do not inherit
    them. One process holds each lock once: two objects of one process do not exclude each other.
    Under ``accelerate launch`` with several processes the main process locks for all of them.
    Where the file system has no locks, or on Windows, every claim succeeds after a warning: run
    one worker per folder there.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._held: dict[str, int] = {}

    def join(self, *, resume: bool) -> None:
        """Joins the folder: beside other workers with ``resume``, alone without it.

        Raises:
            RuntimeError: a worker with ``resume`` meets one without it, or the other way round
                (a worker without ``resume`` retrains every run, the others' too).
        """
        if _main_decides(lambda: self._lock("experiment", shared=resume)):
            return
        if not resume and _main_decides(self._others_resume):
            raise RuntimeError(
                f"other workers are training in {self.folder.parent}: start this one with resume (--resume) "
                "to share the runs with them, or give it another output folder"
            )
        raise RuntimeError(
            f"a worker without resume is training in {self.folder.parent}: it retrains every run, so no other "
            "worker can share the folder with it; wait for it to end, or give this one another output folder"
        )

    def _others_resume(self) -> bool:
        """Whether the workers in the folder joined with resume (they share it), not without."""
        if shared := self._lock("experiment", shared=True):
            self.release("experiment")
        return shared

    def acquire(self, name: str) -> bool:
        """Claims run ``name`` unless another worker holds it; ``True`` when this worker now holds it."""
        return bool(_main_decides(lambda: self._lock(name)))

    def release(self, name: str) -> None:
        """Gives up a claim taken with :meth:`acquire` (nothing when not held)."""
        if (fd := self._held.pop(name, None)) is not None:
            os.close(fd)  # closing the descriptor drops the lock

    def holder(self, name: str) -> str:
        """Who last claimed ``name`` (for messages); only for claims this process does not hold,
        since closing any descriptor of a locked file drops this process's lock on it."""
        path = self.folder / f"{name}.lock"
        return path.read_text().strip() if path.exists() else "?"

    def _lock(self, name: str, *, shared: bool = False) -> bool:
        if fcntl is None:
            _warn_no_locks("this platform has no fcntl")
            return True
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            if not shared:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EACCES, errno.EAGAIN):
                return False
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                _warn_no_locks(f"{self.folder} does not support file locks ({error.strerror})")
                return True
            raise
        self._held[name] = fd
        return True


@functools.cache
def _warn_no_locks(reason: str) -> None:
    logger.warning("%s: run claims are off, so run one worker per output folder", reason)


@dataclass
class _PlannedRun:
    name: str
    arm: str
    size: int | None
    seed: int
    subset: kdata.ImageTensorDataset


def _wait_for_other_workers() -> None:
    time.sleep(CLAIM_POLL_SECONDS)


def run_experiment(config: ExperimentConfig) -> dict[str, object]:
    """Runs both phases and writes ``results.json``, ``results.md`` and the figures.

    Several workers may run the same experiment on one output folder at once (each started with
    ``resume``; on a CPU, two one-thread workers train faster than one two-thread process). They
    share out the runs through :class:`RunClaims`: a worker trains the runs nobody holds, does the
    runs that need no teacher while another worker trains it, then waits for the runs others hold
    and collects them, so every worker writes the same complete report. The settings that define
    the results are recorded in ``experiment.json``; a ``resume`` with other values is refused.

    Returns:
        The content of ``results.json``: ``{"teacher": {...}, "runs": [...], "unfinished": [...], "config": {...}}``;
        ``unfinished`` names the runs a ``finished_only`` report left out.

    Raises:
        ResumeError: ``resume`` with settings other than those the folder's runs were trained with.
        RuntimeError: workers with and without ``resume`` on one folder.
    """
    # Like the Trainer's Accelerator: under torchrun on a CPU-only machine, ask for CPU DDP.
    state = PartialState(cpu=distributed_without_accelerator())
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    claims = RunClaims(output_dir / ".claims")
    claims.join(resume=config.resume)
    try:
        _main_decides(lambda: _check_same_settings(config, output_dir))
        return _run_joined(config, claims, output_dir, state)
    finally:
        claims.release("experiment")  # a notebook or driver that carries on must not keep others out


def _settings(config: ExperimentConfig) -> dict[str, object]:
    """The settings that define an experiment's results, as they read back from JSON."""
    defining = {name: value for name, value in dataclasses.asdict(config).items() if name not in _INVOCATION_FIELDS}
    # Where augmentation runs changes the random draws; `augment="auto"` means another place on
    # another machine, so the place itself is recorded.
    defining["augment_on_device"] = devices.augment_on_device(config.augment)
    return json.loads(json.dumps(defining))


# What the experiments recorded before a setting existed did: compared as these values.
_BEFORE_RECORDED = {"augment_on_device": False}


def _check_same_settings(config: ExperimentConfig, output_dir: Path) -> None:
    """Records the experiment's settings in ``experiment.json``; a resume must match them.

    Each run's checkpoint refuses another training setup, but the loss weights, the teacher,
    the image size of a convolutional network and the data split lie outside it: resumed with
    other values, finished runs would be reported under settings they were not trained with.

    Raises:
        ResumeError: ``resume`` with settings other than the recorded ones, all of them listed.
    """
    path = output_dir / EXPERIMENT_FILE
    settings = _settings(config)
    if config.resume and path.is_file():
        recorded = {**_BEFORE_RECORDED, **json.loads(path.read_text(encoding="utf-8"))}
        # Only the recorded fields: a field added to kdkit since keeps its old behaviour by default.
        if changed := sorted(name for name in recorded.keys() & settings.keys() if recorded[name] != settings[name]):
            raise ResumeError(
                f"cannot resume the experiment in {output_dir} with other settings than {path} records: "
                + "; ".join(f"{name} {recorded[name]!r} there, {settings[name]!r} now" for name in changed)
                + ". Pass the recorded values, or give this experiment another output folder (--output-dir)"
            )
        return
    atomic_write_text(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")


def _check_baselines_take(baselines: Sequence[str], image_size: int) -> None:
    """Fails before anything trains if a baseline cannot take ``image_size`` images (a ViT built for 224 px).

    The check runs a forward pass on the ``meta`` device: shapes only, no memory or compute.
    """
    for name in baselines:
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=2).eval()  # batch norm over one image trains on nothing
        try:
            model(torch.empty(1, 3, image_size, image_size, device="meta"))
        except Exception as error:  # whatever the model raises on the wrong size
            raise ValueError(
                f"baseline {name!r} cannot take {image_size} x {image_size} images ({type(error).__name__}: {error}); "
                "choose a model without a fixed input size, or another --image-size"
            ) from error


def _teacher_set_size(pool: kdata.ImageTensorDataset, config: ExperimentConfig) -> int:
    """The teacher's training images per epoch, known before SMOTE makes them (every class at the largest's size)."""
    labels = pool.labels.numpy()
    if config.teacher_per_class is not None:
        labels = labels[kdata.balanced_subset_indices(labels, config.teacher_per_class, 0)]
    counts = np.bincount(labels)
    return int(counts.max()) * int((counts > 0).sum()) if config.smote else len(labels)


def _run_joined(config: ExperimentConfig, claims: RunClaims, output_dir: Path, state: PartialState) -> dict[str, object]:
    """The body of :func:`run_experiment`, once this worker has joined the folder."""
    started = time.perf_counter()
    _check_baselines_take(config.baselines, config.image_size)
    splits = _load_splits(config)
    pool_full = splits["train"]
    classes = pool_full.classes
    pool_idx, val_idx = kdata.stratified_split_indices(pool_full.labels.numpy(), config.val_fraction, seed=0)
    pipeline = _pipeline(config)
    pool = _with_transform(pool_full.subset(pool_idx), pipeline.train_tf)
    # The figure's images are normalised on the CPU whichever pipeline trains.
    figure_set = splits["test"].with_transform(kdata.eval_transforms(config.image_size))
    splits = {
        "val": _with_transform(pool_full.subset(val_idx), pipeline.eval_tf),
        "test": _with_transform(splits["test"], pipeline.eval_tf),
    }

    # The plan: phase 2's students, alone and distilled, and any baselines, for each size and seed.
    planned: list[_PlannedRun] = []
    for size in config.sizes:
        for seed in config.seeds:
            subset = pool.subset(kdata.balanced_subset_indices(pool.labels.numpy(), size, seed))
            baselines = config.baselines if config.baseline_seeds is None or seed in config.baseline_seeds else []
            for arm in (STUDENT, HDKD, *baselines):
                planned.append(_PlannedRun(f"{arm.lower()}_{size_label(size)}_seed{seed}", arm, size, seed, subset))
    # Every run gets a step on every process, or nothing starts (not the twentieth run, hours in).
    check_plan(
        ([] if config.teacher_checkpoint else [PlannedTraining("teacher", _teacher_set_size(pool, config))])
        + [PlannedTraining(run.name, len(run.subset)) for run in planned],
        batch_size=config.batch_size,
        num_processes=state.num_processes,
    )

    # Phase 1: the teacher, trained (or collected) as soon as no other worker holds it.
    teacher = timm.create_model("hdkd_teacher", num_classes=len(classes))
    teacher_metrics: dict[str, object] | None = None
    if config.teacher_checkpoint:
        load_model(teacher, config.teacher_checkpoint, expected_classes=classes)
        # Only evaluates: the epochs (and so num_images) do not matter.
        evaluation = _train_config(config, output_dir / "teacher", teacher=True, seed=0, num_images=len(pool))
        teacher_metrics = Trainer(Supervised(teacher), evaluation, class_names=classes, **pipeline.trainer_kwargs()).evaluate(
            _loader(splits["test"], config, train=False)
        )
        teacher.eval()
        logger.info("teacher test accuracy %.4f", teacher_metrics["accuracy"])
    else:
        teacher_set = pool
        if config.teacher_per_class is not None:
            teacher_set = pool.subset(kdata.balanced_subset_indices(pool.labels.numpy(), config.teacher_per_class, 0))
        if config.smote:
            images, labels = kdata.smote_balance(teacher_set.images, teacher_set.labels, seed=0)
            teacher_set = _with_transform(kdata.ImageTensorDataset(images, labels, classes), pipeline.train_tf)
        teacher_config = _train_config(config, output_dir / "teacher", teacher=True, seed=0, num_images=len(teacher_set))
        if config.finished_only and not _main_decides(lambda: _finished(teacher_config)):
            raise ValueError(f"finished_only: the teacher in {teacher_config.output_dir} has not finished training")

    def teacher_ready() -> bool:
        """``True`` once the teacher is trained and loaded; trains or collects it if no other worker holds it."""
        nonlocal teacher_metrics
        if teacher_metrics is not None:
            return True
        if not claims.acquire("teacher"):
            return False
        try:
            outcome = _fit_and_test(Supervised(teacher), teacher_config, splits, teacher_set, config, pipeline)
        finally:
            claims.release("teacher")
        teacher_metrics = outcome["test"]
        teacher.eval()
        logger.info("teacher test accuracy %.4f", teacher_metrics["accuracy"])
        if state.is_main_process:
            plot_training_curves(outcome["fit"].history, output_dir / "teacher_curves.png")
        return True

    records: dict[str, dict[str, object]] = {}
    left_out: set[str] = set()
    figure_models: dict[str, nn.Module] = {}
    pending = list(planned)
    awaited: list[str] = []
    teacher_ready()
    # Each pass takes every run no other worker holds; the HDKD runs wait for the teacher.
    while pending:
        held: list[str] = []
        progressed = False
        for run in list(pending):
            if run.arm == HDKD and not teacher_ready():
                held += [] if "teacher" in held else ["teacher"]
                continue
            train_config = _train_config(config, output_dir / run.name, teacher=False, seed=run.seed, num_images=len(run.subset))
            if config.finished_only and not _main_decides(lambda: _finished(train_config)):
                logger.info("%s has not finished: left out of the report", run.name)
                left_out.add(run.name)
            elif not claims.acquire(run.name):
                held.append(run.name)
                continue
            else:
                try:
                    records[run.name] = _train_planned_run(run, train_config, teacher, splits, config, figure_models, pipeline)
                finally:
                    claims.release(run.name)
            pending.remove(run)
            progressed = True
        if pending and not progressed:
            if held != awaited:  # one line per change, not one per poll
                logger.info("waiting for what other workers hold: %s", ", ".join(f"{n} ({claims.holder(n)})" for n in held))
                awaited = held
            _wait_for_other_workers()
    runs = [records[run.name] for run in planned if run.name in records]

    results = {
        "teacher": _summary(teacher_metrics),
        "runs": runs,
        "unfinished": [run.name for run in planned if run.name in left_out],
        "config": {
            **dataclasses.asdict(config),
            "classes": classes,
            "mixed_precision_used": devices.resolve_mixed_precision(config.mixed_precision),
            "augment_on_device": devices.augment_on_device(config.augment),
            "num_processes": state.num_processes,
            "seconds": round(time.perf_counter() - started, 1),
        },
    }
    if state.is_main_process:
        atomic_write_text(output_dir / "results.json", json.dumps(results, indent=2))
        atomic_write_text(output_dir / "results.md", results_markdown(results, config))
        if arm_runs := [run for run in runs if run["model"] in (STUDENT, HDKD)]:  # none yet in an early report
            plot_accuracy_vs_size(
                arm_runs, output_dir / "accuracy_vs_size.png", baselines=[run for run in runs if run["model"] in config.baselines]
            )
        plot_confusion_matrix(teacher_metrics["confusion_matrix"], classes, output_dir / "confusion_teacher.png", title="teacher")
        images = torch.stack([figure_set[i][0] for i in range(min(config.num_figure_images, len(figure_set)))])
        # Rows in a fixed order, whichever order this worker trained or collected the runs in.
        models = {"teacher": teacher, **{arm: figure_models[arm] for arm in (STUDENT, HDKD) if arm in figure_models}}
        maps = {label: list(channel_mean_maps(model, images, "stages.2")) for label, model in models.items()}
        raw = [figure_set.with_transform(None)[i][0] for i in range(len(images))]
        plot_activation_grid(raw, maps, output_dir / "activation_maps.png")
    return results


def _train_planned_run(
    run: _PlannedRun,
    train_config: TrainConfig,
    teacher: nn.Module,
    splits: dict[str, kdata.ImageTensorDataset],
    config: ExperimentConfig,
    figure_models: dict[str, nn.Module],
    pipeline: _Pipeline,
) -> dict[str, object]:
    """Trains (or collects) one phase-2 run and returns its record for ``results.json``.

    The first size and seed's student and HDKD runs also draw their confusion matrix and
    curves, and join ``figure_models`` for the activation-map figure.
    """
    classes = run.subset.classes
    torch.manual_seed(run.seed)
    if run.arm == HDKD:
        model = timm.create_model("hdkd_student", num_classes=len(classes), img_size=config.image_size)
        task: nn.Module = Distiller(teacher, model, losses=hdkd_losses(config), taps=FEATURE_TAPS, input_size=config.image_size)
    elif run.arm == STUDENT:
        model = timm.create_model("hdkd_student_nodistill", num_classes=len(classes), img_size=config.image_size)
        task = Supervised(model)
    else:
        task = Supervised(model := timm.create_model(run.arm, num_classes=len(classes)))
    outcome = _fit_and_test(task, train_config, splits, run.subset, config, pipeline)
    model.eval()
    if run.size == config.sizes[0] and run.seed == config.seeds[0] and run.arm in (STUDENT, HDKD):
        figure_models[run.arm] = model
        if PartialState().is_main_process:
            output_dir = Path(config.output_dir)
            plot_confusion_matrix(outcome["test"]["confusion_matrix"], classes, output_dir / f"confusion_{run.name}.png", title=run.name)
            plot_training_curves(outcome["fit"].history, output_dir / f"curves_{run.name}.png")
    logger.info("%s: test accuracy %.4f", run.name, outcome["test"]["accuracy"])
    return {
        "model": run.arm,
        "size": size_label(run.size),
        "seed": run.seed,
        "distill": run.arm == HDKD,
        "num_train": len(run.subset),
        "epochs": train_config.epochs,
        "train_seconds": round(sum(row.get("train_time", 0.0) for row in outcome["fit"].history), 1),
        **_summary(outcome["test"]),
    }


# --------------------------------------------------------------------------- command line


def _parse_sizes(text: str) -> list[int | None]:
    return [None if item.strip() == "all" else int(item) for item in text.split(",") if item.strip()]


def _parse_budget(text: str) -> int | None:
    return None if text.strip().lower() == "none" else int(text)


def _parse_ints(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def build_parser(dataset: str) -> argparse.ArgumentParser:
    """The command line shared by ``examples/hdkd_brain.py`` and ``examples/hdkd_ham10000.py``."""
    parser = argparse.ArgumentParser(
        description=f"HDKD on {dataset}: train the teacher, then the student with and without distillation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data-dir", help="data root holding the data set folder (default: $KDKIT_DATA_ROOT or ../shared/data)")
    parser.add_argument("--output-dir", default=f"runs/hdkd_{'brain' if dataset == 'brain_tumor_mri' else dataset}")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="cpu: reduced resolution and epochs (default without a GPU); paper: 224 px, 200 epochs",
    )
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--teacher-epochs", type=int)
    parser.add_argument(
        "--teacher-image-budget",
        type=_parse_budget,
        default=argparse.SUPPRESS,
        help="the teacher trains the fewest epochs whose images reach N (at most --teacher-epochs); 'none': no budget",
    )
    parser.add_argument("--student-epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--sizes", type=_parse_sizes, help="images per class, e.g. 50,100,150,all")
    parser.add_argument("--seeds", type=_parse_ints, help="e.g. 0,1,2")
    parser.add_argument(
        "--student-image-budget",
        type=_parse_budget,
        default=argparse.SUPPRESS,  # absent unless given: 'none' must override the preset
        help="each student run trains the fewest epochs whose images reach N (at most --student-epochs); 'none': no budget",
    )
    parser.add_argument(
        "--mixed-precision", choices=list(devices.MIXED_PRECISION_CHOICES),
        help="auto: bf16 on a GPU that has it; accelerate launch --mixed_precision bf16/fp16 wins over the preset",
    )
    parser.add_argument("--checkpoint-every", type=int, help="epochs between the resumable checkpoints of each run")
    parser.add_argument(
        "--augment", choices=list(devices.AUGMENT_PLACES),
        help="where the training augmentation runs: batched on the device, per image in the loader, or auto (device on a GPU)",
    )
    parser.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=None, help="train in channels-last memory format"
    )
    parser.add_argument("--teacher-checkpoint", help="reuse a trained teacher (best_model.safetensors)")
    parser.add_argument(
        "--baselines",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=[],
        help="timm models trained from scratch beside the students, e.g. mobilenetv2_100,efficientnet_b0,mobilevit_s",
    )
    parser.add_argument(
        "--baseline-seeds", type=_parse_ints, help="train the baselines at these seeds only (default: every seed)"
    )
    parser.add_argument("--teacher-per-class", type=int, help="train the teacher on at most N images per class")
    parser.add_argument("--kl-reduction", choices=["batchmean", "mean"], default="batchmean")
    parser.add_argument("--smote", action=argparse.BooleanOptionalAction, default=None, help="SMOTE for the teacher")
    parser.add_argument("--workers", type=int, help="DataLoader worker processes (default: none on the CPU, several on a GPU)")
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads per process (default: the available cores divided among the local processes)",
    )
    parser.add_argument("--resume", action="store_true", help="continue interrupted runs, skip finished ones")
    parser.add_argument(
        "--finished-only",
        action="store_true",
        help="with --resume: report the finished runs, leave the unfinished ones out, train nothing",
    )
    return parser


def config_from_args(dataset: str, args: argparse.Namespace) -> ExperimentConfig:
    """Merges the preset with the flags given on the command line."""
    preset = args.preset or ("paper" if torch.cuda.is_available() else "cpu")
    values: dict[str, object] = dict(PRESETS[preset])
    for name in ("image_size", "teacher_epochs", "student_epochs", "batch_size", "sizes", "seeds", "mixed_precision", "channels_last",
                 "checkpoint_every", "augment"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    for budget in ("teacher_image_budget", "student_image_budget"):
        if hasattr(args, budget):
            values[budget] = getattr(args, budget)
    return ExperimentConfig(
        dataset=dataset,
        output_dir=args.output_dir,
        data_dir=args.data_dir,
        teacher_checkpoint=args.teacher_checkpoint,
        teacher_per_class=args.teacher_per_class,
        kl_reduction=args.kl_reduction,
        baselines=args.baselines,
        baseline_seeds=args.baseline_seeds,
        smote=args.smote,
        workers=args.workers,
        resume=args.resume,
        finished_only=args.finished_only,
        **values,  # type: ignore[arg-type]
    )


def set_cpu_threads(threads: int | None) -> None:
    """Sets torch's CPU threads: ``threads``, or the available cores shared by the local processes."""
    # `accelerate launch` exports OMP_NUM_THREADS=1 when it cannot count physical cores, which
    # halves CPU training speed on a two-core machine; share the available cores instead.
    if threads is None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # Linux only
        threads = max(1, cores // local_processes)
    torch.set_num_threads(threads)


def configure_logging() -> None:
    """Logs kdkit's progress (one line per epoch and per finished run) with time stamps to stderr."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise


def main(dataset: str, argv: Sequence[str] | None = None) -> dict[str, object]:
    """Parses the command line, runs the experiment and prints the results table."""
    configure_logging()
    args = build_parser(dataset).parse_args(argv)
    set_cpu_threads(args.threads)
    config = config_from_args(dataset, args)
    results = run_experiment(config)
    if PartialState(cpu=distributed_without_accelerator()).is_main_process:
        print(results_markdown(results, config))
        print(f"results written to {config.output_dir}")
    return results
