"""A reusable training engine on HuggingFace Accelerate, with exact resume and safe checkpoints.

The engine trains a *task module* (see :mod:`kdkit.tasks`): an ``nn.Module`` whose
``forward(images, labels)`` returns a :class:`~kdkit.outputs.StepOutput` and which has a
``.student`` attribute (the model that is evaluated and exported). :class:`~kdkit.Distiller`
is one; :class:`~kdkit.tasks.Supervised` (plain training on labels) is the other::

    from kdkit.train import Supervised, TrainConfig, Trainer

    config = TrainConfig(epochs=30, lr=1e-3, output_dir="runs/resnet18", select_metric="balanced_accuracy")
    trainer = Trainer(Supervised(model), config, class_names=["benign", "malignant"])
    result = trainer.fit(train_loader, val_loader)          # fit(..., resume=True) after a crash
    test_metrics = trainer.test(test_loader)                # the best model on the test set

Everything goes through one :class:`accelerate.Accelerator` (device placement, DDP, mixed
precision, gradient accumulation, ``gather_for_metrics``), so the same code runs on a CPU, one
GPU or ``accelerate launch --num_processes N``. The training loop never waits for the device
within a logging interval: losses are summed and checked on the device
(:class:`~kdkit.loss_tracker.LossTracker`) and read back every ``log_every`` batches.

Files written to ``config.output_dir``:

* ``best_model.safetensors``: the student's weights whenever the validation metric improves
  (the last epoch's without a validation loader), with metadata (classes, epoch, metric).
* ``metrics.jsonl`` / ``metrics.csv``: one row per epoch (:class:`~kdkit.metrics_log.MetricsLog`).
* ``checkpoints/last/``: the full training state, replaced atomically at the end of every
  ``checkpoint_every`` epochs (:class:`~kdkit.checkpoint_manager.CheckpointManager`).

Resume is exact: shuffling and augmentation randomness are reseeded from ``(seed, epoch)`` at
every epoch start (:func:`kdkit.train_setup.seed_epoch`), so a run interrupted after epoch k and resumed ends
with the same parameters and metrics as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._json import to_jsonable
from ._progress import progress_bar
from .checkpoint import clean_stale_temporaries, load_model, save_model, unwrap_model
from .checkpoint_manager import (
    STATE_VERSION,
    CheckpointManager,
    ResumeError,
    RunExistsError,
    checkpoint_epoch,
    describe_run,
    find_checkpoint,
    model_signature,
    read_state,
)
from .evaluation import evaluate_classifier
from .fingerprint import run_fingerprint
from .loss_tracker import LossReading, LossTracker, NonFiniteBatch
from .metrics_log import MetricsLog, scalar_metrics
from .outputs import check_labels
from .run_lock import RunLock, RunLockedError, main_decides
from .schedulers import LRSchedule
from .tasks import Supervised
from .train_config import TrainConfig
from .train_setup import (
    build_optimizer,
    configure_accelerator,
    create_accelerator,
    distributed_without_accelerator,
    seed_epoch,
)
from .train_state import TrainState

__all__ = [
    "FitResult",
    "NonFiniteLossError",
    "ResumeError",
    "RunExistsError",
    "RunLockedError",
    "Supervised",
    "TrainConfig",
    "Trainer",
    "checkpoint_epoch",
    "distributed_without_accelerator",
    "find_checkpoint",
]

logger = logging.getLogger(__name__)

PathType = str | PathLike[str]
ImageTransform = Callable[[Tensor], Tensor]

_TIME_KEYS = ("epoch_time", "train_time", "eval_time", "images_per_sec")  # last in every row


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

    @classmethod
    def for_batch(cls, bad: NonFiniteBatch, *, epoch: int, epochs: int, batches: int, num_processes: int = 1,
                  kept: Path | None = None) -> NonFiniteLossError:
        """The error for the first non-finite batch ``bad`` of ``epoch`` (0-based); ``kept``: the last good checkpoint."""
        where = f"epoch {epoch + 1}/{epochs}, batch {bad.batch + 1}/{batches}, step {bad.step}"
        if num_processes > 1:
            where += f" on process {bad.process}"
        what, bad_terms = bad.describe()
        all_terms = ", ".join(f"{k}={v:.6g}" for k, v in bad.terms.items()) or "none reported"
        return cls(f"{what} at {where}; training stopped. Terms: {all_terms}. "
                   f"Last good checkpoint: {kept if kept is not None else 'none yet'}.",
                   terms=bad_terms, epoch=epoch + 1, batch=bad.batch + 1, step=bad.step)


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


def _fails_on_one_image(model: nn.Module, dataset: Any) -> bool:
    """Whether ``model`` fails on a training batch of one item of ``dataset``: batch norm over one
    value per channel (after pooling, or on a 1 x 1 map), found on the ``meta`` device.

    The model runs with ``meta`` copies of its parameters and buffers (:func:`torch.func.functional_call`):
    no memory, no compute, and its own statistics do not move.
    """
    if not any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules()):
        return False
    try:
        item = dataset[0]
        image = item[0] if isinstance(item, (tuple, list)) else item
        state = {name: torch.empty_like(tensor, device="meta")
                 for name, tensor in [*model.named_parameters(), *model.named_buffers()]}
        was_training = model.training
        model.train()
        try:
            with torch.no_grad():
                torch.func.functional_call(model, state, (torch.empty(1, *image.shape, device="meta"),))
        finally:
            model.train(was_training)
    except ValueError as error:
        return "Expected more than 1 value per channel" in str(error)
    except Exception:  # a model the meta device cannot run: the step's own check names the failure
        return False
    return False


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


class Trainer:
    """Trains a task module with Accelerate; see the module docstring.

    Args:
        task: A task module (``forward(images, labels) -> StepOutput`` and ``.student``), e.g.
            :class:`~kdkit.Distiller` or :class:`~kdkit.tasks.Supervised`.
        config: The :class:`~kdkit.train_config.TrainConfig`.
        accelerator: An ``accelerate.Accelerator`` to use; one is created from the config when
            ``None``. ``config.grad_accum_steps`` is applied to it either way.
        class_names: Class names, in label order; stored with the best model and used in the metrics.
        metadata: Extra JSON-serialisable metadata for ``best_model.safetensors`` (e.g.
            ``{"model_name": "resnet18", "image_size": 224}``).
        train_transform: Applied to every training image batch on the device (after Accelerate
            moved it there, before the task), e.g. batched augmentation of uint8 batches.
        eval_transform: Applied to every evaluation image batch on the device, before the student.
    """

    def __init__(
        self,
        task: nn.Module,
        config: TrainConfig,
        accelerator: Any | None = None,
        class_names: Sequence[str] | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        train_transform: ImageTransform | None = None,
        eval_transform: ImageTransform | None = None,
    ) -> None:
        if not isinstance(task, nn.Module) or not isinstance(getattr(task, "student", None), nn.Module):
            raise TypeError("task must be an nn.Module with a `.student` module (e.g. kdkit.Distiller or kdkit.train.Supervised)")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        for name, transform in (("train_transform", train_transform), ("eval_transform", eval_transform)):
            if transform is not None and not callable(transform):
                raise TypeError(f"{name} must be callable(images) -> images, got {type(transform).__name__}")
        self.config = config
        self.class_names = [str(c) for c in class_names] if class_names is not None else None
        self.metadata = to_jsonable(dict(metadata or {}))
        self.output_dir = Path(config.output_dir)
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.accelerator = accelerator if accelerator is not None else create_accelerator(config, task)
        configure_accelerator(self.accelerator, config, task, given=accelerator is not None)

        if config.channels_last:
            task.student.to(memory_format=torch.channels_last)
        if config.compile:
            task.student.compile()  # in place: the state-dict keys keep their names
        self.task, self.optimizer = self.accelerator.prepare(task, build_optimizer(task, config))
        self.ema: nn.Module | None = None
        if config.ema_decay is not None:
            from timm.utils import ModelEmaV3

            # Warmed up (timm's schedule), so that a short run's average is not its initial weights.
            self.ema = ModelEmaV3(self.student, decay=config.ema_decay, use_warmup=True)
            self.ema.requires_grad_(False)
            self.accelerator.register_for_checkpointing(self.ema)  # saved and restored with the checkpoints: exact resume
        self.schedule: LRSchedule | None = None  # built by fit(): it needs the updates per epoch
        self.checkpoints = CheckpointManager(self.output_dir / "checkpoints", self.accelerator, config.keep_last)
        self.metrics_log = MetricsLog(self.accelerator, self.output_dir, self.class_names)
        self.state = TrainState()
        self._prepared_loaders: dict[int, tuple[Any, Any]] = {}
        self._updates_per_epoch: int | None = None
        self._fingerprint: dict[str, Any] | None = None  # of this fit's run
        self._num_outputs: int | None = None

    @property
    def student(self) -> nn.Module:
        """The student, without DDP / compile wrappers."""
        return unwrap_model(unwrap_model(self.task).student)

    @property
    def evaluated_model(self) -> nn.Module:
        """What is validated, selected and saved as the best model: the student, or its weight average (``ema_decay``)."""
        return self.ema.module if self.ema is not None else self.student

    @property
    def scheduler(self) -> Any:
        """The timm or torch scheduler of the last ``fit`` (``None`` before it and with ``sched="none"``)."""
        return self.schedule.scheduler if self.schedule is not None else None

    @property
    def best_model_path(self) -> Path:
        return self.output_dir / "best_model.safetensors"

    @property
    def checkpoint_root(self) -> Path:
        return self.checkpoints.root

    # ------------------------------------------------------------------ public API
    def fit(self, train_loader: Any, val_loader: Any | None = None, *, resume: bool | PathType = False,
            overwrite: bool = False) -> FitResult:
        """Trains for ``config.epochs`` epochs.

        While it trains, the main process holds a lock on ``output_dir``
        (:class:`~kdkit.run_lock.RunLock`): a second process started on the same folder stops at
        once. The temporary files a killed write left there are removed first
        (:func:`~kdkit.checkpoint.clean_stale_temporaries`).

        Args:
            train_loader: A ``DataLoader`` of ``(images, labels)`` (or dicts), with a length.
            val_loader: Validation data choosing the best model; never pass the test set.
            resume: ``True`` continues from ``output_dir/checkpoints/last`` (starting afresh when
                there is none); a path continues from that checkpoint (or run directory).
            overwrite: Without ``resume``, start afresh even though ``output_dir`` holds a run
                (a checkpoint or a best model), which is then replaced. Without it, such a
                start is refused.

        Returns:
            The run's `FitResult`.

        Raises:
            NonFiniteLossError: A loss became NaN or infinite (the last good checkpoint is kept).
            ResumeError: The checkpoint was written with another config, model, data or classes.
            RunExistsError: ``output_dir`` holds a run, and neither ``resume`` nor ``overwrite`` was given.
            RunLockedError: Another process is training in ``output_dir``.
        """
        lock = RunLock(self.output_dir)
        main_decides(lambda: lock.acquire() and None)  # the main process locks for all; its refusal stops all
        try:
            # What a killed write of kdkit's left (a best model's or a metrics file's temporary): never a
            # live writer's, nor a file kdkit cannot tell is its own (the folder is the user's).
            main_decides(lambda: clean_stale_temporaries(self.output_dir, max_age=None) and None)
            return self._fit(train_loader, val_loader, resume=resume, overwrite=overwrite)
        finally:
            lock.release()

    def _fit(self, train_loader: Any, val_loader: Any | None, *, resume: bool | PathType, overwrite: bool) -> FitResult:
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
            warnings.warn("persistent_workers=True: the workers' random state and the shuffling order are not reseeded per epoch, "
                          "so a resumed run may differ from an uninterrupted one", stacklevel=2)
        self._updates_per_epoch = math.ceil(batches / cfg.grad_accum_steps)
        self.schedule = LRSchedule(cfg, self.optimizer, self._updates_per_epoch)
        self.state = TrainState()
        self._fingerprint = run_fingerprint(self.task, {"train": train_loader, "val": val_loader})
        if acc.is_main_process:
            self._warn_unchecked(self._fingerprint)
        self._check_data(train_loader)

        checkpoint = self.checkpoints.resolve(resume)
        if checkpoint is not None:
            self._load_checkpoint(checkpoint)
            self.metrics_log.rewrite(self.state.history)
            if self.state.epoch >= cfg.epochs:
                logger.info("%s already holds the finished run (%d epochs)", checkpoint, self.state.epoch)
                return self._result()
        else:
            main_decides(lambda: self._check_fresh_start(overwrite, resumed=resume is not False))
            self.metrics_log.rewrite([])

        trackers_started = self.metrics_log.start_trackers(cfg.to_dict())
        try:
            for epoch in range(self.state.epoch, cfg.epochs):
                self._run_epoch(epoch, train_dl, val_dl)
        finally:
            if trackers_started:
                self.metrics_log.end_trackers()
        return self._result()

    @staticmethod
    def _warn_unchecked(fingerprint: Mapping[str, Any]) -> None:
        """Says what a resume of this run cannot compare: data kdkit cannot look into, loss options it cannot read."""
        for name, record in fingerprint.get("data", {}).items():
            if record.get("content") == "unchecked":
                logger.warning("the %s data (%s) cannot be fingerprinted, so a resume would not notice other items of the "
                               "same count; give it a fingerprint() method (kdkit.fingerprint)", name, record.get("kind"))
        terms = (fingerprint.get("objective") or {}).get("terms") or {}
        for term, described in terms.items():
            if unread := (described.get("options") or {}).get("unread"):
                logger.warning("loss %r keeps its options %s under no attribute of the same name, so a resume would not "
                               "notice them change", term, unread)

    def _check_data(self, train_loader: Any) -> None:
        """Refuses, before training, labels outside the classes and a training batch of one image under batch norm."""
        self._num_outputs = len(self.class_names) if self.class_names is not None else None
        outputs = getattr(self.student, "num_classes", None)
        if isinstance(outputs, int) and outputs > 0:
            self._check_outputs(outputs)  # a student that declares its outputs: before the first batch
        limit = self._num_outputs
        for name, record in (self._fingerprint or {}).get("data", {}).items():
            label_range = record.get("label_range")
            if limit is not None and label_range is not None and (label_range[0] < 0 or label_range[1] >= limit):
                raise ValueError(
                    f"the {name} data's labels range over {label_range[0]}..{label_range[1]}, outside the {limit} classes "
                    f"(0..{limit - 1}); a label of -100 would be ignored by the cross-entropy without a word")
        batch_size, drop_last = getattr(train_loader, "batch_size", None), getattr(train_loader, "drop_last", True)
        size = len(train_loader.dataset) if hasattr(train_loader, "dataset") and hasattr(train_loader.dataset, "__len__") else None
        if (self.accelerator.num_processes == 1 and isinstance(batch_size, int) and batch_size > 1 and not drop_last
                and size is not None and size % batch_size == 1 and self.train_transform is None
                and _fails_on_one_image(self.student, train_loader.dataset)):
            raise ValueError(
                f"the training loader's last batch holds one image ({size} images at batch size {batch_size}), and "
                "the student's batch norm cannot train on one: use drop_last=True (kdkit.data.make_loader does), or "
                "another batch size")

    def _check_fresh_start(self, overwrite: bool, resumed: bool = False) -> None:
        """Refuses a fresh start over a run's results unless ``overwrite``; says what it replaces when it may.

        With ``resume`` and no checkpoint to continue (a run killed before its first one), the
        start is what was asked for: it replaces the run's best model, with a warning.
        """
        existing = describe_run(self.output_dir)
        if existing is None:
            return
        if resumed:
            logger.warning("resume: %s holds no checkpoint to continue; starting afresh, replacing %s", self.output_dir, existing)
            return
        if not overwrite:
            raise RunExistsError(
                f"{self.output_dir} holds {existing}; a fresh start would replace it. Pass resume=True (--resume) to "
                "continue or collect it, overwrite=True (--overwrite) to train it again from scratch, or choose "
                "another output folder")
        logger.warning("overwrite: starting afresh in %s, replacing %s", self.output_dir, existing)

    def evaluate(self, loader: Any) -> dict[str, Any]:
        """Evaluates the student (unwrapped, eval mode; its weight average with ``ema_decay``) on ``loader``, as it is now.

        Returns:
            ``kdkit.metrics.classification_metrics`` (accuracy, balanced_accuracy, macro_f1,
            per_class_recall, confusion_matrix, num_samples) plus ``loss``: the mean of the
            task's ``validation_loss`` (cross-entropy when it has none).
        """
        return self._evaluate(self._prepare_loader(loader))

    def test(self, loader: Any) -> dict[str, Any]:
        """Loads the best model into the student and evaluates it on ``loader`` (the test set, once).

        Returns:
            The metrics of :meth:`evaluate`. The student keeps the best model's weights.

        Raises:
            FileNotFoundError: ``output_dir`` holds no ``best_model.safetensors`` (``fit`` writes it).
            kdkit.checkpoint.CheckpointError: It was saved for other class names or another model.
        """
        if not self.best_model_path.is_file():
            raise FileNotFoundError(f"no best model to test in {self.output_dir}: {self.best_model_path.name} is written "
                                    "by fit(); train (or resume) the run first")
        load_model(self.student, self.best_model_path, expected_classes=self.class_names)
        return self._evaluate(self._prepare_loader(loader), self.student)  # the best model, the average's with ema_decay

    def save_checkpoint(self) -> Path:
        """Writes the full training state to ``output_dir/checkpoints/last``, atomically (see
        :meth:`~kdkit.checkpoint_manager.CheckpointManager.save`)."""
        return self.checkpoints.save(self._state_record(), self.schedule)

    # ------------------------------------------------------------------ epochs
    def _prepare_loader(self, loader: Any) -> Any:
        if getattr(loader, "_is_accelerate_prepared", False):
            return loader
        cached = self._prepared_loaders.get(id(loader))
        if cached is not None and cached[0] is loader:
            return cached[1]
        prepared = self.accelerator.prepare(loader)
        self._prepared_loaders[id(loader)] = (loader, prepared)
        return prepared

    def _model_input(self, batch: object, transform: ImageTransform | None, stage: str) -> tuple[Tensor, Tensor]:
        images, labels = _unpack_batch(batch)
        if labels is None:
            raise ValueError(f"{stage} batches need labels")
        check_labels(labels, images.shape[0])
        if transform is not None:
            images = transform(images)
        elif images.dtype == torch.uint8:
            option = "train_transform" if stage == "training" else "eval_transform"
            raise TypeError(f"the {stage} images reach the model as {images.dtype} batches: pass Trainer({option}=...), "
                            "a callable that turns them into normalised float batches on the device")
        if self.config.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels

    def _train_one_epoch(self, epoch: int, loader: Any) -> dict[str, Any]:
        acc, cfg = self.accelerator, self.config
        self.task.train()
        seed_epoch(loader, cfg.seed, epoch, acc.process_index)
        batches = len(loader)
        tracker = LossTracker(acc.device, acc.num_processes, acc.gather)
        start = time.perf_counter()
        bar = progress_bar(total=batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True,
                           disable=not (cfg.progress and acc.is_main_process))
        try:
            for index, batch in enumerate(loader):
                images, labels = self._model_input(batch, self.train_transform, "training")
                first = index == 0 and epoch == self.state.epoch
                with acc.accumulate(self.task):
                    out = self._training_step(images, labels, epoch, index, batches)
                    if first:
                        self._check_outputs(int(out.logits.shape[-1]))
                    acc.backward(out.loss)
                    if acc.sync_gradients and cfg.clip_grad_norm is not None:
                        acc.clip_grad_norm_(self.task.parameters(), cfg.clip_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                tracker.update(out.loss, out.terms or {}, size=images.shape[0], step=self.state.global_step + 1,
                               labels=labels, num_classes=self._num_outputs)
                if acc.sync_gradients:
                    self.state.global_step += 1
                    self.schedule.step_update(self.state.global_step)
                    if self.ema is not None:
                        self.ema.update(self.student, step=self.state.global_step)
                bar.update(1)
                if (index + 1) % cfg.log_every == 0 and index + 1 < batches:  # the epoch end reads below
                    self._read_losses(tracker, epoch, batches, bar)
            reading = self._read_losses(tracker, epoch, batches, bar)
        finally:
            bar.close()
        elapsed = time.perf_counter() - start  # after the read-back: the device has finished the epoch
        row: dict[str, Any] = {"train_loss": reading.loss}
        row.update({f"train_{name}": value for name, value in sorted(reading.terms.items())})
        row["train_time"] = elapsed
        row["images_per_sec"] = reading.samples / elapsed if elapsed > 0 else float("nan")
        return row

    def _training_step(self, images: Tensor, labels: Tensor, epoch: int, index: int, batches: int) -> Any:
        try:
            out = self.task(images, labels)
        except IndexError as error:  # a class index past the logits (the CPU's cross-entropy checks; CUDA's asserts)
            if "out of bounds" not in str(error) or labels.dim() != 1 or labels.is_floating_point():
                raise
            low, high = int(labels.min()), int(labels.max())
            if self._num_outputs is not None and (low < 0 or high >= self._num_outputs):
                self._refuse_labels(low, high, epoch, index, batches)
            names = f" ({len(self.class_names)} class_names)" if self.class_names is not None else ""
            raise ValueError(
                f"batch {index + 1}/{batches} of epoch {epoch + 1} has labels {low}..{high}, which the loss cannot find "
                f"among the student's logits{names}: {error}. Check the labels and the student's number of outputs"
            ) from error
        except ValueError as error:
            if "Expected more than 1 value per channel" not in str(error):
                raise
            raise ValueError(
                f"batch {index + 1}/{batches} of epoch {epoch + 1} holds {images.shape[0]} image(s) per batch-norm channel, "
                "and batch norm cannot train on one: drop the last partial batch (drop_last=True) or choose a batch size "
                "that leaves none of one") from error
        if not hasattr(out, "loss"):
            raise TypeError(f"the task must return a StepOutput, got {type(out).__name__}")
        if out.loss is None:
            raise ValueError("the task returned no loss (were labels given?)")
        return out

    def _refuse_labels(self, low: int, high: int, epoch: int, batch: int, batches: int, process: int = 0) -> None:
        """Stops training on class indices outside ``[0, outputs)`` (found before the loss, or by the device's check)."""
        where = f" on process {process}" if self.accelerator.num_processes > 1 else ""
        raise ValueError(
            f"batch {batch + 1}/{batches} of epoch {epoch + 1}{where} has labels {low}..{high}, outside the student's "
            f"{self._num_outputs} classes (0..{self._num_outputs - 1}); a label of -100 would be ignored by the "
            "cross-entropy without a word. Training stopped.")

    def _check_outputs(self, outputs: int) -> None:
        """The class names must name every one of the student's ``outputs``, no more and no fewer."""
        if self.class_names is not None and len(self.class_names) != outputs:
            raise ValueError(f"{len(self.class_names)} class_names ({self.class_names}) for a student with {outputs} outputs")
        self._num_outputs = outputs

    def _read_losses(self, tracker: LossTracker, epoch: int, batches: int, bar: Any) -> LossReading:
        """The interval's one host sync: reads the losses back and stops on a non-finite one."""
        reading = tracker.read()
        if reading.bad_labels is not None:
            batch, process, low, high = reading.bad_labels
            self._refuse_labels(low, high, epoch, batch, batches, process)
        if reading.non_finite is not None:  # every process sees it at the same batch: all stop together
            raise NonFiniteLossError.for_batch(reading.non_finite, epoch=epoch, epochs=self.config.epochs, batches=batches,
                                               num_processes=self.accelerator.num_processes, kept=self.checkpoints.find())
        bar.set_postfix(loss=f"{reading.loss:.4f}", lr=f"{self._current_lr():.3g}")
        return reading

    def _current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _run_epoch(self, epoch: int, train_dl: Any, val_dl: Any | None) -> None:
        acc, cfg = self.accelerator, self.config
        start = time.perf_counter()
        row: dict[str, Any] = {"epoch": epoch + 1, "global_step": 0, "lr": 0.0}
        row.update(self._train_one_epoch(epoch, train_dl))
        row["global_step"] = self.state.global_step
        row["lr"] = self._current_lr()

        metrics, value = None, None
        if val_dl is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            eval_start = time.perf_counter()
            metrics = self._evaluate(val_dl)
            row["eval_time"] = time.perf_counter() - eval_start
            if cfg.select_metric not in metrics or not isinstance(metrics[cfg.select_metric], (int, float)):
                raise ValueError(f"TrainConfig.select_metric={cfg.select_metric!r} is not a validation metric; "
                                 f"choose one of {sorted(scalar_metrics(metrics))}")
            row.update({f"val_{key}": item for key, item in metrics.items()})
            value = float(metrics[cfg.select_metric])
            self.schedule.step_epoch(epoch + 1, value)
            row["lr"] = self._current_lr()
        if metrics is not None:
            improved = self.state.improves(value, cfg.select_mode)
        else:  # without validation the last epoch is the best; between validations, none is
            improved = val_dl is None
        if improved and metrics is not None and not math.isfinite(float(metrics.get("loss", 0.0))):
            # Non-finite logits on some validation image: the accuracy may still look fine, the model is not.
            improved = False
            if acc.is_main_process:
                logger.warning("epoch %d: the validation loss is %s, so this epoch's model is not taken as the best",
                               epoch + 1, metrics["loss"])
        row["is_best"] = improved
        row["epoch_time"] = time.perf_counter() - start
        row.update({key: row.pop(key) for key in _TIME_KEYS if key in row})  # timings last
        self.state.end_epoch(row, improved=improved, metric=value, val_metrics=metrics)

        checkpointing = (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs
        if improved or checkpointing:  # never save non-finite weights, as best model or checkpoint
            self._check_parameters(epoch)
        if improved:
            self._save_best_model(epoch + 1)
        self.metrics_log.append(row, self.state.history)
        self.metrics_log.log_trackers(row, step=epoch + 1)
        if acc.is_main_process:
            summary = ", ".join(f"{k}={v:.4g}" for k, v in scalar_metrics(row).items() if k in (
                "train_loss", "val_loss", f"val_{cfg.select_metric}", "lr", "images_per_sec"))
            logger.info("epoch %d/%d: %s%s", epoch + 1, cfg.epochs, summary, " (best)" if improved and val_dl is not None else "")
        if checkpointing:
            self.save_checkpoint()

    def _check_parameters(self, epoch: int) -> None:
        finite = torch.stack([p.detach().isfinite().all() for p in self.task.parameters()]).all()
        if not bool(finite.item()):  # once per checkpoint, not per step
            kept = self.checkpoints.find()
            raise NonFiniteLossError(
                f"parameters became non-finite during epoch {epoch + 1}/{self.config.epochs}; neither the checkpoint "
                f"nor the best model is overwritten. Last good checkpoint: {kept if kept is not None else 'none yet'}.",
                terms=["parameters"], epoch=epoch + 1,
            )

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, loader: Any, model: nn.Module | None = None) -> dict[str, Any]:
        batches = (self._model_input(batch, self.eval_transform, "evaluation") for batch in loader)
        task = unwrap_model(self.task)
        loss = getattr(task, "validation_loss", None)  # the task's, else cross-entropy
        return evaluate_classifier(model or self.evaluated_model, batches, self.accelerator, loss=loss, class_names=self.class_names,
                                   logits_fn=getattr(task, "student_logits", None))

    # ------------------------------------------------------------------ files
    def _save_best_model(self, epoch: int) -> None:
        acc, cfg = self.accelerator, self.config
        if acc.is_main_process:
            student = self.evaluated_model
            meta: dict[str, Any] = {}
            if self.class_names is not None:
                meta["classes"] = self.class_names
            if isinstance(getattr(student, "num_classes", None), int):
                meta["num_classes"] = student.num_classes
            architecture = (getattr(student, "pretrained_cfg", None) or {}).get("architecture")
            if architecture:
                meta["model_name"] = architecture
            meta.update({"epoch": epoch, "select_metric": cfg.select_metric, "metric_value": self.state.best_metric,
                         "run_id": self.state.run_id})
            meta.update(self.metadata)
            save_model(student, self.best_model_path, metadata=meta)
        acc.wait_for_everyone()

    def _state_record(self) -> dict[str, Any]:
        config = self.config.to_dict()
        config["mixed_precision"] = str(self.accelerator.mixed_precision)
        return {
            "format_version": STATE_VERSION,
            **self.state.to_dict(),
            "finished": self.state.epoch >= self.config.epochs,
            "config": config,
            "model": model_signature(self.task),
            "class_names": self.class_names,
            "updates_per_epoch": self._updates_per_epoch,
            "num_processes": self.accelerator.num_processes,
            "fingerprint": self._fingerprint,
        }

    def _load_checkpoint(self, path: Path) -> None:
        state = read_state(path)
        self.checkpoints.check_compatible(state, self._state_record(), path)
        self.checkpoints.check_best_model(self.best_model_path, state, path)  # before loading: a refusal changes nothing
        self.checkpoints.load(path, self.schedule)
        self.state = TrainState.from_dict(state)
        logger.info("resumed from %s after epoch %d (step %d)", path, self.state.epoch, self.state.global_step)

    def _result(self) -> FitResult:
        state = self.state
        return FitResult(
            best_metric=state.best_metric,
            best_epoch=state.best_epoch,
            history=[dict(row) for row in state.history],
            best_model_path=self.best_model_path if self.best_model_path.is_file() else None,
            final_val_metrics=state.final_val_metrics,
            select_metric=self.config.select_metric,
            output_dir=self.output_dir,
        )
