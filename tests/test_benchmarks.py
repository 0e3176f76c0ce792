"""Fast checks of the benchmark scripts in ``benchmarks/`` (meta device and tiny models only)."""

from __future__ import annotations

import copy
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import distill_speed  # noqa: E402
import fidelity  # noqa: E402
from _common import METADATA_LABELS, SPEED_ENV_PREFIXES, run_metadata, write_results  # noqa: E402

TINY_SIZE = 32


def test_fidelity_counts_the_exact_parameters():
    measured = fidelity.measure("hdkd_teacher", num_classes=4)
    assert measured["params"] == 3_948_290
    assert measured["macs"] == pytest.approx(5.70e9, rel=0.01)
    assert sum(measured["macs_by_op"].values()) == measured["macs"]


def test_fidelity_quotes_paper_figures_only_where_given():
    assert fidelity.paper_figures("hdkd_teacher", 4) == {"params": 3_948_290, "gmacs": 5.879, "source": "Tables 1-2"}
    assert fidelity.paper_figures("hdkd_student", 4)["params"] is None
    assert fidelity.paper_figures("hdkd_student_se", 7) == {"params": None, "gmacs": None, "source": "Table 6"}
    assert fidelity.paper_figures("hdkd_teacher_stem4", 7)["source"] == "Table 7"


def loss_and_gradient(method: str, teacher, student, images, labels) -> tuple[float, torch.Tensor]:
    """Runs one compared step's loss on copies of the pair; returns the loss and the student's gradient."""
    student = copy.deepcopy(student)
    loss_fn, _ = distill_speed.METHODS[method](copy.deepcopy(teacher), student, TINY_SIZE)
    loss = loss_fn(images, labels)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in student.parameters()])


@pytest.fixture(scope="module")
def tiny_setup():
    teacher, student = distill_speed.build_pair(TINY_SIZE)
    images, labels = distill_speed.make_batch(2, TINY_SIZE)
    return (teacher, student, images, labels), loss_and_gradient("kdkit", teacher, student, images, labels)


@pytest.mark.parametrize("method", ["floor", "rerun", "torchdistill"])
def test_compared_steps_compute_kdkits_loss_and_gradients(method, tiny_setup):
    """Same weights and batch: the floor, the authors' loop and torchdistill match the Distiller."""
    inputs, (kdkit_loss, kdkit_grad) = tiny_setup
    loss, grad = loss_and_gradient(method, *inputs)
    assert loss == pytest.approx(kdkit_loss, abs=1e-4)
    assert ((grad - kdkit_grad).norm() / kdkit_grad.norm()).item() < 1e-5


def _rounds(median: float, spread: float, rounds: int = 10) -> list[float]:
    """Step times around ``median``, evenly spread by ``spread`` either side."""
    return [median + spread * (2 * index / (rounds - 1) - 1) for index in range(rounds)]


def test_target_checks_pair_the_rounds_and_judge_the_upper_confidence_bound():
    kdkit = _rounds(1.0, 0.1)
    # Each other variant's step in a round is kdkit's times a fixed factor, except torchdistill,
    # whose ratio to kdkit wobbles around 1 by round: +-0.5% or +-3%.
    by_name = {
        "kdkit": {"step_s": kdkit},
        "floor": {"step_s": [t / 1.04 for t in kdkit]},
        "rerun": {"step_s": [t * 1.4 for t in kdkit]},
        "torchdistill": {"step_s": [t * (1 + 0.005 * (-1) ** i) for i, t in enumerate(kdkit)]},
    }
    checks = distill_speed.target_checks(by_name)
    assert [check["compared_with"] for check in checks] == ["floor", "rerun", "torchdistill"]
    assert [check["step_time_ratio"] for check in checks] == pytest.approx([1.04, 1 / 1.4, 1.0], abs=1e-3)
    # The shared load of a round cancels: kdkit's own 20% spread leaves the floor's interval a point.
    assert checks[0]["ratio_interval"] == pytest.approx([1.04, 1.04])
    assert [check["passed"] for check in checks] == [True, False, True]
    assert distill_speed.describe_check(checks[1]).startswith("- FAIL: kdkit at least 1.5x faster")

    by_name["torchdistill"]["step_s"] = [t * (1 + 0.03 * (-1) ** i) for i, t in enumerate(kdkit)]
    noisy = distill_speed.target_checks(by_name)[2]
    assert noisy["step_time_ratio"] == pytest.approx(1.0, abs=0.02)
    assert noisy["ratio_interval"][1] > 1.01 and not noisy["passed"]  # equal medians, too noisy to tell

    # The same step times as kdkit, in reverse round order: equal medians, but round by round the
    # ratios run from 0.8 to 1.2, so the comparison is undecided and fails.
    by_name["torchdistill"]["step_s"] = kdkit[::-1]
    unpaired = distill_speed.target_checks(by_name)[2]
    assert unpaired["ratio_interval"][0] < 0.95 and unpaired["ratio_interval"][1] > 1.05 and not unpaired["passed"]


def test_supervised_steps_train_the_recipes_models_alone(tiny_setup):
    (teacher, student, images, labels), _ = tiny_setup
    for name, model_name in (("teacher_channels_last_bf16", "hdkd_teacher"), ("student", "hdkd_student_nodistill")):
        step = distill_speed.build_step(name, teacher, student, images, labels)
        trained = [p for group in step.optimizer.param_groups for p in group["params"]]
        reference = timm.create_model(model_name, num_classes=distill_speed.NUM_CLASSES, img_size=TINY_SIZE)
        assert [p.shape for p in trained] == [p.shape for p in reference.parameters()], name
        first = step()
        assert math.isfinite(first) and step() != first  # the step trains
    assert "teacher" not in distill_speed.DISTILLATION_VARIANTS and "kdkit_bf16" in distill_speed.DISTILLATION_VARIANTS


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc memory counters")
def test_memory_probe_counts_the_student_alone_in_its_baseline(monkeypatch):
    events = []
    build = distill_speed.build_student_alone
    monkeypatch.setattr(distill_speed, "build_student_alone", lambda size: events.append("model") or build(size))
    read = distill_speed._status_kib
    monkeypatch.setattr(distill_speed, "_status_kib", lambda field: events.append(field) or read(field))
    memory = distill_speed.probe_memory("student", 2, TINY_SIZE, threads=torch.get_num_threads(), steps=1)
    # the model is built once, before the baseline, like the pair the other variants train
    assert events == ["model", "VmRSS", "VmHWM"] and memory["peak_rss_delta_mib"] >= 0


def test_channels_last_effects_are_paired_and_need_the_whole_interval_on_one_side():
    base = _rounds(1.0, 0.2)
    by_name = {
        "kdkit_bf16": {"step_s": base},
        "kdkit_channels_last_bf16": {"step_s": [t * 1.1 for t in base]},
        "teacher": {"step_s": base},
        "teacher_channels_last": {"step_s": [t * 0.9 for t in base]},
        "student_bf16": {"step_s": base},
        "student_channels_last_bf16": {"step_s": base[::-1]},  # same times, unpaired: no decision
        "student": {"step_s": base},  # without its channels_last twin: not compared
    }
    effects = distill_speed.channels_last_effects(by_name)
    assert [(e["variant"], e["compared_with"], e["verdict"]) for e in effects] == [
        ("kdkit_channels_last_bf16", "kdkit_bf16", "slower"),
        ("teacher_channels_last", "teacher", "faster"),
        ("student_channels_last_bf16", "student_bf16", "undecided"),
    ]
    assert effects[0]["step_time_ratio"] == pytest.approx(1.1)


def test_target_checks_fail_with_too_few_rounds_for_an_interval():
    by_name = {"kdkit": {"step_s": [1.0] * 5}, "rerun": {"step_s": [3.0] * 5}}
    (check,) = distill_speed.target_checks(by_name)
    assert check["step_time_ratio"] == pytest.approx(1 / 3)
    assert check["ratio_interval"] is None and not check["passed"]
    assert "5 paired rounds are too few" in distill_speed.describe_check(check)


@pytest.fixture
def no_speed_settings(monkeypatch):
    """An environment without the variables that run_metadata writes into the command."""
    for name in [name for name in os.environ if name.startswith(SPEED_ENV_PREFIXES)]:
        monkeypatch.delenv(name)
    return monkeypatch


def test_results_writer_records_the_run(tmp_path, no_speed_settings):
    metadata = run_metadata(["python", "benchmarks/fidelity.py", "--image-size", "224"])
    json_path, md_path = write_results("demo", "Demo", {"answer": 42}, "| a |\n| --- |\n| 1 |", metadata, tmp_path)
    stored = json.loads(json_path.read_text())
    assert stored["results"] == {"answer": 42}
    assert set(stored["metadata"]) == set(METADATA_LABELS)
    assert stored["metadata"]["command"] == "python benchmarks/fidelity.py --image-size 224"
    assert stored["metadata"]["cpu_count"] >= 1 and stored["metadata"]["cpu_model"]
    assert stored["metadata"]["torch"] == torch.__version__
    markdown = md_path.read_text()
    assert markdown.startswith("# Demo\n")
    assert "`python benchmarks/fidelity.py --image-size 224`" in markdown
    assert f"CPU cores (`os.cpu_count()`): {stored['metadata']['cpu_count']}" in markdown
    assert markdown.rstrip().endswith("| 1 |")


def test_the_recorded_command_carries_the_settings_that_change_speed(no_speed_settings):
    no_speed_settings.setenv("MALLOC_MMAP_THRESHOLD_", "1024")
    no_speed_settings.setenv("OMP_NUM_THREADS", "1")
    no_speed_settings.setenv("KDKIT_DATA_ROOT", "/elsewhere")  # not a speed setting: left out
    command = run_metadata([str(Path.cwd() / ".venv" / "bin" / "python"), "benchmarks/inference.py"])["command"]
    assert command == "MALLOC_MMAP_THRESHOLD_=1024 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/inference.py"


@pytest.mark.parametrize(
    "launcher",
    [[sys.executable, "-m", "accelerate.commands.launch"], [str(Path(sys.executable).parent / "accelerate"), "launch"]],
    ids=["module", "console-script"],
)
def test_a_launched_benchmark_records_the_accelerate_launch_command(tmp_path, launcher):
    script = tmp_path / "report_command.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "from _common import run_metadata\nprint(run_metadata()['command'])\n"
    )
    env = {name: value for name, value in os.environ.items() if not name.startswith(SPEED_ENV_PREFIXES)}
    launch = [*launcher, "--num_processes", "1", "--cpu", str(script), "--flag"]
    done = subprocess.run(launch, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    # The launcher's line, relative to where it ran, without the OMP_NUM_THREADS it gave its child.
    expected = shlex.join([*launcher, "--num_processes", "1", "--cpu", "report_command.py", "--flag"])
    assert done.stdout.strip().splitlines()[-1] == expected


def test_inference_times_every_model_and_exports_a_matching_onnx_student(tmp_path):
    import inference

    args = inference.parse_args(
        ["--image-size", "32", "--batch-size", "2", "--rounds", "2", "--latency-calls", "1", "--warmup", "0",
         "--models", "hdkd_student", "mobilenetv2_100", "--threads", "1", "--output", str(tmp_path)]
    )  # fmt: skip
    results = inference.run(args)
    rows = {row["model"]: row for row in results["rows"]}
    assert list(rows) == ["hdkd_student", "mobilenetv2_100", inference.ONNX_NAME]
    assert all(len(row["timings"]["latency_s"]) == 2 and row["images_per_s"] > 0 for row in rows.values())
    assert rows["mobilenetv2_100"]["params_m"] == pytest.approx(2.229, abs=1e-3)
    assert results["onnx"]["max_abs_diff"] < 1e-4 and results["onnx"]["size_mb"] > 10  # weights inside the file
    markdown = inference.to_markdown(results, args)
    assert "| `hdkd_student` |" in markdown and "| 1.00x |" in markdown.split("| `hdkd_student` |")[1].splitlines()[0]


def test_onnx_check_rejects_nan_logits(tmp_path):
    import inference

    class NaNHead(nn.Module):
        def forward(self, images):
            return images.mean(dim=(2, 3)) * float("nan")

    with pytest.raises(AssertionError, match="differ by nan at batch 1"):
        inference.export_onnx(NaNHead(), 8, tmp_path / "nan.onnx")


def test_inference_summary_takes_medians():
    import inference

    summary = inference.summarise({"latency_s": [0.010, 0.030, 0.020], "batch_s": [2.0, 1.0, 4.0]}, batch_size=32)
    assert summary["latency_ms"] == pytest.approx(20.0) and summary["images_per_s"] == pytest.approx(16.0)


def test_data_efficiency_gains_and_targets():
    import data_efficiency

    runs = [
        {"model": model, "size": size, "seed": seed, "accuracy": acc + 0.02 * seed * (model == "HDKD"),
         "balanced_accuracy": acc - 0.1 * seed}
        for size, student, hdkd in ((50, 0.60, 0.72), ("all", 0.90, 0.89))
        for seed in range(3)
        for model, acc in (("student", student), ("HDKD", hdkd), ("resnet10t", 0.5))
    ]  # fmt: skip
    sizes = [50, 100, "all"]
    rows = data_efficiency.gains(runs, "accuracy", sizes)
    assert [row["size"] for row in rows] == [50, "all"] and [row["seeds"] for row in rows] == [[0, 1, 2], [0, 1, 2]]
    assert rows[0]["student_mean"] == pytest.approx(60.0) and rows[0]["student_std"] == pytest.approx(0.0)
    assert rows[0]["hdkd_mean"] == pytest.approx(74.0) and rows[0]["hdkd_std"] == pytest.approx(2.0)
    # paired over seeds: the gain's spread is that of the per-seed differences (14, 12 + 2 s)
    assert rows[0]["gain"] == pytest.approx(14.0) and rows[0]["gain_std"] == pytest.approx(2.0)
    assert rows[1]["gain"] == pytest.approx(1.0)
    by_metric = {metric: data_efficiency.gains(runs, metric, sizes) for metric in ("accuracy", "balanced_accuracy")}
    checks = data_efficiency.target_checks(by_metric, "brain_tumor_mri", sizes)
    # 100 per class has no runs: reported, never passed
    assert [check["passed"] for check in checks] == [True, None, True, True]
    assert "+10 points at 50 images per class (accuracy)" in checks[-1]["target"]
    assert data_efficiency._verdict(checks[1]).startswith("- NOT RUN: HDKD ahead of the student alone at 100")
    # HAM10000 is imbalanced: balanced accuracy is checked too, and the +10 target is Brain Tumor MRI's.
    ham = data_efficiency.target_checks(by_metric, "ham10000", [50, "all"])
    assert [(check["target"].split("(")[-1], check["passed"]) for check in ham] == [
        ("accuracy)", True), ("accuracy)", True), ("balanced accuracy)", True), ("balanced accuracy)", False)
    ]

    # The minimum gain is judged at the smallest configured size, not at the smallest finished one.
    later = [run for run in runs if run["size"] != 50] + [
        {"model": model, "size": 100, "seed": 0, "accuracy": acc} for model, acc in (("student", 0.5), ("HDKD", 0.9))
    ]
    minimum = data_efficiency.target_checks({"accuracy": data_efficiency.gains(later, "accuracy", sizes)}, "brain_tumor_mri", sizes)[-1]
    assert "at 50 images per class" in minimum["target"] and minimum["passed"] is None

    # Only seeds where both arms finished are compared; one seed has no spread.
    partial = [*runs, {"model": "student", "size": 150, "seed": 0, "accuracy": 0.7}]
    partial = [run for run in partial if not (run["model"] == "HDKD" and run["size"] == "all" and run["seed"] > 0)]
    rows = data_efficiency.gains(partial, "accuracy", [50, 150, "all"])
    assert [(row["size"], row["seeds"]) for row in rows] == [(50, [0, 1, 2]), ("all", [0])]
    assert rows[1]["student_std"] is None and rows[1]["gain_std"] is None and rows[1]["gain"] == pytest.approx(-1.0)
    assert data_efficiency._mean_std(-1.0, None, "+") == "-1.00" and data_efficiency._mean_std(3.0, 1.5, "+") == "+3.00 ± 1.50"


def test_data_efficiency_defaults_to_three_seeds_and_four_sizes():
    import data_efficiency

    dataset, args = data_efficiency.parse_args(["--dataset", "ham10000", "--student-epochs", "3"])
    assert dataset == "ham10000" and args.seeds == [0, 1, 2] and args.sizes == [50, 100, 150, None]
    assert args.output_dir == "runs/hdkd_ham10000" and args.student_epochs == 3
    _, args = data_efficiency.parse_args(["--seeds", "4"])
    assert args.seeds == [4] and args.output_dir == "runs/hdkd_brain"


@pytest.mark.slow
def _fake_brain_tumor_mri(root: Path) -> Path:
    """Ten training and two test images per class, in the Brain Tumor MRI layout, under ``root/data``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("Training", 10), ("Testing", 2)):
        for index, name in enumerate(["glioma", "meningioma", "notumor", "pituitary"]):
            folder = root / "data" / "brain_tumor_mri" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray((rng.integers(0, 256, (40, 40, 3)) // (index + 1)).astype(np.uint8)).save(folder / f"{i}.png")
    return root / "data"


def test_data_efficiency_writes_its_record_on_a_fake_data_set(tmp_path):
    import data_efficiency

    _fake_brain_tumor_mri(tmp_path)
    data_efficiency.main(
        ["--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run"), "--results-dir", str(tmp_path / "results"),
         "--image-size", "32", "--batch-size", "8", "--teacher-epochs", "1", "--student-epochs", "1", "--sizes", "3,all",
         "--seeds", "0,1", "--mixed-precision", "no", "--threads", "1"]
    )  # fmt: skip
    record = json.loads((tmp_path / "results" / "data_efficiency_brain_tumor_mri.json").read_text())
    assert [row["size"] for row in record["results"]["gains"]["accuracy"]] == [3, "all"]
    assert len(record["results"]["runs"]) == 8 and len(record["results"]["checks"]) == 3
    markdown = (tmp_path / "results" / "data_efficiency_brain_tumor_mri.md").read_text()
    assert "## Targets (mean test figures)" in markdown and "| paper's gain (224 px) |" in markdown
    assert "| all | 2 |" in markdown and markdown.count("+0.1 |") == 1  # the paper's gain on the whole set
    assert " ± " in markdown.split("## Test accuracy")[1].split("## Test balanced")[0]
    assert "Training time of the 8 runs above, summed" in markdown
    assert (tmp_path / "results" / "data_efficiency_brain_tumor_mri" / "accuracy_vs_size.png").stat().st_size > 1000


def test_input_pipeline_times_both_pipelines_and_both_steps(tmp_path):
    import input_pipeline

    input_pipeline.main(
        ["--sizes", "32", "--images", "48", "--batch-size", "8", "--batches", "2", "--steps", "1", "--warmup-steps", "0",
         "--workers", "0", "1", "--rounds", "2", "--threads", "1", "--output", str(tmp_path)]
    )  # fmt: skip
    record = json.loads((tmp_path / "input_pipeline_cpu.json").read_text())
    rows = record["results"]["pipelines"]
    assert [(row["pipeline"], row["workers"]) for row in rows] == [
        (input_pipeline.PER_ITEM, 0), (input_pipeline.PER_ITEM, 1), (input_pipeline.BATCHED, 0)
    ]
    assert all(row["images_per_round"] == 16 and len(row["rounds_images_per_s"]) == 2 and row["images_per_s"] > 0
               for row in rows)  # fmt: skip
    assert [row["bytes_per_batch"] for row in rows] == [4 * 8 * 3 * 32 * 32] * 2 + [8 * 3 * 32 * 32]  # float32, uint8
    assert [row["step"] for row in record["results"]["models"]] == list(input_pipeline.STEPS)
    markdown = (tmp_path / "input_pipeline_cpu.md").read_text()
    assert "## Does the input keep up?" in markdown and "| 32 | uint8 batch + kornia | 0 | cpu | uint8 | 24,576 |" in markdown


def test_gpu_check_dry_run_writes_its_record(tmp_path):
    import gpu_check

    results = gpu_check.main(["--device", "cpu", "--quick", "--no-experiment", "--images", "64", "--output", str(tmp_path)])
    record = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    assert record["results"] == json.loads(json.dumps(results))
    assert set(results["model_steps"]) == {"teacher (supervised)", "HDKD distillation"}
    assert all(step["images_per_sec"] > 0 for step in results["model_steps"].values())
    pipelines = {row["pipeline"]: row for row in results["input_pipeline"]}
    assert pipelines["uint8 + batched on the device"]["bytes_per_batch"] * 4 == pipelines["float32, per image in the loader"]["bytes_per_batch"]
    assert 0 <= results["training_with_data"][0]["data_wait_fraction"] < 1
    assert "## What the input pipeline delivers" in (tmp_path / "gpu_check_cpu.md").read_text()


def test_gpu_check_script_fails_loudly_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    env.pop("KDKIT_GPU_CHECK_DEVICE", None)
    completed = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode != 0
    assert "CUDA is not available" in completed.stderr
    assert not list(tmp_path.iterdir())


def test_tuning_runs_a_teacher_and_both_students_and_keeps_one_row_per_run(tmp_path):
    import hdkd_tuning

    data = _fake_brain_tumor_mri(tmp_path)
    common = ["--data-dir", str(data), "--runs-dir", str(tmp_path / "runs"), "--record-dir", str(tmp_path / "results"),
              "--image-size", "32", "--batch-size", "8", "--mixed-precision", "no", "--threads", "1"]
    teacher = hdkd_tuning.main(["teacher", "--name", "t", "--steps", "5", "--label-smoothing", "0.1", *common])
    assert teacher["steps"] == 8 and teacher["epochs"] == 2  # 36 pool images at batch 8: 4 steps an epoch, 5 rounded up
    student = ["student", "--teacher-run", "t", "--per-class", "4", "--epochs", "1", "--sched", "cosine", *common]
    hdkd_tuning.main([*student, "--name", "s_hdkd", "--arm", "hdkd"])
    hdkd_tuning.main([*student, "--name", "s_alone", "--arm", "alone"])
    again = hdkd_tuning.main(["teacher", "--name", "t", "--steps", "5", "--label-smoothing", "0.1", *common])
    assert again["accuracy"] == teacher["accuracy"]  # collected, not trained again
    record = json.loads((tmp_path / "results" / "hdkd_tuning_brain_tumor_mri.json").read_text())
    assert [row["name"] for row in record["levers"]] == ["s_hdkd", "s_alone", "t"]
    markdown = (tmp_path / "results" / "hdkd_tuning_brain_tumor_mri.md").read_text()
    assert "| t | teacher | adamw onecycle lr 0.003, batch 8, 2 ep, ls 0.1 |" in markdown
    assert "| s_hdkd | hdkd | 4/class, seed 0, teacher t, adamw cosine" in markdown and "## Commands" in markdown
    assert "| s_alone | alone | 4/class, seed 0, adamw cosine" in markdown


def test_recorded_commands_name_home_paths_from_the_home_directory(no_speed_settings):
    command = run_metadata([".venv/bin/python", "benchmarks/hdkd_tuning.py", "--runs-dir", str(Path.home() / "runs" / "t"),
                            f"--record-dir={Path.home() / 'records'}", "--note", "it's"])["command"]
    assert str(Path.home()) + "/" not in command and "--runs-dir ~/runs/t" in command and "--record-dir=~/records" in command
    assert shlex.split(command)[-1] == "it's"  # the rest stays quoted as the shell needs
