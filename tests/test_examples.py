"""The examples end to end through `accelerate launch`: the HDKD experiment on the real Brain Tumor MRI
data, and distill_any on a generated image folder. The experiment's parts are tested in
test_hdkd_experiment.py."""

from __future__ import annotations

import json
import os
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


def test_explainable_kd_passes_overwrite_to_every_fit_and_refuses_it_with_resume(tmp_path, monkeypatch, capsys, fit_calls):
    """In process, on tiny random splits: each fit is told whether to replace its run; --resume with --overwrite stops first."""
    import importlib.util

    import torch

    from conftest import StopAtFit

    from kdkit.data import ImageTensorDataset

    spec = importlib.util.spec_from_file_location("explainable_kd", ROOT / "examples" / "explainable_kd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = ["--threads", str(torch.get_num_threads())]  # as it is: the test process keeps its threads

    def tiny(data_dir, image_size):
        data = ImageTensorDataset(torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8), torch.arange(40) % 2, ["a", "b"])
        return {"train": data, "test": data.subset(range(8))}

    monkeypatch.setattr(module, "load_brain_tumor_mri", tiny)
    flags = ["--output-dir", str(tmp_path), "--image-size", "16", "--teachers", "resnet10t", "--student", "resnet10t",
             "--teacher-lr", "1e-3", "--teacher-per-class", "4", "--per-class", "4", "--mixed-precision", "no", *threads]  # fmt: skip
    for given, expected in (([], {"resume": False, "overwrite": False}), (["--overwrite"], {"resume": False, "overwrite": True})):
        with pytest.raises(StopAtFit):
            module.main([*flags, *given])
        assert fit_calls.pop() == expected
    with pytest.raises(SystemExit):
        module.main([*flags, "--resume", "--overwrite"])
    assert "pass one of them, not both" in capsys.readouterr().err and not fit_calls
