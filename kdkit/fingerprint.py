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
  (:func:`dataset_fingerprint`), and for stored images their shape (so another image size).

What cannot be read is said, not guessed: a data set of a type kdkit cannot look into is
recorded as ``"content": "unchecked"`` (the Trainer logs a warning), and a loss's constructor
arguments that are not kept as attributes are listed as ``"unread"``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
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


def _option_value(value: Any) -> tuple[bool, Any]:
    """``(readable, JSON value)`` of an attribute: a number or string, or a list or dict of them."""
    if isinstance(value, _SCALARS):
        return True, value
    if isinstance(value, (list, tuple)) and all(isinstance(item, _SCALARS) for item in value):
        return True, list(value)
    if isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, _SCALARS) for k, v in value.items()):
        return True, dict(sorted(value.items()))
    if isinstance(value, Tensor) and value.numel() <= 64 and value.device.type != "meta":
        return True, value.detach().cpu().tolist()
    return False, None


def module_options(module: object) -> dict[str, Any]:
    """A module's hyper-parameters: its constructor's arguments, read back from the attributes of
    the same name (public, or private with a leading underscore), where they are numbers, strings,
    small tensors (buffers) or lists and dicts of numbers and strings.

    Loss modules keep their options so (``LogitKL(temperature=4.0).temperature``); this reads
    them back without each loss declaring them, and without state such as a call counter. An
    argument kept under no such attribute is listed under ``"unread"``, so that a fingerprint
    says what it could not see.
    """
    try:
        parameters = inspect.signature(type(module).__init__).parameters
    except (TypeError, ValueError):
        return {}
    options: dict[str, Any] = {}
    unread: list[str] = []
    for name, parameter in parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        for attribute in (name, f"_{name}"):
            if hasattr(module, attribute):
                readable, value = _option_value(getattr(module, attribute))
                if readable:
                    options[name] = value
                    break
        else:
            unread.append(name)
    if unread:
        options["unread"] = unread
    return options


def _json_number(value: Any) -> Any:
    # NaN and infinities are not JSON; as strings they still compare and print.
    return repr(value) if isinstance(value, float) and not math.isfinite(value) else value


def dataset_fingerprint(dataset: object) -> dict[str, Any]:
    """What a data set holds, as far as it can be told without iterating it; never raises.

    Recognised, in this order: a ``fingerprint()`` method (:class:`kdkit.data.ImageTensorDataset`
    has one), ``torch.utils.data.Subset`` (its indices and its data set's fingerprint),
    ``TensorDataset`` (its tensors), and torchvision's folder data sets (``DatasetFolder``,
    ``ImageFolder``: each file's path below the root, label, size and modification time, as the
    decoded-image cache tells a changed file). Anything else is described by its type and size
    only (``"content": "unchecked"``); so is one whose fingerprinting fails.

    ``label_range`` (``[min, max]``) is given only where the labels are known to be what the
    items hold: an ``ImageTensorDataset``, an ``(images, labels)`` ``TensorDataset`` and a
    torchvision folder data set.

    Returns:
        JSON: ``kind``, ``size`` and, where known, ``digest``, ``image_shape`` and ``label_range``.
    """
    record: dict[str, Any] = {"kind": type(dataset).__name__}
    try:
        record["size"] = len(dataset)  # type: ignore[arg-type]
    except Exception:  # an iterable data set
        record["size"] = None
    try:
        return _jsonable(_fingerprint(dataset, record))
    except Exception as error:  # a data set of a structure kdkit does not know: described, never a failure
        return {**record, "content": "unchecked", "why": f"{type(error).__name__}: {error}"}


def _fingerprint(dataset: object, record: dict[str, Any]) -> dict[str, Any]:
    from torch.utils.data import Subset, TensorDataset

    own = getattr(dataset, "fingerprint", None)
    if callable(own):
        return dict(own())
    digest = hashlib.sha256()
    if isinstance(dataset, Subset):
        inner = dataset_fingerprint(dataset.dataset)
        if "digest" not in inner:
            return {**record, "content": "unchecked"}
        digest.update(inner["digest"].encode())
        digest.update(np.asarray(dataset.indices, dtype=np.int64).tobytes())
    elif isinstance(dataset, TensorDataset):
        for tensor in dataset.tensors:
            digest.update(tensor_digest(tensor).encode())
        if dataset.tensors:
            record["image_shape"] = list(dataset.tensors[0].shape[1:])
        if len(dataset.tensors) == 2:
            record["label_range"] = _label_range(dataset.tensors[1])
    elif _is_folder_dataset(dataset):
        root = os.fspath(dataset.root)  # type: ignore[attr-defined]
        labels = []
        for path, label in dataset.samples:  # type: ignore[attr-defined]
            stat = os.stat(path)
            digest.update(f"{os.path.relpath(path, root)}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            labels.append(int(label))
        record["label_range"] = [min(labels), max(labels)] if labels else None
    else:
        return {**record, "content": "unchecked"}
    record["digest"] = digest.hexdigest()
    return record


def _is_folder_dataset(dataset: object) -> bool:
    """torchvision's ``DatasetFolder`` (``ImageFolder``): ``samples`` of ``(path, class index)`` under ``root``."""
    try:
        from torchvision.datasets import DatasetFolder
    except ImportError:  # torchvision is optional here
        return False
    return isinstance(dataset, DatasetFolder)


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


_PART_NAMES = {"teachers": "teacher", "objective": "objective", "data": "data"}


def fingerprint_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Every difference between two fingerprints, one line each, naming the item and both values.

    Only the parts both fingerprints have are compared (a checkpoint written before a part was
    recorded does not hold it).
    """
    lines: list[str] = []
    for part in ("teachers", "objective", "data"):
        if part in saved and part in current:
            _compare(saved[part], current[part], _PART_NAMES[part], lines)
    return lines
