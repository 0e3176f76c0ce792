"""Distil any timm model into another on any image-folder data set.

    accelerate launch examples/distill_any.py --data PATH \\
        --teacher resnet18 --student mobilenetv3_small_100 \\
        --losses ce=0.5,kl=0.5,at=1 --teacher-taps layer3,layer4 --student-taps blocks.3,blocks.5

``PATH`` holds ``train/<class>/*.jpg`` (and optionally ``val/`` and ``test/``) or the Kaggle
``Training/``/``Testing/`` layout. Without ``--teacher-checkpoint`` the teacher is trained
first. Taps are matched in order; shapes that differ get learnable adapters. Writes the
teacher, the distilled student (``best_model.safetensors``), per-epoch metrics and
``results.json`` to ``--output-dir``.

The whole plan is checked before anything trains: both models, the Distiller and one training
step of each, on the ``meta`` device (no memory, no compute), and the run folders (a rerun
without ``--resume`` over finished runs needs ``--overwrite``). ``--seed`` makes a run
repeatable: two runs with the same flags give the same weights.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import timm
from accelerate import PartialState
from accelerate.utils import set_seed

import kdkit
from kdkit import data as kdata
from kdkit.plan import (
    CLI_FLAGS,
    PlanError,
    PlannedModel,
    check_distillation,
    check_fresh_starts,
    resume_overwrite_conflict,
)
from kdkit.run_lock import main_decides
from kdkit.train import RunExistsError, distributed_without_accelerator
from kdkit_zoo.hdkd.augmentations import hdkd_train_transforms

# How the plan checks' messages name each setting: by its flag.
FLAGS = {
    "image_size": "--image-size",
    "batch_size": "--batch-size",
    "epochs": "--epochs",
    "teacher_epochs": "--teacher-epochs",
    "val_fraction": "--val-fraction",
    "losses": "--losses",
    "taps": "--teacher-taps/--student-taps",
    **CLI_FLAGS,
}

# The models of the plan check have this many classes before the data is decoded: the class
# count shapes only the classifier heads, which no check depends on.
_PROBE_CLASSES = 2


def parse_losses(text: str) -> dict[str, float]:
    """``"ce=0.5,kl=0.5"`` -> ``{"ce": 0.5, "kl": 0.5}``."""
    pairs = [item.split("=") for item in text.split(",") if item.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise argparse.ArgumentTypeError(f"losses are name=weight pairs separated by commas, got {text!r}")
    try:
        return {name.strip(): float(weight) for name, weight in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"loss weights are numbers, got {text!r}") from None


def parse_taps(text: str) -> list[str | int]:
    """``"layer3,-1"`` -> ``["layer3", -1]`` (integers index timm's ``feature_info``)."""
    return [int(item) if item.lstrip("-").isdigit() else item for item in text.split(",") if item.strip()]


def sized_for(model_name: str, image_size: int) -> dict[str, int]:
    """The HDKD students size their position embeddings by the input: build them for ``--image-size``."""
    return {"img_size": image_size} if model_name.startswith("hdkd_student") else {}


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="image-folder data set")
    parser.add_argument("--teacher", default="resnet18", help="timm model name")
    parser.add_argument("--student", default="resnet10t", help="timm model name")
    parser.add_argument("--teacher-checkpoint", help="trained teacher weights (safetensors); else train it first")
    parser.add_argument("--losses", type=parse_losses, default={"ce": 0.5, "kl": 0.5}, help="e.g. ce=0.5,kl=0.5,fitnet=1")
    parser.add_argument("--teacher-taps", type=parse_taps, help="e.g. layer3,layer4 or -2,-1")
    parser.add_argument("--student-taps", type=parse_taps, help="defaults to --teacher-taps")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights, the validation split and the training draws")
    parser.add_argument("--output-dir", default="runs/distill_any")
    parser.add_argument("--resume", action="store_true", help="continue interrupted runs, collect finished ones")
    parser.add_argument("--overwrite", action="store_true", help="train again from scratch over the runs in --output-dir")
    return parser


def check_the_plan(args: argparse.Namespace, taps: dict[str, list[str | int]] | None, runs: dict[str, Path]) -> None:
    """Everything that would fail later, before the data is decoded and anything trains.

    Raises:
        PlanError: A setting, model, tap or loss that cannot train (:func:`kdkit.plan.check_distillation`).
        RunExistsError: A fresh start over runs in ``--output-dir`` without ``--overwrite``.
    """
    if args.seed < 0:
        raise PlanError(f"--seed must be at least 0, got {args.seed}")
    check_distillation(
        PlannedModel.timm(args.teacher, _PROBE_CLASSES, role="the teacher model", **sized_for(args.teacher, args.image_size)),
        PlannedModel.timm(args.student, _PROBE_CLASSES, role="the student model", **sized_for(args.student, args.image_size)),
        image_size=args.image_size,
        losses=args.losses,
        taps=taps,
        batch_size=args.batch_size,
        epochs=args.epochs,
        teacher_epochs=None if args.teacher_checkpoint else args.teacher_epochs,
        val_fraction=args.val_fraction,
        names=FLAGS,
    )
    # On the main process, for all: every process must take the same decision.
    main_decides(lambda: check_fresh_starts(runs, resume=args.resume, overwrite=args.overwrite, names=FLAGS))


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Checks the plan, trains the teacher (unless given) and the student, and writes ``results.json``.

    Args:
        argv: The arguments; ``None`` reads ``sys.argv``.

    Returns:
        The content of ``results.json``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if (conflict := resume_overwrite_conflict(args.resume, args.overwrite, CLI_FLAGS)) is not None:
        parser.error(conflict)
    if args.student_taps and not args.teacher_taps:
        parser.error("--student-taps needs --teacher-taps: the teacher's modules they are compared with")
    taps = None
    if args.teacher_taps:
        taps = {"teacher": args.teacher_taps, "student": args.student_taps or args.teacher_taps}
    output = Path(args.output_dir)
    runs = {"student": output / "student"} if args.teacher_checkpoint else {"teacher": output / "teacher", "student": output / "student"}
    PartialState(cpu=distributed_without_accelerator())  # as the Trainer's Accelerator will, under torchrun on a CPU
    def config(name: str, epochs: int) -> kdkit.TrainConfig:
        return kdkit.TrainConfig(epochs=epochs, lr=args.lr, warmup_epochs=min(2, epochs - 1), seed=args.seed,
                                 output_dir=str(runs[name]))

    try:
        check_the_plan(args, taps, runs)
        for name in runs:  # the training settings (a learning rate of 0 or NaN), checked before the data is read
            config(name, args.teacher_epochs if name == "teacher" else args.epochs)
    except (PlanError, RunExistsError) as error:
        parser.error(str(error))
    except ValueError as error:  # TrainConfig's, naming its field
        parser.error(f"{error} (--lr)" if "TrainConfig.lr" in str(error) else str(error))

    splits = kdata.load_imagefolder(args.data, args.image_size)
    train = splits["train"]
    classes = train.classes
    if "val" in splits:
        val = splits["val"]
    else:  # model selection never looks at the test set
        train_idx, val_idx = kdata.stratified_split_indices(train.labels.numpy(), args.val_fraction, seed=args.seed)
        train, val = train.subset(train_idx), train.subset(val_idx)
    # The HDKD paper's augmentations (rotations, flips, colour jitter): a sound default for small image sets.
    train = train.with_transform(hdkd_train_transforms(args.image_size))
    val = val.with_transform(kdata.eval_transforms(args.image_size))
    loader = kdata.make_loader(train, args.batch_size, train=True)
    val_loader = kdata.make_loader(val, args.batch_size, train=False)

    # Seeded right before each model is built: the student's initial weights do not depend on
    # whether the teacher was trained here (which draws random numbers) or loaded.
    set_seed(args.seed)
    teacher = timm.create_model(args.teacher, num_classes=len(classes), **sized_for(args.teacher, args.image_size))
    if args.teacher_checkpoint:
        kdkit.load_model(teacher, args.teacher_checkpoint, expected_classes=classes)
    else:
        fitted = kdkit.Trainer(kdkit.Supervised(teacher), config("teacher", args.teacher_epochs), class_names=classes)
        result = fitted.fit(loader, val_loader, resume=args.resume, overwrite=args.overwrite)
        kdkit.load_model(teacher, result.best_model_path, expected_classes=classes)

    set_seed(args.seed)
    student = timm.create_model(args.student, num_classes=len(classes), **sized_for(args.student, args.image_size))
    distiller = kdkit.Distiller(teacher, student, losses=args.losses, taps=taps, input_size=args.image_size)
    print(distiller.extra_repr())
    trainer = kdkit.Trainer(distiller, config("student", args.epochs), class_names=classes)
    result = trainer.fit(loader, val_loader, resume=args.resume, overwrite=args.overwrite)

    report = {"classes": classes, "best_val": {"epoch": result.best_epoch, result.select_metric: result.best_metric}}
    if "test" in splits:
        test = splits["test"].with_transform(kdata.eval_transforms(args.image_size))
        metrics = trainer.test(kdata.make_loader(test, args.batch_size, train=False))
        report["test"] = {key: metrics[key] for key in ("accuracy", "balanced_accuracy", "macro_f1")}
    if trainer.accelerator.is_main_process:
        (output / "results.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
