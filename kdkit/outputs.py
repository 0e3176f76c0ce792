"""The result of one training step, shared by the Distiller and plain supervised training."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .taps import unwrap_model

__all__ = [
    "LogitsFrom",
    "StepOutput",
    "check_images",
    "check_labels",
    "check_soft_labels",
    "stable_name",
    "has_distillation_head",
    "mean_of_heads",
    "model_heads",
    "select_output",
]

LogitsFrom = int | str | Callable[[Any], Any] | None
"""Which part of a model's output holds its logits: an index into a tuple, a key or attribute
(``"logits"`` of a transformers output), a callable, or ``None`` (the output itself)."""


@dataclass
class StepOutput:
    """What a task module (a :class:`~kdkit.Distiller` or :class:`~kdkit.Supervised`) returns.

    Attributes:
        loss: The weighted total loss, a scalar tensor to call ``backward()`` on; ``None``
            when no labels were given and no term could be computed without them.
        logits: The student's class logits (the mean of its heads when it has two). The
            Distiller's are detached, so that under DDP the loss is the only output with a
            graph (DDP looks for unused parameters from every output).
        terms: Each weighted loss term, for logging, as a detached 0-dim tensor on the loss's
            device (e.g. ``{"ce": tensor(0.71), "kl": tensor(0.2)}``): the Trainer sums them on the
            device and reads them back once per logging interval, so a step never waits for the
            device. Floats are accepted too (from tasks that already read their terms back).
    """

    loss: Tensor | None
    logits: Tensor
    terms: dict[str, Tensor | float] = field(default_factory=dict)


def mean_of_heads(output: Tensor | Sequence[Tensor]) -> Tensor:
    """Returns a model's logits: the tensor itself, or the mean of its heads (CLS and distillation).

    Raises:
        TypeError: The output is neither a tensor nor a non-empty sequence of tensors.
    """
    if isinstance(output, Tensor):
        return output
    heads = list(output)
    if not heads or not all(isinstance(h, Tensor) for h in heads):
        raise TypeError(f"the model returned {type(output).__name__}; expected a tensor or a tuple of logit tensors")
    return heads[0] if len(heads) == 1 else torch.stack(heads).mean(0)


def check_images(images: object) -> None:
    """Refuses what no model takes as a batch of images, before the model's own error would.

    Raises:
        TypeError: Not a floating-point tensor (uint8 images must be converted and normalised first).
        ValueError: An empty batch or side.
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(
            f"images are {images.dtype}: models take float batches, normalised as they were trained "
            "(convert uint8 images with kdkit.augment.batch_eval_transforms, or a transform of the data set)")
    if images.dim() == 0 or 0 in images.shape:
        raise ValueError(f"images must be a non-empty (B, C, H, W) batch, got shape {tuple(images.shape)}")


def check_labels(labels: object, batch_size: int) -> None:
    """Refuses labels the losses would misread, with what to change; reads no value (no device sync).

    Hard labels are ``(B,)`` int64 class indices; soft labels ``(B, K)`` floating-point class
    probabilities.

    Raises:
        TypeError: Not a tensor, or integer labels that are not int64, or float class indices.
        ValueError: Another shape, or another batch size than the images'.
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a tensor of class indices, got {type(labels).__name__}")
    if labels.dim() == 2 and labels.shape[1] == 1 and not labels.is_floating_point():
        raise ValueError(f"labels have shape {tuple(labels.shape)}: class indices are (B,); use labels.squeeze(1)")
    if labels.dim() == 1:
        if labels.is_floating_point():
            raise TypeError(f"labels are {labels.dtype} of shape {tuple(labels.shape)}: class indices must be "
                            "int64 (labels.long()); soft labels are (B, num_classes) probabilities")
        if labels.dtype != torch.int64:
            raise TypeError(f"labels are {labels.dtype}: class indices must be int64 (use labels.long())")
    elif not (labels.dim() == 2 and labels.is_floating_point()):
        raise ValueError(f"labels must be (B,) int64 class indices or (B, num_classes) soft labels, got "
                         f"{labels.dtype} of shape {tuple(labels.shape)}")
    if labels.shape[0] != batch_size:
        raise ValueError(f"{labels.shape[0]} labels for a batch of {batch_size} images")


def check_soft_labels(labels: Tensor, logits: Tensor) -> None:
    """Refuses ``(B, K)`` soft labels whose ``K`` is not the logits' number of classes (before the loss's own error).

    Raises:
        ValueError: Naming both shapes.
    """
    if labels.dim() == 2 and labels.is_floating_point() and labels.shape != logits.shape:
        raise ValueError(f"soft labels of shape {tuple(labels.shape)} for logits of shape {tuple(logits.shape)}: "
                         "give one probability per class of the model")


def has_distillation_head(model: nn.Module) -> bool:
    """Whether a model declares a distillation head beside its class head (timm's distilled models, HDKD)."""
    inner = unwrap_model(model)
    return hasattr(inner, "set_distilled_training") or isinstance(getattr(inner, "head_dist", None), nn.Module)


def select_output(output: Any, logits_from: LogitsFrom) -> Any:
    """The part of a model's ``output`` that ``logits_from`` names (see :data:`LogitsFrom`).

    A bare tensor is the logits already: Inception returns ``(logits, aux)`` in training and its
    logits alone in evaluation, and ``logits_from=0`` must not take the first sample then.
    """
    if logits_from is None or isinstance(output, Tensor):
        return output
    if callable(logits_from):
        return logits_from(output)
    if isinstance(logits_from, int):
        return output[logits_from]
    return output[logits_from] if isinstance(output, Mapping) else getattr(output, logits_from)


def stable_name(value: object) -> int | str | None:
    """``value`` (a ``logits_from``, a loss function) as JSON that is the same in every process and
    run: ``None``, an int or a string as it is, a function by its module and qualified name, a
    ``functools.partial`` with its arguments, another callable by its ``repr`` unless that holds
    a memory address (then by its type)."""
    if value is None or isinstance(value, (int, str)):
        return value  # type: ignore[return-value]
    if isinstance(value, functools.partial):
        return f"functools.partial({stable_name(value.func)}, *{value.args!r}, **{value.keywords!r})"
    if hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '?')}.{value.__qualname__}"
    text = repr(value)
    return text if " at 0x" not in text else f"{type(value).__module__}.{type(value).__qualname__}"


def _describe(output: Any) -> str:
    if isinstance(output, (tuple, list)):
        parts = ", ".join(f"{tuple(item.shape)}" if isinstance(item, Tensor) else type(item).__name__ for item in output)
        return f"a {type(output).__name__} of {len(output)} outputs ({parts})"
    return f"a {type(output).__name__}"


def model_heads(output: Any, model: nn.Module, *, what: str = "the student",
                fix: str = "pass logits_from=0 (an index), 'logits' (a key or attribute) or a callable") -> Tensor | tuple[Tensor, Tensor]:
    """The logits in a model's ``output``: a tensor, or ``(cls, dist)`` from a model with a distillation head.

    Only a model that declares a distillation head (:func:`has_distillation_head`) has a pair of
    outputs read as its CLS and distillation logits: any other pair (torchvision's Inception's
    main and auxiliary logits, a model returning ``(logits, features)``) would be misread.

    Args:
        output: What the model returned.
        model: The model (for what it declares, and the message).
        what: How the message names the model.
        fix: What the message suggests for an output that holds no plain logits.

    Raises:
        TypeError: The output is neither a tensor nor a declared pair of heads; the message says
            what it is and asks which output holds the logits.
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and all(isinstance(item, Tensor) for item in output):
        if len(output) == 1:
            return output[0]
        if len(output) == 2 and has_distillation_head(model):
            return output[0], output[1]
    raise TypeError(
        f"{what} ({type(unwrap_model(model)).__name__}) returned {_describe(output)} in "
        f"{'training' if model.training else 'evaluation'}; which of them are the logits? Only a model that declares "
        "a distillation head (timm's distilled models, HDKD) has two outputs read as (CLS logits, distillation "
        f"logits). Say where the logits are: {fix}")
