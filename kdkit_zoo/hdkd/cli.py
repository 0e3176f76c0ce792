"""The command line of the HDKD experiment, behind ``examples/hdkd_brain.py`` and ``examples/hdkd_ham10000.py``.

A preset (``--preset``; ``paper`` on a GPU, ``cpu`` without one) gives every setting it names;
the flags given override it. :func:`main` parses, runs :func:`kdkit_zoo.hdkd.experiment.run_experiment`
and prints the results table.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import torch
from accelerate import PartialState

from kdkit import devices
from kdkit.plan import CLI_FLAGS, resume_overwrite_conflict
from kdkit.train import distributed_without_accelerator

from .config import PRESETS, ExperimentConfig
from .experiment import run_experiment
from .report import results_markdown

__all__ = ["build_parser", "config_from_args", "configure_logging", "main", "set_cpu_threads"]

# The preset settings a flag of the same name overrides when given (the optional counts are
# handled apart: their flag's "none" must override a preset's number).
_PRESET_FLAGS = (
    "image_size", "teacher_epochs", "student_epochs", "batch_size", "sizes", "seeds", "mixed_precision", "channels_last",
    "checkpoint_every", "augment",
)  # fmt: skip
_OPTIONAL_COUNT_FLAGS = ("teacher_steps", "student_steps", "student_batch_size", "validations_per_run")


def _count(text: str) -> int:
    """A whole number of at least 1: sizes, epochs and batches below one are refused as they are parsed."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parse_sizes(text: str) -> list[int | None]:
    return [None if item.strip() == "all" else _count(item) for item in text.split(",") if item.strip()]


def _optional_count(text: str) -> int | None:
    """A count, or ``none`` (which overrides a preset's number)."""
    return None if text.strip().lower() == "none" else _count(text)


def _parse_ints(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def _parse_taps(text: str) -> list[str | int | tuple[str | int, str | int]]:
    """``stages.1,stages.2`` (one path for both models), ``-2,-1`` (timm feature stages) or ``layer3:stages.1`` (teacher:student)."""

    def one(item: str) -> str | int:
        item = item.strip()
        return int(item) if item.lstrip("-").isdigit() else item

    taps: list[str | int | tuple[str | int, str | int]] = []
    for item in filter(str.strip, text.split(",")):
        teacher, _, student = item.partition(":")
        taps.append((one(teacher), one(student)) if student else one(teacher))
    return taps


def build_parser(dataset: str | None) -> argparse.ArgumentParser:
    """The command line of ``examples/hdkd_experiment.py`` (``dataset=None``: the user's data) and its presets
    ``examples/hdkd_brain.py`` and ``examples/hdkd_ham10000.py``.

    Args:
        dataset: ``"brain_tumor_mri"``, ``"ham10000"``, or ``None`` for ``--data``: the description and the default output folder.
    """
    parser = argparse.ArgumentParser(
        description=f"HDKD on {dataset or 'your data (--data)'}: train the teacher, then the student with and without distillation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--data", required=dataset is None,
        help="your data set: a folder with train/ and test/ (and optionally val/) class folders (or Training/ and Testing/), "
        "a folder of class folders only (test and validation split off, seeded and stratified), or a CSV of path,label[,group]",
    )
    parser.add_argument("--data-dir", help="data root holding the data set folder (default: $KDKIT_DATA_ROOT or ../shared/data)")
    default_output = {"brain_tumor_mri": "runs/hdkd_brain", None: "runs/hdkd_experiment"}.get(dataset, f"runs/hdkd_{dataset}")
    parser.add_argument("--output-dir", default=default_output)
    parser.add_argument("--test-fraction", type=float, default=0.2, help="with --data and no test split: the share held out for testing")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="the share of the training images held out for model selection")
    parser.add_argument("--teacher", default="hdkd_teacher", help="timm name of the teacher")
    parser.add_argument("--student", default="hdkd_student", help="timm name of the distilled student")
    parser.add_argument(
        "--alone-student", help="timm name of the student trained alone (default: hdkd_student_nodistill for hdkd_student, else --student)"
    )
    parser.add_argument(
        "--taps", type=_parse_taps,
        help="the distilled feature taps: module paths of both models (stages.0,stages.1,stages.2: the HDKD pair's default), "
        "teacher:student pairs (layer3:stages.1), or timm feature-stage indices (--taps=-2,-1; the default for other pairs: -3,-2,-1)",
    )
    parser.add_argument("--figure-tap", help="the module whose activation maps Figure 5 shows, for every model or per role: teacher=layer3,student=stages.2 "
        "(default: the HDKD stage, else the stride-16 stage)")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="cpu: reduced resolution and epochs (default without a GPU); paper: 224 px, 200 epochs",
    )
    parser.add_argument("--image-size", type=_count)
    parser.add_argument("--teacher-epochs", type=_count, help="epochs of phase 1; alone, the teacher's length (the preset's steps are dropped)")
    # Absent unless given (argparse.SUPPRESS): their 'none' must override a preset's number.
    optional = dict(type=_optional_count, default=argparse.SUPPRESS)
    parser.add_argument(
        "--teacher-steps", **optional,
        help="the teacher trains the fewest whole epochs that reach N optimizer steps, at least --teacher-epochs; 'none': --teacher-epochs",
    )
    parser.add_argument("--student-epochs", type=_count, help="epochs of each student run; alone, their length (the preset's steps are dropped)")
    parser.add_argument(
        "--student-steps", **optional,
        help="each student run trains the fewest whole epochs that reach N optimizer steps, at least --student-epochs; 'none': --student-epochs",
    )
    parser.add_argument("--batch-size", type=_count, help="the global batch of the teacher (and of the students without --student-batch-size)")
    parser.add_argument("--student-batch-size", **optional, help="the global batch of the student runs; 'none': --batch-size")
    parser.add_argument(
        "--validations-per-run", **optional,
        help="validate (and choose the best model) about N times per run, evenly spaced and after the last epoch; 'none': every epoch",
    )
    parser.add_argument("--sizes", type=_parse_sizes, help="images per class, e.g. 50,100,150,all")
    parser.add_argument("--seeds", type=_parse_ints, help="e.g. 0,1,2")
    parser.add_argument(
        "--mixed-precision", choices=list(devices.MIXED_PRECISION_CHOICES),
        help="auto: bf16 on a GPU that has it; accelerate launch --mixed_precision bf16/fp16 wins over the preset",
    )
    parser.add_argument("--checkpoint-every", type=_count, help="epochs between the resumable checkpoints of each run")
    parser.add_argument(
        "--augment", choices=list(devices.AUGMENT_PLACES),
        help="where the training augmentation runs: batched on the device, per image in the loader, or auto (device on a GPU)",
    )
    parser.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=None, help="train in channels-last memory format"
    )
    parser.add_argument("--teacher-checkpoint", help="reuse a trained teacher (best_model.safetensors)")
    parser.add_argument(
        "--baselines",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=[],
        help="timm models trained from scratch beside the students, e.g. mobilenetv2_100,efficientnet_b0,mobilevit_s",
    )
    parser.add_argument(
        "--baseline-seeds", type=_parse_ints, help="train the baselines at these seeds only (default: every seed)"
    )
    parser.add_argument("--teacher-per-class", type=_count, help="train the teacher on at most N images per class")
    parser.add_argument("--kl-reduction", choices=["batchmean", "mean"], default="batchmean")
    parser.add_argument("--smote", action=argparse.BooleanOptionalAction, default=None, help="SMOTE for the teacher")
    parser.add_argument("--workers", type=int, help="DataLoader worker processes (default: none on the CPU, several on a GPU)")
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads per process (default: the available cores divided among the local processes)",
    )
    parser.add_argument("--resume", action="store_true", help="continue interrupted runs, skip finished ones")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="without --resume: train again from scratch over the runs the output folder holds (else refused before anything trains)",
    )
    parser.add_argument(
        "--finished-only",
        action="store_true",
        help="with --resume: report the finished runs, leave the unfinished ones out, train nothing",
    )
    return parser


def config_from_args(dataset: str | None, args: argparse.Namespace) -> ExperimentConfig:
    """Merges the preset (``--preset``; by default ``paper`` on a GPU, ``cpu`` without) with the flags given.

    Args:
        dataset: ``"brain_tumor_mri"`` or ``"ham10000"``.
        args: What :func:`build_parser`'s parser returned.
    """
    preset = args.preset or ("paper" if torch.cuda.is_available() else "cpu")
    values: dict[str, object] = dict(PRESETS[preset])
    for name in _PRESET_FLAGS:
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    for role in ("teacher", "student"):
        # Epochs given without steps are the run's length, not a floor under the preset's steps.
        if getattr(args, f"{role}_epochs") is not None and not hasattr(args, f"{role}_steps"):
            values[f"{role}_steps"] = None
    for name in _OPTIONAL_COUNT_FLAGS:
        if hasattr(args, name):
            values[name] = getattr(args, name)
    return ExperimentConfig(
        dataset=dataset,
        output_dir=args.output_dir,
        data_dir=args.data_dir,
        data=args.data,
        test_fraction=args.test_fraction,
        val_fraction=args.val_fraction,
        teacher_model=args.teacher,
        student_model=args.student,
        alone_model=args.alone_student,
        taps=args.taps,
        figure_tap=args.figure_tap,
        teacher_checkpoint=args.teacher_checkpoint,
        teacher_per_class=args.teacher_per_class,
        kl_reduction=args.kl_reduction,
        baselines=args.baselines,
        baseline_seeds=args.baseline_seeds,
        smote=args.smote,
        workers=args.workers,
        resume=args.resume,
        overwrite=args.overwrite,
        finished_only=args.finished_only,
        **values,  # type: ignore[arg-type]
    )


def set_cpu_threads(threads: int | None) -> None:
    """Sets torch's CPU threads: ``threads``, or the available cores shared by the local processes."""
    # `accelerate launch` exports OMP_NUM_THREADS=1 when it cannot count physical cores, which
    # halves CPU training speed on a two-core machine; share the available cores instead.
    torch.set_num_threads(devices.cores_per_process() if threads is None else threads)


def configure_logging() -> None:
    """Logs kdkit's progress (one line per epoch and per finished run) with time stamps to stderr."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise


def main(dataset: str | None = None, argv: Sequence[str] | None = None) -> dict[str, object]:
    """Parses the command line, runs the experiment and prints the results table.

    Args:
        dataset: ``"brain_tumor_mri"`` or ``"ham10000"``.
        argv: The arguments; ``None`` reads ``sys.argv``.

    Returns:
        The content of ``results.json``.
    """
    configure_logging()
    parser = build_parser(dataset)
    args = parser.parse_args(argv)
    if (conflict := resume_overwrite_conflict(args.resume, args.overwrite, CLI_FLAGS)) is not None:
        parser.error(conflict)
    set_cpu_threads(args.threads)
    config = config_from_args(dataset, args)
    results = run_experiment(config)
    if PartialState(cpu=distributed_without_accelerator()).is_main_process:
        print(results_markdown(results, config))
        seconds = float(results["config"]["seconds"])  # type: ignore[index]
        print(f"wall time: {seconds / 60:.1f} min ({seconds:.0f} s) on {torch.get_num_threads()} CPU thread(s) per process")
        print(f"results written to {config.output_dir}")
    return results
