"""A reusable training engine on HuggingFace Accelerate, with exact resume and safe checkpoints.

The engine trains a *task module*: an ``nn.Module`` whose ``forward(images, labels)`` returns a
:class:`~kdkit.outputs.StepOutput` and which has a ``.student`` attribute (the model that is
evaluated and exported). :class:`~kdkit.Distiller` is one; :class:`Supervised` (plain
cross-entropy on labels) is the other::

    from kdkit.train import Supervised, TrainConfig, Trainer

    config = TrainConfig(epochs=30, lr=1e-3, output_dir="runs/resnet18", select_metric="balanced_accuracy")
    trainer = Trainer(Supervised(model), config, class_names=["benign", "malignant"])
    result = trainer.fit(train_loader, val_loader)          # fit(..., resume=True) after a crash
    test_metrics = trainer.evaluate(test_loader)

Everything goes through one :class:`accelerate.Accelerator` (device placement, DDP, mixed
precision, gradient accumulation, ``gather_for_metrics``), so the same code runs on a CPU, one
GPU or ``accelerate launch --num_processes N``.

Files written to ``config.output_dir``:

* ``best_model.safetensors``: the student's weights whenever the validation metric improves
  (the last epoch's without a validation loader), with metadata (classes, epoch, metric).
* ``metrics.jsonl`` / ``metrics.csv``: one row per epoch.
* ``checkpoints/last/``: the full training state (``accelerator.save_state`` plus
  ``trainer_state.json``), replaced atomically at the end of every ``checkpoint_every`` epochs.

Resume is exact: shuffling and augmentation randomness are reseeded from ``(seed, epoch)`` at
every epoch start, so a run interrupted after epoch k and resumed ends with the same
parameters and metrics as an uninterrupted one.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import random
import secrets
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._progress import progress_bar
from .checkpoint import atomic_write_text, fsync_dir, read_metadata, save_model, unwrap_model
from .outputs import StepOutput, mean_of_heads

__all__ = [
    "FitResult",
    "NonFiniteLossError",
    "ResumeError",
    "Supervised",
    "TrainConfig",
    "Trainer",
    "checkpoint_epoch",
    "find_checkpoint",
]

logger = logging.getLogger(__name__)

PathType = str | PathLike[str]

#: timm scheduler names accepted by ``create_scheduler_v2``, plus torch's ``OneCycleLR``.
TIMM_SCHEDULERS = ("cosine", "tanh", "step", "constant", "multistep", "plateau", "poly", "wsd", "rsqrt")
SCHEDULERS = (*TIMM_SCHEDULERS, "onecycle", "none")
MIXED_PRECISION = ("no", "bf16", "fp16")

#: Config fields that may change between a run and its resumption.
_RESUME_FREE_FIELDS = frozenset({"output_dir", "progress", "log_every", "trackers", "keep_last", "checkpoint_every", "compile"})

_STATE_FILE = "trainer_state.json"  # written last into a checkpoint: its presence marks it complete
_SCHEDULER_FILE = "kdkit_scheduler.pt"
_STATE_VERSION = 1
_TIME_KEYS = ("epoch_time", "train_time", "eval_time", "images_per_sec")


# =========================================================================== errors
class NonFiniteLossError(FloatingPointError):
    """The loss (or a parameter) became NaN or infinite; training stopped.

    Attributes:
        terms: Names of the non-finite loss terms (``["loss"]`` when only the total is).
        epoch: 1-based epoch.
        batch: 1-based batch index within the epoch.
        step: 1-based optimizer step being computed.
    """

    def __init__(self, message: str, *, terms: Sequence[str] = (), epoch: int | None = None,
                 batch: int | None = None, step: int | None = None) -> None:
        super().__init__(message)
        self.terms = list(terms)
        self.epoch = epoch
        self.batch = batch
        self.step = step


class ResumeError(ValueError):
    """A checkpoint cannot be resumed with this trainer (different config, model, data or classes)."""


# =========================================================================== config
@dataclass
class TrainConfig:
    """Hyper-parameters and bookkeeping of one training run.

    Attributes:
        epochs: Number of epochs.
        opt: timm optimizer name (``timm.optim.create_optimizer_v2``), e.g. ``"adamw"``, ``"sgd"``, ``"lamb"``.
        lr: Peak learning rate.
        weight_decay: Weight decay (not applied to biases, norms and the student's ``no_weight_decay()``).
        momentum: Momentum (optimizers that take it).
        sched: timm scheduler name (``cosine``, ``tanh``, ``step``, ``constant``, ``multistep``,
            ``plateau``, ``poly``, ``wsd``, ``rsqrt``), ``"onecycle"`` (torch ``OneCycleLR``) or
            ``"none"``. Stepped per optimizer update (``plateau``: per epoch, on ``select_metric``).
        warmup_epochs: Epochs of linear warm-up from ``warmup_lr`` (``onecycle``: its rising phase).
        warmup_lr: Learning rate at the start of the warm-up.
        min_lr: Lower bound of the decaying schedules.
        grad_accum_steps: Batches per optimizer update.
        clip_grad_norm: Clip the global gradient norm to this value; ``None`` disables clipping.
        mixed_precision: ``"no"``, ``"bf16"`` (works on CPU) or ``"fp16"``; ``None`` (the default)
            keeps Accelerate's own setting (``accelerate launch --mixed_precision``, ``accelerate
            config``, else no mixed precision). Ignored when an ``Accelerator`` is passed to the :class:`Trainer` (its setting is used).
        channels_last: Use the channels-last memory format for the student and the images.
        select_metric: Validation metric choosing the best model (``accuracy``,
            ``balanced_accuracy``, ``macro_f1``, ``loss``, ...); losses are minimised, others maximised.
        seed: Seed of the per-epoch reseeding (shuffling, augmentation, dropout).
        output_dir: Where checkpoints, metrics and the best model go.
        checkpoint_every: Save a resumable checkpoint every this many epochs (and after the last).
        keep_last: How many resumable checkpoints to keep (``checkpoints/last`` and the previous
            ones as ``checkpoints/epoch_NNNN``).
        log_every: Update the progress bar's loss and lr every this many batches.
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
    mixed_precision: str | None = None
    channels_last: bool = False
    select_metric: str = "accuracy"
    seed: int = 0
    output_dir: str | Path = "outputs"
    checkpoint_every: int = 1
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

        for name in ("epochs", "grad_accum_steps", "checkpoint_every", "keep_last", "log_every"):
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
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            fail("mixed_precision", f"one of {MIXED_PRECISION}")
        if not isinstance(self.sched, str) or self.sched.lower() not in SCHEDULERS:
            fail("sched", f"one of {SCHEDULERS}")
        self.sched = self.sched.lower()
        if self.sched == "onecycle" and self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"TrainConfig.warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs}) "
                "with sched='onecycle' (it sets the rising phase)"
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
        for name in ("channels_last", "progress", "compile"):
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
        return json.loads(json.dumps(dataclasses.asdict(self), default=_json_default))


# =========================================================================== tasks
class Supervised(nn.Module):
    """Plain supervised training of a model, as a task module for the :class:`Trainer`.

    Args:
        model: The classifier; it becomes ``.student``. A model returning a tuple of logits in
            training (a distilled student with two heads) is trained on their mean.
        loss: ``loss(logits, labels) -> scalar tensor``; cross-entropy by default.
        name: Name of the loss term in the logs; ``"ce"`` for the default loss, else ``"loss"``.
    """

    def __init__(self, model: nn.Module, loss: Callable[[Tensor, Tensor], Tensor] | None = None, *, name: str | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if loss is not None and not callable(loss):
            raise TypeError(f"loss must be callable(logits, labels), got {type(loss).__name__}")
        self.student = model
        self.loss_fn = loss
        self.term_name = name or ("ce" if loss is None else "loss")

    def forward(self, images: Tensor, labels: Tensor | None = None) -> StepOutput:
        logits = mean_of_heads(self.student(images))
        if labels is None:
            return StepOutput(loss=None, logits=logits, terms={})
        loss = F.cross_entropy(logits, labels) if self.loss_fn is None else self.loss_fn(logits, labels)
        return StepOutput(loss=loss, logits=logits, terms={self.term_name: float(loss.detach().float().item())})

    def no_weight_decay(self) -> set[str]:
        """The student's ``no_weight_decay()`` names (timm), prefixed for this module."""
        names = getattr(unwrap_model(self.student), "no_weight_decay", None)
        return {f"student.{name}" for name in names()} if callable(names) else set()


# =========================================================================== results
@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        best_metric: Best value of ``select_metric`` on the validation split (``None`` without one).
        best_epoch: 1-based epoch of the best model (the last epoch without validation).
        history: One dict per epoch (the rows of ``metrics.jsonl``).
        best_model_path: ``output_dir/best_model.safetensors``.
        final_val_metrics: Validation metrics of the last epoch (``None`` without validation).
        select_metric: The selection metric's name.
        output_dir: The run's directory.
    """

    best_metric: float | None
    best_epoch: int | None
    history: list[dict[str, Any]]
    best_model_path: Path | None
    final_val_metrics: dict[str, Any] | None
    select_metric: str = "accuracy"
    output_dir: Path | None = None


# =========================================================================== helpers
def _json_default(obj: object) -> object:
    if isinstance(obj, PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _jsonable(value: object) -> Any:
    return json.loads(json.dumps(value, default=_json_default))


def _derive_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from non-negative integers (e.g. ``(seed, epoch, rank)``)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint32)[0])


def distributed_without_accelerator() -> bool:
    """True under ``torchrun`` (WORLD_SIZE > 1) on a machine without GPUs or other accelerators.

    Accelerate only sets up multi-CPU DDP (gloo) when asked for the CPU explicitly; without this,
    each process would train alone and they would overwrite each other's files.
    """
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return False
    if torch.cuda.is_available():
        return False
    from accelerate.utils import is_mlu_available, is_npu_available, is_xpu_available

    return not (is_xpu_available() or is_npu_available() or is_mlu_available())


def _unpack_batch(batch: object) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Mapping):
        images = next((batch[k] for k in ("images", "image", "pixel_values", "input", "inputs", "x") if k in batch), None)
        labels = next((batch[k] for k in ("labels", "label", "targets", "target", "y") if k in batch), None)
        if images is None:
            raise KeyError(f"cannot find the images in a batch with keys {sorted(batch)}")
        return images, labels
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, Tensor):
        return batch, None
    raise TypeError(f"batches must be (images, labels) tuples or dicts, got {type(batch).__name__}")


def _model_signature(task: nn.Module) -> dict[str, Any]:
    """Identifies the architecture: the task and student classes and every state tensor's name and shape."""
    module = unwrap_model(task)
    digest = hashlib.sha256()
    count = 0
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        count += 1
    return {
        "task": type(module).__name__,
        "student": type(unwrap_model(module.student)).__name__,
        "num_tensors": count,
        "sha256": digest.hexdigest(),
    }


def _is_complete(path: Path) -> bool:
    return (path / _STATE_FILE).is_file()


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / _STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ResumeError(f"cannot read {path / _STATE_FILE}: {exc}") from exc


def find_checkpoint(path: PathType) -> Path | None:
    """Returns the complete checkpoint directory designated by ``path``, or ``None``.

    ``path`` may be a run's ``output_dir``, its ``checkpoints`` folder or a checkpoint directory.
    A checkpoint caught between the two renames of an atomic swap (``last`` missing,
    ``last.old`` complete) resolves to ``last.old``.
    """
    path = Path(path)
    candidates = [path, path / "last", path / "checkpoints" / "last"]
    for candidate in candidates:
        if _is_complete(candidate):
            return candidate
        previous = candidate.with_name(candidate.name + ".old")
        if candidate.name == "last" and not candidate.exists() and _is_complete(previous):
            return previous
        if candidate.name == "last" and candidate.exists() and not _is_complete(candidate) and _is_complete(previous):
            return previous
    return None


def checkpoint_epoch(path: PathType) -> int | None:
    """Returns the number of epochs the complete checkpoint at ``path`` holds, or ``None`` without one.

    ``path`` is resolved like :func:`find_checkpoint`; compare with ``TrainConfig.epochs`` to
    tell a finished run from an interrupted one without starting a Trainer.
    """
    found = find_checkpoint(path)
    return None if found is None else int(_read_state(found)["epoch"])


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                with open(os.path.join(root, name), "rb") as handle:
                    os.fsync(handle.fileno())
            except OSError:
                pass
        fsync_dir(root)


def _flatten_for_csv(row: Mapping[str, Any], class_names: Sequence[str] | None) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, Mapping):
            for sub, item in value.items():
                if not isinstance(item, (Mapping, list, tuple)):
                    flat[f"{key}/{sub}"] = item
        elif isinstance(value, (list, tuple)):
            if all(not isinstance(v, (Mapping, list, tuple)) for v in value):
                names = class_names if class_names is not None and len(class_names) == len(value) else range(len(value))
                for sub, item in zip(names, value):
                    flat[f"{key}/{sub}"] = item
            # nested lists (confusion matrices) stay in metrics.jsonl only
        else:
            flat[key] = value
    return flat


# =========================================================================== trainer
class Trainer:
    """Trains a task module with Accelerate; see the module docstring.

    Args:
        task: A task module (``forward(images, labels) -> StepOutput`` and ``.student``), e.g.
            :class:`~kdkit.Distiller` or :class:`Supervised`.
        config: The :class:`TrainConfig`.
        accelerator: An ``accelerate.Accelerator`` to use; one is created from the config when
            ``None``. ``config.grad_accum_steps`` is applied to it either way.
        class_names: Class names, in label order; stored with the best model and used in the metrics.
        metadata: Extra JSON-serialisable metadata for ``best_model.safetensors`` (e.g.
            ``{"model_name": "resnet18", "image_size": 224}``).
    """

    def __init__(
        self,
        task: nn.Module,
        config: TrainConfig,
        accelerator: Any | None = None,
        class_names: Sequence[str] | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(task, nn.Module) or not isinstance(getattr(task, "student", None), nn.Module):
            raise TypeError("task must be an nn.Module with a `.student` module (e.g. kdkit.Distiller or kdkit.train.Supervised)")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.config = config
        self.class_names = [str(c) for c in class_names] if class_names is not None else None
        self.metadata = _jsonable(dict(metadata or {}))
        self.output_dir = Path(config.output_dir)
        self.accelerator = accelerator if accelerator is not None else self._make_accelerator()
        acc = self.accelerator
        if getattr(acc.project_configuration, "automatic_checkpoint_naming", False):
            raise ValueError("the Trainer names its checkpoints itself: create the Accelerator without automatic_checkpoint_naming")
        if acc.gradient_accumulation_steps not in (1, config.grad_accum_steps):
            warnings.warn(
                f"the Accelerator's gradient_accumulation_steps={acc.gradient_accumulation_steps} is replaced by "
                f"TrainConfig.grad_accum_steps={config.grad_accum_steps}",
                stacklevel=2,
            )
        acc.gradient_accumulation_steps = config.grad_accum_steps

        student = task.student
        if config.channels_last:
            student.to(memory_format=torch.channels_last)
        if config.compile:
            student.compile()  # in place: the state-dict keys keep their names
        self.optimizer = self._make_optimizer(task)
        self.task, self.optimizer = acc.prepare(task, self.optimizer)
        self.scheduler: Any = None
        self._prepared_loaders: dict[int, tuple[Any, Any]] = {}
        self._reset_run_state()

    # ------------------------------------------------------------------ setup
    def _make_accelerator(self) -> Any:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, PartialState

        cfg = self.config
        shared = AcceleratorState._shared_state
        if (
            cfg.mixed_precision is not None
            and shared
            and shared.get("_mixed_precision") not in (None, cfg.mixed_precision)
            and PartialState().num_processes == 1
        ):
            # AcceleratorState is a process-wide singleton; in a single process (a notebook, tests)
            # a new Trainer with another precision would otherwise be refused.
            logger.warning(
                "re-initialising Accelerate's state for mixed_precision=%r (was %r); Trainers created earlier "
                "in this process now use it too", cfg.mixed_precision, shared.get("_mixed_precision"))
            AcceleratorState._reset_state()
        kwargs: dict[str, Any] = {
            "cpu": distributed_without_accelerator(),
            "gradient_accumulation_steps": cfg.grad_accum_steps,
            "project_dir": os.fspath(cfg.output_dir),
        }
        if cfg.mixed_precision is not None:  # else Accelerate's own: `accelerate launch` flags or config
            kwargs["mixed_precision"] = cfg.mixed_precision
        if cfg.trackers:
            kwargs["log_with"] = list(cfg.trackers)
        return Accelerator(**kwargs)

    def _no_weight_decay_names(self, task: nn.Module) -> set[str]:
        own = getattr(task, "no_weight_decay", None)
        if callable(own):
            return set(own())
        student = task.student
        names = getattr(unwrap_model(student), "no_weight_decay", None)
        if not callable(names):
            return set()
        prefix = next((name for name, module in task.named_modules() if module is student), None)
        if prefix is None:
            return set()
        return {f"{prefix}.{name}" if prefix else name for name in names()}

    def _make_optimizer(self, task: nn.Module) -> torch.optim.Optimizer:
        from timm.optim import create_optimizer_v2, param_groups_weight_decay

        cfg = self.config
        if not any(p.requires_grad for p in task.parameters()):
            raise ValueError("the task has no trainable parameters (requires_grad=True)")
        no_decay = self._no_weight_decay_names(task)
        return create_optimizer_v2(
            task,
            opt=cfg.opt,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.momentum,
            param_group_fn=lambda module: param_groups_weight_decay(module, cfg.weight_decay, no_weight_decay_list=no_decay),
            **cfg.opt_kwargs,
        )

    def _make_scheduler(self, updates_per_epoch: int) -> Any:
        cfg = self.config
        if cfg.sched == "none":
            return None
        if cfg.sched == "onecycle":
            kwargs: dict[str, Any] = {"pct_start": cfg.warmup_epochs / cfg.epochs if cfg.warmup_epochs else 0.3}
            if cfg.min_lr > 0:
                kwargs["final_div_factor"] = (cfg.lr / 25.0) / cfg.min_lr
            kwargs.update(cfg.sched_kwargs)
            return torch.optim.lr_scheduler.OneCycleLR(
                self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer,
                max_lr=cfg.lr, total_steps=cfg.epochs * updates_per_epoch, **kwargs,
            )
        from timm.scheduler import create_scheduler_v2

        per_epoch = cfg.sched == "plateau"  # timm's plateau scheduler only steps per epoch
        scheduler, _ = create_scheduler_v2(
            self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer,
            sched=cfg.sched,
            num_epochs=cfg.epochs,
            min_lr=cfg.min_lr,
            warmup_lr=cfg.warmup_lr,
            warmup_epochs=cfg.warmup_epochs,
            plateau_mode=cfg.select_mode,
            step_on_epochs=per_epoch,
            updates_per_epoch=updates_per_epoch,
            **cfg.sched_kwargs,
        )
        return scheduler

    def _reset_run_state(self) -> None:
        self.epoch = 0  # completed epochs
        self.global_step = 0  # optimizer updates
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.history: list[dict[str, Any]] = []
        self.final_val_metrics: dict[str, Any] | None = None
        # Written into checkpoints and the best model, so that a resume can tell whether both
        # come from one run (not `random`: seeded runs would all draw the same id).
        self.run_id = secrets.token_hex(8)

    def _prepare_loader(self, loader: Any) -> Any:
        if getattr(loader, "_is_accelerate_prepared", False):
            return loader
        cached = self._prepared_loaders.get(id(loader))
        if cached is not None and cached[0] is loader:
            return cached[1]
        prepared = self.accelerator.prepare(loader)
        self._prepared_loaders[id(loader)] = (loader, prepared)
        return prepared

    @property
    def student(self) -> nn.Module:
        """The student, without DDP / compile wrappers."""
        return unwrap_model(unwrap_model(self.task).student)

    @property
    def best_model_path(self) -> Path:
        return self.output_dir / "best_model.safetensors"

    @property
    def checkpoint_root(self) -> Path:
        return self.output_dir / "checkpoints"

    # ------------------------------------------------------------------ public API
    def fit(self, train_loader: Any, val_loader: Any | None = None, *, resume: bool | PathType = False) -> FitResult:
        """Trains for ``config.epochs`` epochs.

        Args:
            train_loader: A ``DataLoader`` of ``(images, labels)`` (or dicts), with a length.
            val_loader: Validation data choosing the best model; never pass the test set.
            resume: ``True`` continues from ``output_dir/checkpoints/last`` (starting afresh when
                there is none); a path continues from that checkpoint (or run directory).

        Returns:
            The run's `FitResult`.

        Raises:
            NonFiniteLossError: a loss became NaN or infinite (the last good checkpoint is kept).
            ResumeError: the checkpoint was written with another config, model, data or classes.
        """
        acc, cfg = self.accelerator, self.config
        # GradientState is process-wide: re-apply this run's accumulation in case another Trainer changed it.
        acc.gradient_accumulation_steps = cfg.grad_accum_steps
        train_dl = self._prepare_loader(train_loader)
        val_dl = self._prepare_loader(val_loader) if val_loader is not None else None
        try:
            batches = len(train_dl)
        except TypeError:
            raise TypeError("train_loader must have a length (a map-style dataset or a sized iterable)") from None
        if batches == 0:
            raise ValueError("train_loader yields no batch")
        if getattr(train_dl, "persistent_workers", False):
            warnings.warn("persistent_workers=True: worker-side augmentation randomness is not reseeded per epoch, "
                          "so a resumed run may differ from an uninterrupted one", stacklevel=2)
        self._updates_per_epoch = math.ceil(batches / cfg.grad_accum_steps)
        self.scheduler = self._make_scheduler(self._updates_per_epoch)
        self._reset_run_state()

        checkpoint = self._resume_dir(resume)
        if checkpoint is not None:
            self._load_checkpoint(checkpoint)
            self._rewrite_metric_files()
            if self.epoch >= cfg.epochs:
                logger.info("%s already holds the finished run (%d epochs)", checkpoint, self.epoch)
                return self._result()
        else:
            if find_checkpoint(self.checkpoint_root) is not None:
                logger.warning("starting afresh in %s: its checkpoint will be replaced (pass resume=True to continue it)",
                               self.output_dir)
            self._rewrite_metric_files()

        trackers_started = self._start_trackers()
        try:
            for epoch in range(self.epoch, cfg.epochs):
                self._run_epoch(epoch, train_dl, val_dl)
        finally:
            if trackers_started:
                acc.end_training()
        return self._result()

    def evaluate(self, loader: Any) -> dict[str, Any]:
        """Evaluates the student (unwrapped, eval mode) on ``loader``.

        Returns:
            ``kdkit.metrics.classification_metrics`` (accuracy, balanced_accuracy, macro_f1,
            per_class_recall, confusion_matrix, num_samples) plus ``loss`` (mean cross-entropy).
        """
        return self._evaluate(self._prepare_loader(loader))

    # ------------------------------------------------------------------ epochs
    def _seed_epoch(self, epoch: int, loader: Any) -> None:
        """Makes every random draw of this epoch a function of (seed, epoch): resume is exact."""
        cfg, acc = self.config, self.accelerator
        process_seed = _derive_seed(cfg.seed, epoch, acc.process_index + 1)
        random.seed(process_seed)
        np.random.seed(process_seed)
        torch.manual_seed(process_seed)  # also seeds every CUDA device
        data_seed = _derive_seed(cfg.seed, epoch, 0)
        from accelerate.data_loader import SeedableRandomSampler

        seen: set[int] = set()
        stack = [loader]
        while stack:
            obj = stack.pop()
            if obj is None or id(obj) in seen:
                continue
            seen.add(id(obj))
            if isinstance(obj, SeedableRandomSampler):
                obj.initial_seed = _derive_seed(cfg.seed, 0, 0)  # + epoch, through set_epoch below
            generator = obj.__dict__.get("generator") if hasattr(obj, "__dict__") else None
            if isinstance(generator, torch.Generator):
                generator.manual_seed(data_seed)
            synced = obj.__dict__.get("synchronized_generator") if hasattr(obj, "__dict__") else None
            if isinstance(synced, torch.Generator):
                synced.manual_seed(data_seed)
            for attr in ("base_dataloader", "sampler", "batch_sampler"):
                child = obj.__dict__.get(attr) if hasattr(obj, "__dict__") else None
                if child is not None:
                    stack.append(child)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)

    def _check_loss(self, out: StepOutput, epoch: int, batch: int, batches: int) -> float:
        if not isinstance(out, StepOutput) and not hasattr(out, "loss"):
            raise TypeError(f"the task must return a StepOutput, got {type(out).__name__}")
        if out.loss is None:
            raise ValueError("the task returned no loss (were labels given?)")
        value = float(out.loss.detach().float().item())
        local_bad = not math.isfinite(value)
        any_bad = local_bad
        acc = self.accelerator
        if acc.num_processes > 1:
            flag = torch.tensor([1.0 if local_bad else 0.0], device=acc.device)
            any_bad = bool(acc.reduce(flag, reduction="sum").item() > 0)
        if not any_bad:
            return value
        terms = {k: float(v) for k, v in (out.terms or {}).items()}
        bad_terms = [k for k, v in terms.items() if not math.isfinite(v)]
        where = f"epoch {epoch + 1}/{self.config.epochs}, batch {batch + 1}/{batches}, step {self.global_step + 1}"
        if not local_bad:
            what = f"a non-finite loss on another process (process {acc.process_index} had {value:g})"
            bad_terms = []
        elif bad_terms:
            what = "non-finite loss term(s) " + ", ".join(f"{k!r}={terms[k]}" for k in bad_terms) + f" (total loss {value})"
        else:
            what = f"a non-finite total loss ({value}) although every term is finite"
            bad_terms = ["loss"]
        all_terms = ", ".join(f"{k}={v:.6g}" for k, v in terms.items()) or "none reported"
        kept = find_checkpoint(self.checkpoint_root)
        raise NonFiniteLossError(
            f"{what} at {where}; training stopped. "
            f"Terms: {all_terms}. Last good checkpoint: {kept if kept is not None else 'none yet'}.",
            terms=bad_terms, epoch=epoch + 1, batch=batch + 1, step=self.global_step + 1,
        )

    def _step_scheduler_update(self) -> None:
        if self.scheduler is None or self.config.sched == "plateau":
            return
        if self.config.sched == "onecycle":
            if self.scheduler.last_epoch < self.scheduler.total_steps:
                self.scheduler.step()
        else:
            self.scheduler.step_update(num_updates=self.global_step)

    def _current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _train_one_epoch(self, epoch: int, loader: Any) -> dict[str, Any]:
        acc, cfg = self.accelerator, self.config
        self.task.train()
        self._seed_epoch(epoch, loader)
        batches = len(loader)
        sums: dict[str, float] = {"loss": 0.0}
        seen = 0
        start = time.perf_counter()
        bar = progress_bar(total=batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True,
                   disable=not (cfg.progress and acc.is_main_process))
        try:
            for index, batch in enumerate(loader):
                images, labels = _unpack_batch(batch)
                if labels is None:
                    raise ValueError("training batches need labels")
                if cfg.channels_last and images.dim() == 4:
                    images = images.contiguous(memory_format=torch.channels_last)
                with acc.accumulate(self.task):
                    out = self.task(images, labels)
                    loss_value = self._check_loss(out, epoch, index, batches)
                    acc.backward(out.loss)
                    if acc.sync_gradients and cfg.clip_grad_norm is not None:
                        acc.clip_grad_norm_(self.task.parameters(), cfg.clip_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                if acc.sync_gradients:
                    self.global_step += 1
                    self._step_scheduler_update()
                size = int(images.shape[0])
                seen += size
                sums["loss"] += loss_value * size
                for key, value in (out.terms or {}).items():
                    sums[key] = sums.get(key, 0.0) + float(value) * size
                bar.update(1)
                if (index + 1) % cfg.log_every == 0 or index + 1 == batches:
                    bar.set_postfix(loss=f"{sums['loss'] / max(seen, 1):.4f}", lr=f"{self._current_lr():.3g}")
        finally:
            bar.close()
        elapsed = time.perf_counter() - start

        keys = sorted(sums)
        dtype = torch.float64 if acc.device.type != "mps" else torch.float32
        totals = torch.tensor([float(seen)] + [sums[k] for k in keys], dtype=dtype, device=acc.device)
        if acc.num_processes > 1:
            totals = acc.reduce(totals, reduction="sum")
        totals = totals.cpu().tolist()
        count = max(totals[0], 1.0)
        row: dict[str, Any] = {"train_loss": totals[1 + keys.index("loss")] / count}
        for key in keys:
            if key != "loss":
                row[f"train_{key}"] = totals[1 + keys.index(key)] / count
        row["train_time"] = elapsed
        row["images_per_sec"] = totals[0] / elapsed if elapsed > 0 else float("nan")
        return row

    def _improved(self, value: float) -> bool:
        if value is None or not math.isfinite(value):
            return False
        if self.best_metric is None:
            return True
        return value < self.best_metric if self.config.select_mode == "min" else value > self.best_metric

    def _run_epoch(self, epoch: int, train_dl: Any, val_dl: Any | None) -> None:
        acc, cfg = self.accelerator, self.config
        start = time.perf_counter()
        row: dict[str, Any] = {"epoch": epoch + 1, "global_step": 0, "lr": 0.0}
        row.update(self._train_one_epoch(epoch, train_dl))
        row["global_step"] = self.global_step
        row["lr"] = self._current_lr()

        improved = False
        if val_dl is not None:
            eval_start = time.perf_counter()
            metrics = self._evaluate(val_dl)
            row["eval_time"] = time.perf_counter() - eval_start
            if cfg.select_metric not in metrics or not isinstance(metrics[cfg.select_metric], (int, float)):
                scalars = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
                raise ValueError(f"TrainConfig.select_metric={cfg.select_metric!r} is not a validation metric; choose one of {scalars}")
            for key, value in metrics.items():
                row[f"val_{key}"] = value
            value = float(metrics[cfg.select_metric])
            improved = self._improved(value)
            if improved:
                self.best_metric, self.best_epoch = value, epoch + 1
            self.final_val_metrics = metrics
            if cfg.sched == "plateau" and self.scheduler is not None:
                self.scheduler.step(epoch + 1, value)
                row["lr"] = self._current_lr()
        else:
            improved = True
            self.best_epoch = epoch + 1
        row["is_best"] = improved
        row["epoch_time"] = time.perf_counter() - start
        for key in _TIME_KEYS:  # timings last
            if key in row:
                row[key] = row.pop(key)
        self.history.append(row)
        self.epoch = epoch + 1

        if improved:
            self._save_best_model(epoch + 1)
        self._append_metrics(row)
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        acc.log(scalars, step=epoch + 1)
        if acc.is_main_process:
            summary = ", ".join(f"{k}={v:.4g}" for k, v in scalars.items() if k in (
                "train_loss", "val_loss", f"val_{cfg.select_metric}", "lr", "images_per_sec"))
            logger.info("epoch %d/%d: %s%s", epoch + 1, cfg.epochs, summary, " (best)" if improved and val_dl is not None else "")
        if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
            self._check_parameters(epoch)
            self.save_checkpoint()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _evaluate(self, loader: Any) -> dict[str, Any]:
        from .metrics import classification_metrics

        acc, cfg = self.accelerator, self.config
        student = self.student
        was_training = student.training
        student.eval()
        preds: list[Tensor] = []
        targets: list[Tensor] = []
        loss_sum, count, num_classes = 0.0, 0, None
        try:
            for batch in loader:
                images, labels = _unpack_batch(batch)
                if labels is None:
                    raise ValueError("evaluation batches need labels")
                if cfg.channels_last and images.dim() == 4:
                    images = images.contiguous(memory_format=torch.channels_last)
                with acc.autocast():
                    output = student(images)
                logits = mean_of_heads(output).float()
                num_classes = logits.shape[-1]
                losses = F.cross_entropy(logits, labels, reduction="none")
                pred, label, loss = acc.gather_for_metrics((logits.argmax(-1), labels, losses))
                preds.append(pred.cpu())
                targets.append(label.cpu())
                loss_sum += float(loss.double().sum().item())
                count += int(loss.numel())
        finally:
            student.train(was_training)
        if count == 0:
            raise ValueError("the evaluation loader yields no sample")
        names = self.class_names if self.class_names is not None else [str(i) for i in range(num_classes or 0)]
        metrics = dict(classification_metrics(torch.cat(targets).numpy(), torch.cat(preds).numpy(), names))
        metrics["loss"] = loss_sum / count
        return _jsonable(metrics)

    # ------------------------------------------------------------------ files
    def _save_best_model(self, epoch: int) -> None:
        acc, cfg = self.accelerator, self.config
        if acc.is_main_process:
            student = self.student
            meta: dict[str, Any] = {}
            if self.class_names is not None:
                meta["classes"] = self.class_names
            if isinstance(getattr(student, "num_classes", None), int):
                meta["num_classes"] = student.num_classes
            architecture = (getattr(student, "pretrained_cfg", None) or {}).get("architecture")
            if architecture:
                meta["model_name"] = architecture
            meta.update({"epoch": epoch, "select_metric": cfg.select_metric, "metric_value": self.best_metric,
                         "run_id": self.run_id})
            meta.update(self.metadata)
            save_model(student, self.best_model_path, metadata=meta)
        acc.wait_for_everyone()

    def _append_metrics(self, row: Mapping[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(_jsonable(row)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._write_csv()

    def _rewrite_metric_files(self) -> None:
        """Makes metrics.jsonl / metrics.csv hold exactly ``self.history`` (used at the start of fit)."""
        if not self.accelerator.is_main_process:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(_jsonable(row)) + "\n" for row in self.history)
        atomic_write_text(self.output_dir / "metrics.jsonl", text)
        self._write_csv()

    def _write_csv(self) -> None:
        rows = [_flatten_for_csv(row, self.class_names) for row in self.history]
        columns: list[str] = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        if columns:
            writer.writeheader()
            writer.writerows(rows)
        atomic_write_text(self.output_dir / "metrics.csv", buffer.getvalue())

    def _start_trackers(self) -> bool:
        acc = self.accelerator
        if not getattr(acc, "log_with", None) or acc.trackers:
            return False
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v))
                   for k, v in self.config.to_dict().items()}
        acc.init_trackers("kdkit", config=hparams)
        return True

    def _check_parameters(self, epoch: int) -> None:
        finite = torch.stack([p.detach().isfinite().all() for p in self.task.parameters()]).all()
        if not bool(finite.item()):
            kept = find_checkpoint(self.checkpoint_root)
            raise NonFiniteLossError(
                f"parameters became non-finite during epoch {epoch + 1}/{self.config.epochs}; the checkpoint is not "
                f"overwritten. Last good checkpoint: {kept if kept is not None else 'none yet'}.",
                terms=["parameters"], epoch=epoch + 1,
            )

    # ------------------------------------------------------------------ checkpoints
    def _state_record(self) -> dict[str, Any]:
        config = self.config.to_dict()
        config["mixed_precision"] = str(self.accelerator.mixed_precision)
        return {
            "format_version": _STATE_VERSION,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "history": _jsonable(self.history),
            "final_val_metrics": self.final_val_metrics,
            "finished": self.epoch >= self.config.epochs,
            "config": config,
            "model": _model_signature(self.task),
            "class_names": self.class_names,
            "updates_per_epoch": self._updates_per_epoch,
            "num_processes": self.accelerator.num_processes,
            "run_id": self.run_id,
        }

    def save_checkpoint(self) -> Path:
        """Writes the full training state to ``output_dir/checkpoints/last``, atomically.

        The state is saved into ``checkpoints/last.tmp`` (``accelerator.save_state``, the
        scheduler, everything fsynced, then ``trainer_state.json`` written atomically as the
        completion marker); then ``last`` is renamed to ``last.old``, ``last.tmp`` to ``last``,
        and ``last.old`` is kept as ``epoch_NNNN`` (``keep_last > 1``) or discarded (renamed to
        ``.trash-*``, then deleted, so a half-deleted directory never looks complete). A kill at
        any point leaves a complete checkpoint: ``last``, or ``last.old`` between the two
        renames, which :func:`find_checkpoint` resolves and the next save or resume repairs.
        """
        acc = self.accelerator
        root = self.checkpoint_root
        tmp = root / "last.tmp"
        if acc.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            _recover_checkpoints(root, self.config.keep_last)
            if tmp.exists():
                shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(os.fspath(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            if self.scheduler is not None:
                torch.save(self._scheduler_state(), tmp / _SCHEDULER_FILE)
            _fsync_tree(tmp)
            atomic_write_text(tmp / _STATE_FILE, json.dumps(self._state_record(), indent=1))
            _commit_checkpoint(root, tmp, self.config.keep_last)
        acc.wait_for_everyone()
        return root / "last"

    def _resume_dir(self, resume: bool | PathType) -> Path | None:
        acc = self.accelerator
        if resume is False or resume is None:
            return None
        if resume is True:
            if acc.is_main_process and self.checkpoint_root.is_dir():
                _recover_checkpoints(self.checkpoint_root, self.config.keep_last)
            acc.wait_for_everyone()
            found = find_checkpoint(self.checkpoint_root)
            if found is None:
                logger.info("no checkpoint in %s: starting from scratch", self.checkpoint_root)
            return found
        if not isinstance(resume, (str, PathLike)):
            raise TypeError(f"resume must be a bool or a path, got {type(resume).__name__}")
        found = find_checkpoint(resume)
        if found is None:
            raise FileNotFoundError(f"no complete checkpoint at {resume} (expected a directory with {_STATE_FILE})")
        return found

    def _check_compatible(self, state: Mapping[str, Any], path: Path) -> None:
        if state.get("format_version") != _STATE_VERSION:
            raise ResumeError(f"{path}: unsupported checkpoint format {state.get('format_version')!r}")
        problems: list[str] = []
        saved_config = state.get("config", {})
        current = self.config.to_dict()
        current["mixed_precision"] = str(self.accelerator.mixed_precision)
        for name in sorted(set(saved_config) | set(current)):
            if name in _RESUME_FREE_FIELDS:
                continue
            if saved_config.get(name) != current.get(name):
                problems.append(f"config field {name!r}: checkpoint {saved_config.get(name)!r}, now {current.get(name)!r}")
        model = _model_signature(self.task)
        if state.get("model") != model:
            saved = state.get("model") or {}
            problems.append(
                f"model: checkpoint {saved.get('task')}/{saved.get('student')} with {saved.get('num_tensors')} tensors, "
                f"now {model['task']}/{model['student']} with {model['num_tensors']} tensors"
                + (" (same classes, different names or shapes)" if saved.get("student") == model["student"] else ""))
        if state.get("class_names") != self.class_names:
            problems.append(f"class_names: checkpoint {state.get('class_names')}, now {self.class_names}")
        # A finished run is only collected, so another number of processes (which changes the
        # updates per epoch) may collect it.
        same_processes = state.get("num_processes") == self.accelerator.num_processes
        if not (same_processes or state.get("finished")):
            problems.append(f"num_processes: checkpoint {state.get('num_processes')}, now {self.accelerator.num_processes}")
        elif same_processes and state.get("updates_per_epoch") != self._updates_per_epoch:
            problems.append(
                f"train_loader: checkpoint had {state.get('updates_per_epoch')} optimizer updates per epoch, now "
                f"{self._updates_per_epoch} (different data or batch size)")
        if problems:
            raise ResumeError(f"cannot resume from {path}:\n  " + "\n  ".join(problems))

    def _scheduler_state(self) -> dict[str, Any]:
        inner = getattr(self.scheduler, "lr_scheduler", None)
        if self.config.sched == "plateau" and inner is not None:
            # timm's PlateauLRScheduler.state_dict() drops the patience and cooldown counters;
            # save its wrapped torch ReduceLROnPlateau whole so that resume stays exact.
            own = {k: v for k, v in vars(self.scheduler).items() if k not in ("optimizer", "lr_scheduler")}
            return {"plateau": own, "reduce_on_plateau": inner.state_dict()}
        return self.scheduler.state_dict()

    def _load_scheduler_state(self, state: dict[str, Any]) -> None:
        if self.config.sched == "plateau" and "reduce_on_plateau" in state:
            vars(self.scheduler).update(state["plateau"])
            self.scheduler.lr_scheduler.load_state_dict(state["reduce_on_plateau"])
        else:
            self.scheduler.load_state_dict(state)

    def _load_checkpoint(self, path: Path) -> None:
        state = _read_state(path)
        self._check_compatible(state, path)
        self._check_best_model_of_this_run(path, state)  # before loading: a refused resume changes nothing
        self.accelerator.load_state(os.fspath(path))
        if self.scheduler is not None:
            scheduler_file = path / _SCHEDULER_FILE
            if not scheduler_file.is_file():
                raise ResumeError(f"{path} has no scheduler state ({_SCHEDULER_FILE})")
            self._load_scheduler_state(torch.load(scheduler_file, map_location="cpu", weights_only=True))
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.best_metric = state.get("best_metric")
        self.best_epoch = state.get("best_epoch")
        self.history = list(state.get("history", []))
        self.final_val_metrics = state.get("final_val_metrics")
        self.run_id = state.get("run_id") or self.run_id  # checkpoints before run ids have none
        logger.info("resumed from %s after epoch %d (step %d)", path, self.epoch, self.global_step)

    def _check_best_model_of_this_run(self, path: Path, state: Mapping[str, Any]) -> None:
        """Refuses a best model written by another run than the checkpoint's.

        A fresh start over a folder keeps the old checkpoint until its own first one; killed in
        between, it leaves the old checkpoint beside its new best model, which a resume would
        otherwise report as the old run's.
        """
        if state.get("run_id") is None or not self.best_model_path.is_file():
            return
        written_by = read_metadata(self.best_model_path).get("run_id")
        if written_by != state["run_id"]:
            raise ResumeError(
                f"{self.best_model_path} comes from another run than the checkpoint {path} (run "
                f"{written_by!r}, checkpoint run {state['run_id']!r}): a fresh start in {self.output_dir} "
                "was interrupted before its first checkpoint. Start afresh (resume=False) to train this run again."
            )

    def _result(self) -> FitResult:
        return FitResult(
            best_metric=self.best_metric,
            best_epoch=self.best_epoch,
            history=[dict(row) for row in self.history],
            best_model_path=self.best_model_path if self.best_model_path.is_file() else None,
            final_val_metrics=self.final_val_metrics,
            select_metric=self.config.select_metric,
            output_dir=self.output_dir,
        )


# =========================================================================== checkpoint directory swap
def _discard(path: Path) -> None:
    """Deletes a checkpoint directory so that no kill leaves a half-deleted one looking complete.

    It is first renamed to a ``.trash-*`` sibling (atomic), then removed; leftovers of a kill
    during the removal are cleaned by :func:`_recover_checkpoints`.
    """
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def _retire_previous(root: Path, keep_last: int) -> None:
    """Removes ``last.old`` (or keeps it as ``epoch_NNNN``) and prunes old epoch checkpoints."""
    old = root / "last.old"
    if old.exists():
        if keep_last > 1 and _is_complete(old):
            try:
                epoch = int(_read_state(old)["epoch"])
            except (ResumeError, KeyError, ValueError):
                epoch = -1
            if epoch >= 0:
                dest = root / f"epoch_{epoch:04d}"
                if dest.exists():
                    _discard(dest)
                os.rename(old, dest)
                fsync_dir(root)
        if old.exists():
            _discard(old)
    archived = sorted(p for p in root.glob("epoch_*") if p.is_dir())
    for stale in archived[: max(0, len(archived) - (keep_last - 1))]:
        _discard(stale)


def _recover_checkpoints(root: Path, keep_last: int) -> None:
    """Repairs what a kill during :meth:`Trainer.save_checkpoint` left behind (main process only)."""
    last, old, tmp = root / "last", root / "last.old", root / "last.tmp"
    if not _is_complete(last) and _is_complete(old):
        # Killed between the two renames: the previous checkpoint is last.old.
        if last.exists():
            broken = root / "last.incomplete"
            if broken.exists():
                _discard(broken)
            os.rename(last, broken)
        os.rename(old, last)
        fsync_dir(root)
    if _is_complete(last) and old.exists():
        _retire_previous(root, keep_last)
    if tmp.exists():
        shutil.rmtree(tmp)
    for trash in root.glob(".trash-*"):
        shutil.rmtree(trash, ignore_errors=True)


def _commit_checkpoint(root: Path, tmp: Path, keep_last: int) -> None:
    last, old = root / "last", root / "last.old"
    if last.exists():
        os.rename(last, old)
    os.rename(tmp, last)
    fsync_dir(root)
    _retire_previous(root, keep_last)
