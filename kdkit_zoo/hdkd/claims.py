"""Several workers on one experiment's output folder: the run claims, and decisions every process shares.

A worker is one ``accelerate launch`` (or one Python process) running the experiment. Workers
that share an output folder split its runs between them by claiming each run before they train
or collect it (:class:`RunClaims`); what the claims decide is taken on the main process and
broadcast (:func:`main_decides`), so that every process of one launch follows it.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, one worker per output folder
    fcntl = None

from accelerate import PartialState
from accelerate.utils import broadcast_object_list

__all__ = ["RunClaims", "main_decides"]

logger = logging.getLogger(__name__)


def main_decides(decide: Callable[[], object]) -> object:
    """``decide()`` on the main process, its result (or its error) broadcast to every process.

    Decisions about files other workers may change at any moment (a lock, a finished checkpoint)
    must be the same on every process of one ``accelerate launch``, or their collectives hang.

    Args:
        decide: What to run on the main process; its result must be picklable.

    Returns:
        What ``decide()`` returned on the main process.

    Raises:
        Exception: What ``decide()`` raised on the main process, raised on every process.
    """
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


class RunClaims:
    """Locks that let several processes (workers) share one experiment's output folder.

    Every worker first joins the folder (:meth:`join`), then claims each run before it trains or
    collects it (:meth:`acquire`). Both are POSIX record locks (``fcntl.lockf``) on files in
    ``<output_dir>/.claims/``: the kernel drops them when the holder exits, so a killed worker
    leaves no stale claim, and the processes a worker forks (DataLoader workers) do not inherit
    them. One process holds each lock once: two objects of one process do not exclude each other.
    Under ``accelerate launch`` with several processes the main process locks for all of them.
    Where the file system has no locks, or on Windows, every claim succeeds after a warning: run
    one worker per folder there.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._held: dict[str, int] = {}

    def join(self, *, resume: bool) -> None:
        """Joins the folder: beside other workers with ``resume``, alone without it.

        Raises:
            RuntimeError: a worker with ``resume`` meets one without it, or the other way round
                (a worker without ``resume`` retrains every run, the others' too).
        """
        if main_decides(lambda: self._lock("experiment", shared=resume)):
            return
        if not resume and main_decides(self._others_resume):
            raise RuntimeError(
                f"other workers are training in {self.folder.parent}: start this one with resume (--resume) "
                "to share the runs with them, or give it another output folder"
            )
        raise RuntimeError(
            f"a worker without resume is training in {self.folder.parent}: it retrains every run, so no other "
            "worker can share the folder with it; wait for it to end, or give this one another output folder"
        )

    def _others_resume(self) -> bool:
        """Whether the workers in the folder joined with resume (they share it), not without."""
        if shared := self._lock("experiment", shared=True):
            self.release("experiment")
        return shared

    def acquire(self, name: str) -> bool:
        """Claims run ``name`` unless another worker holds it; ``True`` when this worker now holds it."""
        return bool(main_decides(lambda: self._lock(name)))

    def release(self, name: str) -> None:
        """Gives up a claim taken with :meth:`acquire` (nothing when not held)."""
        if (fd := self._held.pop(name, None)) is not None:
            os.close(fd)  # closing the descriptor drops the lock

    def holder(self, name: str) -> str:
        """Who last claimed ``name`` (for messages); only for claims this process does not hold,
        since closing any descriptor of a locked file drops this process's lock on it."""
        path = self.folder / f"{name}.lock"
        return path.read_text().strip() if path.exists() else "?"

    def _lock(self, name: str, *, shared: bool = False) -> bool:
        if fcntl is None:
            _warn_no_locks("this platform has no fcntl")
            return True
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            if not shared:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EACCES, errno.EAGAIN):
                return False
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                _warn_no_locks(f"{self.folder} does not support file locks ({error.strerror})")
                return True
            raise
        self._held[name] = fd
        return True


@functools.cache
def _warn_no_locks(reason: str) -> None:
    logger.warning("%s: run claims are off, so run one worker per output folder", reason)
