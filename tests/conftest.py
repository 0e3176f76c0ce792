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
