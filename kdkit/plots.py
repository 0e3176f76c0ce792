"""Figures for runs and papers: confusion matrices, training curves, accuracy against training
set size (HDKD Figure 3) and activation-map grids (HDKD Figure 5).

Figures are built with matplotlib's object-oriented API and rendered to PNG by Agg; pyplot is
never used, so nothing needs a display and the caller's matplotlib backend is left alone.
Every function saves one PNG, creating parent folders, and returns its path.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

from .checkpoint import atomic_write

__all__ = [
    "plot_accuracy_vs_size",
    "plot_activation_grid",
    "plot_confusion_matrix",
    "plot_training_curves",
]

_DPI = 120
# Colours of baseline lines, none of them the student's blue or HDKD's red.
_BASELINE_COLOURS = ("tab:green", "tab:purple", "tab:brown", "tab:gray", "tab:olive", "tab:cyan", "tab:pink", "tab:orange")
_SCORE_MARKERS = ("acc", "f1", "recall", "precision", "auc")


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    # Atomic: workers sharing an output folder may redraw the same figure at the same time.
    return atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=_DPI, format="png"))


def plot_confusion_matrix(
    cm: Sequence[Sequence[float]] | np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "Confusion matrix",
) -> Path:
    """Plot a confusion matrix: cells annotated with counts, coloured by fraction of the row.

    Colouring by row (true class) keeps small classes as visible as large ones.

    Args:
        cm: ``n x n`` counts, rows = true class, columns = predicted class.
        class_names: The ``n`` class names.
        path: Output PNG.
        title: Figure title.

    Raises:
        ValueError: ``cm`` is not ``len(class_names)`` square.
    """
    counts = np.asarray(cm, dtype=float)
    size = len(class_names)
    if counts.shape != (size, size):
        raise ValueError(f"confusion matrix of shape {counts.shape} for {size} class names")
    row_totals = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, row_totals, out=np.zeros_like(counts), where=row_totals > 0)

    side = max(4.0, 0.8 * size + 2.5)
    figure = Figure(figsize=(side + 1.0, side), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, label="fraction of true class")
    axes.set_xticks(range(size), class_names, rotation=45, ha="right")
    axes.set_yticks(range(size), class_names)
    axes.set(xlabel="predicted", ylabel="true", title=title)
    for row in range(size):
        for column in range(size):
            axes.text(
                column,
                row,
                f"{counts[row, column]:g}",
                ha="center",
                va="center",
                color="white" if fractions[row, column] > 0.5 else "black",
            )
    return _save(figure, path)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _curve_panel(key: str) -> str:
    lowered = key.lower()
    if "loss" in lowered:
        return "loss"
    if lowered in ("lr", "learning_rate") or lowered.endswith("_lr"):
        return "learning rate"
    if any(marker in lowered for marker in _SCORE_MARKERS):
        return "accuracy"
    return "other"


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Plot per-epoch values: losses, accuracies/scores, learning rate and anything else numeric.

    Each group gets its own panel (learning rate on a log scale). Rows may lack keys, e.g.
    validation metrics computed every few epochs; missing values are simply not drawn.

    Args:
        history: One mapping per epoch, e.g. ``{"epoch": 1, "train_loss": 0.9,
            "val_accuracy": 0.7, "lr": 1e-3}``. Without ``"epoch"`` the row number is used.
        path: Output PNG.

    Raises:
        ValueError: Empty history or no numeric values besides the epoch.
    """
    if not history:
        raise ValueError("history is empty")
    epochs = [row.get("epoch", position + 1) for position, row in enumerate(history)]
    keys = list(
        dict.fromkeys(
            key for row in history for key, value in row.items() if key != "epoch" and _is_number(value)
        )
    )
    if not keys:
        raise ValueError("history has no numeric values to plot")
    panels: dict[str, list[str]] = {}
    for panel in ("loss", "accuracy", "learning rate", "other"):
        if members := [key for key in keys if _curve_panel(key) == panel]:
            panels[panel] = members

    figure = Figure(figsize=(4.5 * len(panels), 3.8), layout="constrained")
    for axes, (panel, members) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels.items()):
        plotted_values = []
        for key in members:
            points = [(epoch, row[key]) for epoch, row in zip(epochs, history) if _is_number(row.get(key))]
            axes.plot(*zip(*points), marker="o" if len(points) <= 30 else None, markersize=3, label=key)
            plotted_values.extend(value for _, value in points)
        if panel == "learning rate" and min(plotted_values) > 0:
            axes.set_yscale("log")
        axes.set(xlabel="epoch", ylabel=panel, title=panel)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    return _save(figure, path)


def plot_accuracy_vs_size(
    runs: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    metric: str = "accuracy",
    baselines: Sequence[Mapping[str, Any]] = (),
    labels: tuple[str, str] = ("student (no distillation)", "HDKD"),
) -> Path:
    """Plot a metric against training images per class, mean ± std over seeds (HDKD Figure 3).

    One line for the student trained without distillation, one for the distilled student, and a
    dashed line of means per baseline model (the paper's Table 5 models trained from scratch).

    Args:
        runs: One mapping per run: ``{"size": 50 | "all", "seed": 0, "distill": bool,
            metric: value}``. Sizes are ints, or ``"all"`` (plotted last).
        path: Output PNG.
        metric: Key of the value to plot.
        baselines: Runs of other models, each with ``"model"``, ``"size"`` and ``metric``.
        labels: Legend labels of the student alone and the distilled student.

    Raises:
        ValueError: No runs, a run lacking a key, or a size that is neither int nor ``"all"``.
    """
    if not runs:
        raise ValueError("no runs to plot")
    for run, keys in [(run, {"size", "distill", metric}) for run in runs] + [(run, {"size", "model", metric}) for run in baselines]:
        if missing := keys - set(run):
            raise ValueError(f"run {dict(run)} lacks {sorted(missing)}")
        if run["size"] != "all" and not isinstance(run["size"], numbers.Integral):
            raise ValueError(f"size must be an int or 'all', got {run['size']!r}")
    every_run = [*runs, *baselines]
    numeric_sizes = sorted({run["size"] for run in every_run if run["size"] != "all"})
    sizes = numeric_sizes + (["all"] if any(run["size"] == "all" for run in every_run) else [])
    position = {size: index for index, size in enumerate(sizes)}
    # Seeds per plotted point: a partial report may have fewer at some sizes.
    per_point = {(run["size"], bool(run["distill"])): set() for run in runs}
    for run in runs:
        per_point[(run["size"], bool(run["distill"]))].add(run.get("seed"))
    low, high = min(map(len, per_point.values())), max(map(len, per_point.values()))
    seed_label = f"{high} seed{'s' if high != 1 else ''}" if low == high else f"{low}-{high} seeds per point"

    figure = Figure(figsize=(6.5, 5.0), layout="constrained")
    axes = figure.subplots()
    lines = ((False, labels[0], "tab:blue"), (True, labels[1], "tab:red"))
    handles = []
    for distill, label, colour in lines:
        x, values = _values_by_size([run for run in runs if bool(run["distill"]) == distill], position, metric)
        if not x:
            continue
        means = np.array([value.mean() for value in values])
        deviations = np.array([value.std(ddof=1) if len(value) > 1 else 0.0 for value in values])
        handles.append(axes.errorbar(x, means, yerr=deviations, marker="o", capsize=4, color=colour, label=label))
        axes.fill_between(x, means - deviations, means + deviations, color=colour, alpha=0.15)
    for index, model in enumerate(dict.fromkeys(run["model"] for run in baselines)):
        colour = _BASELINE_COLOURS[index % len(_BASELINE_COLOURS)]
        group = [run for run in baselines if run["model"] == model]
        x, values = _values_by_size(group, position, metric)
        seeds = len({run.get("seed") for run in group})
        handles += axes.plot(
            x, [value.mean() for value in values], linestyle="--", marker="s", color=colour,
            label=f"{model} (from scratch, {seeds} seed{'s' if seeds != 1 else ''})",
        )  # fmt: skip
    axes.set_xticks(range(len(sizes)), [str(size) for size in sizes])
    pretty_metric = metric.replace("_", " ")
    axes.set(
        xlabel="training images per class",
        ylabel=pretty_metric,
        title=f"{pretty_metric} vs training set size (mean ± std, {seed_label})",
    )
    axes.grid(alpha=0.3)
    # Below the axes, so that no line hides behind it; the students first (matplotlib would list
    # plain lines before error bars).
    figure.legend(handles=handles, loc="outside lower center", ncols=2, fontsize="small")
    return _save(figure, path)


def _values_by_size(
    group: Sequence[Mapping[str, Any]], position: Mapping[Any, int], metric: str
) -> tuple[list[int], list[np.ndarray]]:
    """The x positions of the sizes ``group`` has runs at, in plotting order, and the metric values at each."""
    sizes = sorted({run["size"] for run in group}, key=position.__getitem__)
    return [position[size] for size in sizes], [
        np.array([float(run[metric]) for run in group if run["size"] == size]) for size in sizes
    ]


def _displayable(image: Tensor) -> np.ndarray:
    """``H x W x 3`` array in [0, 1] from a (possibly normalised) ``C x H x W`` or ``H x W`` image."""
    if image.ndim == 2:
        image = image.unsqueeze(0)
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"images must be C x H x W with 1 or 3 channels, got shape {tuple(image.shape)}")
    image = image.float()
    # Min-max per image undoes any normalisation well enough for display.
    image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
    return image.expand(3, -1, -1).permute(1, 2, 0).numpy()


def _heatmap(activation: Tensor, size: tuple[int, int]) -> np.ndarray:
    """Channel-average a ``C x h x w`` (or take an ``h x w``) map, upsample to ``size``, scale to [0, 1]."""
    if activation.ndim == 3:
        activation = activation.float().mean(dim=0)
    if activation.ndim != 2:
        raise ValueError(f"activation maps must be h x w or C x h x w, got shape {tuple(activation.shape)}")
    upsampled = F.interpolate(
        activation.float()[None, None], size=size, mode="bilinear", align_corners=False
    )[0, 0]
    upsampled = (upsampled - upsampled.min()) / (upsampled.max() - upsampled.min()).clamp_min(1e-12)
    return upsampled.numpy()


def plot_activation_grid(
    images: Tensor | Sequence[Tensor],
    maps: Mapping[str, Sequence[Tensor]],
    path: str | os.PathLike,
    *,
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Plot sample images next to activation-map overlays of several models (HDKD Figure 5).

    Rows are samples; the first column shows the input, then one column per model with its map
    (channel-averaged if it has channels, upsampled to the image, min-max scaled) over the image.
    The same figure shows class-activation maps (:func:`kdkit.explain.compare_maps`): input |
    teacher | student, one row per test image.

    Args:
        images: ``N x C x H x W`` tensor or ``N`` tensors ``C x H x W``, uint8 or (normalised) float.
        maps: Model name -> ``N`` maps, each ``h x w`` or ``C x h x w`` (e.g. stage-3 features),
            or an ``N x h x w`` tensor.
        path: Output PNG.
        row_labels: A caption per sample (e.g. its true class), written left of the row.
        title: Figure title.

    Raises:
        ValueError: No images, a model with a different number of maps than images, a row
            label per image missing, or maps/images of the wrong rank.
    """
    samples = [torch.as_tensor(image).detach().cpu() for image in images]
    if not samples:
        raise ValueError("no images to plot")
    for name, model_maps in maps.items():
        if len(model_maps) != len(samples):
            raise ValueError(f"{name!r} has {len(model_maps)} maps for {len(samples)} images")
    if row_labels is not None and len(row_labels) != len(samples):
        raise ValueError(f"{len(row_labels)} row labels for {len(samples)} images")

    columns = 1 + len(maps)
    figure = Figure(figsize=(2.2 * columns, 2.2 * len(samples) + 0.3), layout="constrained")
    grid = figure.subplots(len(samples), columns, squeeze=False)
    for row, sample in enumerate(samples):
        picture = _displayable(sample)
        grid[row, 0].imshow(picture)
        for column, model_maps in enumerate(maps.values(), start=1):
            heat = _heatmap(torch.as_tensor(model_maps[row]).detach().cpu(), picture.shape[:2])
            grid[row, column].imshow(picture)
            grid[row, column].imshow(heat, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
    for column, column_title in enumerate(["input", *maps]):
        grid[0, column].set_title(column_title)
    for axes in grid.flat:
        axes.set_axis_off()
    for row, label in enumerate(row_labels or []):
        grid[row, 0].text(-0.06, 0.5, label, transform=grid[row, 0].transAxes, rotation=90, ha="right", va="center")
    if title:
        figure.suptitle(title)
    return _save(figure, path)
