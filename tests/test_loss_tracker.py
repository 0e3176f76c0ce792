"""Tests of kdkit.loss_tracker: losses summed and checked on the device, read back at once."""

from __future__ import annotations

import math

import pytest
import torch

from kdkit.loss_tracker import LossTracker

NAN, INF = float("nan"), float("inf")


def test_means_are_weighted_by_batch_size_and_accept_floats() -> None:
    tracker = LossTracker("cpu")
    tracker.update(torch.tensor(1.0), {"ce": torch.tensor(0.75), "kl": 0.25}, size=4, step=1)
    tracker.update(torch.tensor(4.0, dtype=torch.bfloat16), {"ce": torch.tensor(3.0), "kl": 1.0}, size=2, step=2)
    reading = tracker.read()
    assert reading.samples == 6
    assert reading.loss == pytest.approx((1.0 * 4 + 4.0 * 2) / 6)
    assert reading.terms == pytest.approx({"ce": (0.75 * 4 + 3.0 * 2) / 6, "kl": (0.25 * 4 + 1.0 * 2) / 6})
    assert reading.non_finite is None
    tracker.update(torch.tensor(1.0), {"ce": 1.0, "kl": 0.0, "late": 2.0}, size=6, step=3)  # a term seen late
    assert tracker.read().terms["late"] == pytest.approx(2.0 * 6 / 12)


def test_the_first_non_finite_batch_is_kept_with_its_terms() -> None:
    tracker = LossTracker("cpu")
    tracker.update(torch.tensor(1.0), {"ce": torch.tensor(1.0)}, size=2, step=1)
    tracker.update(torch.tensor(INF), {"ce": torch.tensor(INF)}, size=2, step=1)  # accumulating: the same step
    tracker.update(torch.tensor(NAN), {"ce": torch.tensor(2.0)}, size=2, step=2)  # later ones do not replace it
    bad = tracker.read().non_finite
    assert bad is not None
    assert (bad.batch, bad.step, bad.process, bad.loss, bad.terms) == (1, 1, 0, INF, {"ce": INF})
    assert bad.describe() == ("non-finite loss term(s) 'ce'=inf (total loss inf)", ["ce"])

    only_total = LossTracker("cpu")
    only_total.update(torch.tensor(NAN), {"ce": 1.0}, size=1, step=1)
    what, terms = only_total.read().non_finite.describe()
    assert terms == ["loss"] and "every term is finite" in what


def test_several_processes_are_gathered_and_the_earliest_bad_batch_wins() -> None:
    other = LossTracker("cpu")  # what the second process accumulated
    other.update(torch.tensor(3.0), {"ce": 3.0}, size=4, step=1)
    other.update(torch.tensor(NAN), {"ce": NAN}, size=4, step=2)
    gathered: list[torch.Tensor] = []

    def gather(local: torch.Tensor) -> torch.Tensor:  # accelerator.gather of a 1-D tensor: concatenation
        gathered.append(local)
        return torch.cat([local, other._pack()])

    tracker = LossTracker("cpu", num_processes=2, gather=gather)
    tracker.update(torch.tensor(1.0), {"ce": 1.0}, size=4, step=1)
    tracker.update(torch.tensor(1.0), {"ce": 1.0}, size=4, step=2)
    reading = tracker.read()
    assert len(gathered) == 1
    assert reading.samples == 16 and math.isnan(reading.loss)
    assert reading.non_finite.process == 1 and reading.non_finite.batch == 1 and reading.non_finite.step == 2
    with pytest.raises(ValueError, match="gather"):
        LossTracker("cpu", num_processes=2)


def test_terms_must_be_scalars() -> None:
    tracker = LossTracker("cpu")
    with pytest.raises(ValueError, match="'kl' must be a scalar"):
        tracker.update(torch.tensor(1.0), {"kl": torch.ones(3)}, size=1, step=1)
    with pytest.raises(TypeError, match="'kl' must be a 0-dim tensor or a float"):
        tracker.update(torch.tensor(1.0), {"kl": "0.5"}, size=1, step=1)
