"""The optimizer of a training run: a timm optimizer with weight decay off where it does harm."""

from __future__ import annotations

import torch
from torch import nn

from .taps import unwrap_model
from .train_config import TrainConfig

__all__ = ["build_optimizer", "no_weight_decay_names"]


def no_weight_decay_names(task: nn.Module) -> set[str]:
    """Full parameter names within ``task`` that get no weight decay, besides biases and norms.

    The task's own ``no_weight_decay()`` when it has one; else the student's timm
    ``no_weight_decay()`` names (e.g. ``pos_embed``, ``cls_token``) prefixed with ``"student."``,
    the task attribute that holds the student.
    """
    own = getattr(task, "no_weight_decay", None)
    if callable(own):
        return set(own())
    names = getattr(unwrap_model(task.student), "no_weight_decay", None)
    return {f"student.{name}" for name in names()} if callable(names) else set()


def build_optimizer(task: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The timm optimizer of ``config`` over the task's parameters, in decay and no-decay groups.

    Raises:
        ValueError: The task has no trainable parameter.
    """
    from timm.optim import create_optimizer_v2, param_groups_weight_decay

    if not any(p.requires_grad for p in task.parameters()):
        raise ValueError("the task has no trainable parameters (requires_grad=True)")
    no_decay = no_weight_decay_names(task)
    return create_optimizer_v2(
        task,
        opt=config.opt,
        lr=config.lr,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        param_group_fn=lambda module: param_groups_weight_decay(module, config.weight_decay, no_weight_decay_list=no_decay),
        **config.opt_kwargs,
    )
