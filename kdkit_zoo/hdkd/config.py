"""The settings of one HDKD experiment: the named presets and :class:`ExperimentConfig`.

:data:`PRESETS` is the one table of defaults: every setting a preset names defaults, in
:class:`ExperimentConfig`, to the ``cpu`` preset's value, so a config built in Python and the
command line without ``--preset`` on a CPU train the same experiment.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import timm

from kdkit import devices
from kdkit.plan import steps_per_process

from .datasets import DATASETS

HDKD_STAGES = ("stages.0", "stages.1", "stages.2")
"""The three convolutional stages that the HDKD teacher and student share."""

__all__ = ["ARMS", "HDKD", "PRESETS", "STUDENT", "ExperimentConfig"]

STUDENT = "student"
"""The arm of the student trained alone: ``hdkd_student_nodistill``, cross-entropy only."""
HDKD = "HDKD"
"""The arm of the student distilled from the teacher: ``hdkd_student``, the HDKD objective."""
ARMS = (STUDENT, HDKD)
"""The two arms every size and seed trains, in the order they train and are reported."""

PRESETS: dict[str, dict[str, object]] = {
    # Two CPU cores: reduced resolution and budgets, bf16 autocast
    # (1.5x the float32 distillation step on an AVX512-BF16 CPU), and one-cycle AdamW for the
    # teacher and students, which reaches a useful accuracy in few epochs where plain Adam does not.
    # channels_last is off: under bf16 at 64 px it made the teacher's step 5.8% slower and
    # helped neither student step (benchmarks/results/step_formats_64px).
    "cpu": dict(
        image_size=64,
        batch_size=32,
        # Budgets in optimizer steps, so that they follow the data: a run trains the fewest whole
        # epochs that reach its steps, and at least its epochs. 200 images then train as long
        # as 600, and a large pool (HAM10000's SMOTE-balanced one) is not cut to a few passes.
        # The values are the levers measured best so far (benchmarks/results/hdkd_tuning_*).
        teacher_epochs=2,
        teacher_steps=1920,
        student_epochs=10,
        student_steps=720,
        student_batch_size=16,
        validations_per_run=12,
        sizes=[50, 100, 150],
        seeds=[0],
        mixed_precision="bf16",  # the launcher's bf16/fp16 still wins (kdkit.devices)
        channels_last=False,
        checkpoint_every=2,
        teacher_opt="adamw",
        teacher_lr=3e-3,
        teacher_sched="onecycle",
        teacher_weight_decay=0.05,
        student_opt="adamw",
        student_lr=1e-3,
        student_sched="onecycle",
        student_min_lr=0.0,
        student_warmup_epochs=3,
        student_weight_decay=0.05,
    ),
    # The paper's setting (224 px, 200 epochs, global batch 32), for GPUs: bf16 where the GPU
    # has it (the launcher's choice wins), a resumable checkpoint every 10 epochs, not 200.
    "paper": dict(
        image_size=224,
        batch_size=32,
        teacher_epochs=200,
        teacher_steps=None,
        student_epochs=200,
        student_steps=None,
        student_batch_size=None,
        validations_per_run=None,
        sizes=[50, 100, 150, None],
        seeds=[0, 1, 2],
        mixed_precision="auto",
        channels_last=False,
        checkpoint_every=10,
        teacher_opt="adam",
        teacher_lr=1e-3,
        teacher_sched="none",
        teacher_weight_decay=0.0,
        student_opt="adamw",
        student_lr=5e-5,
        student_sched="cosine",
        student_min_lr=2e-5,
        student_warmup_epochs=5,
        student_weight_decay=0.1,
    ),
}
"""Named settings of :class:`ExperimentConfig`; ``cpu`` is the default without a GPU, and the
default of every field it names."""


def _cpu_preset(name: str) -> Any:
    """A dataclass field defaulting to the ``cpu`` preset's ``name`` (a fresh copy of a list)."""
    value = PRESETS["cpu"][name]
    if isinstance(value, list):
        return field(default_factory=functools.partial(list, value))
    return field(default=value)


@dataclass
class ExperimentConfig:
    """Everything one HDKD experiment depends on.

    Every setting that a preset names defaults to the ``cpu`` preset (:data:`PRESETS`).

    Attributes:
        dataset: ``"brain_tumor_mri"`` or ``"ham10000"`` (a preset data set), or ``None`` with ``data``.
        output_dir: Where runs, checkpoints, ``results.json``, ``results.md`` and plots go.
        data_dir: Data root (see :func:`kdkit_zoo.hdkd.datasets.resolve_data_root`).
        image_size: Training and test resolution.
        batch_size: The global batch size, split evenly across the processes of ``accelerate
            launch`` (as the paper's 32 on one GPU); it must divide by their number.
        teacher_epochs: Epochs of phase 1 (the fewest, with ``teacher_steps``).
        teacher_steps: Optimizer steps of phase 1: the teacher trains the fewest whole epochs
            that reach them (on its training set, after SMOTE), and at least ``teacher_epochs``.
            ``None``: ``teacher_epochs``. The teacher also never trains fewer steps than the
            longest student run.
        student_epochs: Epochs of each phase-2 run (the fewest, with ``student_steps``).
        student_steps: Optimizer steps of each phase-2 run (student alone, HDKD and baselines
            alike): the fewest whole epochs that reach them on the run's subset, and at least
            ``student_epochs``. ``None``: ``student_epochs``.
        student_batch_size: The global batch of the phase-2 runs; ``None``: ``batch_size``.
        validations_per_run: Validate (and choose the best model) about this many times per
            run, every ``ceil(epochs / validations_per_run)`` epochs and after the last;
            ``None``: after every epoch.
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
        student_opt: timm optimizer name of the students and baselines (the paper's AdamW).
        student_lr: Peak learning rate of the students.
        student_sched: timm scheduler name of the students (the paper's cosine).
        student_min_lr: Final learning rate of the students' schedule.
        student_warmup_epochs: Linear warm-up epochs of the students (the one-cycle schedule's
            rising phase), in a run of ``student_epochs``; a run of more epochs keeps its share.
        student_weight_decay: Weight decay of the students.
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
        overwrite: Without ``resume``, train again from scratch over the runs that the output
            folder already holds (without it, such a start is refused before anything trains).
            How one invocation runs, not recorded in ``experiment.json``.
        finished_only: Report only the runs that have finished and leave the others out,
            training nothing (a report of a benchmark still running or cut short). Needs
            ``resume`` and a finished teacher.
        workers: DataLoader worker processes; ``None``: none on the CPU, several on a GPU
            (:func:`kdkit.devices.default_workers`).
        num_figure_images: Test images shown in the activation-map figure.
        data: Your own data set instead of the preset one: a folder with ``train/`` and ``test/``
            (and optionally ``val/``) class folders, a folder of class folders only, or a CSV of
            ``path,label[,group]`` (:func:`kdkit.image_data.load_image_data`).
        test_fraction: With ``data`` and no test split: the share carved off for testing.
        teacher_model: timm name of the teacher.
        student_model: timm name of the distilled student.
        alone_model: timm name of the student trained alone; ``None``: ``hdkd_student_nodistill``
            for ``hdkd_student``, else ``student_model``.
        taps: The distilled feature taps; ``None``: the HDKD pair's three shared stages, else
            timm's last three feature stages.
        figure_tap: The module whose activation maps Figure 5 shows; ``None``: the HDKD models'
            last shared stage, else each model's stride-16 stage.
        select_metric: The validation metric choosing each run's best epoch; ``None``: balanced
            accuracy when the largest class has over 1.5x the images of the smallest, else accuracy.
    """

    # The field order is the order of the settings in results.json's "config".
    dataset: str | None = "brain_tumor_mri"
    output_dir: str = "runs/hdkd_brain"
    data_dir: str | None = None
    data: str | None = None
    image_size: int = _cpu_preset("image_size")
    batch_size: int = _cpu_preset("batch_size")
    teacher_epochs: int = _cpu_preset("teacher_epochs")
    teacher_steps: int | None = _cpu_preset("teacher_steps")
    student_epochs: int = _cpu_preset("student_epochs")
    student_steps: int | None = _cpu_preset("student_steps")
    student_batch_size: int | None = _cpu_preset("student_batch_size")
    validations_per_run: int | None = _cpu_preset("validations_per_run")
    sizes: list[int | None] = _cpu_preset("sizes")
    seeds: list[int] = _cpu_preset("seeds")
    mixed_precision: str = _cpu_preset("mixed_precision")
    channels_last: bool = _cpu_preset("channels_last")
    checkpoint_every: int = _cpu_preset("checkpoint_every")
    augment: str = "auto"
    teacher_opt: str = _cpu_preset("teacher_opt")
    teacher_lr: float = _cpu_preset("teacher_lr")
    teacher_sched: str = _cpu_preset("teacher_sched")
    teacher_weight_decay: float = _cpu_preset("teacher_weight_decay")
    student_opt: str = _cpu_preset("student_opt")
    student_lr: float = _cpu_preset("student_lr")
    student_sched: str = _cpu_preset("student_sched")
    student_min_lr: float = _cpu_preset("student_min_lr")
    student_warmup_epochs: int = _cpu_preset("student_warmup_epochs")
    student_weight_decay: float = _cpu_preset("student_weight_decay")
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
    overwrite: bool = False
    finished_only: bool = False
    workers: int | None = None
    num_figure_images: int = 4
    test_fraction: float = 0.2
    teacher_model: str = "hdkd_teacher"
    student_model: str = "hdkd_student"
    alone_model: str | None = None
    taps: list[str | int | tuple[str | int, str | int]] | None = None
    figure_tap: str | None = None
    select_metric: str | None = None

    def __post_init__(self) -> None:
        if self.data is None and self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS} (or give `data`, a folder or CSV of your own), got {self.dataset!r}")
        if self.data is not None:
            self.data = str(self.data)
        if self.smote is None:
            self.smote = self.data is None and self.dataset == "ham10000"
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must lie in (0, 1), got {self.test_fraction}")
        models = {"teacher_model": self.teacher_model, "student_model": self.student_model, "alone_model": self.alone_model}
        if unknown := [f"{field_name}={name!r}" for field_name, name in models.items() if name is not None and not timm.is_model(name)]:
            raise ValueError(f"unknown timm model(s) {', '.join(unknown)}; see timm.list_models()")
        if isinstance(self.taps, str):
            self.taps = [tap.strip() for tap in self.taps.split(",") if tap.strip()]
        if self.taps is not None:  # (teacher, student) pairs read back from JSON as lists
            self.taps = [tuple(tap) if isinstance(tap, list) else tap for tap in self.taps]
        if self.mixed_precision not in devices.MIXED_PRECISION_CHOICES:
            raise ValueError(f"mixed_precision must be one of {devices.MIXED_PRECISION_CHOICES}, got {self.mixed_precision!r}")
        if self.augment not in devices.AUGMENT_PLACES:
            raise ValueError(f"augment must be one of {devices.AUGMENT_PLACES}, got {self.augment!r}")
        # Refused here, not after the teacher has trained for hours (or at its first batch).
        for name in ("image_size", "batch_size", "teacher_epochs", "student_epochs", "checkpoint_every"):
            if not _is_count(value := getattr(self, name)):
                raise ValueError(f"{name} must be a whole number of at least 1 (--{name.replace('_', '-')}), got {value!r}")
        for name in ("teacher_per_class", "teacher_steps", "student_steps", "student_batch_size", "validations_per_run"):
            if (value := getattr(self, name)) is not None and not _is_count(value):
                raise ValueError(f"{name} must be a whole number of at least 1 or None (--{name.replace('_', '-')}), got {value!r}")
        if bad := [size for size in self.sizes or [] if size is not None and not _is_count(size)]:
            raise ValueError(f"sizes are images per class, whole numbers of at least 1 or None for all (--sizes), got {bad}")
        if self.resume and self.overwrite:
            raise ValueError("resume continues the runs in output_dir and overwrite replaces them (--resume, --overwrite): "
                             "pass one of them, not both")
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

    @property
    def alone_model_name(self) -> str:
        """The student trained alone: ``alone_model``, else the HDKD student without its distillation token, else the student."""
        if self.alone_model is not None:
            return self.alone_model
        return "hdkd_student_nodistill" if self.student_model == "hdkd_student" else self.student_model

    @property
    def is_hdkd_pair(self) -> bool:
        """Whether teacher and student are the HDKD family's, which share their three conv stages."""
        return self.teacher_model.startswith("hdkd_teacher") and self.student_model.startswith("hdkd_student")

    @property
    def feature_taps(self) -> list[str] | list[int]:
        """The distilled taps: ``taps``, else the HDKD pair's three shared stages, else timm's last three feature stages."""
        if self.taps:
            return list(self.taps)
        return list(HDKD_STAGES) if self.is_hdkd_pair else [-3, -2, -1]

    @property
    def data_name(self) -> str:
        """How the data is named in reports: the preset data set, or the user's folder or CSV."""
        return self.dataset if self.data is None else self.data

    @property
    def student_batch(self) -> int:
        """The global batch of the phase-2 runs: ``student_batch_size``, else ``batch_size``."""
        return self.student_batch_size or self.batch_size

    def teacher_epochs_for(self, num_images: int, num_processes: int = 1, at_least_steps: int = 0) -> int:
        """Epochs of the teacher on ``num_images`` training images: ``teacher_epochs``, or more to
        reach ``teacher_steps`` and ``at_least_steps`` (the longest student run's)."""
        steps = max(self.teacher_steps or 0, at_least_steps) or None
        return _epochs_reaching(steps, self.teacher_epochs, steps_per_process(num_images, self.batch_size, num_processes))

    def student_epochs_for(self, num_images: int, num_processes: int = 1) -> int:
        """Epochs of a phase-2 run on ``num_images`` training images: ``student_epochs``, or more to reach ``student_steps``."""
        return _epochs_reaching(self.student_steps, self.student_epochs, steps_per_process(num_images, self.student_batch, num_processes))

    def eval_every_for(self, epochs: int) -> int:
        """Epochs between the validations of a run of ``epochs``, under :attr:`validations_per_run`."""
        return 1 if self.validations_per_run is None else max(1, math.ceil(epochs / self.validations_per_run))


def _is_count(value: object) -> bool:
    """A whole number of at least 1 (not a bool, which is an int to Python)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _epochs_reaching(steps: int | None, epochs: int, steps_per_epoch: int) -> int:
    """``epochs``, or more: the fewest whole epochs of ``steps_per_epoch`` optimizer steps that reach ``steps``.

    The last epoch may overshoot (1,800 steps at 12 per epoch: 150 epochs; at 25: 72 epochs,
    1,800 steps; at 37: 49 epochs, 1,813 steps), so that no run takes fewer steps than its budget.
    """
    if steps is None or steps_per_epoch < 1:  # a run that cannot step is the plan check's to report
        return epochs
    return max(epochs, math.ceil(steps / steps_per_epoch))
