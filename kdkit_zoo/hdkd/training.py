"""How each run of an HDKD experiment trains: its data, its :class:`~kdkit.train.TrainConfig`,
its objective, and a fit followed by one test.

The paper's augmentation runs per image in the loader (the CPU) or batched on the training
device (a GPU), as ``ExperimentConfig.augment`` chooses (:class:`Pipeline`). Every run selects
its best epoch on a validation split carved out of the training set, then is tested once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from kdkit import devices
from kdkit.augment import batch_eval_transforms
from kdkit.data import ImageTensorDataset, eval_transforms, make_loader, stratified_split_indices
from kdkit.distiller import LossTerm
from kdkit.plan import steps_per_process
from kdkit.train import FitResult, TrainConfig, Trainer, checkpoint_epoch

from .augmentations import batch_hdkd_train_transforms, hdkd_train_transforms
from .config import HDKD_STAGES, ExperimentConfig

__all__ = [
    "FEATURE_TAPS",
    "ExperimentData",
    "Pipeline",
    "RunOutcome",
    "fit_and_test",
    "hdkd_losses",
    "is_finished",
    "loader",
    "prepare_data",
    "student_steps",
    "student_train_config",
    "teacher_train_config",
]

FEATURE_TAPS = list(HDKD_STAGES)
"""The three convolutional stages that teacher and student share, distilled without adapters."""

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Pipeline:
    """The datasets' per-image transforms and the Trainer's batched device transforms.

    Exactly one side is set: the per-image transforms (augmentation in the loader) or the
    device ones (the datasets then yield their stored uint8 images).
    """

    train_tf: Transform | None
    eval_tf: Transform | None
    device_train_tf: nn.Module | None = None
    device_eval_tf: nn.Module | None = None

    @classmethod
    def for_config(cls, config: ExperimentConfig) -> Pipeline:
        """The paper's augmentation, per image in the loader (CPU) or batched on the device (GPU)."""
        if devices.augment_on_device(config.augment):
            # uint8 batches (a quarter of float32's bytes) cross to the device, where every image
            # gets its own random draw of the same augmentations.
            return cls(None, None, batch_hdkd_train_transforms(config.image_size), batch_eval_transforms(config.image_size))
        return cls(hdkd_train_transforms(config.image_size), eval_transforms(config.image_size))

    def trainer_kwargs(self) -> dict[str, object]:
        """The :class:`~kdkit.train.Trainer`'s ``train_transform`` and ``eval_transform``."""
        return {"train_transform": self.device_train_tf, "eval_transform": self.device_eval_tf}

    def training_view(self, dataset: ImageTensorDataset) -> ImageTensorDataset:
        """``dataset`` as a training set of this pipeline (sharing its images)."""
        return _with_transform(dataset, self.train_tf)

    def evaluation_view(self, dataset: ImageTensorDataset) -> ImageTensorDataset:
        """``dataset`` as a validation or test set of this pipeline (sharing its images)."""
        return _with_transform(dataset, self.eval_tf)


def _with_transform(dataset: ImageTensorDataset, transform: Transform | None) -> ImageTensorDataset:
    return dataset.with_transform(transform) if transform is not None else dataset.as_uint8()


@dataclass
class ExperimentData:
    """The data sets of one experiment, viewed through its :class:`Pipeline`.

    Attributes:
        pool: The training pool: the training set minus the validation split (training view).
        val: The validation split, which chooses every run's best epoch.
        test: The test set, evaluated once per run.
        figure_set: The test set normalised on the CPU, for the figures, whichever pipeline trains.
        pipeline: The transforms every run trains and evaluates with.
    """

    pool: ImageTensorDataset
    val: ImageTensorDataset
    test: ImageTensorDataset
    figure_set: ImageTensorDataset
    pipeline: Pipeline

    @property
    def classes(self) -> list[str]:
        """The class names, in label order."""
        return self.pool.classes


def prepare_data(config: ExperimentConfig, splits: dict[str, ImageTensorDataset]) -> ExperimentData:
    """The pool and validation split (``splits["val"]``, else a stratified share of ``splits["train"]``), with the transforms."""
    full_pool = splits["train"]
    pipeline = Pipeline.for_config(config)
    if "val" in splits:
        pool, val = full_pool, splits["val"]
    else:
        pool_idx, val_idx = stratified_split_indices(full_pool.labels.numpy(), config.val_fraction, seed=0)
        pool, val = full_pool.subset(pool_idx), full_pool.subset(val_idx)
    return ExperimentData(
        pool=pipeline.training_view(pool),
        val=pipeline.evaluation_view(val),
        test=pipeline.evaluation_view(splits["test"]),
        figure_set=splits["test"].with_transform(eval_transforms(config.image_size)),
        pipeline=pipeline,
    )


def loader(dataset: ImageTensorDataset, config: ExperimentConfig, *, train: bool, batch_size: int | None = None) -> DataLoader:
    """:func:`kdkit.data.make_loader` with the experiment's workers and ``batch_size`` (default: its global batch)."""
    workers = devices.default_workers() if config.workers is None else config.workers
    return make_loader(dataset, batch_size or config.batch_size, train=train, workers=workers)


def _shared_settings(config: ExperimentConfig, output_dir: Path, seed: int, epochs: int) -> dict[str, object]:
    return dict(
        eval_every=config.eval_every_for(epochs),
        mixed_precision=devices.resolve_mixed_precision(config.mixed_precision),
        channels_last=config.channels_last,
        checkpoint_every=config.checkpoint_every,
        seed=seed,
        output_dir=str(output_dir),
        # Resolved from the class balance by the experiment (kdkit_zoo.hdkd.experiment.select_metric_for);
        # without it, the preset data sets' own: HAM10000's classes are imbalanced (two thirds are nevi).
        select_metric=config.select_metric or ("balanced_accuracy" if config.dataset == "ham10000" else "accuracy"),
    )


def teacher_train_config(config: ExperimentConfig, output_dir: Path, num_images: int, *, at_least_steps: int = 0,
                         num_processes: int = 1) -> TrainConfig:
    """Phase 1's run: the teacher on ``num_images`` training images per epoch, seed 0.

    It trains :meth:`~kdkit_zoo.hdkd.config.ExperimentConfig.teacher_epochs_for` epochs, with
    at least ``at_least_steps`` optimizer steps (the longest student run's): a teacher that
    trains less than its students is often weaker than the student alone.
    """
    epochs = config.teacher_epochs_for(num_images, num_processes, at_least_steps)
    return TrainConfig(
        epochs=epochs,
        opt=config.teacher_opt,
        lr=config.teacher_lr,
        sched=config.teacher_sched,
        weight_decay=config.teacher_weight_decay,
        **_shared_settings(config, output_dir, seed=0, epochs=epochs),
    )


def student_steps(config: ExperimentConfig, num_images: int, num_processes: int = 1) -> int:
    """Optimizer steps of a phase-2 run on ``num_images`` training images, on each process."""
    return config.student_epochs_for(num_images, num_processes) * steps_per_process(num_images, config.student_batch, num_processes)


def student_train_config(config: ExperimentConfig, output_dir: Path, seed: int, num_images: int, num_processes: int = 1) -> TrainConfig:
    """A phase-2 run (student alone, HDKD or baseline) on ``num_images`` training images."""
    epochs = config.student_epochs_for(num_images, num_processes)
    # A run lengthened to reach its steps keeps the warm-up's share of the schedule, so that
    # every size warms up alike; at least one epoch of decay follows (a one-epoch run has none).
    warmup = config.student_warmup_epochs
    if epochs > config.student_epochs and warmup:
        warmup = round(warmup * epochs / config.student_epochs)
    warmup = min(warmup, epochs - 1)
    return TrainConfig(
        epochs=epochs,
        opt=config.student_opt,
        lr=config.student_lr,
        sched=config.student_sched,
        min_lr=config.student_min_lr,
        warmup_epochs=warmup,
        weight_decay=config.student_weight_decay,
        **_shared_settings(config, output_dir, seed, epochs=epochs),
    )


def hdkd_losses(config: ExperimentConfig) -> list[LossTerm]:
    """The HDKD objective ``(1-a)*CE + a*T^2*KL + lambda * sum_j j^alpha * MSE_j``."""
    return [
        LossTerm("ce", 1 - config.alpha),
        LossTerm("kl", config.alpha, temperature=config.temperature, reduction=config.kl_reduction),
        LossTerm("stage_mse", config.feature_weight, alpha=config.stage_alpha),
    ]


@dataclass
class RunOutcome:
    """What one run's fit and test gave.

    Attributes:
        fit: The fit's result, with its per-epoch history.
        test: The best model's test metrics (:meth:`kdkit.train.Trainer.test`).
    """

    fit: FitResult
    test: dict[str, object]


def fit_and_test(
    task: nn.Module, train_config: TrainConfig, train_set: ImageTensorDataset, data: ExperimentData, config: ExperimentConfig,
    *, batch_size: int | None = None,
) -> RunOutcome:
    """Trains ``task`` on ``train_set`` at the global ``batch_size`` (default: ``config.batch_size``),
    resuming when ``config.resume`` and replacing a run when ``config.overwrite``, then reloads
    its best student and tests it."""
    trainer = Trainer(task, train_config, class_names=train_set.classes, **data.pipeline.trainer_kwargs())
    train_loader = loader(train_set, config, train=True, batch_size=batch_size)
    result = trainer.fit(train_loader, loader(data.val, config, train=False), resume=config.resume,
                         overwrite=config.overwrite)
    return RunOutcome(result, trainer.test(loader(data.test, config, train=False)))


def is_finished(train_config: TrainConfig) -> bool:
    """Whether the run of ``train_config`` has checkpointed its last epoch."""
    return (checkpoint_epoch(Path(train_config.output_dir) / "checkpoints") or 0) >= train_config.epochs
