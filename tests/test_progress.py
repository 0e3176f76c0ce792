"""Progress bars: quiet in log files, live in terminals."""

from __future__ import annotations

import io
import sys

import pytest

from kdkit._progress import LOG_FILE_INTERVAL_S, progress_bar


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream, interval", [(io.StringIO(), LOG_FILE_INTERVAL_S), (FakeTerminal(), 0.1)])
def test_bar_redraws_rarely_when_stderr_is_a_file(monkeypatch, stream, interval):
    monkeypatch.setattr(sys, "stderr", stream)
    bar = progress_bar(range(3), file=stream)
    assert bar.mininterval == interval
    assert list(bar) == [0, 1, 2]
    assert progress_bar(range(1), file=stream, mininterval=5).mininterval == 5  # an explicit choice wins
