"""Tests of kdkit.train: the Accelerate training engine, exact resume, safe checkpoints."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import kdkit
from kdkit.checkpoint import load_model, read_metadata
from kdkit.outputs import StepOutput
from kdkit.train import (
    NonFiniteLossError,
    ResumeError,
    Supervised,
    TrainConfig,
    Trainer,
    find_checkpoint,
)
from sync_counter import SyncCounter

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "train_tiny.py"
TIME_KEYS = {"epoch_time", "train_time", "eval_time", "images_per_sec"}
CLASSES = ["red", "green", "blue"]


# --------------------------------------------------------------------------- fixtures
class Blobs(Dataset):
    """Three separable classes of 8x8 images, with a random horizontal flip per item."""

    def __init__(self, n: int, seed: int = 0, augment: bool = True) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 3
        self.images = torch.randn(n, 3, 8, 8, generator=g) * 0.5
        for c in range(3):
            self.images[self.labels == c, c] += 1.0
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.augment and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, self.labels[index]


def tiny_net(seed: int = 0, dropout: float = 0.2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


class ScriptedCE(nn.Module):
    """Cross-entropy that returns NaN at training call ``nan_at`` or raises at training call ``crash_at`` (1-based).

    The Trainer also computes ``val_loss`` with the task's loss (under ``no_grad``); those calls are not counted.
    The faults are kept under other names than their arguments: not options of the objective, so a resume without them is the same run.
    """

    def __init__(self, nan_at: int | None = None, crash_at: int | None = None) -> None:
        super().__init__()
        self._fault_nan, self._fault_crash, self.calls = nan_at, crash_at, 0

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # evaluation
            return nn.functional.cross_entropy(logits, labels)
        self.calls += 1
        if self.calls == self._fault_crash:
            raise KeyboardInterrupt("simulated interruption")
        loss = nn.functional.cross_entropy(logits, labels)
        if self.calls == self._fault_nan:
            loss = loss * float("nan")
        return loss


def loaders(n_train: int = 48, n_val: int = 24, batch_size: int = 8):
    train = DataLoader(Blobs(n_train, seed=0), batch_size=batch_size, shuffle=True)
    val = DataLoader(Blobs(n_val, seed=1, augment=False), batch_size=batch_size)
    return train, val


def config(tmp: Path, **overrides) -> TrainConfig:
    base = dict(epochs=3, lr=0.02, weight_decay=0.01, sched="cosine", output_dir=tmp, progress=False, seed=3)
    base.update(overrides)
    base.setdefault("warmup_epochs", min(1, base["epochs"] - 1))  # a warm-up as long as the run is refused
    return TrainConfig(**base)


def make_trainer(tmp: Path, loss: nn.Module | None = None, model: nn.Module | None = None, **overrides) -> Trainer:
    task = Supervised(model if model is not None else tiny_net(), loss=loss or ScriptedCE(), name="ce")
    return Trainer(task, config(tmp, **overrides), class_names=CLASSES)


def without_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in history]


def state_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    from kdkit.checkpoint import unwrap_model

    return {k: v.detach().clone() for k, v in unwrap_model(trainer.task).state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


# --------------------------------------------------------------------------- learning and files
def test_supervised_fit_learns_and_writes_metric_files(tmp_path: Path) -> None:
    train, val = loaders()
    trainer = make_trainer(tmp_path, epochs=4)
    result = trainer.fit(train, val)

    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    assert result.final_val_metrics["accuracy"] > 0.9  # chance is 1/3
    assert result.best_metric == max(row["val_accuracy"] for row in result.history)
    assert result.history[result.best_epoch - 1]["val_accuracy"] == result.best_metric
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    assert result.history[-1]["global_step"] == 4 * 6

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert without_times(rows) == without_times(result.history)
    expected = {"epoch", "global_step", "lr", "train_loss", "train_ce", "val_loss", "val_accuracy",
                "val_balanced_accuracy", "val_macro_f1", "val_num_samples", "is_best", "epoch_time",
                "train_time", "eval_time", "images_per_sec", *(f"val_per_class_recall/{c}" for c in CLASSES)}
    with open(tmp_path / "metrics.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        csv_rows = list(reader)
        assert expected <= set(reader.fieldnames)
    assert len(csv_rows) == 4 and float(csv_rows[-1]["val_accuracy"]) == result.history[-1]["val_accuracy"]
    assert all(float(r["images_per_sec"]) > 0 for r in csv_rows)
    assert "val_confusion_matrix" in rows[0] and len(rows[0]["val_confusion_matrix"]) == 3

    # The best model is the student alone, with metadata, and reproduces the selected metric.
    assert result.best_model_path == tmp_path / "best_model.safetensors"
    meta = read_metadata(result.best_model_path)
    assert meta["classes"] == CLASSES and meta["epoch"] == result.best_epoch
    assert meta["select_metric"] == "accuracy" and meta["metric_value"] == result.best_metric
    fresh = tiny_net(seed=99)
    load_model(fresh, result.best_model_path, expected_classes=CLASSES)
    fresh.eval()
    images = torch.stack([val.dataset[i][0] for i in range(len(val.dataset))])
    accuracy = (fresh(images).argmax(1) == val.dataset.labels).float().mean().item()
    assert accuracy == pytest.approx(result.best_metric, abs=1e-9)


def test_best_model_without_val_is_last_epoch_and_reloads_identically(tmp_path: Path) -> None:
    train, _ = loaders()
    trainer = make_trainer(tmp_path, epochs=2)
    result = trainer.fit(train)
    assert result.best_epoch == 2 and result.best_metric is None and result.final_val_metrics is None
    fresh = tiny_net(seed=5).eval()
    load_model(fresh, result.best_model_path)
    student = trainer.student.eval()
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), student(x))


def test_evaluate_counts_every_sample_and_returns_metrics(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path)
    loader = DataLoader(Blobs(13, seed=2, augment=False), batch_size=4)  # last batch partial
    metrics = trainer.evaluate(loader)
    assert metrics["num_samples"] == 13
    assert {"accuracy", "balanced_accuracy", "macro_f1", "per_class_recall", "confusion_matrix", "loss"} <= set(metrics)
    assert sum(map(sum, metrics["confusion_matrix"])) == 13
    assert trainer.student.training  # the mode is restored


def test_supervised_refuses_two_undeclared_outputs_unless_told_which_are_the_logits() -> None:
    class MainAndAux(nn.Module):  # torchvision's Inception in training: (main logits, auxiliary logits)
        def __init__(self) -> None:
            super().__init__()
            self.main, self.aux = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.main(x), self.aux(x)

    model = MainAndAux()
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(TypeError, match=r"MainAndAux\) returned a tuple of 2 outputs \(\(6, 3\), \(6, 3\)\).*logits_from=0"):
        Supervised(model)(x, y)
    out = Supervised(model, logits_from=0)(x, y)
    assert torch.allclose(out.logits, model.main(x))


def test_supervised_two_heads_uses_their_mean() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.head_dist = nn.Linear(4, 3), nn.Linear(4, 3)  # head_dist: a declared distillation head
            self.b = self.head_dist

        def forward(self, x):
            return self.a(x), self.b(x)

    model = TwoHeads()
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    out = Supervised(model)(x, y)
    mean = (model.a(x) + model.b(x)) / 2
    assert torch.allclose(out.logits, mean)
    assert torch.allclose(out.loss, nn.functional.cross_entropy(mean, y))
    # terms are detached 0-dim tensors (no host sync in the step)
    assert set(out.terms) == {"ce"} and out.terms["ce"].dim() == 0 and not out.terms["ce"].requires_grad
    assert torch.equal(out.terms["ce"], out.loss.detach())
    assert Supervised(model)(x).loss is None


# --------------------------------------------------------------------------- resume
@pytest.mark.filterwarnings("ignore:PlateauLRScheduler is deprecated:FutureWarning")
@pytest.mark.parametrize(("sched", "loader"), [("cosine", "plain"), ("onecycle", "plain"), ("plateau", "plain"),
                                               ("cosine", "generator"), ("cosine", "workers"), ("cosine", "make_loader"),
                                               ("cosine", "ema")])
def test_interrupted_then_resumed_run_equals_uninterrupted(tmp_path: Path, sched: str, loader: str) -> None:
    overrides = dict(sched=sched, grad_accum_steps=2, clip_grad_norm=1.0)
    if loader == "ema":  # the weight average is part of the state a checkpoint restores
        overrides["ema_decay"] = 0.9
    train, val = loaders()
    if loader == "generator":  # the loader's own generator: its state is in no checkpoint, reseeding must fix it
        train = DataLoader(train.dataset, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(5))
    elif loader == "workers":  # augmentation drawn in worker processes
        train = DataLoader(train.dataset, batch_size=8, shuffle=True, num_workers=2)
    elif loader == "make_loader":  # kdkit's own loader with workers, as a GPU run gets them
        from kdkit.data import make_loader

        train = make_loader(train.dataset, 8, train=True, workers=2)
    reference = make_trainer(tmp_path / "ref", **overrides)
    expected = reference.fit(train, val)

    # Interrupted in the middle of epoch 2 (6 batches per epoch): only epoch 1 is checkpointed.
    crashing = make_trainer(tmp_path / "run", loss=ScriptedCE(crash_at=9), **overrides)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit(train, val)
    saved = json.loads((tmp_path / "run" / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert saved["epoch"] == 1

    resumed_trainer = make_trainer(tmp_path / "run", **overrides)
    resumed = resumed_trainer.fit(train, val, resume=True)
    assert without_times(resumed.history) == without_times(expected.history)
    assert resumed.best_epoch == expected.best_epoch and resumed.best_metric == expected.best_metric
    assert_same_state(state_of(resumed_trainer), state_of(reference))
    from safetensors.torch import load_file

    best_run, best_ref = tmp_path / "run" / "best_model.safetensors", tmp_path / "ref" / "best_model.safetensors"
    assert_same_state(load_file(best_run), load_file(best_ref))
    run_meta, ref_meta = read_metadata(best_run), read_metadata(best_ref)
    assert run_meta.pop("run_id") != ref_meta.pop("run_id")  # two runs that end alike
    assert run_meta == ref_meta
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_resuming_a_finished_run_returns_its_result(tmp_path: Path) -> None:
    train, val = loaders()
    first = make_trainer(tmp_path, epochs=2).fit(train, val)
    again_trainer = make_trainer(tmp_path, loss=ScriptedCE(crash_at=1), epochs=2)  # must not train
    again = again_trainer.fit(train, val, resume=True)
    assert again.history == first.history
    assert again.best_metric == first.best_metric and again.final_val_metrics == first.final_val_metrics
    # the finished weights are loaded
    fresh = tiny_net(seed=1)
    load_model(fresh, tmp_path / "best_model.safetensors")
    # resume from an explicit path (the run directory) too
    assert make_trainer(tmp_path, loss=ScriptedCE(crash_at=1), epochs=2).fit(train, val, resume=tmp_path).history == first.history


def test_resume_with_different_config_or_model_is_an_error(tmp_path: Path) -> None:
    train, val = loaders()
    make_trainer(tmp_path, epochs=1).fit(train, val)
    with pytest.raises(ResumeError, match="'lr'.*0.02.*0.05"):
        make_trainer(tmp_path, epochs=1, lr=0.05).fit(train, val, resume=True)
    with pytest.raises(ResumeError, match="'epochs'"):
        make_trainer(tmp_path, epochs=2).fit(train, val, resume=True)
    wider = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(0.2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
    with pytest.raises(ResumeError, match="model"):
        make_trainer(tmp_path, epochs=1, model=wider).fit(train, val, resume=True)
    with pytest.raises(ResumeError, match="train_loader"):
        make_trainer(tmp_path, epochs=1).fit(DataLoader(Blobs(16), batch_size=8, shuffle=True), val, resume=True)
    with pytest.raises(FileNotFoundError):
        make_trainer(tmp_path, epochs=1).fit(train, val, resume=tmp_path / "nowhere")
    # fields that do not affect the numbers may change
    make_trainer(tmp_path, epochs=1, log_every=3, keep_last=2).fit(train, val, resume=True)


def test_a_finished_run_is_collected_by_another_number_of_processes(tmp_path: Path) -> None:
    train, val = loaders()
    first = make_trainer(tmp_path, epochs=1).fit(train, val)
    state_file = tmp_path / "checkpoints" / "last" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state.update(num_processes=2, updates_per_epoch=3)  # as if trained by two DDP processes
    state_file.write_text(json.dumps(state))
    assert make_trainer(tmp_path, epochs=1).fit(train, val, resume=True).history == first.history
    # an unfinished one cannot continue on another number of processes
    state.update(finished=False, epoch=0)
    state_file.write_text(json.dumps(state))
    with pytest.raises(ResumeError, match="num_processes: checkpoint 2, now 1"):
        make_trainer(tmp_path, epochs=1).fit(train, val, resume=True)


def test_interrupted_fresh_start_over_a_finished_run_is_not_collected(tmp_path: Path) -> None:
    train, val = loaders()
    make_trainer(tmp_path, epochs=2).fit(train, val)
    # A fresh start writes its first best model, then dies before its first checkpoint (epoch 2).
    with pytest.raises(KeyboardInterrupt, match="simulated"):
        make_trainer(tmp_path, loss=ScriptedCE(crash_at=10), epochs=2, checkpoint_every=2).fit(train, val, overwrite=True)
    assert read_metadata(tmp_path / "best_model.safetensors")["epoch"] == 1
    refused = make_trainer(tmp_path, epochs=2)
    before = state_of(refused)
    with pytest.raises(ResumeError, match="best_model.safetensors comes from another run than the checkpoint"):
        refused.fit(train, val, resume=True)
    assert_same_state(state_of(refused), before)  # refused before the checkpoint's state was loaded
    # the same run's best model and checkpoint resume as before
    make_trainer(tmp_path, epochs=2).fit(train, val, overwrite=True)
    assert make_trainer(tmp_path, epochs=2).fit(train, val, resume=True).best_epoch is not None


def _run_script(out: Path, *args: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(SCRIPT), str(out), *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> None:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output.decode(errors="replace")[-3000:]


def _run_in_process(out: Path, **kwargs) -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_tiny", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script's main()
    try:
        return module.run(out, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _compare_runs(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    ra, rb = json.loads((a / "result.json").read_text()), json.loads((b / "result.json").read_text())
    assert without_times(ra["history"]) == without_times(rb["history"])
    assert ra["final_val_metrics"] == rb["final_val_metrics"]
    assert_same_state(load_file(a / "final_task.safetensors"), load_file(b / "final_task.safetensors"))


def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    """A real kill -9 of a training process after its first checkpoint (issue 7)."""
    reference = tmp_path / "reference"
    _run_in_process(reference, epochs=3)  # the same script, without paying for a third interpreter start

    killed = tmp_path / "killed"
    proc = _run_script(killed, "--epochs", "3", "--sleep", "0.2")  # ~2.4 s of training left to kill
    marker = killed / "checkpoints" / "last" / "trainer_state.json"
    deadline = time.monotonic() + 90
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")[-3000:]
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL  # it was still running
    assert not (killed / "result.json").exists()
    found = find_checkpoint(killed)
    assert found is not None and json.loads((found / "trainer_state.json").read_text())["epoch"] < 3

    _finish(_run_script(killed, "--epochs", "3", "--resume"))
    _compare_runs(reference, killed)


# --------------------------------------------------------------------------- atomic checkpoints
def test_crash_inside_checkpoint_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    train, val = loaders()
    trainer = make_trainer(tmp_path)
    real_save_state = trainer.accelerator.save_state
    calls = {"n": 0}

    def dying_save_state(output_dir, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the checkpoint of epoch 2: write part of it, then die
            real_save_state(output_dir, **kwargs)
            model_file = Path(output_dir) / "model.safetensors"
            model_file.write_bytes(model_file.read_bytes()[:100])
            raise KeyboardInterrupt("killed while saving (simulated)")
        return real_save_state(output_dir, **kwargs)

    trainer.accelerator.save_state = dying_save_state
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.fit(train, val)
    finally:
        trainer.accelerator.save_state = real_save_state
    root = tmp_path / "checkpoints"
    assert find_checkpoint(root) == root / "last"
    assert json.loads((root / "last" / "trainer_state.json").read_text())["epoch"] == 1
    fresh = Supervised(tiny_net(seed=8))
    load_model(fresh, root / "last" / "model.safetensors")  # intact and strict-loadable

    resumed = make_trainer(tmp_path).fit(train, val, resume=True)
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3]
    assert sorted(p.name for p in root.iterdir()) == ["last"]  # the half-written last.tmp is gone


def test_kill_between_the_two_renames_is_recovered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kdkit.checkpoint_manager as checkpoint_manager

    train, val = loaders()
    reference = make_trainer(tmp_path / "ref").fit(train, val)

    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name == "last.tmp" and json.loads((Path(src) / "trainer_state.json").read_text())["epoch"] == 2:
            raise KeyboardInterrupt("killed between the renames (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(checkpoint_manager.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path / "run").fit(train, val)
    monkeypatch.setattr(checkpoint_manager.os, "rename", real_rename)

    root = tmp_path / "run" / "checkpoints"
    assert not (root / "last").exists() and (root / "last.old").is_dir()
    assert find_checkpoint(root) == root / "last.old"
    resumed = make_trainer(tmp_path / "run").fit(train, val, resume=True)
    assert without_times(resumed.history) == without_times(reference.history)
    assert sorted(p.name for p in root.iterdir()) == ["last"]


def test_kill_while_deleting_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import kdkit.checkpoint_manager as checkpoint_manager

    train, _ = loaders(n_train=16)
    real_rmtree = shutil.rmtree

    def dying_rmtree(path, *args, **kwargs):
        path = Path(path)
        if path.name.startswith(".trash-last.old"):
            (path / "model.safetensors").unlink()  # part of it is gone, then the process dies
            raise KeyboardInterrupt("killed while deleting (simulated)")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_manager.shutil, "rmtree", dying_rmtree)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path, epochs=2).fit(train)
    monkeypatch.setattr(checkpoint_manager.shutil, "rmtree", real_rmtree)

    root = tmp_path / "checkpoints"
    leftovers = [p for p in root.iterdir() if p.name.startswith(".trash-")]
    assert leftovers and not (leftovers[0] / "model.safetensors").exists()
    assert find_checkpoint(root) == root / "last"  # never the half-deleted one
    result = make_trainer(tmp_path, epochs=2).fit(train, resume=True)  # finished: returns at once
    assert len(result.history) == 2
    assert sorted(p.name for p in root.iterdir()) == ["last"]


def test_checkpoint_every_and_keep_last(tmp_path: Path) -> None:
    train, _ = loaders(n_train=16)
    trainer = make_trainer(tmp_path, epochs=5, checkpoint_every=2, keep_last=2)
    trainer.fit(train)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["epoch_0004", "last"]
    epoch = lambda p: json.loads((p / "trainer_state.json").read_text())["epoch"]  # noqa: E731
    assert epoch(root / "last") == 5 and epoch(root / "epoch_0004") == 4
    # an older checkpoint can be resumed explicitly (and continues to the same end)
    assert len(make_trainer(tmp_path, epochs=5).fit(train, resume=root / "epoch_0004").history) == 5


# --------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("log_every", [1, 50])
def test_nan_loss_stops_training_naming_term_and_step(tmp_path: Path, log_every: int) -> None:
    train, val = loaders(n_train=32)  # 4 batches per epoch
    loss = ScriptedCE(nan_at=6)
    trainer = make_trainer(tmp_path, loss=loss, log_every=log_every)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(train, val)
    message = str(info.value)
    assert "'ce'=nan" in message and "epoch 2/3" in message and "batch 2/4" in message and "step 6" in message
    assert info.value.terms == ["ce"] and info.value.step == 6 and info.value.epoch == 2 and info.value.batch == 2
    # The loss is read back once per logging interval: the error comes at the end of the interval
    # holding the NaN (batch 2 of epoch 2 with log_every=1, the epoch end with 50), naming that batch.
    assert loss.calls == (6 if log_every == 1 else 8)

    root = tmp_path / "checkpoints"
    assert json.loads((root / "last" / "trainer_state.json").read_text())["epoch"] == 1
    from safetensors.torch import load_file

    weights = load_file(root / "last" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert read_metadata(tmp_path / "best_model.safetensors")["epoch"] == 1
    resumed = make_trainer(tmp_path).fit(train, val, resume=True)  # the kept checkpoint is loadable
    assert len(resumed.history) == 3 and all(math.isfinite(r["train_loss"]) for r in resumed.history)


def test_nan_in_one_term_of_a_multi_term_task_is_named(tmp_path: Path) -> None:
    class TwoTerms(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student = tiny_net()
            self.calls = 0

        def forward(self, images, labels):
            self.calls += 1
            logits = self.student(images)
            ce = nn.functional.cross_entropy(logits, labels)
            kl = logits.pow(2).mean() * (float("inf") if self.calls == 3 else 0.1)
            return StepOutput(ce + kl, logits, {"ce": ce.item(), "kl": kl.item()})

    train, _ = loaders(n_train=32)
    trainer = Trainer(TwoTerms(), config(tmp_path, epochs=1))
    with pytest.raises(NonFiniteLossError, match=r"'kl'=inf.*batch 3/4") as info:
        trainer.fit(train)
    assert info.value.terms == ["kl"]
    assert not (tmp_path / "checkpoints" / "last").exists()  # nothing bad was saved


# --------------------------------------------------------------------------- engine features
def test_gradient_accumulation_equals_one_large_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])

    def run(batch_size: int, accum: int, out: Path):
        model = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.Tanh(), nn.Linear(16, 3))
        torch.manual_seed(1)
        for p in model.parameters():
            nn.init.normal_(p, std=0.3)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        trainer = Trainer(Supervised(model), config(out, epochs=1, opt="momentum", lr=0.5, momentum=0.0,
                                                    weight_decay=0.0, sched="none", warmup_epochs=0,
                                                    grad_accum_steps=accum))
        result = trainer.fit(DataLoader(TensorDataset(x, y), batch_size=batch_size))
        return initial, {k: v.detach().clone() for k, v in model.state_dict().items()}, result

    init_a, accumulated, result_a = run(4, 2, tmp_path / "a")
    init_b, large, result_b = run(8, 1, tmp_path / "b")
    assert result_a.history[0]["global_step"] == 1 and result_b.history[0]["global_step"] == 1
    assert all(torch.equal(init_a[k], init_b[k]) for k in init_a)
    assert not torch.allclose(large["1.weight"], init_b["1.weight"], atol=1e-3)  # an update happened
    assert_same_state(accumulated, large, atol=1e-6)
    # and without accumulation two updates happen, giving something else
    _, two_steps, _ = run(4, 1, tmp_path / "c")
    assert not torch.allclose(two_steps["1.weight"], large["1.weight"], atol=1e-4)


def test_bf16_mixed_precision_runs_on_cpu(tmp_path: Path) -> None:
    model = tiny_net()
    seen: list[torch.dtype] = []
    model[0].register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    trainer = Trainer(Supervised(model), config(tmp_path, epochs=1, mixed_precision="bf16"), class_names=CLASSES)
    train, val = loaders(n_train=16, n_val=8)
    result = trainer.fit(train, val)
    assert trainer.accelerator.mixed_precision == "bf16"
    assert torch.bfloat16 in seen  # autocast was active in training
    assert math.isfinite(result.history[0]["train_loss"]) and result.final_val_metrics["num_samples"] == 8
    assert model[0].weight.dtype == torch.float32  # master weights stay in float32


def test_schedule_is_stepped_per_optimizer_update(tmp_path: Path) -> None:
    train, _ = loaders(n_train=32)  # 4 updates per epoch
    trainer = make_trainer(tmp_path, epochs=2, lr=0.1, min_lr=0.001, warmup_epochs=1, warmup_lr=0.0)
    result = trainer.fit(train)
    # timm cosine over 8 updates, warm-up included: half-way after epoch 1, min_lr at the end.
    assert result.history[0]["lr"] == pytest.approx(0.001 + 0.5 * (0.1 - 0.001))
    assert result.history[1]["lr"] == pytest.approx(0.001)


@pytest.mark.filterwarnings("ignore:PlateauLRScheduler is deprecated:FutureWarning")
@pytest.mark.parametrize("sched", ["onecycle", "step", "plateau", "none"])
def test_other_schedulers_run(tmp_path: Path, sched: str) -> None:
    train, val = loaders(n_train=16, n_val=8)
    result = make_trainer(tmp_path, epochs=2, sched=sched, warmup_epochs=0).fit(train, val)
    lrs = [row["lr"] for row in result.history]
    assert all(lr > 0 for lr in lrs) or sched == "onecycle"
    if sched == "none":
        assert lrs == [0.02, 0.02]


def test_channels_last(tmp_path: Path) -> None:
    model = tiny_net()
    trainer = Trainer(Supervised(model), config(tmp_path, epochs=1, channels_last=True, progress=True, log_every=1))
    train, val = loaders(n_train=16, n_val=8)
    result = trainer.fit(train, val)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert result.final_val_metrics["num_samples"] == 8


@pytest.mark.slow
def test_compile_runs(tmp_path: Path) -> None:
    model = tiny_net(dropout=0.0)
    trainer = Trainer(Supervised(model), config(tmp_path, epochs=1, compile=True))
    train, val = loaders(n_train=16, n_val=8)
    result = trainer.fit(train, val)
    assert math.isfinite(result.history[0]["train_loss"])
    assert set(read_metadata(result.best_model_path)) >= {"epoch"}
    load_model(tiny_net(), result.best_model_path)  # no _orig_mod. prefixes


def test_trains_a_distiller_without_touching_the_teacher(tmp_path: Path) -> None:
    from kdkit.distiller import Distiller

    teacher = tiny_net(seed=11, dropout=0.0).eval()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = tiny_net(seed=12)
    trainer = Trainer(Distiller(teacher, student), config(tmp_path, epochs=1), class_names=CLASSES)
    train, val = loaders(n_train=16, n_val=8)
    result = trainer.fit(train, val)
    assert {"train_ce", "train_kl"} <= set(result.history[0])
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    fresh = tiny_net(seed=13)
    load_model(fresh, result.best_model_path, expected_classes=CLASSES)  # student keys only


def test_given_accelerator_and_trackers_are_used(tmp_path: Path) -> None:
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker

    class Recorder(GeneralTracker):
        name = "recorder"
        requires_logging_directory = False

        def __init__(self) -> None:
            super().__init__()
            self.config: dict = {}
            self.logs: list[tuple[int, dict]] = []

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values: dict) -> None:
            self.config = dict(values)

        def log(self, values: dict, step: int | None = None, **kwargs) -> None:
            self.logs.append((step, dict(values)))

    recorder = Recorder()
    accelerator = Accelerator(log_with=[recorder])
    trainer = Trainer(Supervised(tiny_net()), config(tmp_path, epochs=2, grad_accum_steps=2), accelerator=accelerator,
                      class_names=CLASSES)
    assert trainer.accelerator is accelerator and accelerator.gradient_accumulation_steps == 2
    trainer.fit(*loaders(n_train=16, n_val=8))
    assert recorder.config["lr"] == 0.02 and recorder.config["epochs"] == 2
    assert [step for step, _ in recorder.logs] == [1, 2]
    assert {"train_loss", "val_accuracy", "lr", "images_per_sec"} <= set(recorder.logs[-1][1])


def test_config_validation_names_the_field(tmp_path: Path) -> None:
    bad = {
        "epochs": 0, "lr": -1.0, "grad_accum_steps": 0, "mixed_precision": "fp8", "sched": "cosinus",
        "opt": "no-such-opt", "clip_grad_norm": 0.0, "keep_last": 0, "checkpoint_every": 1.5, "seed": -3,
        "weight_decay": float("nan"), "channels_last": "yes",
    }
    with pytest.raises(ValueError, match="opt='momentum'"):
        TrainConfig(opt="sgd", momentum=0.0)
    for name, value in bad.items():
        with pytest.raises(ValueError, match=name):
            TrainConfig(output_dir=tmp_path, **{name: value})
    with pytest.raises(ValueError, match="select_metric='nope'.*accuracy"):
        make_trainer(tmp_path, epochs=1, select_metric="nope").fit(*loaders(n_train=8, n_val=8))
    assert TrainConfig(select_metric="loss").select_mode == "min"
    assert TrainConfig(select_metric="macro_f1").select_mode == "max"


# --------------------------------------------------------------------------- multi-process
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_ddp(out: Path, *args: str) -> subprocess.CompletedProcess:
    """tests/scripts/train_tiny.py under torchrun, 2 gloo processes."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(SCRIPT), str(out), "--val-size", "13", *args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, timeout=180)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_resumes_exactly(tmp_path: Path) -> None:
    """torchrun with 2 gloo processes: gather_for_metrics de-duplicates, resume is exact."""
    done = _launch_ddp(tmp_path / "ref")
    assert done.returncode == 0, done.stdout.decode()[-3000:] + done.stderr.decode()[-3000:]
    result = json.loads((tmp_path / "ref" / "result.json").read_text())
    assert result["num_processes"] == 2
    assert all(row["val_num_samples"] == 13 for row in result["history"])

    crashed = _launch_ddp(tmp_path / "run", "--crash-at", "5")  # epoch 2 of 3 (3 batches per process)
    assert crashed.returncode != 0
    done = _launch_ddp(tmp_path / "run", "--resume")
    assert done.returncode == 0, done.stdout.decode()[-3000:] + done.stderr.decode()[-3000:]
    _compare_runs(tmp_path / "ref", tmp_path / "run")


@pytest.mark.slow
def test_ddp_trains_a_distiller_whose_terms_leave_a_head_without_gradient(tmp_path: Path) -> None:
    """Without find_unused_parameters (set from the Distiller), DDP stops at the second step."""
    done = _launch_ddp(tmp_path, "--distil-ce-only", "--epochs", "2")
    assert done.returncode == 0, done.stdout.decode()[-3000:] + done.stderr.decode()[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["num_processes"] == 2 and len(result["history"]) == 2


@pytest.mark.slow
def test_ddp_a_nan_on_one_process_stops_both_at_the_same_batch(tmp_path: Path) -> None:
    """The non-finite flag is gathered at the read-back: both processes raise, naming process 0's batch."""
    stopped = _launch_ddp(tmp_path, "--nan-at", "5")  # process 0, epoch 2, batch 2 (3 batches per process)
    assert stopped.returncode != 0
    reports = [json.loads((tmp_path / f"non_finite_{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert (report["epoch"], report["batch"], report["step"], report["terms"]) == (2, 2, 5, ["ce"]), report
        assert "'ce'=nan" in report["message"] and "batch 2/3, step 5 on process 0" in report["message"]
    assert reports[0]["message"] == reports[1]["message"]
    assert find_checkpoint(tmp_path) is not None and json.loads(
        (find_checkpoint(tmp_path) / "trainer_state.json").read_text())["epoch"] == 1
    assert read_metadata(tmp_path / "best_model.safetensors")["epoch"] == 1


# --------------------------------------------------------------------------- host syncs
KDKIT_DIR = str(Path(kdkit.__file__).parent)


class TensorTerms(nn.Module):
    """A plain task (not the Distiller) whose terms are detached 0-dim tensors."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.student = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))

    def forward(self, images, labels):
        logits = self.student(images)
        ce = nn.functional.cross_entropy(logits, labels)
        reg = logits.pow(2).mean() * 0.01
        return StepOutput(ce + reg, logits, {"ce": ce.detach(), "reg": reg.detach()})


def test_training_syncs_with_the_host_once_per_logging_interval(tmp_path: Path) -> None:
    def count_syncs(batches: int, log_every: int) -> tuple[SyncCounter, SyncCounter, dict]:
        x = torch.randn(batches * 4, 3, 4, 4)
        loader = DataLoader(TensorDataset(x, torch.arange(len(x)) % 3), batch_size=4)
        # SGD: torch's Adam reads its step counters back with .item() (CPU tensors, even on a GPU)
        trainer = Trainer(TensorTerms(), config(tmp_path / f"{batches}_{log_every}", epochs=1, opt="momentum",
                                                log_every=log_every))
        with SyncCounter() as in_fit:
            row = trainer.fit(loader).history[0]
        with SyncCounter() as in_evaluate:
            trainer.evaluate(loader)
        return in_fit, in_evaluate, row

    four, four_eval, _ = count_syncs(4, log_every=100)
    eight, eight_eval, row = count_syncs(8, log_every=100)
    assert len(eight.callers) == len(four.callers)  # a constant per epoch, not one per batch
    # The run's fingerprint reads the data's labels and the teachers' weights once, before the first step.
    fingerprint = f"{KDKIT_DIR}/fingerprint.py"
    assert eight.made_by(fingerprint) == four.made_by(fingerprint)
    # kdkit's own in the epoch: the losses read back at the epoch end, and the parameter check before the checkpoint
    assert eight.made_by(KDKIT_DIR) - eight.made_by(fingerprint) == 2, eight.callers
    every_two, _, row_every_two = count_syncs(8, log_every=2)
    assert every_two.made_by(KDKIT_DIR) - eight.made_by(KDKIT_DIR) == 3  # 4 intervals; the last one is the epoch end's read
    assert len(eight_eval.callers) == len(four_eval.callers)  # evaluation reads back at its end only
    # the terms were summed on the device all the same
    assert {"train_loss", "train_ce", "train_reg"} <= set(row) and row["train_loss"] == pytest.approx(
        row["train_ce"] + row["train_reg"], rel=1e-6)
    assert without_times([row]) == without_times([row_every_two])


# --------------------------------------------------------------------------- tasks, transforms, test()
def test_test_evaluates_the_best_model(tmp_path: Path) -> None:
    from kdkit.checkpoint import CheckpointError

    train, val = loaders()
    trainer = make_trainer(tmp_path, epochs=2)
    result = trainer.fit(train, val)
    with torch.no_grad():
        for parameter in trainer.student.parameters():
            parameter.zero_()  # whatever the student holds now, test() evaluates the best model
    metrics = trainer.test(val)
    assert metrics["accuracy"] == result.best_metric
    assert metrics["loss"] == result.history[result.best_epoch - 1]["val_loss"]
    assert metrics == trainer.evaluate(val)  # the student keeps the best model's weights

    with pytest.raises(FileNotFoundError, match=str(tmp_path / "elsewhere")):
        make_trainer(tmp_path / "elsewhere").test(val)
    other = Trainer(Supervised(tiny_net()), config(tmp_path), class_names=["a", "b", "c"])
    with pytest.raises(CheckpointError, match="class names differ"):
        other.test(val)


def test_validation_loss_comes_from_the_task(tmp_path: Path) -> None:
    loader = DataLoader(Blobs(13, seed=2, augment=False), batch_size=4)  # last batch partial
    images, labels = loader.dataset.images, loader.dataset.labels

    def doubled(logits, labels):
        return 2 * nn.functional.cross_entropy(logits, labels)

    class NoValidationLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student = tiny_net(seed=4)

        def forward(self, images, labels):
            logits = self.student(images)
            return StepOutput(logits.sum() * 0, logits)

    fp32 = dict(mixed_precision="no")  # not an earlier test's bf16: Accelerate's state is per process
    plain = Trainer(Supervised(tiny_net(seed=4)), config(tmp_path / "a", **fp32)).evaluate(loader)
    model = tiny_net(seed=4).eval()
    with torch.no_grad():  # the mean over all 13 samples, whatever the batches
        assert plain["loss"] == pytest.approx(nn.functional.cross_entropy(model(images), labels).item(), rel=1e-5)
    custom = Trainer(Supervised(tiny_net(seed=4), loss=doubled), config(tmp_path / "b", **fp32)).evaluate(loader)
    assert custom["loss"] == pytest.approx(2 * plain["loss"], rel=1e-5)  # the custom loss counts in val_loss
    assert custom["accuracy"] == plain["accuracy"]
    bare = Trainer(NoValidationLoss(), config(tmp_path / "c", **fp32)).evaluate(loader)  # cross-entropy without one
    assert bare["loss"] == pytest.approx(plain["loss"], rel=1e-5)


def test_device_transforms_prepare_uint8_batches(tmp_path: Path) -> None:
    images = (torch.rand(16, 3, 8, 8) * 255).to(torch.uint8)
    loader = DataLoader(TensorDataset(images, torch.arange(16) % 3), batch_size=8)
    seen: dict[str, list] = {"train": [], "eval": []}

    def to_float(stage: str):
        def transform(batch: torch.Tensor) -> torch.Tensor:
            seen[stage].append((batch.dtype, batch.device))
            return batch.float() / 255
        return transform

    trainer = Trainer(Supervised(tiny_net()), config(tmp_path, epochs=1), class_names=CLASSES,
                      train_transform=to_float("train"), eval_transform=to_float("eval"))
    result = trainer.fit(loader, loader)
    device = trainer.accelerator.device
    assert seen["train"] == [(torch.uint8, device)] * 2  # on the device, before the task
    assert seen["eval"] == [(torch.uint8, device)] * 2
    assert math.isfinite(result.history[0]["train_loss"]) and result.final_val_metrics["num_samples"] == 16

    untransformed = Trainer(Supervised(tiny_net()), config(tmp_path / "raw", epochs=1))
    with pytest.raises(TypeError, match=r"torch\.uint8.*train_transform"):
        untransformed.fit(loader)
    with pytest.raises(TypeError, match=r"torch\.uint8.*eval_transform"):
        untransformed.evaluate(loader)
    with pytest.raises(TypeError, match="eval_transform must be callable"):
        Trainer(Supervised(tiny_net()), config(tmp_path), eval_transform="normalise")


def test_weight_decay_exemptions_come_from_the_task_or_the_student(tmp_path: Path) -> None:
    class WithPosEmbed(nn.Module):  # a timm-style model
        def __init__(self) -> None:
            super().__init__()
            self.pos_embed = nn.Parameter(torch.zeros(1, 4, 3))
            self.head = nn.Linear(3, 3)

        def forward(self, x):
            return self.head(x.flatten(2).mean(-1) + self.pos_embed.mean((0, 1)))

        def no_weight_decay(self):
            return {"pos_embed"}

    class Bare(nn.Module):  # a task without no_weight_decay()
        def __init__(self) -> None:
            super().__init__()
            self.student = WithPosEmbed()

    class Own(Bare):
        def no_weight_decay(self):
            return {"student.head.weight"}

    def undecayed(task: nn.Module) -> set[str]:
        trainer = Trainer(task, config(tmp_path))
        ids = {id(p) for group in trainer.optimizer.param_groups if group["weight_decay"] == 0 for p in group["params"]}
        return {name for name, p in task.named_parameters() if id(p) in ids}

    expected = {"student.pos_embed", "student.head.bias"}  # the student's list, and 1-d parameters
    assert undecayed(Bare()) == expected
    assert undecayed(Supervised(WithPosEmbed())) == expected
    assert undecayed(Own()) == {"student.head.weight", "student.head.bias"}  # the task's own list wins


# --------------------------------------------------------------------------- cadence and precision
def test_checkpoint_every_3_resumes_from_epoch_3_and_ends_like_an_uninterrupted_run(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from kdkit.train import checkpoint_epoch

    train, val = loaders(n_train=16, n_val=8)  # 2 batches per epoch
    cadence = dict(epochs=5, checkpoint_every=3)
    reference_trainer = make_trainer(tmp_path / "ref", **cadence)
    reference = reference_trainer.fit(train, val)

    # Stopped after epoch 4 (at the first batch of epoch 5): the last checkpoint holds epoch 3.
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path / "run", loss=ScriptedCE(crash_at=9), **cadence).fit(train, val)
    run = tmp_path / "run"
    assert checkpoint_epoch(run) == 3
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4  # epoch 4 ran, unsaved

    resumed_trainer = make_trainer(run, **cadence)
    resumed = resumed_trainer.fit(train, val, resume=True)
    assert without_times(resumed.history) == without_times(reference.history)
    assert resumed.best_epoch == reference.best_epoch and resumed.best_metric == reference.best_metric
    assert_same_state(state_of(resumed_trainer), state_of(reference_trainer))
    assert_same_state(load_file(run / "best_model.safetensors"), load_file(tmp_path / "ref" / "best_model.safetensors"))
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert checkpoint_epoch(run) == 5  # the last epoch is always saved
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last"]


def test_tf32_and_cudnn_fields_resume_freely_and_touch_cuda_only(tmp_path: Path) -> None:
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,  # noqa: E731
                     torch.backends.cudnn.benchmark)
    before = flags()
    train, _ = loaders(n_train=16)
    first = make_trainer(tmp_path, epochs=1, allow_tf32=not before[0], cudnn_benchmark=not before[2])
    if first.accelerator.device.type != "cuda":
        assert flags() == before
    first.fit(train)
    # other values on resume, and a checkpoint from before the fields existed, both resume
    assert make_trainer(tmp_path, epochs=1).fit(train, resume=True).best_epoch == 1
    state_file = tmp_path / "checkpoints" / "last" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    for name in ("allow_tf32", "cudnn_benchmark"):
        del state["config"][name]
    state_file.write_text(json.dumps(state))
    assert make_trainer(tmp_path, epochs=1).fit(train, resume=True).best_epoch == 1
    with pytest.raises(ValueError, match="cudnn_benchmark"):
        TrainConfig(cudnn_benchmark="yes")


def test_a_term_named_loss_is_not_counted_twice(tmp_path: Path) -> None:
    train, _ = loaders(n_train=16)
    named_loss = Trainer(Supervised(tiny_net(), loss=ScriptedCE()), config(tmp_path / "a", epochs=1)).fit(train)
    named_ce = Trainer(Supervised(tiny_net(), loss=ScriptedCE(), name="ce"), config(tmp_path / "b", epochs=1)).fit(train)
    assert named_loss.history[0]["train_loss"] == named_ce.history[0]["train_loss"] == named_ce.history[0]["train_ce"]


def test_public_names_keep_working() -> None:
    import kdkit
    import kdkit.checkpoint_manager
    import kdkit.tasks
    import kdkit.train
    import kdkit.train_config
    from kdkit.train import (  # noqa: F401
        FitResult,
        checkpoint_epoch,
        distributed_without_accelerator,
    )

    assert kdkit.Trainer is kdkit.train.Trainer and kdkit.FitResult is FitResult
    assert kdkit.Supervised is kdkit.train.Supervised is kdkit.tasks.Supervised
    assert kdkit.TrainConfig is kdkit.train.TrainConfig is kdkit.train_config.TrainConfig
    assert kdkit.ResumeError is kdkit.train.ResumeError is kdkit.checkpoint_manager.ResumeError
    assert kdkit.NonFiniteLossError is kdkit.train.NonFiniteLossError
    assert kdkit.train.find_checkpoint is kdkit.checkpoint_manager.find_checkpoint
    assert checkpoint_epoch is kdkit.checkpoint_manager.checkpoint_epoch


def test_non_finite_weights_never_become_the_best_model(tmp_path: Path) -> None:
    """A finite loss but a NaN parameter (here one the loss does not read): no best model, no checkpoint of it."""

    class PoisonsAParameter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.student = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
            self.spare = nn.Parameter(torch.zeros(2))
            self.calls = 0

        def forward(self, images, labels):
            self.calls += 1
            if self.calls == 5:  # epoch 2 of 3 batches
                with torch.no_grad():
                    self.spare.fill_(float("nan"))
            logits = self.student(images)
            return StepOutput(nn.functional.cross_entropy(logits, labels), logits, {})

    data = TensorDataset(torch.randn(24, 3, 4, 4), torch.arange(24) % 3)
    config = TrainConfig(epochs=3, lr=1e-2, sched="none", output_dir=tmp_path, progress=False, checkpoint_every=3)
    trainer = Trainer(PoisonsAParameter(), config, class_names=CLASSES)
    with pytest.raises(NonFiniteLossError, match="parameters became non-finite during epoch 2/3; neither the checkpoint nor the best model"):
        trainer.fit(DataLoader(data, batch_size=8))  # no validation: every epoch would be the best
    assert read_metadata(tmp_path / "best_model.safetensors")["epoch"] == 1


def test_eval_every_validates_at_its_cadence_and_after_the_last_epoch(tmp_path: Path) -> None:
    train, val = loaders()
    result = make_trainer(tmp_path, epochs=5, eval_every=2).fit(train, val)
    validated = [row["epoch"] for row in result.history if "val_accuracy" in row]
    assert validated == [2, 4, 5] and result.best_epoch in validated
    assert not any(row["is_best"] for row in result.history if row["epoch"] not in validated)
    with open(tmp_path / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["val_accuracy"] != "" for row in rows] == [False, True, False, True, True]
    with pytest.raises(ValueError, match="eval_every"):
        TrainConfig(eval_every=0)


def test_ema_is_validated_selected_and_saved_instead_of_the_raw_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    train, val = loaders()
    trainer = make_trainer(tmp_path, epochs=3, ema_decay=0.9)
    result = trainer.fit(train, val)
    average = {k: v for k, v in trainer.ema.module.state_dict().items()}
    raw = trainer.student.state_dict()
    assert any(not torch.equal(average[k], raw[k]) for k in raw if raw[k].is_floating_point())  # an average, not a copy
    assert result.history[-1]["val_loss"] == pytest.approx(trainer.evaluate(val)["loss"])  # validation saw the average
    best = load_file(tmp_path / "best_model.safetensors")
    if result.best_epoch == 3:
        assert all(torch.equal(best[k], average[k].cpu()) for k in best)
    metrics = trainer.test(val)  # the best average, loaded into the student
    assert all(torch.equal(trainer.student.state_dict()[k].cpu(), best[k]) for k in best)
    assert metrics["loss"] == pytest.approx(result.history[result.best_epoch - 1]["val_loss"])
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
