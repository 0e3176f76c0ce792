"""Tests for kdkit.plots: each function writes a readable PNG and rejects inconsistent input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from kdkit.plots import (
    plot_accuracy_vs_size,
    plot_activation_grid,
    plot_confusion_matrix,
    plot_training_curves,
)


def _assert_png(path: Path, min_side: int = 300, max_side: int = 3000) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert all(min_side <= side <= max_side for side in image.size), image.size


def test_confusion_matrix_png(tmp_path):
    cm = [[50, 3, 0], [4, 40, 6], [0, 0, 12]]
    path = plot_confusion_matrix(cm, ["glioma", "meningioma", "notumor"], tmp_path / "sub" / "cm.png")
    assert path == tmp_path / "sub" / "cm.png"
    _assert_png(path)
    with pytest.raises(ValueError, match="class names"):
        plot_confusion_matrix([[1, 2], [3, 4]], ["a", "b", "c"], tmp_path / "bad.png")


def test_training_curves_png_with_uneven_rows(tmp_path):
    history = [
        {
            "epoch": epoch,
            "train_loss": 1 / epoch,
            "val_loss": 1.2 / epoch,
            "train_accuracy": 0.5 + epoch / 20,
            "lr": 1e-3 * 0.9**epoch,
        }
        for epoch in range(1, 9)
    ]
    for row in history[::2]:
        row["val_accuracy"] = row["train_accuracy"] - 0.05
        row["note"] = "text is ignored"
    _assert_png(plot_training_curves(history, tmp_path / "curves.png"))
    with pytest.raises(ValueError, match="empty"):
        plot_training_curves([], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="numeric"):
        plot_training_curves([{"epoch": 1, "note": "x"}], tmp_path / "bad.png")


def test_accuracy_vs_size_png(tmp_path):
    runs = [
        {"size": size, "seed": seed, "distill": distill, "accuracy": 0.6 + 0.1 * distill + 0.01 * seed + rank / 20}
        for rank, size in enumerate((50, 100, 200, "all"))
        for seed in range(3)
        for distill in (False, True)
    ]
    _assert_png(plot_accuracy_vs_size(runs, tmp_path / "sizes.png"))
    with pytest.raises(ValueError, match="lacks"):
        plot_accuracy_vs_size([{"size": 50, "distill": True}], tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"lacks \['model'\]"):
        plot_accuracy_vs_size(runs, tmp_path / "bad.png", baselines=[{"size": 50, "accuracy": 0.5}])
    with pytest.raises(ValueError, match="int or 'all'"):
        plot_accuracy_vs_size([{"size": "many", "distill": True, "accuracy": 0.5}], tmp_path / "bad.png")


def test_accuracy_vs_size_draws_each_baseline(tmp_path, monkeypatch):
    import kdkit.plots

    figures = []
    save = kdkit.plots._save
    monkeypatch.setattr(kdkit.plots, "_save", lambda figure, path: figures.append(figure) or save(figure, path))
    runs = [{"size": size, "seed": 0, "distill": distill, "accuracy": 0.7} for size in (50, 100) for distill in (False, True)]
    baselines = [
        {"model": model, "size": size, "seed": seed, "accuracy": 0.4 + 0.1 * seed}
        for model in ("mobilenetv2_100", "mobilevit_s")
        for size in (50, 100, "all")
        for seed in ((0, 1) if model == "mobilevit_s" else (0,))
    ]
    _assert_png(plot_accuracy_vs_size(runs, tmp_path / "sizes.png", baselines=baselines))
    (axes,) = figures[0].axes
    assert [text.get_text() for text in figures[0].legends[0].get_texts()] == [
        "student (no distillation)", "HDKD", "mobilenetv2_100 (from scratch, 1 seed)", "mobilevit_s (from scratch, 2 seeds)"
    ]  # fmt: skip
    mobilevit = axes.get_lines()[-1]
    assert list(mobilevit.get_xdata()) == [0, 1, 2]  # "all" comes from the baselines alone
    assert list(mobilevit.get_ydata()) == pytest.approx([0.45, 0.45, 0.45])  # mean over seeds


def test_activation_grid_png(tmp_path):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 64, 64, generator=generator)
    maps = {
        "teacher": [torch.rand(8, 4, 4, generator=generator) for _ in range(3)],
        "student": [torch.rand(4, 4, generator=generator) for _ in range(3)],
        "HDKD": list(torch.rand(3, 8, 4, 4, generator=generator)),
    }
    _assert_png(plot_activation_grid(images, maps, tmp_path / "activations.png"))
    with pytest.raises(ValueError, match="2 maps for 3 images"):
        plot_activation_grid(images, {"teacher": maps["teacher"][:2]}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="no images"):
        plot_activation_grid([], {}, tmp_path / "bad.png")
