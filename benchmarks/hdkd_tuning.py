"""One lever of the HDKD recipe, measured: a teacher or a student run, and its row in the tuning table.

    .venv/bin/accelerate launch benchmarks/hdkd_tuning.py teacher --name t12_onecycle \\
        --epochs 12 --lr 3e-3 --sched onecycle
    .venv/bin/accelerate launch benchmarks/hdkd_tuning.py student --name s60_b16_hdkd \\
        --teacher-run t12_onecycle --arm hdkd --per-class 50 --epochs 60 --batch-size 16 --lr 5e-4 --sched onecycle

Each run trains with the HDKD experiment's own pieces (:mod:`kdkit_zoo.hdkd`: its data split,
augmentation, models and objective) and only the settings given here changed, in
``--runs-dir`` (default ``~/runs/hdkd_tuning``, outside the checkout: runs outlive a session).
It always resumes: an interrupted run continues, a finished one is collected. Its test metrics,
minutes, optimizer steps and exact command join ``results/hdkd_tuning_<dataset>.json`` and the
table in ``.md`` (a run of the same name replaces its row), kept or not, so that no lever is
tried twice.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import timm
import torch
from accelerate import PartialState

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, markdown_table, run_metadata  # noqa: E402

from kdkit import devices  # noqa: E402
from kdkit.checkpoint import atomic_write_text, load_model  # noqa: E402
from kdkit.data import balanced_subset_indices, make_loader  # noqa: E402
from kdkit.distiller import Distiller  # noqa: E402
from kdkit.losses import CrossEntropy  # noqa: E402
from kdkit.train import Supervised, TrainConfig, Trainer  # noqa: E402
from kdkit_zoo.hdkd.cli import configure_logging, set_cpu_threads  # noqa: E402
from kdkit_zoo.hdkd.config import ExperimentConfig  # noqa: E402
from kdkit_zoo.hdkd.datasets import DATASETS, load_dataset  # noqa: E402
from kdkit_zoo.hdkd.training import FEATURE_TAPS, hdkd_losses, prepare_data  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_RUNS_DIR = Path.home() / "runs" / "hdkd_tuning"
METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=("teacher", "student"))
    parser.add_argument("--name", required=True, help="the run's folder and row in the table")
    parser.add_argument("--note", default="", help="why this lever, for the table")
    parser.add_argument("--dataset", choices=DATASETS, default="brain_tumor_mri")
    parser.add_argument("--data-dir")
    parser.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    parser.add_argument("--record-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="the global batch")
    parser.add_argument("--epochs", type=int, help="epochs (or give --steps)")
    parser.add_argument("--steps", type=int, help="optimizer steps, rounded up to whole epochs")
    parser.add_argument("--opt", default="adamw")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--sched", default="onecycle")
    parser.add_argument("--warmup-epochs", type=int, default=0, help="warm-up (one-cycle: the rising phase)")
    parser.add_argument("--min-lr", type=float, default=0.0)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--ema-decay", type=float, help="validate and keep a weight average of this decay (e.g. 0.999)")
    parser.add_argument("--mixed-precision", default="bf16")
    parser.add_argument("--seed", type=int, default=0, help="the subset's and the run's seed (a teacher's weights: 0)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--checkpoint-every", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=1, help="epochs between validations (and after the last)")
    student = parser.add_argument_group("student runs")
    student.add_argument("--teacher-run", help="the teacher: a teacher run of this table (its best model)")
    student.add_argument("--arm", choices=("hdkd", "alone"), default="hdkd")
    student.add_argument("--per-class", type=int, help="training images per class (default: the whole pool)")
    student.add_argument("--alpha", type=float, default=0.5)
    student.add_argument("--temperature", type=float, default=1.0)
    student.add_argument("--feature-weight", type=float, default=10.0)
    return parser


def _epochs(args: argparse.Namespace, updates_per_epoch: int) -> int:
    if (args.epochs is None) == (args.steps is None):
        raise SystemExit("give --epochs or --steps (one of them)")
    return args.epochs if args.epochs is not None else max(1, math.ceil(args.steps / updates_per_epoch))


def run(args: argparse.Namespace) -> dict[str, object]:
    """Trains (or collects) the run and returns its row."""
    config = ExperimentConfig(dataset=args.dataset, data_dir=args.data_dir, image_size=args.image_size, augment="loader",
                              alpha=args.alpha, temperature=args.temperature, feature_weight=args.feature_weight)
    data = prepare_data(config, load_dataset(args.dataset, args.data_dir, args.image_size))
    classes = data.classes
    train_set = data.pool
    if args.per_class is not None:
        train_set = train_set.subset(balanced_subset_indices(train_set.labels.numpy(), args.per_class, args.seed))
    train_loader = make_loader(train_set, args.batch_size, train=True)
    epochs = _epochs(args, len(train_loader))
    loss = CrossEntropy(label_smoothing=args.label_smoothing) if args.label_smoothing else None
    if args.role == "teacher":
        torch.manual_seed(0)
        task = Supervised(timm.create_model("hdkd_teacher", num_classes=len(classes)), loss=loss)
    else:
        if args.arm == "hdkd" and not args.teacher_run:
            raise SystemExit("--arm hdkd needs --teacher-run")
        torch.manual_seed(args.seed)
        if args.arm == "hdkd":
            teacher = timm.create_model("hdkd_teacher", num_classes=len(classes))
            load_model(teacher, args.runs_dir / args.teacher_run / "best_model.safetensors", expected_classes=classes)
            student = timm.create_model("hdkd_student", num_classes=len(classes), img_size=args.image_size)
            task = Distiller(teacher, student, losses=hdkd_losses(config), taps=FEATURE_TAPS, input_size=args.image_size)
        else:
            task = Supervised(timm.create_model("hdkd_student_nodistill", num_classes=len(classes), img_size=args.image_size),
                              loss=loss)
    select = "balanced_accuracy" if args.dataset == "ham10000" else "accuracy"
    train_config = TrainConfig(
        epochs=epochs, opt=args.opt, lr=args.lr, sched=args.sched, warmup_epochs=args.warmup_epochs, min_lr=args.min_lr,
        weight_decay=args.weight_decay, mixed_precision=devices.resolve_mixed_precision(args.mixed_precision),
        checkpoint_every=args.checkpoint_every, eval_every=args.eval_every, ema_decay=args.ema_decay, seed=args.seed,
        select_metric=select,
        output_dir=str(args.runs_dir / args.name))
    trainer = Trainer(task, train_config, class_names=classes)
    started = time.perf_counter()
    result = trainer.fit(train_loader, make_loader(data.val, args.batch_size, train=False), resume=True)
    test = trainer.test(make_loader(data.test, args.batch_size, train=False))
    minutes = sum(row.get("epoch_time", 0.0) for row in result.history) / 60
    settings = {key: value for key, value in vars(args).items()
                if key not in ("role", "name", "note", "data_dir", "runs_dir", "record_dir", "threads", "dataset")}
    return {
        "name": args.name, "role": args.role if args.role == "teacher" else args.arm, "note": args.note,
        "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in settings.items()},
        "train_images": len(train_set), "epochs": epochs, "steps": result.history[-1]["global_step"] if result.history else 0,
        "best_epoch": result.best_epoch, **{metric: test[metric] for metric in METRICS},
        "minutes": round(minutes, 1), "collected_in_s": round(time.perf_counter() - started, 1),
        "metadata": run_metadata(),
    }


def _settings_text(row: dict[str, object]) -> str:
    settings = dict(row["settings"])  # type: ignore[arg-type]
    shown = [f"{settings['opt']} {settings['sched']} lr {settings['lr']:g}", f"batch {settings['batch_size']}",
             f"{row['epochs']} ep"]
    if settings.get("label_smoothing"):
        shown.append(f"ls {settings['label_smoothing']:g}")
    if settings.get("warmup_epochs"):
        shown.append(f"warm-up {settings['warmup_epochs']}")
    if settings.get("ema_decay"):
        shown.append(f"EMA {settings['ema_decay']:g}")
    if settings.get("eval_every", 1) > 1:
        shown.append(f"validated every {settings['eval_every']}")
    if row["role"] != "teacher":
        teacher = f", teacher {settings.get('teacher_run')}" if row["role"] == "hdkd" else ""
        shown.insert(0, f"{settings.get('per_class') or 'all'}/class, seed {settings['seed']}{teacher}")
    return ", ".join(shown)


def write_record(row: dict[str, object], dataset: str, record_dir: Path) -> Path:
    """Adds ``row`` to ``hdkd_tuning_<dataset>.json`` (replacing a row of the same name) and rewrites the table."""
    path = record_dir / f"hdkd_tuning_{dataset}.json"
    rows = json.loads(path.read_text())["levers"] if path.is_file() else []
    rows = [existing for existing in rows if existing["name"] != row["name"]] + [row]
    atomic_write_text(path, json.dumps({"levers": rows}, indent=2) + "\n")
    table = markdown_table(
        ["run", "role", "settings", "accuracy", "balanced acc.", "minutes", "steps", "note", "date (UTC), threads"],
        [[r["name"], r["role"], _settings_text(r), f"{100 * r['accuracy']:.2f}%", f"{100 * r['balanced_accuracy']:.2f}%",
          r["minutes"], r["steps"], r["note"], f"{r['metadata']['date_utc']}, {r['metadata']['torch_threads']}"] for r in rows])
    commands = "\n".join(f"- `{r['name']}`: `{r['metadata']['command']}` (torch {r['metadata']['torch']}, "
                         f"{r['metadata']['cpu_count']} cores, load at start {r['metadata']['load_average_at_start']})"
                         for r in rows)
    atomic_write_text(path.with_suffix(".md"), f"# Tuning the HDKD recipe on {dataset} (test set, 1 seed)\n\n"
                      "Every lever tried, kept or not; minutes are training and validation time on the machine of "
                      f"its row.\n\n{table}\n\n## Commands\n\n{commands}\n")
    return path


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = build_parser().parse_args(argv)
    configure_logging()
    set_cpu_threads(args.threads)
    row = run(args)
    if PartialState().is_main_process:
        logger.info("recorded in %s", write_record(row, args.dataset, args.record_dir))
        print(json.dumps({key: value for key, value in row.items() if key != "metadata"}, indent=2))
    return row


if __name__ == "__main__":
    main()

