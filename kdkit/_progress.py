"""Progress bars that suit both a terminal and a log file."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

# Redirected to a file, a bar redrawn ten times a second floods the log with carriage-return
# frames; there it is redrawn at most once a minute instead. Notebook widgets (whose stderr is
# not a terminal either) keep tqdm's default.
LOG_FILE_INTERVAL_S = 60.0


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """A ``tqdm`` bar, redrawn at most every :data:`LOG_FILE_INTERVAL_S` when stderr is not a terminal."""
    if not sys.stderr.isatty() and "notebook" not in tqdm.__module__:
        kwargs.setdefault("mininterval", LOG_FILE_INTERVAL_S)
    return tqdm(iterable, **kwargs)
