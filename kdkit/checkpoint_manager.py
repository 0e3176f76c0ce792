"""Resumable training checkpoints: atomic saves, crash recovery, and the checks before a resume.

A run's checkpoints live in ``output_dir/checkpoints``:

* ``last/``: the newest complete checkpoint (``accelerator.save_state`` output, the
  learning-rate schedule in ``kdkit_scheduler.pt``, and ``trainer_state.json``);
* ``epoch_NNNN/``: older ones kept with ``keep_last > 1``.

``trainer_state.json`` is written last, atomically: a directory holding it is complete. A
save goes to ``last.tmp``, then ``last`` is renamed to ``last.old`` and ``last.tmp`` to
``last``; so a kill at any moment leaves a complete checkpoint (``last``, or ``last.old``
between the two renames), which :func:`find_checkpoint` resolves and the next save or resume
repairs (:meth:`CheckpointManager.recover`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import atomic_write_text, fsync_dir, read_metadata
from .fingerprint import fingerprint_differences
from .schedulers import LRSchedule
from .taps import unwrap_model
from .train_config import RESUME_FREE_FIELDS

__all__ = [
    "SCHEDULER_FILE",
    "STATE_FILE",
    "STATE_VERSION",
    "CheckpointManager",
    "ResumeError",
    "RunExistsError",
    "checkpoint_epoch",
    "describe_run",
    "find_checkpoint",
    "model_signature",
    "read_state",
]

logger = logging.getLogger(__name__)

PathType = str | PathLike[str]

STATE_FILE = "trainer_state.json"  #: written last into a checkpoint: its presence marks it complete
SCHEDULER_FILE = "kdkit_scheduler.pt"
STATE_VERSION = 1


class ResumeError(ValueError):
    """A checkpoint cannot be resumed with this trainer (different config, model, data or classes)."""


class RunExistsError(FileExistsError):
    """A fresh start (no resume) over a folder that holds a run's results, without ``overwrite``."""


def _is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


def read_state(path: PathType) -> dict[str, Any]:
    """The ``trainer_state.json`` of the checkpoint directory ``path``.

    Raises:
        ResumeError: It is missing or unreadable.
    """
    path = Path(path)
    try:
        return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ResumeError(f"cannot read {path / STATE_FILE}: {exc}") from exc


def find_checkpoint(path: PathType) -> Path | None:
    """Returns the complete checkpoint directory designated by ``path``, or ``None``.

    ``path`` may be a run's ``output_dir``, its ``checkpoints`` folder or a checkpoint directory.
    A checkpoint caught between the two renames of an atomic swap (``last`` missing or
    incomplete, ``last.old`` complete) resolves to ``last.old``.
    """
    path = Path(path)
    for candidate in (path, path / "last", path / "checkpoints" / "last"):
        if _is_complete(candidate):
            return candidate
        previous = candidate.with_name(candidate.name + ".old")
        if candidate.name == "last" and _is_complete(previous):
            return previous
    return None


def checkpoint_epoch(path: PathType) -> int | None:
    """Returns the number of epochs the complete checkpoint at ``path`` holds, or ``None`` without one.

    ``path`` is resolved like :func:`find_checkpoint`; compare with ``TrainConfig.epochs`` to
    tell a finished run from an interrupted one without starting a Trainer.
    """
    found = find_checkpoint(path)
    return None if found is None else int(read_state(found)["epoch"])


def describe_run(output_dir: PathType) -> str | None:
    """What a fresh start in ``output_dir`` would throw away, in words; ``None`` when nothing.

    A run folder holds a checkpoint (a finished or an interrupted run) and/or a best model.
    """
    output_dir = Path(output_dir)
    found = find_checkpoint(output_dir / "checkpoints")
    parts: list[str] = []
    if found is not None:
        try:
            saved = read_state(found)
            epochs = saved.get("config", {}).get("epochs")
            state = "a finished run" if saved.get("finished") else "an interrupted run"
            parts.append(f"{state} (checkpoint after epoch {saved.get('epoch')} of {epochs}, {found})")
        except ResumeError:
            parts.append(f"a checkpoint ({found})")
    best = output_dir / "best_model.safetensors"
    if best.is_file():
        try:
            meta = read_metadata(best)
            value = meta.get("metric_value")
            detail = f"epoch {meta.get('epoch')}" + (f", val {meta.get('select_metric')} {value:.4g}" if isinstance(value, (int, float)) else "")
        except Exception:  # an unreadable best model is still a file a fresh start replaces
            detail = "unreadable metadata"
        parts.append(f"its best model ({best}, {detail})")
    return " and ".join(parts) or None


def model_signature(task: nn.Module) -> dict[str, Any]:
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


class CheckpointManager:
    """Saves, finds, repairs and restores the checkpoints in ``root``.

    Every method is called on all processes; files are moved by the main process only.

    Args:
        root: The run's ``checkpoints`` folder.
        accelerator: The run's ``accelerate.Accelerator`` (its ``save_state``/``load_state``).
        keep_last: How many checkpoints to keep (``last`` and ``keep_last - 1`` ``epoch_NNNN``).
    """

    def __init__(self, root: PathType, accelerator: Any, keep_last: int = 1) -> None:
        self.root = Path(root)
        self.accelerator = accelerator
        self.keep_last = keep_last

    # ------------------------------------------------------------------ finding
    def find(self) -> Path | None:
        """The newest complete checkpoint, or ``None``."""
        return find_checkpoint(self.root)

    def resolve(self, resume: bool | PathType | None) -> Path | None:
        """The checkpoint a ``fit(resume=...)`` continues from (``None``: start afresh).

        ``True`` is this run's newest checkpoint, repaired first, or ``None`` when there is none;
        a path must hold a complete checkpoint.

        Raises:
            FileNotFoundError: ``resume`` is a path without a complete checkpoint.
        """
        if resume is False or resume is None:
            return None
        if resume is True:
            self.recover()
            found = self.find()
            if found is None:
                logger.info("no checkpoint in %s: starting from scratch", self.root)
            return found
        if not isinstance(resume, (str, PathLike)):
            raise TypeError(f"resume must be a bool or a path, got {type(resume).__name__}")
        found = find_checkpoint(resume)
        if found is None:
            raise FileNotFoundError(f"no complete checkpoint at {resume} (expected a directory with {STATE_FILE})")
        return found

    # ------------------------------------------------------------------ saving
    def save(self, state: Mapping[str, Any], schedule: LRSchedule | None = None) -> Path:
        """Writes the full training state to ``root/last``, atomically.

        The Accelerator's state goes into ``last.tmp``, then the schedule's, everything is
        fsynced, ``trainer_state.json`` (``state``) is written atomically as the completion
        marker, and :meth:`commit` swaps ``last.tmp`` in.

        Returns:
            ``root / "last"``.
        """
        acc = self.accelerator
        tmp = self.root / "last.tmp"
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            self._recover()
            if tmp.exists():
                shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(os.fspath(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            if schedule is not None and schedule.active:
                torch.save(schedule.state_dict(), tmp / SCHEDULER_FILE)
            _fsync_tree(tmp)
            atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=1))
            self.commit(tmp)
        acc.wait_for_everyone()
        return self.root / "last"

    def commit(self, tmp: Path) -> None:
        """Makes the complete checkpoint ``tmp`` the new ``last`` (main process only).

        ``last`` is renamed to ``last.old``, ``tmp`` to ``last``; ``last.old`` is then kept as
        ``epoch_NNNN`` (``keep_last > 1``) or discarded.
        """
        last, old = self.root / "last", self.root / "last.old"
        if last.exists():
            os.rename(last, old)
        os.rename(tmp, last)
        fsync_dir(self.root)
        self._retire_previous()

    # ------------------------------------------------------------------ repairing
    def recover(self) -> None:
        """Repairs what a kill during :meth:`save` left behind; a no-op when nothing did."""
        if self.accelerator.is_main_process and self.root.is_dir():
            self._recover()
        self.accelerator.wait_for_everyone()

    def _recover(self) -> None:
        root = self.root
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
            self._retire_previous()
        if tmp.exists():
            shutil.rmtree(tmp)
        for trash in root.glob(".trash-*"):
            shutil.rmtree(trash, ignore_errors=True)

    def _retire_previous(self) -> None:
        """Removes ``last.old`` (or keeps it as ``epoch_NNNN``) and prunes old epoch checkpoints."""
        root = self.root
        old = root / "last.old"
        if old.exists():
            if self.keep_last > 1 and _is_complete(old):
                try:
                    epoch = int(read_state(old)["epoch"])
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
        for stale in archived[: max(0, len(archived) - (self.keep_last - 1))]:
            _discard(stale)

    # ------------------------------------------------------------------ resuming
    def check_compatible(self, saved: Mapping[str, Any], current: Mapping[str, Any], path: Path) -> None:
        """Refuses to resume ``saved`` (a checkpoint's state) with a trainer whose state is ``current``.

        Every config field except :data:`~kdkit.train_config.RESUME_FREE_FIELDS`, the model
        signature, the class names, the run's fingerprint (:mod:`kdkit.fingerprint`: the
        teachers' weights, the objective with its weights and options, the data's items and
        labels) and (unless the run is finished, so only collected) the number of processes and
        of optimizer updates per epoch must agree.

        Raises:
            ResumeError: Listing every difference.
        """
        if saved.get("format_version") != STATE_VERSION:
            raise ResumeError(f"{path}: unsupported checkpoint format {saved.get('format_version')!r}")
        problems: list[str] = []
        saved_config, config = saved.get("config", {}), current["config"]
        for name in sorted(set(saved_config) | set(config)):
            if name not in RESUME_FREE_FIELDS and saved_config.get(name) != config.get(name):
                problems.append(f"config field {name!r}: checkpoint {saved_config.get(name)!r}, now {config.get(name)!r}")
        model = current["model"]
        if saved.get("model") != model:
            old = saved.get("model") or {}
            problems.append(
                f"model: checkpoint {old.get('task')}/{old.get('student')} with {old.get('num_tensors')} tensors, "
                f"now {model['task']}/{model['student']} with {model['num_tensors']} tensors"
                + (" (same classes, different names or shapes)" if old.get("student") == model["student"] else ""))
        if saved.get("fingerprint") and current.get("fingerprint"):  # checkpoints before fingerprints have none
            problems.extend(fingerprint_differences(saved["fingerprint"], current["fingerprint"]))
        if saved.get("class_names") != current["class_names"]:
            problems.append(f"class_names: checkpoint {saved.get('class_names')}, now {current['class_names']}")
        # A finished run is only collected, so another number of processes (which changes the
        # updates per epoch) may collect it.
        same_processes = saved.get("num_processes") == current["num_processes"]
        if not (same_processes or saved.get("finished")):
            problems.append(f"num_processes: checkpoint {saved.get('num_processes')}, now {current['num_processes']}")
        elif same_processes and saved.get("updates_per_epoch") != current["updates_per_epoch"]:
            problems.append(
                f"train_loader: checkpoint had {saved.get('updates_per_epoch')} optimizer updates per epoch, now "
                f"{current['updates_per_epoch']} (different data or batch size)")
        if problems:
            raise ResumeError(f"cannot resume from {path}:\n  " + "\n  ".join(problems))

    @staticmethod
    def check_best_model(best_model_path: Path, saved: Mapping[str, Any], path: Path) -> None:
        """Refuses a best model written by another run than the checkpoint ``saved`` at ``path``.

        A fresh start over a folder keeps the old checkpoint until its own first one; killed in
        between, it leaves the old checkpoint beside its new best model, which a resume would
        otherwise report as the old run's.

        Raises:
            ResumeError: The two carry different run ids.
        """
        if saved.get("run_id") is None or not best_model_path.is_file():
            return  # checkpoints from before run ids have none
        written_by = read_metadata(best_model_path).get("run_id")
        if written_by != saved["run_id"]:
            raise ResumeError(
                f"{best_model_path} comes from another run than the checkpoint {path} (run "
                f"{written_by!r}, checkpoint run {saved['run_id']!r}): a fresh start in {best_model_path.parent} "
                "was interrupted before its first checkpoint. Start afresh (resume=False) to train this run again."
            )

    def load(self, path: Path, schedule: LRSchedule | None = None) -> None:
        """Restores the Accelerator's state (model, optimizer, RNGs) and the schedule from ``path``.

        Raises:
            ResumeError: The schedule's state is missing.
        """
        self.accelerator.load_state(os.fspath(path))
        if schedule is not None and schedule.active:
            scheduler_file = path / SCHEDULER_FILE
            if not scheduler_file.is_file():
                raise ResumeError(f"{path} has no scheduler state ({SCHEDULER_FILE})")
            schedule.load_state_dict(torch.load(scheduler_file, map_location="cpu", weights_only=True))


def _discard(path: Path) -> None:
    """Deletes a checkpoint directory so that no kill leaves a half-deleted one looking complete.

    It is first renamed to a ``.trash-*`` sibling (atomic), then removed; leftovers of a kill
    during the removal are cleaned by :meth:`CheckpointManager.recover`.
    """
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                with open(os.path.join(root, name), "rb") as handle:
                    os.fsync(handle.fileno())
            except OSError:
                pass
        fsync_dir(root)
