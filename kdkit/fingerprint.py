"""Fingerprints of what a training run depends on: teachers' weights, the objective, the data.

A checkpoint records the fingerprint of its run (:func:`run_fingerprint`), and a resume
compares it with the resuming trainer's (:func:`fingerprint_differences`): continuing a run with
another teacher, another loss weight or temperature, other images or another image size would
give a model that no single configuration trained. The same fingerprint identifies a teacher's
outputs on a data set, for anything that caches them.

Each part is JSON: digests are SHA-256 hex strings of the bytes (tensors are hashed with their
names, shapes and dtypes), so two fingerprints are equal exactly when what they describe is.

* ``teachers``: per teacher, its class and a digest of its weights (state dict);
* ``objective``: what the task optimises (:meth:`kdkit.Distiller.objective`,
  :meth:`kdkit.tasks.Supervised.objective`, or the task's ``objective()``);
* ``data``: per loader (``train``, ``val``), the size and a digest of the items and labels
  (:func:`dataset_fingerprint`);
* ``input_shape``: the shape of one model input, ``(C, H, W)``, once a batch has been seen.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .taps import unwrap_model

__all__ = [
    "dataset_fingerprint",
    "fingerprint_differences",
    "module_options",
    "run_fingerprint",
    "tensor_digest",
    "weights_digest",
]

_SCALARS = (bool, int, float, str, type(None))
# Digests of large tensors already hashed, by tensor: a pool of images shared by many subsets is hashed once.
# Keyed by id (a tensor's == is elementwise), with a weak reference that tells a reused id apart.
_DIGESTS: dict[int, tuple[weakref.ref[Tensor], int, str]] = {}


def _update(digest: Any, tensor: Tensor) -> None:
    digest.update(f"{tuple(tensor.shape)}:{tensor.dtype};".encode())
    if tensor.device.type == "meta":
        return  # shapes only: a meta tensor has no values
    # The raw bytes, whatever the dtype (numpy has no bfloat16).
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    digest.update(data.numpy().data)


def tensor_digest(tensor: Tensor) -> str:
    """SHA-256 of a tensor's shape, dtype and values (cached per tensor until it is modified in place)."""
    cached = _DIGESTS.get(id(tensor))
    if cached is not None and cached[0]() is tensor and cached[1] == tensor._version:
        return cached[2]
    digest = hashlib.sha256()
    _update(digest, tensor)
    value = digest.hexdigest()
    if tensor.numel() >= 1 << 16:
        key = id(tensor)
        _DIGESTS[key] = (weakref.ref(tensor, lambda _ref, key=key: _DIGESTS.pop(key, None)), tensor._version, value)
    return value


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state dict: every tensor's name, shape, dtype and values."""
    digest = hashlib.sha256()
    for name, tensor in unwrap_model(module).state_dict().items():
        digest.update(name.encode())
        _update(digest, tensor)
    return digest.hexdigest()


def module_options(module: object) -> dict[str, Any]:
    """A module's hyper-parameters: its constructor's arguments, read back from the public
    attributes of the same name, where they are numbers, strings or lists of them.

    Loss modules keep their options so (``LogitKL(temperature=4.0).temperature``); this reads
    them back without each loss declaring them, and without state such as a call counter.
    """
    try:
        parameters = inspect.signature(type(module).__init__).parameters
    except (TypeError, ValueError):
        return {}
    options: dict[str, Any] = {}
    for name, parameter in parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        value = getattr(module, name, None) if not name.startswith("_") else None
        if isinstance(value, _SCALARS) and hasattr(module, name):
            options[name] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(item, _SCALARS) for item in value):
            options[name] = list(value)
    return options


def _json_number(value: Any) -> Any:
    # NaN and infinities are not JSON; as strings they still compare and print.
    return repr(value) if isinstance(value, float) and not math.isfinite(value) else value


def _labels_of(dataset: object) -> Tensor | None:
    for name in ("labels", "targets"):
        value = getattr(dataset, name, None)
        if isinstance(value, Tensor):
            return value
        if isinstance(value, (list, tuple, np.ndarray)) and len(value) == len(dataset):  # type: ignore[arg-type]
            return torch.as_tensor(np.asarray(value))
    return None


def dataset_fingerprint(dataset: object) -> dict[str, Any]:
    """What a data set holds, as far as it can be told without iterating it.

    Recognised, in this order: a ``fingerprint()`` method (:class:`kdkit.data.ImageTensorDataset`
    has one), ``torch.utils.data.Subset`` (its indices and its data set's fingerprint),
    ``TensorDataset`` (its tensors), and folder data sets with ``samples`` (torchvision's
    ``ImageFolder``: relative paths, labels and file sizes). Anything else is described by its
    type and size only (``"content": "unchecked"``).

    Returns:
        JSON: ``kind``, ``size`` and, where known, ``digest`` and ``label_range`` (``[min, max]``).
    """
    from torch.utils.data import Subset, TensorDataset

    own = getattr(dataset, "fingerprint", None)
    if callable(own):
        return dict(own())
    record: dict[str, Any] = {"kind": type(dataset).__name__}
    try:
        record["size"] = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        record["size"] = None
    digest = hashlib.sha256()
    if isinstance(dataset, Subset):
        inner = dataset_fingerprint(dataset.dataset)
        digest.update(repr(sorted(inner.items())).encode())
        digest.update(np.asarray(dataset.indices, dtype=np.int64).tobytes())
        if "digest" not in inner:
            return {**record, "content": "unchecked"}
    elif isinstance(dataset, TensorDataset):
        for tensor in dataset.tensors:
            digest.update(tensor_digest(tensor).encode())
        if len(dataset.tensors) >= 2:
            record["label_range"] = _label_range(dataset.tensors[1])
    elif isinstance(getattr(dataset, "samples", None), list):
        import os

        root = os.fspath(getattr(dataset, "root", "") or "")
        for path, label in dataset.samples:  # type: ignore[attr-defined]
            relative = os.path.relpath(path, root) if root else os.path.basename(path)
            size = os.path.getsize(path) if os.path.exists(path) else -1
            digest.update(f"{relative}\0{label}\0{size}\n".encode())
    else:
        labels = _labels_of(dataset)
        if labels is not None:
            record["label_range"] = _label_range(labels)
        return {**record, "content": "unchecked"}
    labels = _labels_of(dataset)
    if labels is not None and "label_range" not in record:
        record["label_range"] = _label_range(labels)
    record["digest"] = digest.hexdigest()
    return record


def _label_range(labels: Tensor) -> list[int] | None:
    if labels.numel() == 0 or labels.is_floating_point() or labels.dim() != 1:
        return None
    return [int(labels.min()), int(labels.max())]


def _loader_dataset(loader: object) -> object | None:
    return getattr(loader, "dataset", None)


def run_fingerprint(task: nn.Module, loaders: Mapping[str, object | None]) -> dict[str, Any]:
    """The fingerprint of a run of ``task`` on ``loaders`` (``{"train": ..., "val": ...}``).

    Returns:
        ``{"teachers": [...], "objective": {...}, "data": {name: ...}}``; see the module docstring.
    """
    inner = unwrap_model(task)
    teachers = getattr(inner, "teachers", None)
    record: dict[str, Any] = {
        "teachers": [{"class": type(unwrap_model(model)).__name__, "weights": weights_digest(model)}
                     for model in (teachers or [])],
    }
    objective = getattr(inner, "objective", None)
    record["objective"] = objective() if callable(objective) else {"task": type(inner).__name__}
    data: dict[str, Any] = {}
    for name, loader in loaders.items():
        dataset = _loader_dataset(loader) if loader is not None else None
        if dataset is not None:
            data[name] = dataset_fingerprint(dataset)
    record["data"] = data
    return _jsonable(record)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, float):
        return _json_number(value)
    if isinstance(value, _SCALARS):
        return value
    return str(value)


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return f"sha256 {value[:12]}"
    if isinstance(value, (Mapping, list)):
        return json.dumps(value, sort_keys=True, default=str)
    return repr(value)


def _compare(old: Any, new: Any, where: str, lines: list[str]) -> None:
    """Appends one line per difference below ``where``; a part present on one side only is one line."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in sorted(set(old) | set(new), key=lambda k: (not str(k).isdigit(), int(k) if str(k).isdigit() else str(k))):
            if key not in old:
                lines.append(f"{where}.{key}: not in the checkpoint, now {_short(new[key])}")
            elif key not in new:
                lines.append(f"{where}.{key}: checkpoint {_short(old[key])}, not now")
            else:
                _compare(old[key], new[key], f"{where}.{key}", lines)
    elif (isinstance(old, list) and isinstance(new, list) and len(old) == len(new)
          and any(isinstance(item, Mapping) for item in old)):
        for index, (before, after) in enumerate(zip(old, new)):
            _compare(before, after, f"{where}.{index}", lines)
    elif old != new:
        lines.append(f"{where}: checkpoint {_short(old)}, now {_short(new)}")


_PART_NAMES = {"teachers": "teacher", "objective": "objective", "data": "data", "input_shape": "input shape"}


def fingerprint_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Every difference between two fingerprints, one line each, naming the item and both values.

    Only the parts both fingerprints have are compared (a checkpoint written before a part was
    recorded does not hold it).
    """
    lines: list[str] = []
    for part in ("teachers", "objective", "data", "input_shape"):
        if part in saved and part in current:
            _compare(saved[part], current[part], _PART_NAMES[part], lines)
    return lines
