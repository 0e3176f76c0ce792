"""kdkit: knowledge distillation for timm-style PyTorch vision models.

Importing kdkit also registers the model families of :mod:`kdkit_zoo` (HDKD) with timm.
"""

from __future__ import annotations

import kdkit_zoo  # noqa: F401  (registers the HDKD models with timm)

from .adapters import ADAPTERS, register_adapter
from .checkpoint import load_model, read_metadata, save_model
from .distiller import Distiller, LossTerm
from .losses import LOSSES, build_loss, list_losses, register_loss
from .outputs import StepOutput
from .taps import FeatureTaps, resolve_selector, unwrap_model
from .train import FitResult, NonFiniteLossError, ResumeError, Supervised, TrainConfig, Trainer

__version__ = "0.1.0"

__all__ = [
    "ADAPTERS",
    "LOSSES",
    "Distiller",
    "FeatureTaps",
    "FitResult",
    "LossTerm",
    "NonFiniteLossError",
    "ResumeError",
    "StepOutput",
    "Supervised",
    "TrainConfig",
    "Trainer",
    "build_loss",
    "list_losses",
    "load_model",
    "read_metadata",
    "register_adapter",
    "register_loss",
    "resolve_selector",
    "save_model",
    "unwrap_model",
    "__version__",
]
