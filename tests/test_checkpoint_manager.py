"""Tests of kdkit.checkpoint_manager: atomic swaps, recovery after kills, resume checks.

The Trainer-level tests (kills during a real save, exact resume) are in test_train.py; these
drive the manager directly, with a stand-in for the Accelerator's save_state.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from kdkit.checkpoint_manager import (
    STATE_FILE,
    STATE_VERSION,
    CheckpointManager,
    ResumeError,
    checkpoint_epoch,
    find_checkpoint,
)


class FakeAccelerator(SimpleNamespace):
    """One process; save_state writes one file, as accelerate's writes the model and optimizer."""

    is_main_process = True
    num_processes = 1

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, output_dir: str) -> None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_text("weights")


def record(epoch: int, **overrides) -> dict:
    base = {"format_version": STATE_VERSION, "epoch": epoch, "config": {"lr": 0.1, "log_every": 5},
            "model": {"task": "T", "student": "S", "num_tensors": 2, "sha256": "x"}, "class_names": ["a", "b"],
            "num_processes": 1, "updates_per_epoch": 3, "finished": False}
    base.update(overrides)
    return base


def test_saves_keep_the_last_checkpoints_and_find_resolves_them(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "checkpoints", FakeAccelerator(), keep_last=2)
    for epoch in (1, 2, 3):
        assert manager.save(record(epoch)) == tmp_path / "checkpoints" / "last"
    assert sorted(p.name for p in manager.root.iterdir()) == ["epoch_0002", "last"]
    assert checkpoint_epoch(tmp_path) == checkpoint_epoch(manager.root) == 3
    assert find_checkpoint(manager.root / "epoch_0002") == manager.root / "epoch_0002"
    assert manager.resolve(True) == manager.root / "last" and manager.resolve(False) is None
    with pytest.raises(FileNotFoundError, match=STATE_FILE):
        manager.resolve(tmp_path / "nowhere")


def test_recover_repairs_a_kill_between_the_two_renames(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, FakeAccelerator())
    manager.save(record(1))
    (tmp_path / "last").rename(tmp_path / "last.old")  # killed after the first rename
    (tmp_path / "last.tmp").mkdir()  # and the new checkpoint half-written
    (tmp_path / ".trash-last.old-1-2").mkdir()  # and a deletion interrupted earlier
    assert find_checkpoint(tmp_path) == tmp_path / "last.old"
    manager.recover()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"] and checkpoint_epoch(tmp_path) == 1

    (tmp_path / "last" / STATE_FILE).unlink()  # an incomplete `last` is never resumed
    assert find_checkpoint(tmp_path) is None and manager.resolve(True) is None


def test_check_compatible_lists_every_difference(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, FakeAccelerator())
    current = record(0, config={"lr": 0.2, "log_every": 50}, class_names=["a", "c"], updates_per_epoch=4)
    with pytest.raises(ResumeError) as info:
        manager.check_compatible(record(1), current, tmp_path)
    message = str(info.value)
    assert "'lr': checkpoint 0.1, now 0.2" in message and "log_every" not in message  # a resume-free field
    assert "class_names" in message and "4 optimizer updates" not in message and "now 4" in message
    manager.check_compatible(record(1, finished=True, num_processes=2), record(0, num_processes=1), tmp_path)
    with pytest.raises(ResumeError, match="num_processes: checkpoint 2, now 1"):
        manager.check_compatible(record(1, num_processes=2), record(0), tmp_path)
    with pytest.raises(ResumeError, match="unsupported checkpoint format"):
        manager.check_compatible(record(1, format_version=99), record(0), tmp_path)
    # a config field added since the checkpoint was written is resume-free only when listed as such
    manager.check_compatible(record(1), record(0, config={"lr": 0.1, "log_every": 5, "cudnn_benchmark": True}), tmp_path)
    with pytest.raises(ResumeError, match="'seed'"):
        manager.check_compatible(record(1), record(0, config={"lr": 0.1, "log_every": 5, "seed": 3}), tmp_path)

