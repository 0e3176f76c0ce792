"""Safe model files: atomic writes, safetensors weights with metadata, strict loading.

Every file is written to a temporary file in the destination's directory, flushed to disk
(``fsync``) and moved into place with :func:`os.replace`, so a crash or a kill at any moment
leaves either the previous file or the new one, never a half-written one.

Weights are stored as `safetensors <https://huggingface.co/docs/safetensors>`_ (no pickle).
Metadata values are JSON-encoded strings (safetensors metadata is ``dict[str, str]``), e.g.::

    save_model(student, "student.safetensors",
               metadata={"classes": ["benign", "malignant"], "model_name": "resnet18", "image_size": 224})
    meta = load_model(fresh_student, "student.safetensors", expected_classes=["benign", "malignant"])

Loading is strict: missing or unexpected keys, shape mismatches, a corrupt or truncated file and
class-name mismatches all raise :class:`CheckpointError` with the details.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .taps import unwrap_model

__all__ = [
    "CheckpointError",
    "atomic_write",
    "atomic_write_text",
    "clean_stale_temporaries",
    "fsync_dir",
    "load_model",
    "load_safetensors",
    "owned_temporary",
    "read_metadata",
    "save_model",
    "save_safetensors",
]

logger = logging.getLogger(__name__)

PathType = str | PathLike[str]

# How old a temporary file whose writer cannot be checked (another host, an unknown name) must
# be before clean_stale_temporaries removes it: a write takes minutes at most, not a day.
STALE_AFTER_SECONDS = 24 * 60 * 60

# Stored raw (not JSON-encoded) so that other safetensors tools recognise PyTorch files.
_FORMAT_KEY = "format"
_MAX_LISTED = 50


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable or does not match the model it is loaded into."""


# --------------------------------------------------------------------------- atomic files
def fsync_dir(path: PathType) -> None:
    """Flushes a directory entry (after a rename or a new file) to disk; a no-op where unsupported."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: PathType) -> None:
    with open(path, "rb+") as handle:
        handle.flush()
        os.fsync(handle.fileno())


# .<name>.<host>.<pid>.<token>.tmp, as owned_temporary names them.
_OWNED_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]{12})\.tmp$")


def _host_tag() -> str:
    # Host names may hold dots (node1.cluster): kept to the characters the pattern above reads.
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "unknown-host"


def owned_temporary(path: str | os.PathLike) -> Path:
    """Create an empty temporary file next to ``path`` that names its writer.

    The name is ``.<name>.<host>.<pid>.<token>.tmp``: the host and process id let
    :func:`clean_stale_temporaries` tell a file left behind by a killed writer from one still
    being written.

    Args:
        path: The file the temporary one will replace.

    Returns:
        The new, empty temporary file (created exclusively, with the umask's default mode).
    """
    path = Path(path)
    while True:
        candidate = path.with_name(f".{path.name}.{_host_tag()}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate


def _process_alive(pid: int) -> bool | None:
    """Whether process ``pid`` of this host runs; None where that cannot be told."""
    if os.name == "nt" or pid <= 0:
        # On Windows os.kill(pid, 0) sends CTRL_C_EVENT; pid 0 would mean our process group.
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    except (OSError, OverflowError):
        return None
    return True


def clean_stale_temporaries(
    folder: str | os.PathLike, pattern: str = ".*.tmp", *, max_age: float | None = STALE_AFTER_SECONDS
) -> list[Path]:
    """Remove the temporary files in ``folder`` that no live process is writing.

    A file named by :func:`owned_temporary` on this host (by host name) is removed when its
    process no longer runs, and kept while it does, whatever its age: a live writer's file is
    never removed (nor one whose process id has since been reused).
    Other files matching ``pattern``, such as those of kdkit before temporary files named their
    writer, or ones written on another host sharing the folder, are removed only
    once unmodified for ``max_age`` seconds. Files that vanish or cannot be removed meanwhile are
    left alone.

    Args:
        folder: The folder to clean (not its subfolders).
        pattern: Glob pattern of the temporary files, e.g. ``".*.pt.*.tmp"``.
        max_age: Seconds after its last modification that a file whose writer cannot be
            checked is taken to be abandoned; ``None``: never (a folder of the user's, where a
            file named like a temporary may be someone else's).

    Returns:
        The files removed.
    """
    removed = []
    host, now = _host_tag(), time.time()
    for candidate in Path(folder).glob(pattern):
        try:
            if not candidate.is_file():
                continue
            owner = _OWNED_TEMPORARY.match(candidate.name)
            alive = _process_alive(int(owner["pid"])) if owner and owner["host"] == host else None
            if alive is None:
                alive = max_age is None or now - candidate.stat().st_mtime < max_age
            if alive:
                continue
            candidate.unlink()
        except OSError:  # gone already (its writer finished), or not ours to remove
            continue
        logger.info("Removed stale temporary file %s", candidate)
        removed.append(candidate)
    return removed


def _new_sibling(path: Path) -> tuple[Path, int]:
    """Creates an empty temporary file next to ``path``, named for its writer (:func:`owned_temporary`).

    Returns:
        The file and the mode a plain write would leave ``path`` with: its current mode if it
        exists, else the umask's default for a new file (which the temporary file was created
        with; :func:`tempfile.mkstemp` would make it private, 0600).
    """
    candidate = owned_temporary(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        mode = candidate.stat().st_mode
    return candidate, stat.S_IMODE(mode)


def atomic_write(path: PathType, write_fn: Callable[[Path], Any]) -> Path:
    """Writes ``path`` atomically.

    ``write_fn(tmp_path)`` writes the complete content to ``tmp_path``, a fresh file in the
    same directory as ``path`` named for its writer (:func:`owned_temporary`), so that one a
    kill leaves behind is removed by :func:`clean_stale_temporaries`. The temporary file is then fsynced and renamed over ``path``
    (:func:`os.replace`), and the directory entry is fsynced. If ``write_fn`` raises, the
    temporary file is removed and ``path`` is left untouched. The file ends up with the
    permissions a plain write would give it: those of the file it replaces, or the umask's
    default for a new one.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    tmp, mode = _new_sibling(path)
    try:
        write_fn(tmp)
        # Writers such as safetensors replace the file with a private one of their own.
        os.chmod(tmp, mode)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)
    return path


def atomic_write_text(path: PathType, text: str) -> Path:
    """Writes a text file atomically (UTF-8)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# --------------------------------------------------------------------------- safetensors
def _prepare_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors; tensors sharing memory with an earlier one are copied.

    safetensors refuses tensors that share storage (tied weights); each name gets its own copy
    so that every key of the state dict is in the file and strict loading works.
    """
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in state.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"state[{name!r}] is a {type(tensor).__name__}, not a tensor")
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.numel() else None
        if key is not None and key in seen:
            t = t.clone()
        elif key is not None:
            seen.add(key)
        out[name] = t.contiguous()
    return out


def save_safetensors(state: Mapping[str, Tensor], path: PathType, metadata: Mapping[str, str] | None = None) -> Path:
    """Saves tensors to a safetensors file atomically.

    Args:
        state: Name to tensor (any device; copied to CPU).
        path: Destination file.
        metadata: ``dict[str, str]`` stored in the file header, as is.
    """
    from safetensors.torch import save_file

    tensors = _prepare_state(state)
    meta = None
    if metadata is not None:
        meta = {}
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"safetensors metadata must be dict[str, str]; got {key!r}: {type(value).__name__}")
            meta[key] = value
    return atomic_write(path, lambda tmp: save_file(tensors, os.fspath(tmp), metadata=meta))


def load_safetensors(path: PathType, device: str | torch.device = "cpu") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Reads a safetensors file.

    Returns:
        ``(tensors, raw_metadata)``; the metadata strings are not decoded.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is corrupt, truncated or not a safetensors file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with safe_open(os.fspath(path), framework="pt", device=str(device)) as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises SafetensorError (a bare Exception subclass)
        size = path.stat().st_size
        raise CheckpointError(
            f"cannot read {path} ({size} bytes): corrupt, truncated or not a safetensors file ({exc})"
        ) from exc
    return tensors, metadata


def _decode_metadata(raw: Mapping[str, str]) -> dict[str, Any]:
    decoded: dict[str, Any] = {}
    for key, value in raw.items():
        if key == _FORMAT_KEY:
            decoded[key] = value
            continue
        try:
            decoded[key] = json.loads(value)
        except (TypeError, ValueError):
            decoded[key] = value  # written by another tool: keep the raw string
    return decoded


def read_metadata(path: PathType) -> dict[str, Any]:
    """Returns the metadata of a safetensors file, JSON values decoded, without loading tensors.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file's header is unreadable.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            raw = dict(handle.metadata() or {})
    except Exception as exc:
        raise CheckpointError(f"cannot read the header of {path}: corrupt, truncated or not a safetensors file ({exc})") from exc
    return _decode_metadata(raw)


# --------------------------------------------------------------------------- models
def _strip_compile(key: str) -> str:
    """Removes the ``_orig_mod`` segments that ``torch.compile``-wrapped submodules add."""
    return ".".join(part for part in key.split(".") if part != "_orig_mod") if "_orig_mod" in key else key


def _normalise_key(key: str) -> str:
    """Strips the wrappers' key prefixes: a leading ``module.`` (DDP) and every ``_orig_mod.``."""
    key = _strip_compile(key)
    return key[len("module."):] if key.startswith("module.") else key


def _renamed(keys: list[str], rename: Callable[[str], str], what: str) -> dict[str, str]:
    """``{renamed: original}``; raises when two keys collide."""
    out: dict[str, str] = {}
    for key in keys:
        new = rename(key)
        if new in out:
            raise CheckpointError(f"{what}: keys {out[new]!r} and {key!r} both map to {new!r}")
        out[new] = key
    return out


def _model_state(model: nn.Module) -> dict[str, Tensor]:
    state = unwrap_model(model).state_dict()
    names = _renamed(list(state), _strip_compile, "model state dict")
    return {new: state[old] for new, old in names.items()}


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown += f", ... ({len(items) - _MAX_LISTED} more)"
    return shown


def save_model(model: nn.Module, path: PathType, *, metadata: Mapping[str, Any] | None = None) -> Path:
    """Saves a model's weights (its ``state_dict``) to a safetensors file, atomically.

    Wrappers (DDP ``module.``, ``torch.compile``'s ``_orig_mod.``) are removed first, so the file
    loads into the plain model.

    Args:
        model: The model (e.g. a distilled student), possibly wrapped.
        path: Destination ``.safetensors`` file.
        metadata: JSON-serialisable values stored in the header, e.g. ``classes``,
            ``model_name``, ``num_classes``, ``image_size``.

    Returns:
        ``path``.
    """
    meta: dict[str, str] = {_FORMAT_KEY: "pt"}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"metadata keys must be strings, got {key!r}")
        if key == _FORMAT_KEY:
            raise ValueError(f"metadata key {_FORMAT_KEY!r} is reserved")
        try:
            meta[key] = json.dumps(value)
        except TypeError as exc:
            raise TypeError(f"metadata[{key!r}] is not JSON-serialisable: {exc}") from exc
    return save_safetensors(_model_state(model), path, meta)


def load_model(
    model: nn.Module,
    path: PathType,
    *,
    expected_classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Loads weights saved by :func:`save_model` into ``model``, strictly.

    Args:
        model: A model of the same architecture (wrappers are handled).
        path: The ``.safetensors`` file.
        expected_classes: When given, the checkpoint's ``classes`` metadata must equal this list.

    Returns:
        The decoded metadata.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is corrupt or truncated; keys are missing or unexpected;
            shapes differ; the class names differ from ``expected_classes``.
    """
    path = Path(path)
    tensors, raw_meta = load_safetensors(path)
    metadata = _decode_metadata(raw_meta)

    if expected_classes is not None:
        expected = [str(c) for c in expected_classes]
        stored = metadata.get("classes")
        if stored is None:
            raise CheckpointError(
                f"{path} records no class names ('classes' metadata), so they cannot be checked against "
                f"expected_classes={expected}"
            )
        stored_list = [str(c) for c in stored] if isinstance(stored, (list, tuple)) else stored
        if stored_list != expected:
            raise CheckpointError(
                f"class names differ between {path} and the expected ones:\n"
                f"  checkpoint: {stored_list}\n  expected:   {expected}"
            )

    target = unwrap_model(model)
    own_state = target.state_dict()
    if set(tensors) == set(own_state):
        own_keys = {k: k for k in own_state}
        loaded = tensors
    else:  # match through the wrappers' prefixes (DDP `module.`, torch.compile `_orig_mod.`)
        own_keys = _renamed(list(own_state), _normalise_key, f"{type(target).__name__} state dict")
        loaded = {new: tensors[old] for new, old in _renamed(list(tensors), _normalise_key, str(path)).items()}

    missing = sorted(set(own_keys) - set(loaded))
    unexpected = sorted(set(loaded) - set(own_keys))
    mismatched = []
    for key in sorted(set(own_keys) & set(loaded)):
        want = tuple(own_state[own_keys[key]].shape)
        got = tuple(loaded[key].shape)
        if want != got:
            mismatched.append(f"{key}: checkpoint {got} vs model {want}")
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_listing(mismatched)}")
    if problems:
        raise CheckpointError(
            f"{path} does not match {type(target).__name__}:\n  " + "\n  ".join(problems)
        )
    target.load_state_dict({own_keys[k]: v for k, v in loaded.items()}, strict=True)
    return metadata
