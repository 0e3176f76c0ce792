"""Tests for kdkit.metrics against values computed by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdkit.metrics import classification_metrics

CLASSES = ["a", "b", "c"]


def test_metrics_match_hand_computed_values():
    # true a a a b b c ; pred a a b b c c
    metrics = classification_metrics([0, 0, 0, 1, 1, 2], np.array([0, 0, 1, 1, 2, 2]), CLASSES)

    assert metrics["accuracy"] == pytest.approx(4 / 6)
    # recalls: a 2/3, b 1/2, c 1/1
    assert metrics["per_class_recall"] == pytest.approx({"a": 2 / 3, "b": 1 / 2, "c": 1.0})
    assert metrics["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # precisions: a 2/2, b 1/2, c 1/2 -> F1: a 0.8, b 0.5, c 2/3
    assert metrics["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert metrics["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert metrics["num_samples"] == 6


def test_metrics_are_plain_json_serialisable_python_values():
    metrics = classification_metrics(np.array([0, 1]), np.array([0, 1]), CLASSES)
    assert json.loads(json.dumps(metrics)) == metrics
    assert type(metrics["accuracy"]) is float and type(metrics["num_samples"]) is int
    assert all(type(value) is int for row in metrics["confusion_matrix"] for value in row)


def test_metrics_handle_classes_absent_from_a_small_batch():
    # class c never occurs; class b is predicted but never true
    metrics = classification_metrics([0, 0], [0, 1], CLASSES)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 0, 0], [0, 0, 0]]
    assert metrics["per_class_recall"] == {"a": 0.5, "b": 0.0, "c": 0.0}
    assert metrics["balanced_accuracy"] == pytest.approx(0.5)  # over the true class a only
    # over classes a and b: F1 a = 2/3, F1 b = 0
    assert metrics["macro_f1"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("y_true", "y_pred", "message"),
    [([0, 1], [0], "entries"), ([], [], "no samples"), ([0, 3], [0, 1], "outside")],
)
def test_metrics_reject_bad_input(y_true, y_pred, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(y_true, y_pred, CLASSES)
