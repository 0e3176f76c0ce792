"""examples/distill_any.py in process: its plan check before anything trains, its seeding, and
its refusal to start afresh over finished runs. The end-to-end run through ``accelerate launch``
is in test_examples.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import colour_class_folders
from safetensors.torch import load_file

import kdkit

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distill_any.py"


def _example_module():
    spec = importlib.util.spec_from_file_location("distill_any", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def distill_any(monkeypatch, tmp_path):
    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))
    return _example_module()


def _image_folder(root: Path, per_class: int = 6, size: int = 16) -> Path:
    """``train/<class>/*.png``: two classes of small images, each its own colour."""
    colour_class_folders(root / "train", ("cats", "dogs"), per_class=per_class, size=size)
    return root


def _same_weights(first: Path, second: Path) -> bool:
    """Whether two safetensors files hold bit-identical tensors (their metadata names each run apart)."""
    a, b = load_file(first), load_file(second)
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


# resnet10t as both models, 16 px, 1 epoch each: a few seconds per run.
TINY = ["--teacher", "resnet10t", "--student", "resnet10t", "--image-size", "16", "--batch-size", "4",
        "--teacher-epochs", "1", "--epochs", "1", "--val-fraction", "0.2"]  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--losses", "ce=0.5,kl=0.5,fitnet=1", "--teacher-taps", "layer3", "--student-taps", "layer9"], ["--student-taps", "layer9"]),
        (["--losses", "ce=0.5,kl=0.5,fitnet=1"], ["--teacher-taps", "fitnet"]),
        (["--teacher-taps", "layer3"], ["--teacher-taps", "no feature loss of --losses"]),
        (["--losses", "ce=0.5,klx=0.5"], ["--losses", "unknown loss 'klx'"]),
        (["--losses", "ce=-1,kl=1"], ["--losses", "'ce'"]),
        (["--losses", "ce=0,kl=0"], ["--losses", "every weight is 0"]),
        (["--epochs", "0"], ["--epochs must be a whole number of at least 1, got 0"]),
        (["--teacher-epochs", "0"], ["--teacher-epochs must be a whole number of at least 1, got 0"]),
        (["--image-size", "0"], ["--image-size must be a whole number of at least 1, got 0"]),
        (["--batch-size", "0"], ["--batch-size must be a whole number of at least 1, got 0"]),
        (["--val-fraction", "1"], ["--val-fraction must lie strictly between 0 and 1, got 1.0"]),
        (["--epochs", "0", "--batch-size", "-2"], ["2 problem(s)", "--epochs", "--batch-size"]),
        # Too small for the HDKD student's patches, and a ViT built for 224 px.
        (["--student", "hdkd_student", "--image-size", "8"], ["the student model 'hdkd_student' cannot be built for 8 x 8 images", "--image-size"]),
        (["--student", "deit_tiny_patch16_224"], ["the student model 'deit_tiny_patch16_224' cannot take 16 x 16 images", "--image-size"]),
        (["--resume", "--overwrite"], ["--resume", "--overwrite", "not both"]),
        (["--lr", "nan"], ["TrainConfig.lr must be a positive number, got nan (--lr)"]),
        (["--lr", "0"], ["TrainConfig.lr must be a positive number, got 0.0 (--lr)"]),
        (["--losses", "ce=0.5,dkd=1"], None),  # a registered loss the meta device runs: the plan passes
    ],
)
def test_the_whole_plan_is_checked_before_the_data_is_read_or_anything_trains(distill_any, tmp_path, monkeypatch, capsys, flags, named):
    def never(*args, **kwargs):
        raise AssertionError("the plan check must come first")

    monkeypatch.setattr(distill_any.kdata, "load_imagefolder", never)
    monkeypatch.setattr(kdkit.Trainer, "fit", never)
    if named is None:  # past the plan check: the data is read next
        with pytest.raises(AssertionError, match="the plan check must come first"):
            distill_any.main(["--data", str(tmp_path / "none"), "--output-dir", str(tmp_path / "out"), *TINY, *flags])
        return
    with pytest.raises(SystemExit) as stopped:
        distill_any.main(["--data", str(tmp_path / "none"), "--output-dir", str(tmp_path / "out"), *TINY, *flags])
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    for part in named:
        assert part in message, (part, message)


def test_a_teacher_checkpoint_needs_no_teacher_epochs(distill_any, tmp_path, monkeypatch):
    class Decoded(Exception):
        pass

    def decoded(*args, **kwargs):
        raise Decoded

    monkeypatch.setattr(distill_any.kdata, "load_imagefolder", decoded)
    with pytest.raises(Decoded):  # past the plan check
        distill_any.main(["--data", str(tmp_path), "--output-dir", str(tmp_path / "out"), *TINY, "--teacher-epochs", "0",
                          "--teacher-checkpoint", str(tmp_path / "teacher.safetensors")])  # fmt: skip


def test_two_runs_of_one_seed_give_the_same_weights_and_a_rerun_needs_overwrite(distill_any, tmp_path, capsys):
    data = _image_folder(tmp_path / "data")
    first, second = tmp_path / "first", tmp_path / "second"
    for output in (first, second):
        distill_any.main(["--data", str(data), "--output-dir", str(output), *TINY, "--seed", "3"])
    for run in ("teacher", "student"):
        assert _same_weights(first / run / "best_model.safetensors", second / run / "best_model.safetensors"), run

    # Again without --resume: refused before anything trains, naming both runs and what they hold.
    before = {run: (first / run / "best_model.safetensors").stat().st_mtime_ns for run in ("teacher", "student")}
    with pytest.raises(SystemExit):
        distill_any.main(["--data", str(data), "--output-dir", str(first), *TINY, "--seed", "3"])
    message = capsys.readouterr().err
    assert "2 run folder(s)" in message and "teacher: a finished run" in message and "student: a finished run" in message
    assert "--resume" in message and "--overwrite" in message
    assert before == {run: (first / run / "best_model.safetensors").stat().st_mtime_ns for run in ("teacher", "student")}
    # With --overwrite they train again, from the same seed: the same weights.
    distill_any.main(["--data", str(data), "--output-dir", str(first), *TINY, "--seed", "3", "--overwrite"])
    assert before != {run: (first / run / "best_model.safetensors").stat().st_mtime_ns for run in ("teacher", "student")}
    assert _same_weights(first / "student" / "best_model.safetensors", second / "student" / "best_model.safetensors")
