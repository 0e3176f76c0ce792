"""Tests of kdkit.metrics_log: metrics.jsonl, metrics.csv and trackers."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

from kdkit.metrics_log import MetricsLog, scalar_metrics

ROWS = [
    {"epoch": 1, "train_loss": 0.9, "val_per_class_recall": [0.5, 1.0], "val_confusion_matrix": [[1, 1], [0, 2]],
     "is_best": True},
    {"epoch": 2, "train_loss": 0.5, "train_kl": 0.1, "val_per_class_recall": [1.0, 1.0],
     "val_confusion_matrix": [[2, 0], [0, 2]], "is_best": True},
]


def test_rows_go_to_jsonl_whole_and_to_csv_flattened(tmp_path: Path) -> None:
    log = MetricsLog(SimpleNamespace(is_main_process=True), tmp_path / "run", ["cat", "dog"])
    log.rewrite([])
    assert log.jsonl_path.read_text() == "" and log.csv_path.read_text() == ""
    log.append(ROWS[0], ROWS[:1])
    log.append(ROWS[1], ROWS)
    assert [json.loads(line) for line in log.jsonl_path.read_text().splitlines()] == ROWS
    with open(log.csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == ["epoch", "train_loss", "val_per_class_recall/cat", "val_per_class_recall/dog",
                                 "is_best", "train_kl"]  # the confusion matrix stays in the JSONL
    assert rows[0]["train_kl"] == "" and rows[1]["val_per_class_recall/cat"] == "1.0"
    log.rewrite(ROWS[:1])  # a resume rewrites both files from the checkpoint's history
    assert len(log.jsonl_path.read_text().splitlines()) == 1


def test_only_the_main_process_writes(tmp_path: Path) -> None:
    log = MetricsLog(SimpleNamespace(is_main_process=False), tmp_path)
    log.rewrite(ROWS)
    log.append(ROWS[0], ROWS)
    assert list(tmp_path.iterdir()) == []


def test_trackers_get_the_numbers_and_the_config() -> None:
    calls: list[tuple] = []
    accelerator = SimpleNamespace(
        is_main_process=True, log_with=["x"], trackers=[],
        init_trackers=lambda name, config: calls.append(("init", name, config)),
        log=lambda values, step: calls.append(("log", values, step)),
    )
    log = MetricsLog(accelerator, ".")
    assert log.start_trackers({"lr": 0.1, "trackers": ["x"]})
    log.log_trackers(ROWS[0], step=1)
    assert calls == [("init", "kdkit", {"lr": 0.1, "trackers": '["x"]'}), ("log", {"epoch": 1, "train_loss": 0.9}, 1)]
    assert scalar_metrics({"a": 1, "b": True, "c": [1]}) == {"a": 1}
    accelerator.trackers = ["started by the caller"]
    assert not log.start_trackers({})
