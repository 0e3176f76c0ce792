"""Evaluation of a classifier over a (distributed) loader: the metrics of every validation and test."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._json import to_jsonable
from .outputs import mean_of_heads

__all__ = ["evaluate_classifier"]


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    accelerator: Any,
    *,
    loss: Callable[[Tensor, Tensor], Tensor] | None = None,
    class_names: Sequence[str] | None = None,
    logits_fn: Callable[[Any], Tensor] | None = None,
) -> dict[str, Any]:
    """Evaluates ``model`` (in eval mode, restored after) on ``(images, labels)`` batches.

    Predictions, labels and logits are gathered over the processes with
    ``accelerator.gather_for_metrics`` (the samples that pad the last batch are dropped), so
    every process returns the metrics of the whole data set. Nothing is read back to the host
    before the end.

    Args:
        model: The classifier (the student); a tuple of heads is averaged.
        batches: Image and label batches on the Accelerator's device.
        accelerator: The run's ``accelerate.Accelerator`` (autocast, gathering).
        loss: ``loss(logits, labels) -> batch mean``, e.g. a task's ``validation_loss``;
            cross-entropy by default.
        class_names: Class names in label order (their indices without them).
        logits_fn: The logits in the model's output (a task's ``student_logits``); default: the
            output itself, or the mean of a tuple of heads.

    Returns:
        :func:`~kdkit.metrics.classification_metrics` (``accuracy``, ``balanced_accuracy``,
        ``macro_f1``, ``per_class_recall``, ``confusion_matrix``, ``num_samples``) plus
        ``loss``, the mean ``loss`` per sample.

    Raises:
        ValueError: ``batches`` yields no sample, or ``class_names`` do not name every output.
    """
    from .metrics import classification_metrics

    loss = loss or F.cross_entropy
    was_training = model.training
    model.eval()
    preds: list[Tensor] = []
    targets: list[Tensor] = []
    device = accelerator.device
    loss_sum = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
    count, num_classes = 0, 0
    try:
        for images, labels in batches:
            with accelerator.autocast():
                output = model(images)
            logits = (logits_fn or mean_of_heads)(output).float()
            num_classes = logits.shape[-1]
            if class_names is not None and len(class_names) != num_classes:
                raise ValueError(f"{len(class_names)} class_names ({list(class_names)}) for a model with {num_classes} outputs")
            # The loss of the gathered batch, so that the padding samples do not count in it either.
            logits, labels = accelerator.gather_for_metrics((logits, labels))
            loss_sum += loss(logits, labels).detach().to(loss_sum.dtype) * labels.shape[0]
            preds.append(logits.argmax(-1))
            targets.append(labels)
            count += labels.shape[0]
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the evaluation loader yields no sample")
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    metrics = dict(classification_metrics(torch.cat(targets).cpu().numpy(), torch.cat(preds).cpu().numpy(), names))
    metrics["loss"] = loss_sum.item() / count
    return to_jsonable(metrics)
