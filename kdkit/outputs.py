"""The result of one training step, shared by the Distiller and plain supervised training."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["StepOutput"]


@dataclass
class StepOutput:
    """What a task module (a :class:`~kdkit.Distiller` or :class:`~kdkit.Supervised`) returns.

    Attributes:
        loss: The weighted total loss, a scalar tensor to call ``backward()`` on; ``None``
            when no labels were given and no term could be computed without them.
        logits: The student's class logits (the mean of its heads when it has two).
        terms: Each weighted loss term as a float, for logging (e.g. ``{"ce": 0.71, "kl": 0.2}``).
    """

    loss: Tensor | None
    logits: Tensor
    terms: dict[str, float] = field(default_factory=dict)
