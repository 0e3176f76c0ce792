"""Shared test helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdkit_zoo.hdkd.datasets import dataset_dir


def _real_dataset(name: str) -> Path | None:
    try:
        return dataset_dir(name)
    except FileNotFoundError:
        return None


def requires_real_data(name: str) -> pytest.MarkDecorator:
    """Skip unless the real data set ``name`` is found by the experiment's own lookup."""
    return pytest.mark.skipif(
        _real_dataset(name) is None,
        reason=f"real data set {name}/ not found (put it under ../shared/data or set KDKIT_DATA_ROOT)",
    )


class StopAtFit(Exception):
    """Raised by the ``fit_calls`` fixture's ``Trainer.fit`` in place of training."""


@pytest.fixture()
def fit_calls(monkeypatch) -> list[dict]:
    """``Trainer.fit`` replaced by a stub that records its keyword arguments and raises :class:`StopAtFit`.

    For tests of what a script asks of each fit (resume, overwrite) without training.
    """
    from kdkit.train import Trainer

    calls: list[dict] = []

    def fit(self, train_loader, val_loader=None, **kwargs):
        calls.append(kwargs)
        raise StopAtFit

    monkeypatch.setattr(Trainer, "fit", fit)
    return calls
