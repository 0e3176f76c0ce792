"""The Accelerator of a training run: how the :class:`~kdkit.train.Trainer` creates and checks it."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import torch
from torch import nn

from .train_config import TrainConfig

__all__ = ["configure_accelerator", "create_accelerator", "distributed_without_accelerator", "wants_unused_parameters"]

logger = logging.getLogger(__name__)


def distributed_without_accelerator() -> bool:
    """True under ``torchrun`` (WORLD_SIZE > 1) on a machine without GPUs or other accelerators.

    Accelerate only sets up multi-CPU DDP (gloo) when asked for the CPU explicitly; without this,
    each process would train alone and they would overwrite each other's files.
    """
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return False
    if torch.cuda.is_available():
        return False
    from accelerate.utils import is_mlu_available, is_npu_available, is_xpu_available

    return not (is_xpu_available() or is_npu_available() or is_mlu_available())


def wants_unused_parameters(task: nn.Module) -> bool:
    """Whether the task declares ``find_unused_parameters = True`` (DDP must look for them)."""
    return getattr(task, "find_unused_parameters", False) is True


def create_accelerator(config: TrainConfig, task: nn.Module) -> Any:
    """An ``accelerate.Accelerator`` for ``config`` and ``task``.

    It uses the config's ``mixed_precision`` (when set) and ``trackers``, its output directory
    as project directory, copies pinned batches to the device asynchronously, runs multi-CPU
    DDP under ``torchrun`` without GPUs, and makes DDP find unused parameters when the task
    asks for it.
    """
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState, PartialState

    shared = AcceleratorState._shared_state
    if (
        config.mixed_precision is not None
        and shared
        and shared.get("_mixed_precision") not in (None, config.mixed_precision)
        and PartialState().num_processes == 1
    ):
        # AcceleratorState is a process-wide singleton; in a single process (a notebook, tests)
        # a new Trainer with another precision would otherwise be refused.
        logger.warning(
            "re-initialising Accelerate's state for mixed_precision=%r (was %r); Trainers created earlier "
            "in this process now use it too", config.mixed_precision, shared.get("_mixed_precision"))
        AcceleratorState._reset_state()
    kwargs: dict[str, Any] = {
        "cpu": distributed_without_accelerator(),
        "gradient_accumulation_steps": config.grad_accum_steps,
        "project_dir": os.fspath(config.output_dir),
        # non_blocking: batches from pin_memory=True loaders are copied while the device computes.
        "dataloader_config": DataLoaderConfiguration(non_blocking=True),
    }
    if config.mixed_precision is not None:  # else Accelerate's own: `accelerate launch` flags or config
        kwargs["mixed_precision"] = config.mixed_precision
    if config.trackers:
        kwargs["log_with"] = list(config.trackers)
    if wants_unused_parameters(task):
        kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    return Accelerator(**kwargs)


def configure_accelerator(accelerator: Any, config: TrainConfig, task: nn.Module, *, given: bool = False) -> None:
    """Applies the config to an Accelerator (created or ``given`` by the user) and checks it.

    Sets the gradient accumulation and, on CUDA, TF32 and the cuDNN benchmark; warns when a
    ``given`` multi-process Accelerator lacks the unused-parameter search the task asks for.

    Raises:
        ValueError: The Accelerator names its checkpoints itself.
    """
    if getattr(accelerator.project_configuration, "automatic_checkpoint_naming", False):
        raise ValueError("the Trainer names its checkpoints itself: create the Accelerator without automatic_checkpoint_naming")
    if accelerator.gradient_accumulation_steps not in (1, config.grad_accum_steps):
        warnings.warn(
            f"the Accelerator's gradient_accumulation_steps={accelerator.gradient_accumulation_steps} is replaced by "
            f"TrainConfig.grad_accum_steps={config.grad_accum_steps}",
            stacklevel=3,
        )
    accelerator.gradient_accumulation_steps = config.grad_accum_steps
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
        torch.backends.cudnn.allow_tf32 = config.allow_tf32
        torch.backends.cudnn.benchmark = config.cudnn_benchmark
    handler = getattr(accelerator, "ddp_handler", None)
    if (given and accelerator.num_processes > 1 and wants_unused_parameters(task)
            and not getattr(handler, "find_unused_parameters", False)):
        warnings.warn(
            f"{type(task).__name__} sets find_unused_parameters=True (some parameters get no gradient in some steps), "
            "but the Accelerator given to the Trainer does not: create it with "
            "kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)], or DDP may fail or hang",
            stacklevel=3,
        )
