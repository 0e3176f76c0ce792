"""The hyper-parameters and bookkeeping of one training run: :class:`TrainConfig`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from ._json import to_jsonable

__all__ = ["MIXED_PRECISION", "RESUME_FREE_FIELDS", "SCHEDULERS", "TIMM_SCHEDULERS", "TrainConfig"]

#: timm scheduler names accepted by ``create_scheduler_v2``.
TIMM_SCHEDULERS = ("cosine", "tanh", "step", "constant", "multistep", "plateau", "poly", "wsd", "rsqrt")
#: Every ``TrainConfig.sched``: the timm ones, torch's ``OneCycleLR`` and no schedule.
SCHEDULERS = (*TIMM_SCHEDULERS, "onecycle", "none")
MIXED_PRECISION = ("no", "bf16", "fp16")

#: Config fields that may change between a run and its resumption: they change where files go,
#: what is shown or how fast it runs, not the numbers (``allow_tf32`` and ``cudnn_benchmark``
#: also because checkpoints written before they existed must still resume).
RESUME_FREE_FIELDS = frozenset({
    "output_dir", "progress", "log_every", "trackers", "keep_last", "checkpoint_every", "compile",
    "allow_tf32", "cudnn_benchmark",
})


@dataclass
class TrainConfig:
    """Hyper-parameters and bookkeeping of one training run.

    Every field is validated when the config is built; the error names the field.

    Attributes:
        epochs: Number of epochs.
        opt: timm optimizer name (``timm.optim.create_optimizer_v2``), e.g. ``"adamw"``, ``"sgd"``, ``"lamb"``.
        lr: Peak learning rate.
        weight_decay: Weight decay (not applied to biases, norms and the task's or student's
            ``no_weight_decay()`` parameters).
        momentum: Momentum (optimizers that take it).
        sched: timm scheduler name (``cosine``, ``tanh``, ``step``, ``constant``, ``multistep``,
            ``plateau``, ``poly``, ``wsd``, ``rsqrt``), ``"onecycle"`` (torch ``OneCycleLR``) or
            ``"none"``. Stepped per optimizer update (``plateau``: per epoch, on ``select_metric``).
        warmup_epochs: Epochs of linear warm-up from ``warmup_lr`` (``onecycle``: its rising phase).
        warmup_lr: Learning rate at the start of the warm-up.
        min_lr: Lower bound of the decaying schedules.
        grad_accum_steps: Batches per optimizer update.
        clip_grad_norm: Clip the global gradient norm to this value; ``None`` disables clipping.
        ema_decay: Keep an exponential moving average of the student's weights with this decay
            (timm's ``ModelEmaV3``, warmed up over the first steps), and validate, select and
            save it instead of the raw weights; ``None`` (default) keeps none.
        mixed_precision: ``"no"``, ``"bf16"`` (works on CPU) or ``"fp16"``; ``None`` (the default)
            keeps Accelerate's own setting (``accelerate launch --mixed_precision``, ``accelerate
            config``, else no mixed precision). Ignored when an ``Accelerator`` is passed to the
            :class:`~kdkit.train.Trainer` (its setting is used).
        channels_last: Use the channels-last memory format for the student and the images.
        allow_tf32: Let CUDA matmuls and cuDNN convolutions use TF32 (Ampere and newer GPUs).
            Applied only when the Accelerator's device is CUDA.
        cudnn_benchmark: Let cuDNN time its algorithms on the first batches of every shape and keep
            the fastest (``torch.backends.cudnn.benchmark``). Applied only on CUDA.
        select_metric: Validation metric choosing the best model (``accuracy``,
            ``balanced_accuracy``, ``macro_f1``, ``loss``, ...); losses are minimised, others maximised.
        seed: Seed of the per-epoch reseeding (shuffling, augmentation, dropout).
        output_dir: Where checkpoints, metrics and the best model go.
        checkpoint_every: Save a resumable checkpoint every this many epochs (and after the last).
        eval_every: Validate (and so choose the best model among) every this many epochs, and
            after the last: a short run on a small training set spends most of its time on
            validation otherwise.
        keep_last: How many resumable checkpoints to keep (``checkpoints/last`` and the previous
            ones as ``checkpoints/epoch_NNNN``).
        log_every: Every this many batches, read the running loss back from the device: refresh
            the progress bar and check that the loss stayed finite (also at every epoch end).
        progress: Show a tqdm progress bar (main process only).
        compile: ``torch.compile`` the student (in place, its state-dict keys unchanged).
        trackers: Accelerate trackers to log the epoch metrics to, e.g. ``["tensorboard"]``.
        opt_kwargs: Extra keyword arguments of the optimizer (e.g. ``{"betas": [0.9, 0.95]}``).
        sched_kwargs: Extra keyword arguments of ``timm.scheduler.create_scheduler_v2``
            (e.g. ``{"decay_milestones": [30, 60]}``) or of ``OneCycleLR``.
    """

    epochs: int = 10
    opt: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    sched: str = "cosine"
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    grad_accum_steps: int = 1
    clip_grad_norm: float | None = None
    ema_decay: float | None = None
    mixed_precision: str | None = None
    channels_last: bool = False
    allow_tf32: bool = True
    cudnn_benchmark: bool = True
    select_metric: str = "accuracy"
    seed: int = 0
    output_dir: str | Path = "outputs"
    checkpoint_every: int = 1
    eval_every: int = 1
    keep_last: int = 1
    log_every: int = 50
    progress: bool = True
    compile: bool = False
    trackers: list[str] = field(default_factory=list)
    opt_kwargs: dict[str, Any] = field(default_factory=dict)
    sched_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def fail(name: str, expected: str) -> None:
            raise ValueError(f"TrainConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        def is_int(value: object) -> bool:
            return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

        def is_number(value: object) -> bool:
            return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(value)

        for name in ("epochs", "grad_accum_steps", "checkpoint_every", "eval_every", "keep_last", "log_every"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                fail(name, "an integer >= 1")
        if not is_int(self.seed) or self.seed < 0:
            fail("seed", "an integer >= 0")
        if not is_int(self.warmup_epochs) or self.warmup_epochs < 0:
            fail("warmup_epochs", "an integer >= 0")
        if not is_number(self.lr) or self.lr <= 0:
            fail("lr", "a positive number")
        for name in ("weight_decay", "momentum", "warmup_lr", "min_lr"):
            if not is_number(getattr(self, name)) or getattr(self, name) < 0:
                fail(name, "a number >= 0")
        if self.clip_grad_norm is not None and (not is_number(self.clip_grad_norm) or self.clip_grad_norm <= 0):
            fail("clip_grad_norm", "None or a positive number")
        if self.ema_decay is not None and (not is_number(self.ema_decay) or not 0 < self.ema_decay < 1):
            fail("ema_decay", "None or a number between 0 and 1 (e.g. 0.999)")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            fail("mixed_precision", f"one of {MIXED_PRECISION}")
        if not isinstance(self.sched, str) or self.sched.lower() not in SCHEDULERS:
            fail("sched", f"one of {SCHEDULERS}")
        self.sched = self.sched.lower()
        if self.warmup_epochs > 0 and self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"TrainConfig.warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs}): the "
                "learning rate would never reach lr"
                + (" (with sched='onecycle' it sets the rising phase)" if self.sched == "onecycle" else "")
            )
        if self.sched != "none" and self.min_lr > self.lr:
            raise ValueError(f"TrainConfig.min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if not isinstance(self.opt, str) or not self.opt:
            fail("opt", "a timm optimizer name")
        from timm.optim import get_optimizer_info

        try:
            get_optimizer_info(self.opt.lower().split("_")[-1])
        except Exception as exc:
            raise ValueError(f"TrainConfig.opt: unknown timm optimizer {self.opt!r} ({exc})") from None
        if self.opt.lower().split("_")[-1] in ("sgd", "nesterov") and self.momentum == 0:
            raise ValueError(
                f"TrainConfig.opt={self.opt!r} is Nesterov SGD in timm, which needs momentum > 0; "
                "use opt='momentum' for plain SGD (with momentum=0 for none)"
            )
        if not isinstance(self.select_metric, str) or not self.select_metric:
            fail("select_metric", "a metric name such as 'accuracy'")
        for name in ("channels_last", "allow_tf32", "cudnn_benchmark", "progress", "compile"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "a bool")
        if isinstance(self.trackers, str):
            self.trackers = [self.trackers]
        if not isinstance(self.trackers, (list, tuple)) or not all(isinstance(t, str) for t in self.trackers):
            fail("trackers", "a list of tracker names")
        self.trackers = list(self.trackers)
        if not isinstance(self.output_dir, (str, PathLike)) or not str(self.output_dir):
            fail("output_dir", "a path")
        for name in ("opt_kwargs", "sched_kwargs"):
            if not isinstance(getattr(self, name), Mapping):
                fail(name, "a dict")
            setattr(self, name, dict(getattr(self, name)))

    @property
    def select_mode(self) -> str:
        """``"min"`` for losses and errors, ``"max"`` for every other metric."""
        name = self.select_metric.lower()
        return "min" if name.endswith("loss") or name.endswith("error") else "max"

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-compatible values."""
        return to_jsonable(dataclasses.asdict(self))
