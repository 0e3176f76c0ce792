"""Where a run's per-epoch metrics go: ``metrics.jsonl``, ``metrics.csv`` and Accelerate trackers."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._json import to_jsonable
from .checkpoint import atomic_write_text

__all__ = ["MetricsLog", "scalar_metrics"]


def scalar_metrics(row: Mapping[str, Any]) -> dict[str, int | float]:
    """The numeric entries of a metrics row (no flags, lists or nested dicts)."""
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class MetricsLog:
    """Writes one row per epoch to ``output_dir/metrics.jsonl`` and ``metrics.csv``, and to trackers.

    Files are written by the main process only. ``metrics.jsonl`` holds every row as it was
    given (confusion matrices included), appended and fsynced per epoch; ``metrics.csv`` the
    same rows flattened (one column per class for per-class values), rewritten atomically.

    Args:
        accelerator: The run's ``accelerate.Accelerator`` (main process, trackers).
        output_dir: The run's directory.
        class_names: Column suffixes of per-class lists in the CSV (their indices without them).
    """

    def __init__(self, accelerator: Any, output_dir: str | os.PathLike[str], class_names: Sequence[str] | None = None) -> None:
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names) if class_names is not None else None

    @property
    def jsonl_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    @property
    def csv_path(self) -> Path:
        return self.output_dir / "metrics.csv"

    def rewrite(self, history: Sequence[Mapping[str, Any]]) -> None:
        """Makes both files hold exactly ``history`` (at the start of a run or a resume)."""
        if not self.accelerator.is_main_process:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.jsonl_path, "".join(json.dumps(to_jsonable(row)) + "\n" for row in history))
        self._write_csv(history)

    def append(self, row: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> None:
        """Appends ``row`` to ``metrics.jsonl`` and rewrites ``metrics.csv`` from ``history`` (which ends with it)."""
        if not self.accelerator.is_main_process:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.jsonl_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(to_jsonable(row)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._write_csv(history)

    def start_trackers(self, config: Mapping[str, Any]) -> bool:
        """Starts the Accelerator's trackers with ``config`` as hyper-parameters.

        Returns:
            Whether they were started here (and so must be ended by :meth:`end_trackers`):
            not when the Accelerator has no tracker or the caller already started them.
        """
        acc = self.accelerator
        if not getattr(acc, "log_with", None) or acc.trackers:
            return False
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in config.items()}
        acc.init_trackers("kdkit", config=hparams)
        return True

    def log_trackers(self, row: Mapping[str, Any], step: int) -> None:
        """Sends the row's numbers to the trackers (a no-op without trackers)."""
        self.accelerator.log(scalar_metrics(row), step=step)

    def end_trackers(self) -> None:
        self.accelerator.end_training()

    def _write_csv(self, history: Sequence[Mapping[str, Any]]) -> None:
        rows = [_flatten(row, self.class_names) for row in history]
        columns: list[str] = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        if columns:
            writer.writeheader()
            writer.writerows(rows)
        atomic_write_text(self.csv_path, buffer.getvalue())


def _flatten(row: Mapping[str, Any], class_names: Sequence[str] | None) -> dict[str, Any]:
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
