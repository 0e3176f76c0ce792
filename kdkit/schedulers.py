"""Learning-rate schedules behind one interface: timm's schedulers, torch's ``OneCycleLR``, none.

The three kinds step differently (timm's per-update ``step_update(num_updates)``, timm's
plateau scheduler per epoch on a metric, ``OneCycleLR.step()`` with no argument and an error
past its last step) and save differently (timm's plateau scheduler loses its counters in
``state_dict``). :class:`LRSchedule` hides that from the training loop.
"""

from __future__ import annotations

from typing import Any

import torch

from .train_config import TrainConfig

__all__ = ["LRSchedule"]


class LRSchedule:
    """The learning-rate schedule of ``config.sched`` over ``config.epochs``.

    Args:
        config: The run's config (``sched``, ``epochs``, ``lr``, ``min_lr``, ``warmup_epochs``,
            ``warmup_lr``, ``select_mode`` and ``sched_kwargs`` are used).
        optimizer: The optimizer, or Accelerate's wrapper of it.
        updates_per_epoch: Optimizer updates per epoch.

    Attributes:
        scheduler: The wrapped timm or torch scheduler; ``None`` for ``sched="none"``.
    """

    def __init__(self, config: TrainConfig, optimizer: torch.optim.Optimizer, updates_per_epoch: int) -> None:
        self.kind = config.sched
        # Accelerate's AcceleratedOptimizer wraps the torch optimizer the schedulers must see.
        inner = getattr(optimizer, "optimizer", optimizer)
        self.scheduler: Any = _create(config, inner, updates_per_epoch)

    @property
    def active(self) -> bool:
        """Whether there is a schedule (and so a state to save)."""
        return self.scheduler is not None

    def step_update(self, global_step: int) -> None:
        """Sets the learning rate after optimizer update number ``global_step`` (1-based)."""
        if self.kind in ("none", "plateau"):  # plateau only moves per epoch
            return
        if self.kind == "onecycle":
            if self.scheduler.last_epoch < self.scheduler.total_steps:  # it raises past its end
                self.scheduler.step()
        else:
            self.scheduler.step_update(num_updates=global_step)

    def step_epoch(self, epoch: int, metric: float | None) -> None:
        """Sets the learning rate after ``epoch`` completed epochs with validation ``metric``.

        Only the plateau schedule moves here, and only on a metric (``None`` without validation).
        """
        if self.kind == "plateau" and metric is not None:
            self.scheduler.step(epoch, metric)

    def state_dict(self) -> dict[str, Any]:
        """The schedule's state, for a checkpoint (empty without a schedule)."""
        if self.scheduler is None:
            return {}
        inner = getattr(self.scheduler, "lr_scheduler", None)
        if self.kind == "plateau" and inner is not None:
            # timm's PlateauLRScheduler.state_dict() drops the patience and cooldown counters;
            # save its wrapped torch ReduceLROnPlateau whole so that resume stays exact.
            own = {k: v for k, v in vars(self.scheduler).items() if k not in ("optimizer", "lr_scheduler")}
            return {"plateau": own, "reduce_on_plateau": inner.state_dict()}
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a state from :meth:`state_dict`."""
        if self.scheduler is None:
            return
        if self.kind == "plateau" and "reduce_on_plateau" in state:
            vars(self.scheduler).update(state["plateau"])
            self.scheduler.lr_scheduler.load_state_dict(state["reduce_on_plateau"])
        else:
            self.scheduler.load_state_dict(state)


def _create(config: TrainConfig, optimizer: torch.optim.Optimizer, updates_per_epoch: int) -> Any:
    if config.sched == "none":
        return None
    if config.sched == "onecycle":
        total_steps = config.epochs * updates_per_epoch
        pct_start = config.warmup_epochs / config.epochs if config.warmup_epochs else 0.3
        if pct_start * total_steps == 1:  # torch's rise would end at step 0 and divide by its length, zero
            pct_start = 1.5 / total_steps
        kwargs: dict[str, Any] = {"pct_start": pct_start}
        if config.min_lr > 0:
            kwargs["final_div_factor"] = (config.lr / 25.0) / config.min_lr
        kwargs.update(config.sched_kwargs)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=total_steps, **kwargs)
    from timm.scheduler import create_scheduler_v2

    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=config.sched,
        num_epochs=config.epochs,
        min_lr=config.min_lr,
        warmup_lr=config.warmup_lr,
        warmup_epochs=config.warmup_epochs,
        plateau_mode=config.select_mode,
        step_on_epochs=config.sched == "plateau",  # timm's plateau scheduler only steps per epoch
        updates_per_epoch=updates_per_epoch,
        **config.sched_kwargs,
    )
    return scheduler
