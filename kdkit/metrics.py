"""Classification metrics as plain, JSON-serialisable Python values."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

__all__ = ["classification_metrics"]


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """Compute the metrics reported for every run.

    Classes are the indices ``0 .. len(class_names) - 1``; a class may be absent from a small
    batch. Conventions for absent classes follow scikit-learn:

    * ``balanced_accuracy`` is the mean recall over classes present in ``y_true``
      (``sklearn.metrics.balanced_accuracy_score``'s definition).
    * ``macro_f1`` averages over classes present in ``y_true`` or ``y_pred``.
    * ``per_class_recall`` lists every class; one absent from ``y_true`` gets 0.0.
    * ``confusion_matrix`` is always ``n x n``, rows = true class, columns = predicted.

    Args:
        y_true: True class indices.
        y_pred: Predicted class indices.
        class_names: Names of the classes, in index order.

    Returns:
        ``accuracy``, ``balanced_accuracy``, ``macro_f1`` (floats), ``per_class_recall``
        (class name -> float), ``confusion_matrix`` (list of lists of ints) and
        ``num_samples`` (int).

    Raises:
        ValueError: Empty or mismatched inputs, or a class index out of range.
    """
    y_true = np.asarray(y_true).ravel()
    y_pred = np.asarray(y_pred).ravel()
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} entries but y_pred has {len(y_pred)}")
    if not len(y_true):
        raise ValueError("no samples to score")
    all_labels = np.arange(len(class_names))
    out_of_range = np.setdiff1d(np.union1d(y_true, y_pred), all_labels)
    if len(out_of_range):
        raise ValueError(f"class indices {out_of_range.tolist()} outside 0..{len(class_names) - 1}")

    # recall_score restricted to the true classes instead of balanced_accuracy_score: same
    # value, without its warning when a batch predicts a class it does not contain.
    balanced_accuracy = recall_score(
        y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0
    )
    recalls = recall_score(y_true, y_pred, labels=all_labels, average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "per_class_recall": {name: float(recall) for name, recall in zip(class_names, recalls)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=all_labels).tolist(),
        "num_samples": int(len(y_true)),
    }
