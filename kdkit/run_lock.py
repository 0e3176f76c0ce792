"""Advisory file locks: one training process per run folder, and the primitive under them.

:func:`lock_file` takes a POSIX record lock (``fcntl.lockf``) on a file without waiting. The
kernel drops it when the holder exits, however it exits, so a killed run leaves no stale lock;
the processes a holder forks (DataLoader workers) do not inherit it. One process holds a lock
once: a second lock on the same file by the same process succeeds.

:class:`RunLock` is what :meth:`kdkit.Trainer.fit` holds on its ``output_dir`` while it trains,
so that a second process started on the same folder stops at once with a message naming the
first, instead of both writing the same checkpoints and metrics::

    with RunLock("runs/resnet18"):
        ...  # train

Where the file system has no locks, or on Windows, locking succeeds after a warning.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import socket
import sys
import time
from os import PathLike
from collections.abc import Callable
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None

__all__ = ["LOCK_FILE", "LOCKS_UNSUPPORTED", "RunLock", "RunLockedError", "lock_file", "main_decides", "unlock_file"]

logger = logging.getLogger(__name__)

LOCK_FILE = ".kdkit-run.lock"  #: in a run's output folder, held while a process trains in it
LOCKS_UNSUPPORTED = -1  #: what :func:`lock_file` returns where no lock can be taken (it warned)
_HELD: set[str] = set()  # the run folders this process holds


class RunLockedError(RuntimeError):
    """Another process is training in the run folder.

    Attributes:
        folder: The run folder.
        holder: What the holder wrote about itself (pid, host, start time, command), or ``{}``.
    """

    def __init__(self, message: str, folder: Path | None = None, holder: dict[str, object] | None = None) -> None:
        super().__init__(message)  # one positional argument: the error pickles (broadcast to every process)
        self.folder = folder
        self.holder = holder or {}


def lock_file(path: str | PathLike[str], *, shared: bool = False, note: str | None = None) -> int | None:
    """Locks ``path`` (created if needed) without waiting.

    Args:
        path: The lock file.
        shared: A shared (reader) lock instead of an exclusive one.
        note: Written into the file once an exclusive lock is held (who holds it, for messages).

    Returns:
        The open descriptor that holds the lock (close it, or :func:`unlock_file`, to release);
        ``None`` when another process holds a conflicting lock; :data:`LOCKS_UNSUPPORTED` where
        the platform or file system has no locks.

    Raises:
        OSError: The file cannot be opened or locked for another reason.
    """
    if fcntl is None:
        _warn_no_locks("this platform has no fcntl")
        return LOCKS_UNSUPPORTED
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.lockf(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        if note is not None and not shared:
            os.ftruncate(fd, 0)
            os.write(fd, note.encode())
    except OSError as error:
        os.close(fd)
        if error.errno in (errno.EACCES, errno.EAGAIN):
            return None
        if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            _warn_no_locks(f"{path.parent} does not support file locks ({error.strerror})")
            return LOCKS_UNSUPPORTED
        raise
    return fd


def unlock_file(fd: int | None) -> None:
    """Releases a lock :func:`lock_file` returned (nothing for ``None`` or :data:`LOCKS_UNSUPPORTED`)."""
    if fd is not None and fd >= 0:
        os.close(fd)  # closing the descriptor drops the lock


def main_decides(decide: Callable[[], object]) -> object:
    """``decide()`` on the main process, its result (or its error) broadcast to every process.

    Decisions about files other processes may change at any moment (a lock, a finished
    checkpoint) must be the same on every process of one ``accelerate launch``, or their
    collectives hang.

    Args:
        decide: What to run on the main process; its result must be picklable.

    Returns:
        What ``decide()`` returned on the main process.

    Raises:
        Exception: What ``decide()`` raised on the main process, raised on every process.
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    outcome: list[object] = [None]
    if state.is_main_process:
        try:
            outcome[0] = decide()
        except Exception as error:  # raised on every process below, not on the main one alone
            outcome[0] = error
    if state.num_processes > 1:
        broadcast_object_list(outcome)
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


@functools.cache
def _warn_no_locks(reason: str) -> None:
    logger.warning("%s: file locks are off, so run one process per output folder", reason)


class RunLock:
    """An exclusive lock on a run folder, held by the one process that trains in it.

    Args:
        folder: The run's output folder (created if needed).

    Raises:
        RunLockedError: On :meth:`acquire`, when another process holds the folder.
    """

    def __init__(self, folder: str | PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Takes the lock, writing who holds it (pid, host, start time, command) into the lock file.

        Raises:
            RunLockedError: Another process holds the folder, or another lock of this process does
                (a record lock belongs to the process: a second one would not exclude it, and
                releasing either would release both).
        """
        if self._fd is not None:
            return self
        key = os.path.realpath(self.folder)
        if key in _HELD:
            raise RunLockedError(f"{self.folder} is in use: this process is already training in it (a Trainer.fit "
                                 "inside another's on the same output folder); give the inner run another folder",
                                 folder=self.folder, holder={"pid": os.getpid()})
        note = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)})
        fd = lock_file(self.path, note=note + "\n")
        if fd is None:
            holder = self.holder()
            who = (f"process {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')}: "
                   f"{holder.get('command') or '?'})") if holder else "another process"
            raise RunLockedError(
                f"{self.folder} is in use: {who} is training in it. Wait for it to end, stop it, or give this "
                "run another output folder", folder=self.folder, holder=holder)
        self._fd = fd
        _HELD.add(key)
        return self

    def release(self) -> None:
        """Gives the lock up (nothing when not held)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            _HELD.discard(os.path.realpath(self.folder))
        unlock_file(fd)

    def holder(self) -> dict[str, object]:
        """What the holder wrote about itself, or ``{}``; read only while this process does not
        hold the lock, since closing any descriptor of a locked file drops this process's lock."""
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()
