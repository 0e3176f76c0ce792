"""One check of a training plan before anything trains.

An experiment of many runs (a teacher, then students at several training-set sizes and seeds)
must not fail hours in, when its twentieth run turns out to give a process no batch. The
check here takes every planned run at once, computes what each data-parallel process will
iterate under :func:`kdkit.data.make_loader`'s policy (the batch size is the *global* batch,
split evenly across processes) and Accelerate's sharding, and reports every run that cannot
train, in one error::

    from kdkit.plan import PlannedTraining, check_plan

    check_plan([PlannedTraining("teacher", 5137), PlannedTraining("student_50_seed0", 200)],
               batch_size=32, num_processes=8)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from . import data as kdata

__all__ = ["PlanError", "PlannedTraining", "check_plan", "steps_per_process"]


class PlanError(ValueError):
    """A planned run cannot train as configured; raised before any run starts.

    Attributes:
        problems: One line per run that cannot train.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


@dataclass(frozen=True)
class PlannedTraining:
    """One run of a plan: its name and the number of training images it iterates per epoch.

    Attributes:
        name: How the run is named in messages and output folders (e.g. ``"hdkd_50_seed0"``).
        num_images: Training images per epoch (after subsetting and oversampling).
        grad_accum_steps: Batches per optimizer update.
    """

    name: str
    num_images: int
    grad_accum_steps: int = 1


def steps_per_process(num_images: int, batch_size: int, num_processes: int, grad_accum_steps: int = 1) -> int:
    """Optimizer updates per epoch on each process, for a training loader of ``num_images``.

    Args:
        num_images: Training images per epoch.
        batch_size: The global batch (all processes together).
        num_processes: Data-parallel processes.
        grad_accum_steps: Batches per optimizer update.

    Raises:
        ValueError: ``batch_size`` does not divide by ``num_processes``.
    """
    batches = kdata.batches_per_process(num_images, batch_size, train=True, num_processes=num_processes)
    return math.ceil(batches / grad_accum_steps)


def check_plan(runs: Sequence[PlannedTraining], *, batch_size: int, num_processes: int) -> dict[str, int]:
    """Checks that every planned run gives each process at least one optimizer update per epoch.

    A run also needs at least as many images as processes: with fewer, Accelerate fills the
    missing places of a batch with repeated images, and a process would train on copies only.

    Args:
        runs: Every run of the plan.
        batch_size: The global batch size.
        num_processes: Data-parallel processes (``accelerate launch --num_processes``).

    Returns:
        ``{run name: optimizer updates per epoch on each process}``.

    Raises:
        PlanError: The batch size does not divide by the process count, or some runs cannot
            train; the message names every such run with its size and the process count.
    """
    try:
        kdata.per_process_batch_size(batch_size, num_processes)
    except ValueError as error:
        raise PlanError(f"the plan cannot run: {error}", [str(error)]) from None
    steps: dict[str, int] = {}
    problems: list[str] = []
    for run in runs:
        if run.num_images < max(1, num_processes):
            problems.append(
                f"run {run.name!r} has {run.num_images} training image(s) for {num_processes} process(es): "
                "each process needs at least one image of its own"
            )
            continue
        steps[run.name] = steps_per_process(run.num_images, batch_size, num_processes, run.grad_accum_steps)
        if steps[run.name] < 1:
            problems.append(
                f"run {run.name!r} ({run.num_images} training images) gives no optimizer update per process "
                f"at a global batch of {batch_size} on {num_processes} process(es)"
            )
    if problems:
        raise PlanError(
            f"{len(problems)} planned run(s) cannot train; nothing was started:\n  " + "\n  ".join(problems)
            + "\nLower the batch size (--batch-size is the global batch), use fewer processes, or train on more images.",
            problems,
        )
    return steps
