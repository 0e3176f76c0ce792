"""What an HDKD experiment reports: the records' metrics, and the ``results.md`` tables.

The ``runs`` of a ``results.json`` are records of one trained model each: its arm (:data:`STUDENT`,
:data:`HDKD`, or a baseline's timm name), its size label (:func:`size_label`), its seed and its
test metrics. The functions here select and summarise them; :func:`results_markdown` writes
the paper's Table 3 (student alone against HDKD) and, with baselines, its Table 5.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

from .config import ARMS, HDKD, STUDENT, ExperimentConfig

__all__ = [
    "METRICS",
    "metric_summary",
    "metric_values",
    "paired_values",
    "results_markdown",
    "size_label",
    "summary_cell",
    "weak_teacher_notes",
]

METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
"""The test metrics every record keeps, in the order the tables list them."""


def _student_budget_text(config: ExperimentConfig) -> str:
    """How long each student run trains, as the report says it."""
    if config.student_steps is None:
        return f"{config.student_epochs} student epochs at batch {config.student_batch}"
    return (f"{config.student_steps:,} optimizer steps per student run at batch {config.student_batch} "
            f"(the fewest whole epochs that reach them, at least {config.student_epochs})")


def size_label(size: int | None) -> int | str:
    """The label of a training-set size in records: images per class, or ``"all"`` for ``None``."""
    return "all" if size is None else size


def metric_summary(metrics: Mapping[str, object]) -> dict[str, float]:
    """The :data:`METRICS` of an evaluation (:func:`kdkit.evaluation.evaluate_classifier`), as floats."""
    return {key: float(metrics[key]) for key in METRICS}  # type: ignore[arg-type]


def _runs_of(
    runs: Sequence[dict[str, object]], model: str, size: int | str, seeds: Sequence[int] | None = None
) -> list[dict[str, object]]:
    """The runs of ``model`` at ``size`` (and at ``seeds``, if given)."""
    return [r for r in runs if r["model"] == model and r["size"] == size and (seeds is None or r["seed"] in seeds)]


def metric_values(
    runs: Sequence[dict[str, object]], model: str, size: int | str, metric: str, seeds: Sequence[int] | None = None
) -> list[float]:
    """``metric`` in percent of every run of ``model`` at ``size`` (and at ``seeds``, if given).

    Args:
        runs: The ``runs`` of a ``results.json``.
        model: An arm (:data:`STUDENT`, :data:`HDKD`) or a baseline's timm name.
        size: Images per class, or ``"all"``.
        metric: ``"accuracy"``, ``"balanced_accuracy"`` or ``"macro_f1"``.
        seeds: Keep only the runs of these seeds.
    """
    return [100 * float(r[metric]) for r in _runs_of(runs, model, size, seeds)]  # type: ignore[arg-type]


def weak_teacher_notes(results: Mapping[str, object], config: ExperimentConfig) -> list[str]:
    """A note for each size at which the teacher is below the student trained alone (mean over seeds).

    HDKD then distils a weaker model than the student reaches alone, and its gain or loss
    says nothing about distillation: the teacher needs more training (or another recipe).
    Compared on the selection metric's pair, accuracy and balanced accuracy.
    """
    teacher = results["teacher"]  # type: ignore[index]
    runs = results["runs"]  # type: ignore[index]
    notes = []
    for size in map(size_label, config.sizes):
        for metric in ("accuracy", "balanced_accuracy"):
            alone = metric_values(runs, STUDENT, size, metric)  # type: ignore[arg-type]
            mine = 100 * float(teacher[metric])  # type: ignore[index]
            if alone and statistics.fmean(alone) > mine:
                notes.append(
                    f"the teacher ({metric.replace('_', ' ')} {mine:.2f}%) is below the student alone at {size} images per "
                    f"class ({statistics.fmean(alone):.2f}%): HDKD distils a weaker model than the student reaches alone "
                    "there, so its result says nothing about distillation; train the teacher longer (--teacher-steps) "
                    "or with another recipe")
    return notes


def paired_values(runs: Sequence[dict[str, object]], size: int | str, metric: str) -> tuple[list[int], list[float], list[float]]:
    """The seeds at ``size`` where both arms finished, with ``metric`` (percent) of each arm there.

    A seed gives the student alone and HDKD the same images, so the gain of distillation is the
    mean of the per-seed differences, over these seeds only.

    Returns:
        The seeds in increasing order, the student's values and HDKD's values in that order.
    """
    finished = [{run["seed"] for run in _runs_of(runs, arm, size)} for arm in ARMS]
    seeds = sorted(finished[0] & finished[1])
    student, hdkd = ([metric_values(runs, arm, size, metric, [seed])[0] for seed in seeds] for arm in ARMS)
    return seeds, student, hdkd


def summary_cell(values: Sequence[float], expected_runs: int) -> str:
    """``mean ± std`` over seeds, a lone run without a spread, and the count when runs are missing.

    Args:
        values: One value per finished seed.
        expected_runs: The seeds the experiment planned.
    """
    if not values:
        return "-"
    cell = f"{values[0]:.2f}" if len(values) == 1 else f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"
    if len(values) != expected_runs:
        cell += f" ({len(values)} seed{'s' if len(values) > 1 else ''})"
    return cell


def results_markdown(results: dict[str, object], config: ExperimentConfig) -> str:
    """The ``results.md`` tables: student vs HDKD per size and metric, then any baselines.

    Args:
        results: The content of a ``results.json`` (:func:`kdkit_zoo.hdkd.experiment.run_experiment`).
        config: The experiment that wrote it.
    """
    runs = results["runs"]  # type: ignore[index]
    teacher = results["teacher"]  # type: ignore[index]
    lines = [
        f"# HDKD on {config.data_name}: student alone vs distilled (test set)",
        "",
        f"Teacher (`{config.teacher_model}`): accuracy {100 * teacher['accuracy']:.2f}%, "
        f"balanced accuracy {100 * teacher['balanced_accuracy']:.2f}%, macro F1 {100 * teacher['macro_f1']:.2f}%.",
        "",
        f"{config.image_size} px, " + _student_budget_text(config)
        + f", seeds {config.seeds}; mean ± standard deviation over seeds; the gain over the seeds both arms finished.",
        "",
        "| images per class | metric | student | HDKD | gain |",
        "|---|---|---|---|---|",
    ]
    for size in map(size_label, config.sizes):
        for metric in METRICS:
            student, hdkd = (metric_values(runs, arm, size, metric) for arm in ARMS)
            if not student and not hdkd:
                continue  # no finished run at this size (finished_only)
            seeds, paired_student, paired_hdkd = paired_values(runs, size, metric)
            gain = f"{statistics.fmean(paired_hdkd) - statistics.fmean(paired_student):+.2f}" if seeds else "-"
            if seeds and len(seeds) < max(len(student), len(hdkd)):
                gain += f" (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})"
            cells = [summary_cell(values, len(config.seeds)) for values in (student, hdkd)]
            lines.append(f"| {size} | {metric} | {cells[0]} | {cells[1]} | {gain} |")
    if len(config.seeds) == 1:
        lines += ["", _one_seed_text(results)]
    if notes := results.get("notes"):
        lines += ["", *(f"Note: {note}." for note in notes)]
    if unfinished := results.get("unfinished"):
        lines += ["", f"Not finished, left out ({len(unfinished)} runs): " + ", ".join(f"`{name}`" for name in unfinished) + "."]
    if config.baselines:
        lines += _baselines_table(runs, config)
    return "\n".join(lines) + "\n"


def _one_seed_text(results: Mapping[str, object]) -> str:
    """How far the figures of a one-seed experiment can be trusted, and what repeats them."""
    recorded = results.get("config", {})
    formats = {"threads_per_process": "{} CPU thread(s) per process", "num_processes": "{} process(es)", "torch": "torch {}"}
    setup = ", ".join(text.format(recorded[key]) for key, text in formats.items() if recorded.get(key) is not None)
    return (
        "One seed: each cell is one draw of the subset and of the initial weights, not a mean. The same command repeats "
        f"it{' on ' + setup if setup else ''}; another thread count changes the order of float sums, and so every epoch "
        "after the first. Seeds move a small run by a few points (the three-seed records in the docs' Reproducing page "
        "give each cell's spread), so a gain of that order is not a finding on its own: `--seeds 0,1,2` measures it."
    )


def _baselines_table(runs: Sequence[dict[str, object]], config: ExperimentConfig) -> list[str]:
    """The paper's Table 5: every baseline beside the student and HDKD, at the baselines' seeds."""
    arms = [*config.baselines, STUDENT, HDKD]
    seeds = config.seeds if config.baseline_seeds is None else config.baseline_seeds
    lines = [
        "",
        f"Baselines from scratch (timm) at seeds {seeds}, beside the student and HDKD runs of the same seeds (so on "
        "the same images), with the student's epochs, optimizer and schedule; training time is the mean per run.",
        "",
        "| images per class | metric | " + " | ".join(f"`{arm}`" if arm in config.baselines else arm for arm in arms) + " |",
        "|---|---|" + "---|" * len(arms),
    ]
    for size in map(size_label, config.sizes):
        for metric in METRICS:
            cells = [summary_cell(metric_values(runs, arm, size, metric, seeds), len(seeds)) for arm in arms]
            lines.append(f"| {size} | {metric} | " + " | ".join(cells) + " |")
        seconds = [[float(r["train_seconds"]) for r in _runs_of(runs, arm, size, seeds)] for arm in arms]
        lines.append(
            f"| {size} | training time (s) | " + " | ".join(f"{statistics.fmean(v):.0f}" if v else "-" for v in seconds) + " |"
        )
    return lines
