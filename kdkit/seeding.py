"""Per-epoch reseeding: every random draw of an epoch is a function of ``(seed, epoch)``.

This is what makes a resumed run exact without saving data-loader or worker state: shuffling,
augmentation (in the main process and in fresh workers) and dropout of epoch ``e`` are drawn
the same whether the run got there uninterrupted or from a checkpoint.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["derive_seed", "seed_epoch"]


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
