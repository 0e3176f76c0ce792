"""Task modules: what the :class:`~kdkit.train.Trainer` trains.

A task module is an ``nn.Module`` with

* ``forward(images, labels) -> StepOutput``: the training step's loss, the student's logits and
  the loss terms to log (detached 0-dim tensors, or floats);
* ``.student``: the model that is evaluated and saved as the best model.

and optionally

* ``validation_loss(logits, labels) -> Tensor``: the mean loss over a batch of the student's
  evaluation logits, reported as ``val_loss`` (cross-entropy when the task has none);
* ``no_weight_decay() -> set[str]``: full parameter names within the task to exempt from
  weight decay (without it: the student's timm ``no_weight_decay()``, prefixed ``"student."``);
* ``find_unused_parameters = True``: some parameters get no gradient in some steps, so DDP must
  look for them (the Trainer then creates its Accelerator accordingly).

:class:`~kdkit.Distiller` is one task; :class:`Supervised`, plain training on labels, the other.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from .fingerprint import module_options
from .outputs import (
    LogitsFrom,
    StepOutput,
    check_labels,
    check_soft_labels,
    mean_of_heads,
    model_heads,
    select_output,
    stable_name,
)
from .taps import unwrap_model

__all__ = ["Supervised"]


class Supervised(nn.Module):
    """Plain supervised training of a model, as a task module for the :class:`~kdkit.train.Trainer`.

    Args:
        model: The classifier; it becomes ``.student``. A model with a distillation head that
            returns its two heads in training (DeiT, HDKD) is trained on their mean.
        loss: ``loss(logits, labels) -> scalar tensor`` (the batch mean), used in training and
            for ``val_loss``; cross-entropy by default.
        name: Name of the loss term in the logs; ``"ce"`` for the default loss, else ``"loss"``.
        logits_from: Where the logits are in a model's output that holds more than them (``0``
            for torchvision's Inception in training, ``"logits"``, or a callable).
    """

    def __init__(self, model: nn.Module, loss: Callable[[Tensor, Tensor], Tensor] | None = None, *, name: str | None = None,
                 logits_from: LogitsFrom = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if loss is not None and not callable(loss):
            raise TypeError(f"loss must be callable(logits, labels), got {type(loss).__name__}")
        self.student = model
        self.loss_fn = loss
        self.term_name = name or ("ce" if loss is None else "loss")
        self.logits_from = logits_from

    def student_logits(self, output: object) -> Tensor:
        """The logits in the model's ``output`` (see ``logits_from``; two declared heads: their mean).

        Raises:
            TypeError: The output holds more than logits and ``logits_from`` does not say where they are.
        """
        return mean_of_heads(model_heads(select_output(output, self.logits_from), self.student, what="the model"))

    def objective(self) -> dict[str, object]:
        """What this task optimises, as JSON (for :mod:`kdkit.fingerprint`)."""
        loss = self.loss_fn
        if loss is None:
            described: object = "cross_entropy"
        else:
            described = {"class": f"{type(loss).__module__}.{type(loss).__qualname__}" if isinstance(loss, nn.Module)
                         else stable_name(loss), "options": module_options(loss) if isinstance(loss, nn.Module) else {}}
        return {"task": type(self).__name__, "loss": described, "logits_from": stable_name(self.logits_from)}

    def forward(self, images: Tensor, labels: Tensor | None = None) -> StepOutput:
        """One training step: the loss on ``labels`` (``None`` without them) and the logits."""
        logits = self.student_logits(self.student(images))
        if labels is None:
            return StepOutput(loss=None, logits=logits, terms={})
        check_labels(labels, logits.shape[0])
        check_soft_labels(labels, logits)
        loss = self.validation_loss(logits, labels)
        # A detached tensor, not a float: reading it back would make the host wait for the device.
        return StepOutput(loss=loss, logits=logits, terms={self.term_name: loss.detach()})

    def validation_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The batch-mean loss of ``logits``: the custom ``loss`` when one was given, else cross-entropy."""
        return F.cross_entropy(logits, labels) if self.loss_fn is None else self.loss_fn(logits, labels)

    def no_weight_decay(self) -> set[str]:
        """The student's ``no_weight_decay()`` names (timm), prefixed for this module."""
        names = getattr(unwrap_model(self.student), "no_weight_decay", None)
        return {f"student.{name}" for name in names()} if callable(names) else set()
