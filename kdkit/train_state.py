"""The progress of a training run, as a checkpoint records it: :class:`TrainState`."""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._json import to_jsonable

__all__ = ["TrainState"]


def _new_run_id() -> str:
    # Not `random`: seeded runs would all draw the same id.
    return secrets.token_hex(8)


@dataclass
class TrainState:
    """Where a run stands after its last completed epoch.

    Attributes:
        epoch: Completed epochs.
        global_step: Optimizer updates so far.
        best_metric: Best validation value of the selection metric (``None`` without validation).
        best_epoch: 1-based epoch of the best model (the last epoch without validation).
        history: One metrics row per completed epoch.
        final_val_metrics: The last epoch's validation metrics.
        run_id: Written into the checkpoints and the best model, so that a resume can tell
            whether both come from one run.
    """

    epoch: int = 0
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    final_val_metrics: dict[str, Any] | None = None
    run_id: str = field(default_factory=_new_run_id)

    def improves(self, value: float | None, mode: str) -> bool:
        """Whether ``value`` beats :attr:`best_metric` (``mode``: ``"min"`` or ``"max"``); NaN never does."""
        if value is None or not math.isfinite(value):
            return False
        if self.best_metric is None:
            return True
        return value < self.best_metric if mode == "min" else value > self.best_metric

    def end_epoch(self, row: dict[str, Any], *, improved: bool, metric: float | None = None,
                  val_metrics: dict[str, Any] | None = None) -> None:
        """Records a completed epoch: its metrics ``row``, whether its model is the new best
        (see :meth:`improves`), and its validation ``metric`` and ``val_metrics`` (``None`` without validation)."""
        if improved:
            self.best_epoch = int(row["epoch"])
            if val_metrics is not None:
                self.best_metric = metric
        if val_metrics is not None:
            self.final_val_metrics = val_metrics
        self.history.append(row)
        self.epoch = int(row["epoch"])

    def to_dict(self) -> dict[str, Any]:
        """The state as JSON values."""
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "history": to_jsonable(self.history),
            "final_val_metrics": self.final_val_metrics,
            "run_id": self.run_id,
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> TrainState:
        """The state saved by :meth:`to_dict` (extra keys of a checkpoint record are ignored)."""
        return cls(
            epoch=int(record["epoch"]),
            global_step=int(record["global_step"]),
            best_metric=record.get("best_metric"),
            best_epoch=record.get("best_epoch"),
            history=list(record.get("history", [])),
            final_val_metrics=record.get("final_val_metrics"),
            run_id=record.get("run_id") or _new_run_id(),  # checkpoints before run ids have none
        )
