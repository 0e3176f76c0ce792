"""Tests of kdkit.train_state: the run's progress and what a checkpoint records of it."""

from __future__ import annotations

from kdkit.train_state import TrainState


def test_best_epoch_follows_the_metric_in_its_direction() -> None:
    state = TrainState()
    assert state.improves(0.5, "max") and state.improves(0.5, "min") and not state.improves(float("nan"), "max")
    state.end_epoch({"epoch": 1}, improved=True, metric=0.5, val_metrics={"accuracy": 0.5})
    assert not state.improves(0.4, "max") and state.improves(0.4, "min") and not state.improves(0.5, "max")
    state.end_epoch({"epoch": 2}, improved=False, metric=0.4, val_metrics={"accuracy": 0.4})
    assert (state.epoch, state.best_epoch, state.best_metric, state.final_val_metrics) == (2, 1, 0.5, {"accuracy": 0.4})

    without_validation = TrainState()
    without_validation.end_epoch({"epoch": 1}, improved=True)
    assert without_validation.best_epoch == 1 and without_validation.best_metric is None


def test_round_trip_and_checkpoints_without_run_ids() -> None:
    state = TrainState(epoch=3, global_step=12, best_metric=0.9, best_epoch=2, history=[{"epoch": 1}],
                       final_val_metrics={"accuracy": 0.8})
    assert TrainState.from_dict({**state.to_dict(), "finished": False}) == state
    old = state.to_dict()
    del old["run_id"]
    restored = TrainState.from_dict(old)
    assert len(restored.run_id) == 16 and restored.run_id != state.run_id
    assert TrainState().run_id != TrainState().run_id
