"""A resume continues the run it interrupted, or is refused, naming what changed (kdkit.fingerprint);
one process per run folder (kdkit.run_lock); a fresh start never silently replaces a run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from kdkit import Distiller, LossTerm
from kdkit.checkpoint_manager import describe_run
from kdkit.fingerprint import dataset_fingerprint, fingerprint_differences, module_options, weights_digest
from kdkit.losses import LogitKL
from kdkit.run_lock import LOCK_FILE, RunLock, RunLockedError
from kdkit.train import ResumeError, RunExistsError, Supervised, TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b", "c"]


def net(seed: int, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3))


def images(seed: int = 0, size: int = 8, count: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(count, 3, size, size, generator=g), torch.arange(count) % 3)


class Interrupt:
    """A training transform that stops the run at its ``at``-th batch (1-based), as a kill would."""

    def __init__(self, at: int | None) -> None:
        self.at, self.calls = at, 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt("simulated interruption")
        return batch


def distil(folder: Path, *, teacher: nn.Module | None = None, losses=None, data: Dataset | None = None,
           interrupt_at: int | None = None, resume: bool = True) -> Trainer:
    distiller = Distiller(teacher if teacher is not None else net(1), net(2), losses=losses or {"ce": 0.5, "kl": 0.5})
    trainer = Trainer(distiller, TrainConfig(epochs=3, lr=0.01, output_dir=folder, progress=False, seed=0),
                      class_names=CLASSES, train_transform=Interrupt(interrupt_at))
    loader = DataLoader(data if data is not None else images(), batch_size=8, shuffle=True)
    trainer.fit(loader, resume=resume)
    return trainer


@pytest.fixture()
def interrupted(tmp_path: Path) -> Path:
    """A run stopped in its second epoch (two batches an epoch), its checkpoint after epoch 1."""
    with pytest.raises(KeyboardInterrupt):
        distil(tmp_path, interrupt_at=3)
    return tmp_path


@pytest.mark.parametrize(("change", "named"), [
    (dict(teacher=net(7)), r"teacher\.0\.weights: checkpoint sha256 \w{12}, now sha256 \w{12}"),
    (dict(teacher=net(1, width=16)), r"teacher\.0\.weights"),
    (dict(teacher=nn.Sequential(nn.Flatten(), nn.Linear(192, 3))), r"teacher\.0\.weights"),
    (dict(losses={"ce": 0.5, "kl": 5.0}), r"objective\.terms\.kl\.weight: checkpoint 0\.5, now 5\.0"),
    (dict(losses={"ce": 0.5, "dkd": 0.5}), r"objective\.terms\.dkd: not in the checkpoint, now \{.*\"loss\": \"dkd\".*\n"
                                           r"  objective\.terms\.kl: checkpoint \{.*\"loss\": \"kl\".*\}, not now"),
    (dict(losses=[LossTerm("ce", 0.5), LossTerm("kl", 0.5, temperature=2.0)]),
     r"objective\.terms\.kl\.options\.temperature: checkpoint 4\.0, now 2\.0"),
    (dict(data=images(seed=5)), r"data\.train\.digest: checkpoint sha256 \w{12}, now sha256 \w{12}"),
    (dict(data=images(size=12)), r"data\.train\.digest"),
])
def test_a_resume_with_another_teacher_objective_or_data_is_refused_naming_both_values(interrupted: Path, change, named):
    with pytest.raises(ResumeError, match=f"cannot resume from .*checkpoints/last:(?s:.*){named}"):
        distil(interrupted, **change)
    # refused before anything changed: the unchanged run still resumes, and ends
    distil(interrupted)
    assert json.loads((interrupted / "checkpoints/last/trainer_state.json").read_text())["epoch"] == 3


class Unlabelled(Dataset):
    """A data set kdkit cannot look into (no tensors, no samples): its content is not fingerprinted."""

    def __init__(self, size: int) -> None:
        self.data = images(size=size)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        return self.data[index]


def test_data_that_cannot_be_fingerprinted_is_said_so_and_never_fails(tmp_path: Path, caplog):
    with caplog.at_level("WARNING", logger="kdkit.train"):
        distil(tmp_path, data=Unlabelled(8))
    assert "the train data (Unlabelled) cannot be fingerprinted, so a resume would not notice other items" in caplog.text

    class Odd(Dataset):  # structures kdkit does not know: described as unchecked, never an error
        samples = [("a.png", 0, "extra")]
        labels = ["cat", "dog"]
        targets = [1, None]

        def __len__(self) -> int:
            return 2

    assert dataset_fingerprint(Odd()) == {"kind": "Odd", "size": 2, "content": "unchecked"}
    ids = TensorDataset(torch.zeros(4, 3, 2, 2), torch.arange(100, 104), torch.arange(4) % 3)  # (x, id, y): ids are no labels
    assert "label_range" not in dataset_fingerprint(ids)


def test_a_resume_at_another_image_size_names_it(interrupted: Path):
    with pytest.raises(ResumeError, match=r"data\.train\.image_shape: checkpoint \[3, 8, 8\], now \[3, 12, 12\]"):
        distil(interrupted, data=images(size=12))


class ScaledKL(nn.Module):
    """A user's loss keeping its option privately, and one it keeps nowhere."""

    inputs = "logits"

    def __init__(self, tau: float = 1.0, mode: str = "a") -> None:
        super().__init__()
        self._tau = tau

    def forward(self, student_logits, teacher_logits, labels=None):
        return LogitKL(temperature=self._tau)(student_logits, teacher_logits)


def test_a_users_loss_options_are_compared_and_the_unreadable_ones_named(tmp_path: Path, caplog):
    with pytest.raises(KeyboardInterrupt), caplog.at_level("WARNING", logger="kdkit.train"):
        distil(tmp_path, losses=[LossTerm("ce", 0.5), LossTerm(ScaledKL(1.0), 0.5)], interrupt_at=3)
    assert "loss 'ScaledKL' keeps its options ['mode'] under no attribute of the same name" in caplog.text
    with pytest.raises(ResumeError, match=r"objective\.terms\.ScaledKL\.options\.tau: checkpoint 1\.0, now 8\.0"):
        distil(tmp_path, losses=[LossTerm("ce", 0.5), LossTerm(ScaledKL(8.0), 0.5)])
    assert module_options(ScaledKL(2.0)) == {"tau": 2.0, "unread": ["mode"]}


def test_fingerprints_see_weights_options_and_data():
    assert weights_digest(net(1)) == weights_digest(net(1)) != weights_digest(net(2))
    assert module_options(LogitKL(temperature=2.0)) == {"temperature": 2.0, "scale_by_t2": True, "reduction": "batchmean"}
    one, same, other = (dataset_fingerprint(images(seed)) for seed in (0, 0, 1))
    assert one == same and one["digest"] != other["digest"] and one["label_range"] == [0, 2]
    assert fingerprint_differences({"data": one}, {"data": other}) == [
        f"data.digest: checkpoint sha256 {one['digest'][:12]}, now sha256 {other['digest'][:12]}"]
    assert fingerprint_differences({"data": one}, {}) == []  # a part one side lacks (older checkpoints) is not compared


# --------------------------------------------------------------------------- fresh starts over a run
def supervised(folder: Path, epochs: int = 2) -> Trainer:
    return Trainer(Supervised(net(0)), TrainConfig(epochs=epochs, lr=0.01, output_dir=folder, progress=False), class_names=CLASSES)


def test_a_fresh_start_over_a_finished_run_is_refused_unless_overwrite(tmp_path: Path):
    loader = DataLoader(images(), batch_size=8)
    supervised(tmp_path).fit(loader)
    best = (tmp_path / "best_model.safetensors").read_bytes()
    assert "a finished run (checkpoint after epoch 2 of 2" in describe_run(tmp_path)
    with pytest.raises(RunExistsError, match=r"holds a finished run \(checkpoint after epoch 2 of 2.*and its best model "
                                             r"\(.*best_model\.safetensors, epoch 2\).*overwrite=True \(--overwrite\)"):
        supervised(tmp_path).fit(loader)
    assert (tmp_path / "best_model.safetensors").read_bytes() == best  # nothing lost
    supervised(tmp_path).fit(loader, resume=True)  # collecting it is not a fresh start
    supervised(tmp_path, epochs=1).fit(loader, overwrite=True)
    assert json.loads((tmp_path / "checkpoints/last/trainer_state.json").read_text())["config"]["epochs"] == 1
    assert describe_run(tmp_path / "elsewhere") is None


def test_a_resume_without_a_checkpoint_starts_afresh_saying_what_it_replaces(tmp_path: Path, caplog):
    loader = DataLoader(images(), batch_size=8)
    supervised(tmp_path).fit(loader)
    shutil.rmtree(tmp_path / "checkpoints")  # as a run killed before its first checkpoint leaves its folder
    with caplog.at_level("WARNING", logger="kdkit.train"):
        supervised(tmp_path).fit(loader, resume=True)
    assert "holds no checkpoint to continue; starting afresh, replacing its best model" in caplog.text


def test_a_fresh_start_over_an_interrupted_run_is_refused_too(interrupted: Path):
    with pytest.raises(RunExistsError, match=r"holds an interrupted run \(checkpoint after epoch 1 of 3"):
        distil(interrupted, resume=False)


# --------------------------------------------------------------------------- one process per run folder
def test_a_run_inside_another_on_the_same_folder_is_refused_and_keeps_the_outer_lock(tmp_path: Path):
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match=r"this process is already training in it"):
            supervised(tmp_path).fit(DataLoader(images(), batch_size=8))
        with pytest.raises(RunLockedError):  # the refused inner run released nothing
            RunLock(tmp_path).acquire()
    supervised(tmp_path).fit(DataLoader(images(), batch_size=8))  # sequential runs in one process: fine
    supervised(tmp_path).fit(DataLoader(images(), batch_size=8), resume=True)


_HOLDER = textwrap.dedent("""
    import sys
    from kdkit.run_lock import RunLock
    with RunLock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()  # until the test closes it
""")


def test_a_second_process_on_a_run_folder_stops_at_once_naming_the_first(tmp_path: Path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"{tmp_path} is in use: process {holder.pid} on .* is training in it"):
            supervised(tmp_path).fit(DataLoader(images(), batch_size=8))
        assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()  # it wrote nothing
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # the kernel dropped the lock with its holder: no stale lock stops the next run
    supervised(tmp_path).fit(DataLoader(images(), batch_size=8))
    assert (tmp_path / LOCK_FILE).exists() and not RunLock(tmp_path).acquire().release()


def test_the_temporaries_of_a_killed_write_are_removed_at_the_next_start_and_a_live_writers_kept(tmp_path: Path):
    from kdkit.checkpoint import _host_tag

    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()  # a process id that no longer runs
    tmp_path.mkdir(exist_ok=True)
    killed = tmp_path / f".best_model.safetensors.{_host_tag()}.{child.pid}.0123456789ab.tmp"
    live = tmp_path / f".metrics.jsonl.{_host_tag()}.{os.getpid()}.0123456789ab.tmp"
    users = tmp_path / ".editor-backup.tmp"  # not kdkit's, however old: never removed
    for path in (killed, live, users):
        path.write_bytes(b"half a file")
    os.utime(users, (0, 0))
    supervised(tmp_path).fit(DataLoader(images(), batch_size=8))
    assert not killed.exists() and live.exists() and users.exists()
    assert sorted(p.name for p in tmp_path.glob(".*.tmp")) == sorted([live.name, users.name])  # the run itself left none
