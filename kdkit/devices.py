"""Where training runs: the mixed precision, the loader's workers and where augmentation runs.

These defaults follow the machine and the launcher instead of one fixed preset: on a GPU the
data pipeline needs worker processes and batched augmentation on the device to keep up with
the model, whereas on a few CPU cores workers compete with training for the cores and the
input is a few percent of a training step whichever way it is augmented
(``benchmarks/results/input_pipeline_cpu.md``), so the CPU keeps the per-image augmentation
in the loader that its recorded results were trained with.
"""

from __future__ import annotations

import logging
import os

import torch

__all__ = [
    "AUGMENT_PLACES",
    "LAUNCHER_PRECISION_ENV",
    "MIXED_PRECISION_CHOICES",
    "accelerator_available",
    "augment_on_device",
    "cores_per_process",
    "default_workers",
    "resolve_mixed_precision",
]

logger = logging.getLogger(__name__)

LAUNCHER_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"
"""Set by ``accelerate launch --mixed_precision`` (and by ``accelerate config``)."""
MIXED_PRECISION_CHOICES = ("auto", "no", "bf16", "fp16")
"""What a preset or a user may ask for; ``auto`` picks what the device supports."""
AUGMENT_PLACES = ("auto", "device", "loader")
"""Where training augmentation runs: batched on the training device, or per image in the loader."""


def accelerator_available() -> bool:
    """Whether a CUDA GPU is visible to this process."""
    return torch.cuda.is_available()


def resolve_mixed_precision(requested: str) -> str:
    """The mixed precision to train in, honouring the launcher.

    The launcher's choice (``accelerate launch --mixed_precision bf16``) wins over a preset's:
    a preset never silently overrides it. Without one (or with ``no``, Accelerate's default),
    ``requested`` applies; ``auto`` is bf16 on a GPU that has it, fp16 on an older GPU and no
    mixed precision on the CPU.

    Args:
        requested: One of :data:`MIXED_PRECISION_CHOICES`.

    Returns:
        ``"no"``, ``"bf16"`` or ``"fp16"``.
    """
    if requested not in MIXED_PRECISION_CHOICES:
        raise ValueError(f"mixed precision must be one of {MIXED_PRECISION_CHOICES}, got {requested!r}")
    launcher = os.environ.get(LAUNCHER_PRECISION_ENV, "").strip().lower()
    if launcher in ("bf16", "fp16"):
        if requested not in ("auto", launcher):
            logger.info("mixed precision %s, as the launcher asks (%s=%s), instead of %s",
                        launcher, LAUNCHER_PRECISION_ENV, launcher, requested)
        return launcher
    if requested != "auto":
        return requested
    if accelerator_available():
        # Emulated bf16 (V100, T4) is slower than fp16, which those GPUs run natively.
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "no"


def default_workers() -> int:
    """Loader worker processes: none on the CPU (they compete with training for the cores), up to 8 on a GPU."""
    if not accelerator_available():
        return 0
    return max(1, min(8, cores_per_process() - 1))


def cores_per_process() -> int:
    """The CPU cores this process may use, shared evenly by the processes of this machine (``LOCAL_WORLD_SIZE``)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # Linux only
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))


def augment_on_device(place: str) -> bool:
    """Whether training augmentation runs batched on the device (``place`` one of :data:`AUGMENT_PLACES`).

    ``auto``: on the device when a GPU is there, per image in the loader on the CPU.
    """
    if place not in AUGMENT_PLACES:
        raise ValueError(f"augmentation place must be one of {AUGMENT_PLACES}, got {place!r}")
    return place == "device" or (place == "auto" and accelerator_available())
