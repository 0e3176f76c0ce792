"""The examples end to end on the real Brain Tumor MRI data, through `accelerate launch`."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import requires_real_data

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--image-size", "32", "--teacher-epochs", "1", "--student-epochs", "1", "--sizes", "4",
    "--seeds", "0", "--batch-size", "8", "--teacher-per-class", "8", "--threads", "1",
]  # fmt: skip


def _launch(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", script, *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@requires_real_data("brain_tumor_mri")
def test_hdkd_brain_end_to_end_and_resume(tmp_path):
    output = tmp_path / "run"
    done = _launch("examples/hdkd_brain.py", "--output-dir", str(output), "--baselines", "resnet10t", *TINY)
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((output / "results.json").read_text())
    assert set(results["teacher"]) == {"accuracy", "balanced_accuracy", "macro_f1"}
    assert [(r["model"], r["size"], r["seed"], r["distill"]) for r in results["runs"]] == [
        ("student", 4, 0, False), ("HDKD", 4, 0, True), ("resnet10t", 4, 0, False)
    ]
    for run in results["runs"]:
        assert 0.0 <= run["accuracy"] <= 1.0 and run["num_train"] == 16 and run["train_seconds"] > 0
    assert results["config"]["classes"] == ["glioma", "meningioma", "notumor", "pituitary"]
    report = (output / "results.md").read_text()
    assert "| 4 | accuracy |" in report and "| images per class | metric | `resnet10t` | student | HDKD |" in report
    for figure in ("accuracy_vs_size", "activation_maps", "confusion_teacher", "confusion_hdkd_4_seed0", "teacher_curves"):
        assert (output / f"{figure}.png").stat().st_size > 1000, figure

    # Resuming a finished experiment retrains nothing and reports the same test figures.
    again = _launch("examples/hdkd_brain.py", "--output-dir", str(output), "--resume", "--baselines", "resnet10t", *TINY)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads((output / "results.json").read_text())
    assert resumed["runs"] == results["runs"] and resumed["teacher"] == results["teacher"]

    # A report of what has finished: the size and seed never trained are left out, nothing trains,
    # and the baseline, asked for at seed 0 only, is missed at seed 0 only.
    partial = _launch("examples/hdkd_brain.py", "--output-dir", str(output), "--resume", "--finished-only",
                      "--baselines", "resnet10t", *TINY, "--sizes", "4,8", "--seeds", "0,1", "--baseline-seeds", "0")  # fmt: skip
    assert partial.returncode == 0, partial.stderr[-3000:]
    reported = json.loads((output / "results.json").read_text())
    assert reported["runs"] == results["runs"]
    assert reported["unfinished"] == [
        "student_4_seed1", "hdkd_4_seed1", "student_8_seed0", "hdkd_8_seed0", "resnet10t_8_seed0", "student_8_seed1", "hdkd_8_seed1"
    ]  # fmt: skip
    assert not (output / "student_8_seed0").exists()
    report = (output / "results.md").read_text()
    assert "Not finished, left out (7 runs): `student_4_seed1`" in report
    student, hdkd, baseline = (100 * run["accuracy"] for run in results["runs"])
    assert f"| 4 | accuracy | {student:.2f} (1 seed) | {hdkd:.2f} (1 seed) | {hdkd - student:+.2f} |" in report
    assert f"| 4 | accuracy | {baseline:.2f} | {student:.2f} | {hdkd:.2f} |" in report  # the baselines' seed only


def test_flags_reach_the_config():
    from kdkit.recipe import PRESETS, build_parser, config_from_args

    args = build_parser("brain_tumor_mri").parse_args(["--preset", "paper", "--sizes", "50,all", "--seeds", "1,2"])
    config = config_from_args("brain_tumor_mri", args)
    assert (config.image_size, config.student_epochs, config.sizes, config.seeds) == (224, 200, [50, None], [1, 2])
    assert config.teacher_opt == "adam" and config.teacher_lr == 1e-3 and not config.smote
    with_baselines = build_parser("brain_tumor_mri").parse_args(
        ["--seeds", "0,1,2", "--baselines", "resnet10t,mobilenetv2_100", "--baseline-seeds", "0"]
    )
    config = config_from_args("brain_tumor_mri", with_baselines)
    assert (config.baselines, config.baseline_seeds) == (["resnet10t", "mobilenetv2_100"], [0])
    ham = config_from_args("ham10000", build_parser("ham10000").parse_args(["--preset", "cpu"]))
    assert ham.smote and ham.image_size == 64 and ham.channels_last == PRESETS["cpu"]["channels_last"]
    for flag, value in (("--channels-last", True), ("--no-channels-last", False)):
        assert config_from_args("ham10000", build_parser("ham10000").parse_args([flag])).channels_last is value


def test_image_budgets_shorten_only_large_sets():
    from kdkit.recipe import ExperimentConfig, build_parser, config_from_args

    config = config_from_args("brain_tumor_mri", build_parser("brain_tumor_mri").parse_args(["--preset", "cpu"]))
    assert config.student_image_budget == 18_000
    assert [config.student_epochs_for(n) for n in (200, 600, 5137, 10**6)] == [30, 30, 4, 1]
    # The teacher: the Brain Tumor MRI pool keeps its 8 epochs, the SMOTE-balanced HAM10000 pool gets 2.
    assert [config.teacher_epochs_for(n) for n in (5137, 38_720)] == [8, 2]
    uncapped = build_parser("brain_tumor_mri").parse_args(
        ["--preset", "cpu", "--student-image-budget", "none", "--teacher-image-budget", "none"]
    )
    uncapped_config = config_from_args("brain_tumor_mri", uncapped)
    assert uncapped_config.student_epochs_for(5137) == 30 and uncapped_config.teacher_epochs_for(38_720) == 8
    paper = config_from_args("ham10000", build_parser("ham10000").parse_args(["--preset", "paper"]))
    assert paper.teacher_epochs_for(38_720) == 200
    with pytest.raises(ValueError, match="student_image_budget"):
        ExperimentConfig(student_image_budget=0)
    with pytest.raises(ValueError, match="teacher_image_budget"):
        ExperimentConfig(teacher_image_budget=-5)
    with pytest.raises(ValueError, match=r"unknown timm baseline model\(s\) \['mobilenet_v9'\]"):
        ExperimentConfig(baselines=["mobilenet_v9", "resnet10t"])
    with pytest.raises(ValueError, match="finished_only .* needs resume=True"):
        ExperimentConfig(finished_only=True)
    with pytest.raises(ValueError, match=r"baseline_seeds \[3\] are not among the seeds \[0, 1\]"):
        ExperimentConfig(seeds=[0, 1], baselines=["resnet10t"], baseline_seeds=[1, 3])
    with pytest.raises(ValueError, match="baseline_seeds needs baselines and at least one seed"):
        ExperimentConfig(baseline_seeds=[0])
    with pytest.raises(ValueError, match="baseline_seeds needs baselines and at least one seed"):
        ExperimentConfig(baselines=["resnet10t"], baseline_seeds=[])
    with pytest.raises(ValueError, match="seeds lists 0 more than once"):
        ExperimentConfig(seeds=[0, 1, 0])
    with pytest.raises(ValueError, match="sizes lists None more than once"):
        ExperimentConfig(sizes=[50, None, None])


def test_a_run_cut_to_one_epoch_has_no_warm_up(tmp_path):
    from kdkit.recipe import ExperimentConfig, _train_config

    config = ExperimentConfig(student_epochs=30, student_warmup_epochs=2, student_image_budget=18_000)
    warmups = {n: _train_config(config, tmp_path, teacher=False, seed=0, num_images=n) for n in (200, 5137, 10**6)}
    assert [(c.epochs, c.warmup_epochs) for c in warmups.values()] == [(30, 2), (4, 1), (1, 0)]


def test_summary_cells_say_how_many_seeds_when_runs_are_missing():
    from kdkit.recipe import _summary_cell

    assert _summary_cell([], 3) == "-"
    assert _summary_cell([70.0], 1) == "70.00"
    assert _summary_cell([70.0], 3) == "70.00 (1 seed)"
    assert _summary_cell([70.0, 74.0], 3) == "72.00 ± 2.83 (2 seeds)"
    assert _summary_cell([70.0, 74.0, 72.0], 3) == "72.00 ± 2.00"


# Another worker: joins the folder (with or without resume), claims the runs named, and waits.
_OTHER_WORKER = """
import sys, time
from pathlib import Path
from kdkit.recipe import RunClaims
folder, mode, *names = sys.argv[1:]
claims = RunClaims(Path(folder))
claims.join(resume=mode == "resume")
assert all(claims.acquire(name) for name in names)
print("ready", flush=True)
time.sleep(600)
"""
requires_locks = pytest.mark.skipif(sys.platform == "win32", reason="no POSIX file locks")


@contextlib.contextmanager
def _other_worker(folder, mode, *names):
    worker = subprocess.Popen([sys.executable, "-c", _OTHER_WORKER, str(folder), mode, *names], stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "ready"
        yield worker
    finally:
        worker.kill()
        worker.wait()


@requires_locks
def test_run_claims_exclude_other_workers_until_they_exit(tmp_path):
    from kdkit.recipe import RunClaims

    mine = RunClaims(tmp_path)
    mine.join(resume=True)
    with _other_worker(tmp_path, "resume", "teacher") as other:
        assert not mine.acquire("teacher") and mine.acquire("student_50_seed0")
        assert mine.holder("teacher") == f"pid {other.pid} on {socket.gethostname()}"
        mine.release("student_50_seed0")
    assert mine.acquire("teacher")  # killed, however it died: its claims are gone


@requires_locks
def test_workers_with_and_without_resume_do_not_share_a_folder(tmp_path):
    from kdkit.recipe import RunClaims

    with _other_worker(tmp_path / "a", "resume"), pytest.raises(RuntimeError, match="start this one with resume"):
        RunClaims(tmp_path / "a").join(resume=False)
    with _other_worker(tmp_path / "b", "fresh"), pytest.raises(RuntimeError, match="a worker without resume is training"):
        RunClaims(tmp_path / "b").join(resume=True)
    with _other_worker(tmp_path / "c", "fresh"), pytest.raises(RuntimeError, match="without resume is training.*wait for it"):
        RunClaims(tmp_path / "c").join(resume=False)


@requires_locks
def test_a_resume_must_keep_the_experiments_settings(tmp_path):
    from kdkit.recipe import EXPERIMENT_FILE, run_experiment
    from kdkit.train import ResumeError

    no_data = tmp_path / "no_data"
    no_data.mkdir()
    # Each call stops at loading the (missing) data: after the settings check, which comes first.
    with pytest.raises(FileNotFoundError):
        run_experiment(_tiny_experiment(tmp_path, data_dir=str(no_data), resume=False))
    recorded = json.loads((tmp_path / EXPERIMENT_FILE).read_text())
    assert recorded["alpha"] == 0.5 and recorded["image_size"] == 32 and "seeds" not in recorded
    with pytest.raises(ResumeError, match=r"alpha 0.5 there, 0.7 now; image_size 32 there, 48 now\. Pass the recorded"):
        run_experiment(_tiny_experiment(tmp_path, data_dir=str(no_data), alpha=0.7, image_size=48))
    # more seeds, sizes or baselines, and a report of what finished, extend the same experiment
    with pytest.raises(FileNotFoundError):
        run_experiment(_tiny_experiment(tmp_path, data_dir=str(no_data), seeds=[0, 1], sizes=[4, 8], finished_only=True))
    # where augmentation runs is recorded as a place, not as "auto" (which moves with the machine);
    # an experiment recorded before the place was is taken as augmenting in the loader
    assert recorded["augment_on_device"] is False
    with pytest.raises(ResumeError, match=r"augment_on_device False there, True now"):
        run_experiment(_tiny_experiment(tmp_path, data_dir=str(no_data), augment="device"))
    (tmp_path / EXPERIMENT_FILE).write_text(json.dumps({k: v for k, v in recorded.items() if k != "augment_on_device"}))
    with pytest.raises(ResumeError, match=r"augment_on_device False there, True now"):
        run_experiment(_tiny_experiment(tmp_path, data_dir=str(no_data), augment="device"))
    # starting afresh records the new settings
    with pytest.raises(FileNotFoundError):
        run_experiment(_tiny_experiment(tmp_path, data_dir=str(no_data), alpha=0.7, resume=False))
    assert json.loads((tmp_path / EXPERIMENT_FILE).read_text())["alpha"] == 0.7
    # a baseline that cannot take the image size stops the experiment before anything trains
    with pytest.raises(ValueError, match=r"baseline 'deit_tiny_patch16_224' cannot take 32 x 32 images \(AssertionError"):
        run_experiment(_tiny_experiment(tmp_path, data_dir=str(no_data), alpha=0.7, baselines=["deit_tiny_patch16_224", "resnet10t"]))
    # the experiment's lock went with the call: a worker without resume may take the folder
    with _other_worker(tmp_path / ".claims", "fresh"):
        pass


def _tiny_experiment(tmp_path, **overrides):
    from kdkit.recipe import ExperimentConfig

    settings = dict(
        output_dir=str(tmp_path), image_size=32, teacher_epochs=1, student_epochs=1, sizes=[4], seeds=[0],
        batch_size=8, teacher_per_class=8, mixed_precision="no", channels_last=False, resume=True,
    )  # fmt: skip
    return ExperimentConfig(**{**settings, **overrides})


@pytest.mark.slow
@requires_locks
@requires_real_data("brain_tumor_mri")
def test_a_worker_takes_the_runs_nobody_holds_and_the_rest_when_freed(tmp_path, monkeypatch):
    from kdkit import recipe

    trained_before_waiting = []
    with _other_worker(tmp_path / ".claims", "resume", "teacher", "student_4_seed0") as other:

        def other_worker_dies():  # its claims drop with it: this worker takes its runs over
            trained_before_waiting.append(sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and p.name != ".claims"))
            other.kill()
            other.wait()

        monkeypatch.setattr(recipe, "_wait_for_other_workers", other_worker_dies)
        results = recipe.run_experiment(_tiny_experiment(tmp_path, baselines=["resnet10t"]))
    # Only the baseline was free (the student alone is held, HDKD needs the held teacher); the
    # rest trained once the other worker had gone, and the report keeps the planned order.
    assert trained_before_waiting == [["resnet10t_4_seed0"]]
    assert [run["model"] for run in results["runs"]] == ["student", "HDKD", "resnet10t"]
    assert (tmp_path / "teacher" / "best_model.safetensors").exists()
    figures = ("teacher_curves", "activation_maps", "accuracy_vs_size", "confusion_hdkd_4_seed0")
    assert all((tmp_path / f"{name}.png").stat().st_size > 1000 for name in figures)

    # The trained teacher, reused by a new experiment: tested, not trained again.
    teacher_file = tmp_path / "teacher" / "best_model.safetensors"
    reused = recipe.run_experiment(_tiny_experiment(tmp_path / "reuse", teacher_checkpoint=str(teacher_file), resume=False))
    assert reused["teacher"] == results["teacher"] and len(reused["runs"]) == 2
    assert not (tmp_path / "reuse" / "teacher").exists()

    # A report while only the teacher has finished at the sizes asked for: tables, no size plot.
    early = recipe.run_experiment(_tiny_experiment(tmp_path, sizes=[6], finished_only=True))
    assert early["runs"] == [] and early["unfinished"] == ["student_6_seed0", "hdkd_6_seed0"]


@pytest.mark.slow
def test_distill_any_on_an_image_folder(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 10), ("test", 3)):
        for index, name in enumerate(("cats", "dogs")):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray((rng.integers(0, 256, (40, 40, 3)) // (index + 1)).astype(np.uint8)).save(folder / f"{i}.png")
    output = tmp_path / "out"
    done = _launch(
        "examples/distill_any.py", "--data", str(tmp_path / "data"), "--teacher", "resnet10t", "--student", "resnet10t",
        "--losses", "ce=0.5,kl=0.5,fitnet=1", "--teacher-taps", "-1", "--image-size", "32", "--batch-size", "4",
        "--teacher-epochs", "1", "--epochs", "1", "--output-dir", str(output),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((output / "results.json").read_text())
    assert report["classes"] == ["cats", "dogs"] and 0.0 <= report["test"]["accuracy"] <= 1.0
    assert (output / "student" / "best_model.safetensors").is_file()


def test_the_recipe_checks_its_plan_for_every_process_before_training(tmp_path, monkeypatch):
    """8 processes and 1 image per class: every run is named, with its size, and nothing trains."""
    from types import SimpleNamespace

    from kdkit import recipe
    from kdkit.data import ImageTensorDataset
    from kdkit.plan import PlanError
    import torch

    def tiny_splits(config):
        images = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8)
        data = ImageTensorDataset(images, torch.arange(48) % 4, ["a", "b", "c", "d"])
        return {"train": data, "test": data.subset(range(8))}

    monkeypatch.setattr(recipe, "_load_splits", tiny_splits)
    config = _tiny_experiment(tmp_path, sizes=[1, 8], batch_size=8, resume=False)
    eight = SimpleNamespace(num_processes=8, is_main_process=True, process_index=0)
    with pytest.raises(PlanError) as error:
        recipe._run_joined(config, recipe.RunClaims(tmp_path / ".claims"), tmp_path, eight)
    message = str(error.value)
    assert "student_1_seed0" in message and "hdkd_1_seed0" in message and "4 training image(s) for 8 process(es)" in message
    assert "student_8_seed0" not in message and "teacher" not in message
    assert not (tmp_path / "teacher").exists()
    with pytest.raises(PlanError, match="global batch size 8 does not divide evenly across 3 processes"):
        recipe._run_joined(config, recipe.RunClaims(tmp_path / ".claims"), tmp_path, SimpleNamespace(num_processes=3, is_main_process=True))
