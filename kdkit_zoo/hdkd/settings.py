"""The settings record of an experiment, ``experiment.json``, and the check that a resume keeps them.

Each run's checkpoint refuses another training setup, but the loss weights, the teacher, the
image size of a convolutional network and the data split lie outside it: resumed with other
values, finished runs would be reported under settings they were not trained with. The first
invocation in an output folder therefore records the settings that define the results, and
every ``resume`` must match them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from kdkit import devices
from kdkit.checkpoint import atomic_write_text
from kdkit.train import ResumeError

from .config import ExperimentConfig

__all__ = ["EXPERIMENT_FILE", "check_same_data", "check_same_settings", "data_fingerprint", "defining_settings"]

EXPERIMENT_FILE = "experiment.json"
_PRESET = "preset data set"  # the data fingerprint of an experiment on a preset data set (and of older records)
"""The file in the output folder that records the settings an experiment's runs were trained with."""

# Fields free to change between the invocations of one experiment: where files are, how it runs,
# which runs it adds (sizes, seeds, baselines), whether it only reports and whether it replaces runs.
_INVOCATION_FIELDS = frozenset(
    {"output_dir", "data_dir", "sizes", "seeds", "baselines", "baseline_seeds", "resume", "overwrite", "finished_only",
     "workers", "num_figure_images", "checkpoint_every", "augment", "data", "figure_tap"}
)

# What the experiments recorded before a setting existed did: compared as these values. The
# students' optimizer and schedule were AdamW and cosine before they became settings.
_BEFORE_RECORDED = {
    "augment_on_device": False,
    "student_opt": "adamw",
    "student_sched": "cosine",
    # before any data set and any model pair: the HDKD pair on a preset data set
    "test_fraction": 0.2,
    "teacher_model": "hdkd_teacher",
    "student_model": "hdkd_student",
    "alone_model": None,
    "taps": None,
    "select_metric": None,
    # before budgets in optimizer steps: epochs only, the global batch, a validation per epoch
    "teacher_steps": None,
    "student_steps": None,
    "student_batch_size": None,
    "validations_per_run": None,
}

# Settings kdkit no longer has, and the value under which their runs are what today's kdkit
# trains: a record of another value was trained under a rule that is gone.
_REMOVED = {
    "teacher_image_budget": (None, "budgets in images gave way to budgets in optimizer steps (teacher_steps)"),
    "student_image_budget": (None, "budgets in images gave way to budgets in optimizer steps (student_steps)"),
}


def defining_settings(config: ExperimentConfig) -> dict[str, object]:
    """The settings that define an experiment's results, as they read back from JSON."""
    defining = {name: value for name, value in dataclasses.asdict(config).items() if name not in _INVOCATION_FIELDS}
    # Where augmentation runs changes the random draws; `augment="auto"` means another place on
    # another machine, so the place itself is recorded.
    defining["augment_on_device"] = devices.augment_on_device(config.augment)
    return json.loads(json.dumps(defining))


def check_same_settings(config: ExperimentConfig, output_dir: Path) -> None:
    """Records the experiment's settings in ``experiment.json``; a resume must match them.

    Args:
        config: The experiment about to run.
        output_dir: Its output folder.

    Raises:
        ResumeError: ``resume`` with settings other than the recorded ones, all of them listed.
    """
    path = output_dir / EXPERIMENT_FILE
    settings = defining_settings(config)
    if config.resume and path.is_file():
        recorded = {**_BEFORE_RECORDED, **json.loads(path.read_text(encoding="utf-8"))}
        if gone := [f"{name} {recorded[name]!r} ({why})" for name, (value, why) in _REMOVED.items() if recorded.get(name, value) != value]:
            raise ResumeError(
                f"cannot resume the experiment in {output_dir}: {path} records "
                + "; ".join(gone)
                + ", a setting this version of kdkit no longer has, so its runs cannot continue as they were trained. "
                "Give this experiment another output folder (--output-dir), or resume it with the kdkit that started it"
            )
        # Only the recorded fields: a field added to kdkit since keeps its old behaviour by default.
        if changed := sorted(name for name in recorded.keys() & settings.keys() if recorded[name] != settings[name]):
            raise ResumeError(
                f"cannot resume the experiment in {output_dir} with other settings than {path} records: "
                + "; ".join(f"{name} {recorded[name]!r} there, {settings[name]!r} now" for name in changed)
                + ". Pass the recorded values, or give this experiment another output folder (--output-dir)"
            )
        return
    # The data's fingerprint is added once the data is loaded (check_same_data); a preset data set has none.
    pending = {"data_fingerprint": _PRESET if config.data is None else None}
    atomic_write_text(path, json.dumps({**settings, **pending}, indent=2, sort_keys=True) + "\n")


def data_fingerprint(record: dict[str, object]) -> str:
    """A digest of how a data set of one's own was split: its classes and, per split, its files or counts (not its path)."""
    content = {key: value for key, value in record.items() if key != "path"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def check_same_data(config: ExperimentConfig, output_dir: Path, record: dict[str, object]) -> None:
    """Records the fingerprint of a ``data`` experiment's split in ``experiment.json``; a resume must match it.

    The folder may move (``data`` is free to change), its content may not: finished runs would be
    tested on a split that overlaps their training images. A ``data`` experiment and a preset
    data set's do not resume each other. Call it after :func:`check_same_settings`.

    Raises:
        ResumeError: An experiment of other data in ``output_dir``.
    """
    path = output_dir / EXPERIMENT_FILE
    if not path.is_file():  # no settings recorded here (check_same_settings records them)
        return
    recorded = json.loads(path.read_text(encoding="utf-8")).get("data_fingerprint", _PRESET)
    current = data_fingerprint(record) if config.data is not None else _PRESET
    if recorded == current:
        return
    if recorded is not None or config.data is None:  # None: this experiment's data is not recorded yet
        was = "a preset data set" if recorded == _PRESET else "other data (another split or content)"
        now = f"the data in {config.data}" if config.data is not None else f"the preset data set {config.dataset!r}"
        raise ResumeError(
            f"cannot resume the experiment in {output_dir}: it was trained on {was}, and {now} differs. "
            "Give this experiment another output folder (--output-dir)"
        )
    settings = json.loads(path.read_text(encoding="utf-8"))
    atomic_write_text(path, json.dumps({**settings, "data_fingerprint": current}, indent=2, sort_keys=True) + "\n")
