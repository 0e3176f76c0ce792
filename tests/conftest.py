"""Shared test helpers."""

from __future__ import annotations

from collections.abc import Sequence
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


def colour_class_folders(root: Path, classes: Sequence[str], *, per_class: int, size: int) -> Path:
    """``root/<class>/<class>_NN.png``: small seeded images, each class its own colour (learnable, and distinct)."""
    import numpy as np
    from PIL import Image

    generator = np.random.default_rng(0)
    for index, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for item in range(per_class):
            pixels = generator.integers(0, 80, (size, size, 3), dtype=np.uint8)
            pixels[..., index] += 150
            Image.fromarray(pixels).save(folder / f"{name}_{item:02d}.png")
    return root
