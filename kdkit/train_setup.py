"""How a training run is set up: its Accelerator, its optimizer and the per-epoch reseeding.

* :func:`create_accelerator` / :func:`configure_accelerator`: the ``accelerate.Accelerator``
  the :class:`~kdkit.train.Trainer` creates (or is given) and what it sets on it;
* :func:`build_optimizer`: a timm optimizer with weight decay off where it does harm;
* :func:`seed_epoch`: every random draw of an epoch is a function of ``(seed, epoch)``. This is
  what makes a resumed run exact without saving data-loader or worker state: shuffling,
  augmentation (in the main process and in fresh workers) and dropout of epoch ``e`` are drawn
  the same whether the run got there uninterrupted or from a checkpoint.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from .taps import unwrap_model
from .train_config import TrainConfig

__all__ = [
    "build_optimizer",
    "configure_accelerator",
    "create_accelerator",
    "derive_seed",
    "distributed_without_accelerator",
    "no_weight_decay_names",
    "seed_epoch",
    "wants_unused_parameters",
]

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


# --------------------------------------------------------------------------- optimizer
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


# --------------------------------------------------------------------------- seeding
def derive_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from non-negative integers (e.g. ``(seed, epoch, rank)``)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint32)[0])


def seed_epoch(loader: Any, seed: int, epoch: int, process_index: int = 0) -> None:
    """Reseeds Python, numpy, torch (CUDA included) and ``loader``'s samplers for ``epoch`` (0-based).

    The global generators get a seed per process (dropout and augmentation differ between
    processes); the loader's shuffling generators one shared by all processes (they must agree
    on the order to shard it). Accelerate's ``SeedableRandomSampler`` adds the epoch itself,
    through ``set_epoch``.
    """
    process_seed = derive_seed(seed, epoch, process_index + 1)
    random.seed(process_seed)
    np.random.seed(process_seed)
    torch.manual_seed(process_seed)  # also seeds every CUDA device
    data_seed = derive_seed(seed, epoch, 0)
    from accelerate.data_loader import SeedableRandomSampler

    seen: set[int] = set()
    stack = [loader]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        attrs = obj.__dict__ if hasattr(obj, "__dict__") else {}
        if isinstance(obj, SeedableRandomSampler):
            obj.initial_seed = derive_seed(seed, 0, 0)  # + epoch, through set_epoch below
        for name in ("generator", "synchronized_generator"):
            if isinstance(attrs.get(name), torch.Generator):
                attrs[name].manual_seed(data_seed)
        for name in ("base_dataloader", "sampler", "batch_sampler"):
            if attrs.get(name) is not None:
                stack.append(attrs[name])
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
