"""The result of one training step, shared by the Distiller and plain supervised training."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["StepOutput", "mean_of_heads"]


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
