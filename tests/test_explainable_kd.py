"""The explainable multi-teacher recipe (examples/explainable_kd.py): its objective and an end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_real_data
from PIL import Image
from torch import nn

from kdkit import Distiller, LossTerm

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "explainable_kd.py"


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.log()).sum(dim=1).mean()


@pytest.mark.parametrize("teacher_weights", [None, [0.2, 0.8]])
def test_mean_of_teacher_kls_has_the_gradient_of_kl_to_averaged_soft_targets(teacher_weights):
    """What the example documents: sum_i w_i KL(p_i || q) = KL(sum_i w_i p_i || q) + a constant
    (the entropy of the mixture minus the mean entropy of the teachers), so the student gets
    the same gradient from the Distiller's per-teacher KLs as from the averaged soft targets."""
    torch.manual_seed(0)
    teachers = [nn.Sequential(nn.Flatten(), nn.Linear(12, 5)) for _ in range(2)]
    student = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    images, temperature = 3 * torch.randn(8, 3, 2, 2), 4.0
    distiller = Distiller(teachers, student, losses=[LossTerm("kl", 1.0, temperature=temperature)], teacher_weights=teacher_weights)
    per_teacher = distiller(images).loss
    per_teacher.backward()
    distiller_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()

    weights = distiller.teacher_weights
    with torch.no_grad():
        soft = [F.softmax(teacher(images) / temperature, dim=1) for teacher in teachers]
    averaged = sum(w * p for w, p in zip(weights, soft))
    log_q = F.log_softmax(student(images) / temperature, dim=1)
    to_average = temperature**2 * F.kl_div(log_q, averaged, reduction="batchmean")
    to_average.backward()

    for got, expected in zip(distiller_grads, (p.grad for p in student.parameters())):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert expected.abs().max() > 1e-3  # the gradients compared are not trivially zero
    constant = temperature**2 * (_entropy(averaged) - sum(w * _entropy(p) for w, p in zip(weights, soft)))
    assert constant > 1e-4  # the two losses differ, by the teacher-only term
    assert per_teacher.item() == pytest.approx((to_average + constant).item(), abs=1e-5)


def _example_module():
    spec = importlib.util.spec_from_file_location("explainable_kd", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flags_and_their_defaults():
    parser = _example_module().build_parser()
    defaults = parser.parse_args([])
    assert defaults.teachers == "vgg19_bn,visformer_small" and defaults.student == "resnet18"
    assert (defaults.image_size, defaults.mixed_precision, defaults.channels_last) == (64, "bf16", True)
    assert defaults.teacher_lr == [1e-4, 1e-3]  # plain AdamW at 1e-3 leaves the VGG near chance
    args = parser.parse_args(["--dataset", "ham10000", "--figure-indices", "3,5", "--no-channels-last", "--scorecam-images", "0"])
    assert (args.dataset, args.figure_indices, args.channels_last, args.scorecam_images) == ("ham10000", [3, 5], False, 0)


TINY = [
    "--image-size", "32", "--teacher-epochs", "1", "--student-epochs", "1", "--batch-size", "16",
    "--teacher-per-class", "8", "--per-class", "4", "--cam-images", "8", "--scorecam-images", "4", "--threads", "1",
    # Small stand-ins for VGG19 and Visformer-S (a 2 GB checkpoint per epoch): still a CNN and a token model.
    "--teachers", "resnet10t,visformer_tiny", "--teacher-lr", "1e-3", "--student", "resnet10t",
]  # fmt: skip


@pytest.mark.slow
@requires_real_data("brain_tumor_mri")
def test_explainable_kd_end_to_end(tmp_path):
    output = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", str(EXAMPLE),
               "--output-dir", str(output), *TINY]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((output / "results.json").read_text())
    classes = ["glioma", "meningioma", "notumor", "pituitary"]
    assert results["classes"] == classes
    assert list(results["models"]) == ["resnet10t", "visformer_tiny", "student_kd", "student_alone"]
    assert results["train_images"] == {"teachers": 32, "students": 16}
    for name, model in results["models"].items():
        assert 0.0 <= model["test"]["accuracy"] <= 1.0 and 0.0 <= model["test"]["balanced_accuracy"] <= 1.0, name
    layers = {name: model["cam_layer"] for name, model in results["models"].items()}
    assert layers == {"resnet10t": "layer3", "visformer_tiny": "stage2", "student_kd": "layer3", "student_alone": "layer3"}
    assert results["models"]["student_kd"]["parameters"] == results["models"]["student_alone"]["parameters"]

    assert set(results["agreement"]) == {"gradcam", "scorecam", "activation"}
    assert results["agreement"]["gradcam"]["images"] == 8 and results["agreement"]["scorecam"]["images"] == 4
    pairs = [(p["model"], p["reference"]) for p in results["agreement"]["gradcam"]["pairs"]]
    assert ("student_kd", "teachers (mean map)") in pairs and ("visformer_tiny", "resnet10t") in pairs
    for block in results["agreement"].values():
        for pair in block["pairs"]:
            assert set(pair["per_class"]) == set(classes)
            row = pair["overall"]
            assert row["images"] + row["flat_maps"] == block["images"]
            if row["images"]:
                assert -1.0 <= row["pearson_mean"] <= 1.0 and 0.0 <= row["top_iou_mean"] <= 1.0

    report = (output / "results.md").read_text()
    assert "| student_kd | student |" in report and "## Score-CAM" in report
    assert "| student_kd | teachers (mean map) |" in report
    for method in ("gradcam", "scorecam", "activation"):
        with Image.open(output / f"maps_{method}.png") as image:
            # input + 4 model columns of 2.2 inches, one row per class, at 120 dpi
            assert image.size == (1320, 1092), (method, image.size)
    assert (output / "student_kd" / "best_model.safetensors").is_file()
