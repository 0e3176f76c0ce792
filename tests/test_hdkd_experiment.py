"""The HDKD experiment (kdkit_zoo.hdkd): its configuration and presets, command line, run
claims, settings record, report cells and plan check, and the import boundary with kdkit."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import colour_class_folders, requires_real_data

from kdkit.data import ImageTensorDataset
from kdkit.plan import PlanError, PlannedTraining, check_plan
from kdkit.train import ResumeError
from kdkit_zoo.hdkd import experiment
from kdkit_zoo.hdkd.claims import RunClaims
from kdkit_zoo.hdkd.cli import build_parser, config_from_args
from kdkit_zoo.hdkd.config import PRESETS, STUDENT, ExperimentConfig
from kdkit_zoo.hdkd.report import summary_cell
from kdkit_zoo.hdkd.run_plan import check_models, figure_tap
from kdkit_zoo.hdkd.settings import EXPERIMENT_FILE, check_same_settings, defining_settings
from kdkit_zoo.hdkd.training import student_steps, student_train_config, teacher_train_config


def test_flags_reach_the_config():
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


def test_step_budgets_follow_the_data():
    config = config_from_args("brain_tumor_mri", build_parser("brain_tumor_mri").parse_args(["--preset", "cpu"]))
    steps, batch = config.student_steps, config.student_batch
    assert (steps, batch) == (720, 16)
    for num_images in (200, 400, 600, 1000, 5137):
        epochs, per_epoch = config.student_epochs_for(num_images), num_images // batch  # the last partial batch is dropped
        # the fewest whole epochs that reach the steps, and at least student_epochs
        assert epochs >= config.student_epochs and epochs * per_epoch >= steps
        assert epochs == config.student_epochs or (epochs - 1) * per_epoch < steps
    assert [config.student_epochs_for(n) for n in (200, 400, 600, 5137)] == [60, 29, 20, 10]
    # The teacher at the global batch: Brain Tumor MRI's pool (5,137), a set of 1,000, the SMOTE-balanced HAM10000 pool.
    assert [config.teacher_epochs_for(n) for n in (5137, 1000, 38_720)] == [12, 62, 2]
    # Two processes share the global batch: the same steps, the same epochs.
    assert config.student_epochs_for(400, num_processes=2) == 29
    plain = build_parser("brain_tumor_mri").parse_args(
        ["--preset", "cpu", "--student-steps", "none", "--teacher-steps", "none", "--student-batch-size", "none"]
    )
    plain_config = config_from_args("brain_tumor_mri", plain)
    assert plain_config.student_epochs_for(200) == 10 and plain_config.teacher_epochs_for(38_720) == 2
    assert plain_config.student_batch == plain_config.batch_size == 32
    given = config_from_args("brain_tumor_mri", build_parser("brain_tumor_mri").parse_args(["--student-steps", "120", "--student-batch-size", "8"]))
    assert (given.student_steps, given.student_batch, given.student_epochs_for(200)) == (120, 8, 10)
    # epochs given alone are the runs' length (a quick trial), with steps the floor under them
    epochs_only = config_from_args("brain_tumor_mri", build_parser("brain_tumor_mri").parse_args(["--teacher-epochs", "1", "--student-epochs", "2"]))
    assert (epochs_only.teacher_epochs_for(5137), epochs_only.student_epochs_for(200)) == (1, 2)
    both = config_from_args("brain_tumor_mri", build_parser("brain_tumor_mri").parse_args(["--student-epochs", "2", "--student-steps", "100"]))
    assert (both.student_epochs_for(200), both.student_epochs_for(5137), both.teacher_steps) == (9, 2, 1920)
    paper = config_from_args("ham10000", build_parser("ham10000").parse_args(["--preset", "paper"]))
    assert (paper.teacher_epochs_for(38_720), paper.student_epochs_for(200), paper.student_batch) == (200, 200, 32)
    for name, value in (("student_steps", 0), ("teacher_steps", -5), ("student_batch_size", 0), ("validations_per_run", 2.5)):
        with pytest.raises(ValueError, match=rf"{name} must be a whole number of at least 1 or None \(--{name.replace('_', '-')}\)"):
            ExperimentConfig(**{name: value})
    with pytest.raises(SystemExit):
        build_parser("brain_tumor_mri").parse_args(["--student-steps", "0"])
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


def test_a_lengthened_run_keeps_the_warm_ups_share_and_validates_as_often(tmp_path):
    config = ExperimentConfig(student_epochs=10, student_warmup_epochs=1, student_steps=1800, student_batch_size=16, validations_per_run=30)
    runs = {n: student_train_config(config, tmp_path, seed=0, num_images=n) for n in (200, 400, 5137)}
    assert [(c.epochs, c.warmup_epochs, c.eval_every) for c in runs.values()] == [(150, 15, 5), (72, 7, 3), (10, 1, 1)]
    # a one-epoch experiment beside a warm-up has none (--student-epochs 1), and validation every epoch without a count
    one = student_train_config(ExperimentConfig(student_epochs=1, student_steps=None, validations_per_run=None), tmp_path, 0, 200)
    assert (one.epochs, one.warmup_epochs, one.eval_every) == (1, 0, 1)
    teacher = teacher_train_config(config, tmp_path, num_images=5137)
    assert (teacher.epochs, teacher.eval_every) == (12, 1)


def test_student_runs_step_at_the_student_batch(tmp_path):
    config = ExperimentConfig(teacher_steps=None, student_epochs=2, student_steps=None, student_batch_size=8)
    assert student_steps(config, 100) == 2 * (100 // 8)
    assert student_steps(config, 100, num_processes=2) == 2 * (50 // 4)
    # the teacher never trains fewer steps than the longest student run, whatever their batches
    assert teacher_train_config(config, tmp_path, num_images=100, at_least_steps=student_steps(config, 100)).epochs == 8
    with pytest.raises(PlanError, match="global batch size 8 does not divide evenly across 3 processes"):
        check_plan([PlannedTraining("student_50_seed0", 200, batch_size=8)], batch_size=12, num_processes=3)


def test_summary_cells_say_how_many_seeds_when_runs_are_missing():
    assert summary_cell([], 3) == "-"
    assert summary_cell([70.0], 1) == "70.00"
    assert summary_cell([70.0], 3) == "70.00 (1 seed)"
    assert summary_cell([70.0, 74.0], 3) == "72.00 ± 2.83 (2 seeds)"
    assert summary_cell([70.0, 74.0, 72.0], 3) == "72.00 ± 2.00"


# Another worker: joins the folder (with or without resume), claims the runs named, and waits.
_OTHER_WORKER = """
import sys, time
from pathlib import Path
from kdkit_zoo.hdkd.claims import RunClaims
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
    mine = RunClaims(tmp_path)
    mine.join(resume=True)
    with _other_worker(tmp_path, "resume", "teacher") as other:
        assert not mine.acquire("teacher") and mine.acquire("student_50_seed0")
        assert mine.holder("teacher") == f"pid {other.pid} on {socket.gethostname()}"
        mine.release("student_50_seed0")
    assert mine.acquire("teacher")  # killed, however it died: its claims are gone


@requires_locks
def test_workers_with_and_without_resume_do_not_share_a_folder(tmp_path):
    with _other_worker(tmp_path / "a", "resume"), pytest.raises(RuntimeError, match="start this one with resume"):
        RunClaims(tmp_path / "a").join(resume=False)
    with _other_worker(tmp_path / "b", "fresh"), pytest.raises(RuntimeError, match="a worker without resume is training"):
        RunClaims(tmp_path / "b").join(resume=True)
    with _other_worker(tmp_path / "c", "fresh"), pytest.raises(RuntimeError, match="without resume is training.*wait for it"):
        RunClaims(tmp_path / "c").join(resume=False)


@requires_locks
def test_a_resume_must_keep_the_experiments_settings(tmp_path):
    no_data = tmp_path / "no_data"
    no_data.mkdir()
    # Each call stops at loading the (missing) data: after the settings check, which comes first.
    with pytest.raises(FileNotFoundError):
        experiment.run_experiment(_tiny_experiment(tmp_path, data_dir=str(no_data), resume=False))
    recorded = json.loads((tmp_path / EXPERIMENT_FILE).read_text())
    assert recorded["alpha"] == 0.5 and recorded["image_size"] == 32 and "seeds" not in recorded
    with pytest.raises(ResumeError, match=r"alpha 0.5 there, 0.7 now; image_size 32 there, 48 now\. Pass the recorded"):
        experiment.run_experiment(_tiny_experiment(tmp_path, data_dir=str(no_data), alpha=0.7, image_size=48))
    # more seeds, sizes or baselines, and a report of what finished, extend the same experiment
    with pytest.raises(FileNotFoundError):
        experiment.run_experiment(_tiny_experiment(tmp_path, data_dir=str(no_data), seeds=[0, 1], sizes=[4, 8], finished_only=True))
    # where augmentation runs is recorded as a place, not as "auto" (which moves with the machine);
    # an experiment recorded before the place was is taken as augmenting in the loader
    assert recorded["augment_on_device"] is False
    with pytest.raises(ResumeError, match=r"augment_on_device False there, True now"):
        experiment.run_experiment(_tiny_experiment(tmp_path, data_dir=str(no_data), augment="device"))
    (tmp_path / EXPERIMENT_FILE).write_text(json.dumps({k: v for k, v in recorded.items() if k != "augment_on_device"}))
    with pytest.raises(ResumeError, match=r"augment_on_device False there, True now"):
        experiment.run_experiment(_tiny_experiment(tmp_path, data_dir=str(no_data), augment="device"))
    # starting afresh records the new settings
    with pytest.raises(FileNotFoundError):
        experiment.run_experiment(_tiny_experiment(tmp_path, data_dir=str(no_data), alpha=0.7, resume=False))
    assert json.loads((tmp_path / EXPERIMENT_FILE).read_text())["alpha"] == 0.7
    # a baseline that cannot take the image size stops the experiment before anything trains
    with pytest.raises(ValueError, match=r"baseline 'deit_tiny_patch16_224' cannot take 32 x 32 images \(AssertionError"):
        experiment.run_experiment(_tiny_experiment(tmp_path, data_dir=str(no_data), alpha=0.7, baselines=["deit_tiny_patch16_224", "resnet10t"]))
    # the experiment's lock went with the call: a worker without resume may take the folder
    with _other_worker(tmp_path / ".claims", "fresh"):
        pass


def _tiny_experiment(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path), image_size=32, teacher_epochs=1, teacher_steps=None, student_epochs=1, student_steps=None,
        sizes=[4], seeds=[0], batch_size=8, teacher_per_class=8, mixed_precision="no", channels_last=False, resume=True,
    )  # fmt: skip
    return ExperimentConfig(**{**settings, **overrides})


@pytest.mark.slow
@requires_locks
@requires_real_data("brain_tumor_mri")
def test_a_worker_takes_the_runs_nobody_holds_and_the_rest_when_freed(tmp_path, monkeypatch):
    trained_before_waiting = []
    with _other_worker(tmp_path / ".claims", "resume", "teacher", "student_4_seed0") as other:

        def other_worker_dies():  # its claims drop with it: this worker takes its runs over
            trained_before_waiting.append(sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and p.name != ".claims"))
            other.kill()
            other.wait()

        monkeypatch.setattr(experiment, "_wait_for_other_workers", other_worker_dies)
        results = experiment.run_experiment(_tiny_experiment(tmp_path, baselines=["resnet10t"]))
    # Only the baseline was free (the student alone is held, HDKD needs the held teacher); the
    # rest trained once the other worker had gone, and the report keeps the planned order.
    assert trained_before_waiting == [["resnet10t_4_seed0"]]
    assert [run["model"] for run in results["runs"]] == ["student", "HDKD", "resnet10t"]
    assert (tmp_path / "teacher" / "best_model.safetensors").exists()
    figures = ("teacher_curves", "activation_maps", "accuracy_vs_size", "confusion_hdkd_4_seed0")
    assert all((tmp_path / f"{name}.png").stat().st_size > 1000 for name in figures)

    # The trained teacher, reused by a new experiment: tested, not trained again.
    teacher_file = tmp_path / "teacher" / "best_model.safetensors"
    reused = experiment.run_experiment(_tiny_experiment(tmp_path / "reuse", teacher_checkpoint=str(teacher_file), resume=False))
    assert reused["teacher"] == results["teacher"] and len(reused["runs"]) == 2
    assert not (tmp_path / "reuse" / "teacher").exists()

    # A report while only the teacher has finished at the sizes asked for: tables, no size plot.
    early = experiment.run_experiment(_tiny_experiment(tmp_path, sizes=[6], finished_only=True))
    assert early["runs"] == [] and early["unfinished"] == ["student_6_seed0", "hdkd_6_seed0"]


def test_the_experiment_checks_its_plan_for_every_process_before_training(tmp_path, monkeypatch):
    """8 processes and 1 image per class: every run is named, with its size, and nothing trains."""

    def tiny_splits(config):
        images = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8)
        data = ImageTensorDataset(images, torch.arange(48) % 4, ["a", "b", "c", "d"])
        return {"train": data, "test": data.subset(range(8))}, {"dataset": "tiny"}

    monkeypatch.setattr(experiment, "_load_splits", tiny_splits)
    config = _tiny_experiment(tmp_path, sizes=[1, 8], batch_size=8, resume=False)
    eight = SimpleNamespace(num_processes=8, is_main_process=True, process_index=0)
    with pytest.raises(PlanError) as error:
        experiment._run_joined(config, RunClaims(tmp_path / ".claims"), tmp_path, eight)
    message = str(error.value)
    assert "student_1_seed0" in message and "hdkd_1_seed0" in message and "4 training image(s) for 8 process(es)" in message
    assert "student_8_seed0" not in message and "teacher" not in message
    assert not (tmp_path / "teacher").exists()
    with pytest.raises(PlanError, match="global batch size 8 does not divide evenly across 3 processes"):
        experiment._run_joined(config, RunClaims(tmp_path / ".claims"), tmp_path, SimpleNamespace(num_processes=3, is_main_process=True))


# --------------------------------------------------------------------------- one table of defaults

# The presets as the tuning of benchmarks/results/hdkd_tuning_*.md chose them (the paper's as
# the paper has them): a changed value changes every result.
PINNED_PRESETS = {
    "cpu": dict(
        image_size=64, batch_size=32, teacher_epochs=2, teacher_steps=1920, student_epochs=10, student_steps=720,
        student_batch_size=16, validations_per_run=12, sizes=[50, 100, 150], seeds=[0], mixed_precision="bf16",
        channels_last=False, checkpoint_every=2, teacher_opt="adamw", teacher_lr=3e-3, teacher_sched="onecycle",
        teacher_weight_decay=0.05, student_opt="adamw", student_lr=1e-3, student_sched="onecycle", student_min_lr=0.0,
        student_warmup_epochs=3, student_weight_decay=0.05,
    ),
    # the paper's hyper-parameters: epochs, optimizers, learning rates and batch
    "paper": dict(
        image_size=224, batch_size=32, teacher_epochs=200, teacher_steps=None, student_epochs=200, student_steps=None,
        student_batch_size=None, validations_per_run=None, sizes=[50, 100, 150, None], seeds=[0, 1, 2], mixed_precision="auto",
        channels_last=False, checkpoint_every=10, teacher_opt="adam", teacher_lr=1e-3, teacher_sched="none",
        teacher_weight_decay=0.0, student_opt="adamw", student_lr=5e-5, student_sched="cosine", student_min_lr=2e-5,
        student_warmup_epochs=5, student_weight_decay=0.1,
    ),
}  # fmt: skip


def test_the_presets_keep_their_values():
    assert PRESETS == PINNED_PRESETS


def test_the_config_defaults_are_the_cpu_preset():
    default = ExperimentConfig()
    assert {name: getattr(default, name) for name in PRESETS["cpu"]} == PRESETS["cpu"]
    # a preset may only name fields, and both name the same ones: none falls back to a default of the other
    assert set(PRESETS["paper"]) == set(PRESETS["cpu"]) <= set(vars(default))
    # the list defaults are copies: a config's own sizes do not change the preset or the next config
    default.sizes.append(200)
    assert PRESETS["cpu"]["sizes"] == [50, 100, 150] and ExperimentConfig().sizes == [50, 100, 150]
    # so the command line's cpu preset and a config built in Python are the same experiment
    from_flags = config_from_args("brain_tumor_mri", build_parser("brain_tumor_mri").parse_args(["--preset", "cpu"]))
    assert from_flags == ExperimentConfig()


def test_the_runs_train_with_the_configs_optimizers(tmp_path):
    paper = ExperimentConfig(**PRESETS["paper"])
    teacher = teacher_train_config(paper, tmp_path, num_images=100)
    assert (teacher.opt, teacher.lr, teacher.sched, teacher.weight_decay, teacher.epochs) == ("adam", 1e-3, "none", 0.0, 200)
    student = student_train_config(paper, tmp_path, seed=2, num_images=100)
    assert (student.opt, student.sched, student.lr, student.min_lr, student.warmup_epochs) == ("adamw", "cosine", 5e-5, 2e-5, 5)
    assert (student.weight_decay, student.seed, student.select_metric) == (0.1, 2, "accuracy")
    sgd = student_train_config(ExperimentConfig(dataset="ham10000", student_opt="sgd", student_sched="step"), tmp_path, 0, 100)
    assert (sgd.opt, sgd.sched, sgd.select_metric) == ("sgd", "step", "balanced_accuracy")


def test_experiments_recorded_before_the_students_optimizer_was_a_setting_still_resume(tmp_path):
    config = ExperimentConfig(output_dir=str(tmp_path), resume=True)
    settings = defining_settings(config)
    # the settings recorded before the move to the zoo, and the two that joined them
    assert set(settings) == {
        "alpha", "augment_on_device", "batch_size", "channels_last", "dataset", "feature_weight", "image_size", "kl_reduction",
        "mixed_precision", "smote", "stage_alpha", "student_epochs", "student_lr", "student_min_lr",
        "student_opt", "student_sched", "student_warmup_epochs", "student_weight_decay", "teacher_checkpoint", "teacher_epochs",
        "teacher_lr", "teacher_opt", "teacher_per_class", "teacher_sched", "teacher_weight_decay",
        "temperature", "val_fraction",
        # the experiment on any data set and model pair
        "test_fraction", "teacher_model", "student_model", "alone_model", "taps", "select_metric",
        # budgets in optimizer steps, which replaced the image budgets
        "teacher_steps", "student_steps", "student_batch_size", "validations_per_run",
    }  # fmt: skip
    added_since = ("student_opt", "student_sched", "test_fraction", "teacher_model", "student_model", "alone_model", "taps", "select_metric")
    steps = ("teacher_steps", "student_steps", "student_batch_size", "validations_per_run")
    # as those experiments were trained: epochs alone, and the students' cosine schedule
    config = ExperimentConfig(output_dir=str(tmp_path), resume=True, student_sched="cosine", **{name: None for name in steps})
    settings = defining_settings(config)
    older = {name: value for name, value in settings.items() if name not in (*added_since, *steps)}
    (tmp_path / EXPERIMENT_FILE).write_text(json.dumps({**older, "teacher_image_budget": None, "student_image_budget": None}))
    check_same_settings(config, tmp_path)  # AdamW and cosine, the HDKD pair, as every run before was trained
    with pytest.raises(ResumeError, match=r"teacher_model 'hdkd_teacher' there, 'resnet10t' now"):
        check_same_settings(ExperimentConfig(output_dir=str(tmp_path), resume=True, teacher_model="resnet10t"), tmp_path)
    with pytest.raises(ResumeError, match=r"student_opt 'adamw' there, 'sgd' now"):
        check_same_settings(ExperimentConfig(output_dir=str(tmp_path), resume=True, student_opt="sgd"), tmp_path)
    # an experiment of epochs only does not resume under a step budget (its runs would train on)
    with pytest.raises(ResumeError, match=r"student_steps None there, 720 now"):
        check_same_settings(ExperimentConfig(output_dir=str(tmp_path), resume=True, teacher_steps=None), tmp_path)
    # nor one trained under an image budget, a rule that is gone
    (tmp_path / EXPERIMENT_FILE).write_text(json.dumps({**older, "student_image_budget": 18_000}))
    with pytest.raises(ResumeError, match=r"records student_image_budget 18000 \(budgets in images gave way to budgets in optimizer steps"):
        check_same_settings(config, tmp_path)


# --------------------------------------------------------------------------- the import boundary

_IMPORT_BOUNDARY = """
import importlib, pkgutil, sys
import kdkit_zoo.hdkd.model
assert not [name for name in sys.modules if name.split(".")[0] == "kdkit"], "the HDKD models import kdkit"
import kdkit
for module in pkgutil.iter_modules(kdkit.__path__, "kdkit."):
    importlib.import_module(module.name)
imported = sorted(name for name in sys.modules if name.startswith("kdkit_zoo.") and name not in ("kdkit_zoo.hdkd", "kdkit_zoo.hdkd.model"))
assert imported == [], f"kdkit imports the experiment: {imported}"
"""


def test_no_import_cycle_between_kdkit_and_the_zoo():
    """The models import nothing of kdkit (which imports them); kdkit imports no experiment module."""
    for code in (_IMPORT_BOUNDARY, "import kdkit_zoo.hdkd.cli", "import kdkit_zoo.hdkd.experiment; import kdkit"):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]


# --------------------------------------------------------------------------- your own data set
def _class_folders(root, classes=("alpha", "beta", "gamma"), per_class=15, size=24):
    """Class folders of small PNGs, each class its own colour (learnable, and distinct)."""
    return colour_class_folders(root, classes, per_class=per_class, size=size)


def test_select_metric_follows_the_class_balance_and_sizes_are_capped_with_a_note():
    import numpy as np

    assert experiment.select_metric_for(np.array([0] * 10 + [1] * 15)) == "accuracy"
    assert experiment.select_metric_for(np.array([0] * 10 + [1] * 16)) == "balanced_accuracy"
    pool = ImageTensorDataset(torch.zeros(12, 3, 8, 8, dtype=torch.uint8), [0] * 8 + [1] * 4, ["big", "small"])
    config = ExperimentConfig(dataset=None, data="x", sizes=[3, 5, None])
    assert experiment._size_notes(config, pool) == [
        "5 images per class: class 'small' has 4 in the training pool, so its subsets hold all 4 of them"
    ]


def test_the_brain_tumor_folder_itself_is_a_data_dir(tmp_path):
    from kdkit_zoo.hdkd.datasets import dataset_dir

    for split in ("Training", "Testing"):
        (tmp_path / "brain_tumor_mri" / split).mkdir(parents=True)
    assert dataset_dir("brain_tumor_mri", tmp_path) == tmp_path / "brain_tumor_mri"
    assert dataset_dir("brain_tumor_mri", tmp_path / "brain_tumor_mri") == tmp_path / "brain_tumor_mri"


def test_the_experiment_on_class_folders_with_any_timm_pair(tmp_path):
    """No preset data set: the classes, sizes and split come from the folder, the models from the flags."""
    data = _class_folders(tmp_path / "images")
    args = build_parser(None).parse_args([
        "--data", str(data), "--output-dir", str(tmp_path / "run"), "--preset", "cpu", "--image-size", "32",
        "--teacher-epochs", "1", "--student-epochs", "2", "--sizes", "3,20", "--seeds", "0", "--batch-size", "8",
        "--student-batch-size", "none", "--teacher", "resnet10t", "--student", "resnet10t", "--taps", "layer2,layer3", "--mixed-precision", "no",
        "--figure-tap", "teacher=layer3,student=layer2",
    ])
    config = config_from_args(None, args)
    results = experiment.run_experiment(config)
    assert results["config"]["classes"] == ["alpha", "beta", "gamma"]
    assert [(run["model"], run["size"]) for run in results["runs"]] == [("student", 3), ("HDKD", 3), ("student", 20), ("HDKD", 20)]
    assert results["data"]["layout"] == "class folders" and results["data"]["seed"] == 0
    assert results["notes"] and "20 images per class" in results["notes"][0]
    # The 20-per-class run (the whole pool) trains 2 epochs: the teacher's 1 would give it fewer steps.
    assert any("the teacher trains 2 epochs instead of 1, so that it takes at least the 8 optimizer steps of the longest "
               "student run (student_20_seed0)" in note for note in results["notes"])
    teacher_history = [json.loads(line) for line in (tmp_path / "run" / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert teacher_history[-1]["global_step"] >= max(run["epochs"] for run in results["runs"]) * 4
    assert results["config"]["select_metric"] == "accuracy"
    report = (tmp_path / "run" / "results.md").read_text()
    assert "resnet10t" in report and str(data) in report
    assert "Note: 20 images per class: class" in report
    # one seed: the report says what repeats it and how far it can be trusted
    assert results["config"]["threads_per_process"] == torch.get_num_threads()
    assert f"One seed: each cell is one draw of the subset and of the initial weights, not a mean. The same command repeats it on {torch.get_num_threads()} CPU thread(s) per process, 1 process(es), torch {torch.__version__}" in report
    assert "2 student epochs at batch 8" in report
    assert (tmp_path / "run" / "activation_maps.png").is_file()


def _launch_experiment(data: Path, output: Path, *, size: int) -> dict:
    """``accelerate launch examples/hdkd_experiment.py --data DATA`` at one size and seed, tiny; its ``results.json``."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
               "examples/hdkd_experiment.py", "--data", str(data), "--output-dir", str(output),
               "--image-size", "32", "--teacher-epochs", "1", "--student-epochs", "1", "--sizes", str(size), "--seeds", "0",
               "--batch-size", "8", "--preset", "cpu", "--threads", "2"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((output / "results.json").read_text())


@pytest.mark.slow
@requires_real_data("brain_tumor_mri")
def test_the_experiment_on_a_csv_with_groups_through_accelerate_launch(tmp_path):
    """A CSV of real images with a group column: one patient's images never on both sides of a split."""
    import csv
    import shutil

    from kdkit_zoo.hdkd.datasets import dataset_dir

    source = dataset_dir("brain_tumor_mri") / "Training"
    rows = []
    for label, folder in (("calm", "notumor"), ("spot", "glioma"), ("mass", "meningioma")):
        for index, image in enumerate(sorted((source / folder).iterdir())[:30]):
            target = tmp_path / "images" / f"{label}_{index:02d}.jpg"
            target.parent.mkdir(exist_ok=True)
            shutil.copy(image, target)
            rows.append({"path": f"images/{target.name}", "label": label, "group": f"{label}-patient{index // 3}"})
    with open(tmp_path / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "group"])
        writer.writeheader()
        writer.writerows(rows)
    results = _launch_experiment(tmp_path / "labels.csv", tmp_path / "run", size=5)
    assert results["config"]["classes"] == ["calm", "mass", "spot"]
    assert {run["model"] for run in results["runs"]} == {"student", "HDKD"}
    record = results["data"]
    assert record["layout"] == "csv"
    group_of = {row["path"]: row["group"] for row in rows}
    sides = {name: {group_of[path] for path in split.get("files", [])} for name, split in record["splits"].items()}
    names = sorted(sides)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            assert not sides[first] & sides[second], (first, second)


def test_a_teacher_below_the_student_alone_is_flagged_per_size_and_metric():
    from kdkit_zoo.hdkd.report import weak_teacher_notes

    config = ExperimentConfig(sizes=[50, None], seeds=[0, 1])
    alone = lambda size, seed, acc, bal: dict(model=STUDENT, size=size, seed=seed, accuracy=acc, balanced_accuracy=bal, macro_f1=0.5)  # noqa: E731
    results = {"teacher": {"accuracy": 0.838, "balanced_accuracy": 0.9, "macro_f1": 0.8},
               "runs": [alone(50, 0, 0.86, 0.80), alone(50, 1, 0.876, 0.82), alone("all", 0, 0.80, 0.95), alone("all", 1, 0.82, 0.93)]}
    notes = weak_teacher_notes(results, config)
    assert notes == [
        "the teacher (accuracy 83.80%) is below the student alone at 50 images per class (86.80%): HDKD distils a weaker "
        "model than the student reaches alone there, so its result says nothing about distillation; train the teacher "
        "longer (--teacher-steps) or with another recipe",
        notes[1],
    ]
    assert notes[1].startswith("the teacher (balanced accuracy 90.00%) is below the student alone at all images per class (94.00%)")
    results["teacher"] = {"accuracy": 0.95, "balanced_accuracy": 0.95, "macro_f1": 0.9}
    assert weak_teacher_notes(results, config) == []


def test_the_report_states_the_budget_and_trusts_one_seed_only_so_far():
    from kdkit_zoo.hdkd.report import results_markdown

    run = lambda model, seed: dict(model=model, size=50, seed=seed, accuracy=0.8, balanced_accuracy=0.8, macro_f1=0.8)  # noqa: E731
    teacher = {"accuracy": 0.95, "balanced_accuracy": 0.95, "macro_f1": 0.95}
    one = results_markdown({"teacher": teacher, "runs": [run(STUDENT, 0), run("HDKD", 0)], "config": {"threads_per_process": 2}},
                           ExperimentConfig(sizes=[50]))
    assert "720 optimizer steps per student run at batch 16 (the fewest whole epochs that reach them, at least 10)" in one
    assert "One seed: each cell is one draw" in one and "repeats it on 2 CPU thread(s) per process;" in one
    three = results_markdown({"teacher": teacher, "runs": [run(arm, seed) for seed in range(3) for arm in (STUDENT, "HDKD")]},
                             ExperimentConfig(sizes=[50], seeds=[0, 1, 2], student_steps=None))
    assert "One seed" not in three and "10 student epochs at batch 16" in three


def test_the_figure_tap_is_one_for_all_models_or_one_per_role():
    import timm

    resnet, hdkd = timm.create_model("resnet10t", num_classes=3), timm.create_model("hdkd_student", num_classes=3, img_size=32)
    default = ExperimentConfig(dataset=None, data="x")
    assert figure_tap(default, "student", hdkd) == "stages.2"
    assert figure_tap(default, "teacher", resnet) == "layer3"  # stride 16
    per_role = ExperimentConfig(dataset=None, data="x", figure_tap="teacher=layer4,student=stages.1")
    assert figure_tap(per_role, "teacher", resnet) == "layer4"
    assert figure_tap(per_role, "student", hdkd) == "stages.1"
    assert figure_tap(per_role, "alone", hdkd) == "stages.1"  # the distilled student's, unless alone= is given
    assert figure_tap(ExperimentConfig(dataset=None, data="x", figure_tap="layer2"), "teacher", resnet) == "layer2"


@pytest.mark.slow
@requires_real_data("brain_tumor_mri")
def test_the_experiment_on_split_folders_of_real_images_through_accelerate_launch(tmp_path):
    """Kaggle-spelled Training/ and Testing/ folders of three freely named classes: their classes, runs and splits."""
    import shutil

    from kdkit_zoo.hdkd.datasets import dataset_dir

    source = dataset_dir("brain_tumor_mri")
    for split, count in (("Training", 24), ("Testing", 6)):
        for label, folder in (("calm", "notumor"), ("spot", "glioma"), ("mass", "pituitary")):
            target = tmp_path / "scans" / split / label
            target.mkdir(parents=True)
            for image in sorted((source / split / folder).iterdir())[:count]:
                shutil.copy(image, target / image.name)
    results = _launch_experiment(tmp_path / "scans", tmp_path / "run", size=4)
    assert results["config"]["classes"] == ["calm", "mass", "spot"]
    assert [(run["model"], run["num_train"]) for run in results["runs"]] == [("student", 12), ("HDKD", 12)]
    splits = results["data"]["splits"]
    assert results["data"]["layout"] == "split folders"
    assert splits["test"]["source"] == "folder" and splits["test"]["size"] == 18
    assert splits["val"]["size"] + splits["train"]["size"] == 72 and set(splits["val"]["files"]).isdisjoint(splits["train"]["files"])
    for figure in ("accuracy_vs_size.png", "activation_maps.png", "results.md"):
        assert (tmp_path / "run" / figure).is_file()



def test_models_taps_and_figure_taps_are_checked_before_anything_trains():
    check_models(ExperimentConfig(image_size=32), num_classes=3)  # the HDKD pair
    check_models(ExperimentConfig(image_size=32, teacher_model="resnet10t", student_model="hdkd_student"), num_classes=3)
    with pytest.raises(ValueError, match=r"the student model 'deit_tiny_patch16_224' cannot take 32 x 32 images"):
        check_models(ExperimentConfig(image_size=32, teacher_model="resnet10t", student_model="deit_tiny_patch16_224"), num_classes=3)
    with pytest.raises(ValueError, match=r"the distilled taps \['layer2'\] do not fit resnet10t -> hdkd_student"):
        check_models(ExperimentConfig(image_size=32, teacher_model="resnet10t", taps=["layer2"]), num_classes=3)
    check_models(ExperimentConfig(image_size=32, teacher_model="resnet10t", taps=[("layer2", "stages.1")]), num_classes=3)
    with pytest.raises(ValueError, match=r"--figure-tap: 'layer3' for the student model 'hdkd_student': .*no module 'layer3'"):
        check_models(ExperimentConfig(image_size=32, teacher_model="resnet10t", figure_tap="layer3"), num_classes=3)


def test_taps_on_the_command_line_take_paths_pairs_and_stage_indices():
    parse = lambda text: config_from_args(None, build_parser(None).parse_args(["--data", "x", f"--taps={text}"])).taps  # noqa: E731
    assert parse("stages.1,stages.2") == ["stages.1", "stages.2"]
    assert parse("-2,-1") == [-2, -1]
    assert parse("layer2:stages.1,layer3:stages.2") == [("layer2", "stages.1"), ("layer3", "stages.2")]
    assert ExperimentConfig(taps=[["layer2", "stages.1"]]).taps == [("layer2", "stages.1")]  # as read back from JSON


def test_a_resume_over_other_data_is_refused(tmp_path):
    from kdkit_zoo.hdkd.settings import check_same_data

    record = {"path": "/a", "layout": "csv", "classes": ["x", "y"], "splits": {"test": {"files": ["1.png"]}}}
    mine = ExperimentConfig(dataset=None, data="/a", output_dir=str(tmp_path), resume=True)
    check_same_settings(mine, tmp_path)
    check_same_data(mine, tmp_path, record)
    check_same_data(ExperimentConfig(dataset=None, data="/moved", output_dir=str(tmp_path), resume=True), tmp_path, {**record, "path": "/moved"})
    other = {**record, "splits": {"test": {"files": ["2.png"]}}}
    with pytest.raises(ResumeError, match=r"trained on other data \(another split or content\)"):
        check_same_data(mine, tmp_path, other)
    with pytest.raises(ResumeError, match=r"the preset data set 'brain_tumor_mri' differs"):
        check_same_data(ExperimentConfig(output_dir=str(tmp_path), resume=True), tmp_path, {"dataset": "brain_tumor_mri"})
    preset = tmp_path / "preset"
    check_same_settings(ExperimentConfig(output_dir=str(preset), resume=False), preset)
    with pytest.raises(ResumeError, match=r"trained on a preset data set, and the data in /a differs"):
        check_same_data(ExperimentConfig(dataset=None, data="/a", output_dir=str(preset), resume=True), preset, record)


# --------------------------------------------------------------------------- the plan, before anything trains


def _tiny_splits(config):
    images = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8)
    data = ImageTensorDataset(images, torch.arange(48) % 4, ["a", "b", "c", "d"])
    return {"train": data, "test": data.subset(range(8))}, {"dataset": "tiny"}


@pytest.mark.parametrize("size", [7, 8])
def test_an_image_size_too_small_for_the_hdkd_models_is_refused_before_the_data_is_read(tmp_path, monkeypatch, size):
    def never(config):
        raise AssertionError("the models are checked before the data is read")

    monkeypatch.setattr(experiment, "_load_splits", never)
    with pytest.raises(PlanError) as error:
        experiment.run_experiment(_tiny_experiment(tmp_path, image_size=size, resume=False))
    message = str(error.value)
    # the distilled student and the student alone: both named, with the flag to change
    assert f"the student model 'hdkd_student' cannot be built for {size} x {size} images" in message
    assert f"the alone model 'hdkd_student_nodistill' cannot be built for {size} x {size} images" in message
    assert "--image-size" in message and "not a multiple of 16" in message
    assert not (tmp_path / EXPERIMENT_FILE).exists() and not (tmp_path / "teacher").exists()


def test_the_model_check_runs_a_training_step_at_each_processs_batch():
    # resnet10t ends on a 1 x 1 map at 32 px: evaluation passes, a training step of one image
    # (batch norm over one value per channel) does not.
    pair = dict(image_size=32, teacher_model="resnet10t", student_model="resnet10t", taps=["layer2"])
    check_models(ExperimentConfig(**pair, batch_size=2), num_classes=3)
    with pytest.raises(PlanError, match=r"the teacher model 'resnet10t' cannot take 32 x 32 images \(ValueError: Expected more "
                       r"than 1 value per channel.*in a training step of 1 image\(s\).*--image-size, or a larger --batch-size"):
        check_models(ExperimentConfig(**pair, batch_size=1), num_classes=3)
    with pytest.raises(PlanError, match=r"in a training step of 1 image\(s\)"):
        check_models(ExperimentConfig(**pair, batch_size=8), num_classes=3, num_processes=8)
    # reused from a checkpoint, the teacher only evaluates; the students still train
    with pytest.raises(PlanError) as error:
        check_models(ExperimentConfig(**pair, batch_size=1, student_batch_size=1, teacher_checkpoint="teacher.safetensors"), num_classes=3)
    assert "the teacher model" not in str(error.value) and "the student model 'resnet10t' cannot take" in str(error.value)
    # the students train at their own batch: a batch of one is theirs to fix, by its own flag
    with pytest.raises(PlanError) as error:
        check_models(ExperimentConfig(**pair, batch_size=2, student_batch_size=1), num_classes=3)
    assert "the teacher model" not in str(error.value)
    assert "the student model 'resnet10t' cannot take" in str(error.value) and "a larger --student-batch-size" in str(error.value)


def test_sizes_epochs_and_batches_below_one_are_refused_naming_the_flag(capsys):
    for name in ("image_size", "batch_size", "teacher_epochs", "student_epochs"):
        flag = "--" + name.replace("_", "-")
        with pytest.raises(ValueError, match=rf"{name} must be a whole number of at least 1 \({flag}\), got 0"):
            ExperimentConfig(**{name: 0})
        with pytest.raises(SystemExit):
            build_parser("brain_tumor_mri").parse_args([flag, "0"])
        assert f"argument {flag}: must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"\(--sizes\), got \[0\]"):
        ExperimentConfig(sizes=[0, 50])
    with pytest.raises(SystemExit):
        build_parser("brain_tumor_mri").parse_args(["--sizes", "50,-1"])
    assert "argument --sizes: must be at least 1, got -1" in capsys.readouterr().err


@requires_locks
def test_a_fresh_start_over_finished_runs_needs_overwrite(tmp_path, monkeypatch, capsys, fit_calls):
    from conftest import StopAtFit

    from kdkit.train import RunExistsError

    no_data = tmp_path / "no_data"
    no_data.mkdir()
    output = tmp_path / "run"
    with pytest.raises(FileNotFoundError):  # no run results there yet: a fresh start records its settings
        experiment.run_experiment(_tiny_experiment(output, data_dir=str(no_data), resume=False))
    recorded = (output / EXPERIMENT_FILE).read_text()
    for run in ("teacher", "hdkd_4_seed0"):  # two runs with results
        (output / run).mkdir()
        (output / run / "best_model.safetensors").write_bytes(b"weights")
    with pytest.raises(RunExistsError) as error:
        experiment.run_experiment(_tiny_experiment(output, data_dir=str(no_data), resume=False, alpha=0.7))
    message = str(error.value)
    assert "2 run folder(s)" in message and "teacher: its best model" in message and "hdkd_4_seed0: its best model" in message
    assert "student_4_seed0" not in message and "--resume" in message and "--overwrite" in message
    assert (output / EXPERIMENT_FILE).read_text() == recorded  # the refused start changed nothing

    # --overwrite: past the check, the new settings recorded, and every run told to replace its folder
    monkeypatch.setattr(experiment, "_load_splits", _tiny_splits)
    with pytest.raises(StopAtFit):
        experiment.run_experiment(_tiny_experiment(output, resume=False, overwrite=True, alpha=0.7))
    assert fit_calls == [{"resume": False, "overwrite": True}]
    assert json.loads((output / EXPERIMENT_FILE).read_text())["alpha"] == 0.7

    # overwrite is how one invocation runs, not a setting of the experiment; with resume, an error
    config = config_from_args("brain_tumor_mri", build_parser("brain_tumor_mri").parse_args(["--overwrite"]))
    assert config.overwrite and "overwrite" not in defining_settings(config)
    with pytest.raises(ValueError, match=r"--resume, --overwrite"):
        ExperimentConfig(resume=True, overwrite=True)
    from kdkit_zoo.hdkd.cli import main

    with pytest.raises(SystemExit):
        main("brain_tumor_mri", ["--resume", "--overwrite", "--output-dir", str(tmp_path / "both")])
    assert "pass one of them, not both" in capsys.readouterr().err
