"""Several workers on one experiment's output folder: the run claims, and decisions every process shares.

A worker is one ``accelerate launch`` (or one Python process) running the experiment. Workers
that share an output folder split its runs between them by claiming each run before they train
or collect it (:class:`RunClaims`); what the claims decide is taken on the main process and
broadcast (:func:`kdkit.run_lock.main_decides`), so that every process of one launch follows it.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from kdkit.run_lock import LOCKS_UNSUPPORTED, lock_file, main_decides, unlock_file

__all__ = ["RunClaims"]

logger = logging.getLogger(__name__)


class RunClaims:
    """Locks that let several processes (workers) share one experiment's output folder.

    Every worker first joins the folder (:meth:`join`), then claims each run before it trains or
    collects it (:meth:`acquire`). Both are POSIX record locks (:func:`kdkit.run_lock.lock_file`) on files in
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
        unlock_file(self._held.pop(name, None))

    def holder(self, name: str) -> str:
        """Who last claimed ``name`` (for messages); only for claims this process does not hold,
        since closing any descriptor of a locked file drops this process's lock on it."""
        path = self.folder / f"{name}.lock"
        return path.read_text().strip() if path.exists() else "?"

    def _lock(self, name: str, *, shared: bool = False) -> bool:
        fd = lock_file(self.folder / f"{name}.lock", shared=shared, note=f"pid {os.getpid()} on {socket.gethostname()}\n")
        if fd is None:
            return False
        if fd != LOCKS_UNSUPPORTED:
            self._held[name] = fd
        return True
