"""JSON conversion of the values a training run records (configs, metrics, checkpoint state)."""

from __future__ import annotations

import json
import os
from os import PathLike
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["json_default", "to_jsonable"]


def json_default(obj: object) -> object:
    """``json.dumps(default=...)`` for paths, numpy and torch values, sets and tuples."""
    if isinstance(obj, PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def to_jsonable(value: object) -> Any:
    """``value`` as plain JSON types (what reading back its JSON text would give)."""
    return json.loads(json.dumps(value, default=json_default))
