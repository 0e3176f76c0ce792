"""Explainable multi-teacher distillation (Mir and Rizvi 2025) on Brain Tumor MRI or HAM10000.

    python examples/explainable_kd.py                       # CPU defaults: 49 min measured on 1 core (VGG19: 29 of them)
    python examples/explainable_kd.py --dataset ham10000
    python examples/explainable_kd.py --resume              # continue an interrupted run
    python examples/explainable_kd.py --overwrite           # train every model again from scratch

The study's recipe on our data, at a CPU-friendly resolution (64 px):

1. Train the teachers from scratch: a VGG19 and the light vision transformer Visformer-S (timm
   ``vgg19_bn`` and ``visformer_small``). Plain ``vgg19`` has no batch norm and barely moves
   from chance in the few epochs a CPU affords, so the default takes its batch-normed twin
   (``--teachers vgg19,visformer_small`` restores the study's exact pair); it needs a lower
   learning rate than the transformer (AdamW at 1e-3 leaves it at chance).
2. Distil both into a compact student under hybrid supervision, labels plus the teachers'
   soft targets::

       loss = (1 - a) * CE(student, labels) + a * T^2 * mean_i KL(p_i || q)

   with ``p_i`` teacher ``i``'s and ``q`` the student's softened class probabilities. This
   is the study's "averaged soft targets": the mean of the per-teacher KLs (what the Distiller
   computes for several teachers) differs from ``KL(mean_i p_i || q)`` only by a term without
   the student (the entropy of the teachers' mean minus their mean entropy), so both give the
   student exactly the same gradient (tests/test_explainable_kd.py checks it).
   The student is ``resnet18``: 11M parameters against the teachers' 180M. The 0.7M
   ``mobilenetv2_050`` trains about twice as fast per image on a CPU, but a distillation step
   is dominated by the two teachers' forward passes (about four fifths of its time),
   and a plain residual network with batch norm trains reliably from scratch in few epochs.
3. Train the same student on the labels alone, as the baseline.
4. Test every model, then explain teachers and students on test images with Grad-CAM,
   Score-CAM (expensive: ``--scorecam-images``) and the channel-averaged stage activation,
   each at its deepest stage of stride 16 or less, for the image's true class; measure how
   much each student's maps agree with each teacher's and with the teachers' mean map
   (Pearson correlation, IoU of the top-20% regions), per class.

Writes to ``--output-dir``: ``results.json``, ``results.md`` (test metrics and per-class
agreement tables), ``maps_gradcam.png``, ``maps_scorecam.png``, ``maps_activation.png`` (input |
teachers | students) and one folder per trained model (checkpoints, metrics, best weights).
``--help`` lists every flag.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import timm
import torch
from accelerate import PartialState
from torch import nn
from torch.utils.data import DataLoader

from kdkit import Distiller, LossTerm, Supervised, TrainConfig, Trainer
from kdkit import data as kdata
from kdkit.checkpoint import atomic_write_text
from kdkit.plan import CLI_FLAGS, resume_overwrite_conflict
from kdkit.explain import ACTIVATION_METHOD, agreement_by_class, compare_maps, feature_stage
from kdkit.plots import plot_activation_grid
from kdkit.train import distributed_without_accelerator
from kdkit_zoo.hdkd.augmentations import hdkd_train_transforms
from kdkit_zoo.hdkd.cli import configure_logging, set_cpu_threads
from kdkit_zoo.hdkd.datasets import load_brain_tumor_mri, load_ham10000

logger = logging.getLogger("explainable_kd")

METHODS = {"gradcam": "Grad-CAM", "scorecam": "Score-CAM", ACTIVATION_METHOD: "channel-mean activation"}
STUDENT_KD, STUDENT_ALONE = "student_kd", "student_alone"
TEACHERS_MEAN = "teachers (mean map)"


def _floats(text: str) -> list[float]:
    return [float(item) for item in text.split(",") if item.strip()]


def _ints(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", choices=["brain_tumor_mri", "ham10000"], default="brain_tumor_mri")
    parser.add_argument("--data-dir", help="data root holding the data set folder (default: $KDKIT_DATA_ROOT or ../shared/data)")
    parser.add_argument("--output-dir", default="runs/explainable_kd")
    parser.add_argument("--teachers", default="vgg19_bn,visformer_small", help="comma-separated timm model names")
    parser.add_argument("--student", default="resnet18", help="timm model name of the compact student")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--student-epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--teacher-per-class", type=int, default=250, help="teacher training images per class; 0 for all")
    parser.add_argument("--per-class", type=int, default=100, help="student training images per class; 0 for all")
    parser.add_argument("--teacher-lr", type=_floats, default="1e-4,1e-3",
                        help="peak learning rate of the teachers (one-cycle AdamW): one value, or one per teacher")
    parser.add_argument("--student-lr", type=float, default=1e-3, help="peak learning rate of the students (cosine AdamW)")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight a of the KL term; 1 - a weighs the cross-entropy")
    parser.add_argument("--temperature", type=float, default=4.0, help="softening temperature T of the soft targets")
    parser.add_argument("--cam-images", type=int, default=200, help="test images for the Grad-CAM and activation agreement")
    parser.add_argument("--scorecam-images", type=int, default=12, help="test images for Score-CAM (hundreds of passes each)")
    parser.add_argument("--figure-indices", type=_ints,
                        help="test-set indices shown in the figures (default: one random image per class)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="bf16")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--threads", type=int, help="CPU threads per process (default: the available cores divided among the processes)")
    parser.add_argument("--resume", action="store_true", help="continue interrupted runs, skip finished ones")
    parser.add_argument("--overwrite", action="store_true",
                        help="without --resume: train again from scratch over the runs in --output-dir (else refused)")
    return parser


# --------------------------------------------------------------------------- training


def create_model(name: str, num_classes: int, image_size: int, seed: int) -> nn.Module:
    """A freshly initialised timm model; vision transformers are built for ``image_size``."""
    torch.manual_seed(seed)
    try:  # transformers fix their position embedding to img_size; CNNs take any size and reject the argument
        return timm.create_model(name, num_classes=num_classes, img_size=image_size)
    except TypeError as error:
        if "img_size" not in str(error):
            raise
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=num_classes)


def loader(dataset: kdata.ImageTensorDataset, args: argparse.Namespace, *, train: bool) -> DataLoader:
    return kdata.make_loader(dataset, args.batch_size, train=train, workers=args.workers)


def train_and_test(
    task: nn.Module,
    name: str,
    train_set: kdata.ImageTensorDataset,
    splits: dict[str, kdata.ImageTensorDataset],
    args: argparse.Namespace,
    *,
    teacher: bool,
    lr: float,
) -> dict[str, object]:
    """Trains ``task`` (resuming if asked), reloads its best model and returns its test metrics.

    Teachers learn from scratch with a one-cycle schedule, which reaches a useful accuracy in few
    epochs; students follow a cosine schedule with one warm-up epoch (none in a run of one epoch).
    """
    config = TrainConfig(
        epochs=args.teacher_epochs if teacher else args.student_epochs,
        opt="adamw",
        lr=lr,
        sched="onecycle" if teacher else "cosine",
        warmup_epochs=0 if teacher else min(1, args.student_epochs - 1),  # a run of one epoch has no warm-up
        min_lr=0.0 if teacher else lr / 10,
        weight_decay=0.05,
        mixed_precision=args.mixed_precision,
        channels_last=args.channels_last,
        seed=args.seed,
        output_dir=str(Path(args.output_dir) / name),
        select_metric="balanced_accuracy" if args.dataset == "ham10000" else "accuracy",
    )
    started = time.perf_counter()
    trainer = Trainer(task, config, class_names=train_set.classes)
    trainer.fit(loader(train_set, args, train=True), loader(splits["val"], args, train=False), resume=args.resume,
                overwrite=args.overwrite)
    metrics = trainer.test(loader(splits["test"], args, train=False))
    logger.info("%s: test accuracy %.4f, balanced accuracy %.4f (%.0f s)", name, metrics["accuracy"],
                metrics["balanced_accuracy"], time.perf_counter() - started)
    task.student.eval()
    return {key: metrics[key] for key in ("accuracy", "balanced_accuracy", "macro_f1", "per_class_recall")}


# --------------------------------------------------------------------------- explanation


def balanced_test_indices(labels: torch.Tensor, count: int, seed: int) -> list[int]:
    """About ``count`` test images, the same number per class; nested across counts for one seed."""
    per_class = max(1, math.ceil(count / len(labels.unique())))
    return kdata.balanced_subset_indices(labels.numpy(), per_class, seed).tolist()


def explain(
    models: dict[str, nn.Module], test_set: kdata.ImageTensorDataset, classes: list[str], args: argparse.Namespace
) -> tuple[dict[str, dict], dict[str, str]]:
    """Maps of every model, their per-class agreement, and the figures."""
    output_dir = Path(args.output_dir)
    labels, raw_images = test_set.labels, test_set.with_transform(None)
    layers = {name: feature_stage(model, max_reduction=16) for name, model in models.items()}
    logger.info("explaining at layers %s", layers)
    figure_indices = args.figure_indices or balanced_test_indices(labels, len(classes), args.seed)
    counts = {"gradcam": args.cam_images, "scorecam": args.scorecam_images, ACTIVATION_METHOD: args.cam_images}
    teachers = [name for name in models if name not in (STUDENT_KD, STUDENT_ALONE)]
    agreement: dict[str, dict] = {}
    for method, title in METHODS.items():
        measured = balanced_test_indices(labels, counts[method], args.seed) if counts[method] > 0 else []
        indices = sorted(set(measured) | set(figure_indices))
        started = time.perf_counter()
        images = torch.stack([test_set[i][0] for i in indices])
        targets = labels[indices]
        maps = compare_maps(models, images, layers=layers, method=method, targets=targets, batch_size=args.batch_size)
        logger.info("%s maps of %d images for %d models (%.0f s)", title, len(indices), len(models), time.perf_counter() - started)

        rows = [indices.index(i) for i in figure_indices]
        plot_activation_grid(
            [raw_images[i][0] for i in figure_indices],
            {name: maps[name][rows] for name in models},
            output_dir / f"maps_{method}.png",
            row_labels=[f"#{i} {classes[int(labels[i])]}" for i in figure_indices],
            title=f"{title}, true class ({args.dataset}, {args.image_size} px)",
        )
        if not measured:
            continue
        rows = [indices.index(i) for i in measured]
        chosen = {name: maps[name][rows] for name in models}
        chosen[TEACHERS_MEAN] = torch.stack([chosen[name] for name in teachers]).mean(0)
        pairs = [(student, reference) for student in (STUDENT_KD, STUDENT_ALONE) for reference in (*teachers, TEACHERS_MEAN)]
        pairs += [(teachers[j], teachers[i]) for i in range(len(teachers)) for j in range(i + 1, len(teachers))]
        agreement[method] = {
            "images": len(measured),
            "pairs": [
                {"model": model, "reference": reference,
                 **agreement_by_class(chosen[reference], chosen[model], labels[measured], classes)}
                for model, reference in pairs
            ],
        }
    return agreement, layers


# --------------------------------------------------------------------------- report


def _cell(row: dict) -> str:
    if row["pearson_mean"] is None:
        return "n/a"
    return f"{row['pearson_mean']:.2f} / {row['top_iou_mean']:.2f}"


def results_markdown(results: dict) -> str:
    config, classes = results["config"], results["classes"]
    lines = [
        f"# Explainable multi-teacher distillation on {config['dataset']} (test set)",
        "",
        f"{config['image_size']} px; teachers trained on {results['train_images']['teachers']} images for "
        f"{config['teacher_epochs']} epochs; students on {results['train_images']['students']} images for "
        f"{config['student_epochs']} epochs; KD: (1 - {config['alpha']}) CE + {config['alpha']} T^2 KL, T = {config['temperature']}.",
        "",
        "| model | role | parameters | accuracy | balanced accuracy | macro F1 |",
        "|---|---|---|---|---|---|",
    ]
    for name, model in results["models"].items():
        test = model["test"]
        lines.append(
            f"| {name} | {model['role']} | {model['parameters'] / 1e6:.1f}M | {100 * test['accuracy']:.2f} | "
            f"{100 * test['balanced_accuracy']:.2f} | {100 * test['macro_f1']:.2f} |"
        )
    for method, block in results["agreement"].items():
        lines += [
            "",
            f"## {METHODS[method]}: agreement with the reference's maps ({block['images']} test images, true class)",
            "",
            "Each cell: Pearson correlation / IoU of the top-20% regions, mean over the class's images "
            "(1 / 1 = identical maps; about 0 / 0.11 = unrelated ones).",
            "",
            "| model | reference | " + " | ".join(classes) + " | all |",
            "|---|---|" + "---|" * (len(classes) + 1),
        ]
        for pair in block["pairs"]:
            cells = [_cell(pair["per_class"][name]) for name in classes] + [_cell(pair["overall"])]
            lines.append(f"| {pair['model']} | {pair['reference']} | " + " | ".join(cells) + " |")
        flat = sum(pair["overall"]["flat_maps"] for pair in block["pairs"])
        if flat:
            lines += ["", f"Left out, summed over the rows: {flat} image pairs where a map is flat (no positive evidence for the class)."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, object]:
    configure_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    if (conflict := resume_overwrite_conflict(args.resume, args.overwrite, CLI_FLAGS)) is not None:
        parser.error(conflict)
    teacher_names = [name.strip() for name in args.teachers.split(",") if name.strip()]
    if not teacher_names:
        parser.error("--teachers names no model")
    if len(args.teacher_lr) not in (1, len(teacher_names)):
        parser.error(f"--teacher-lr needs one value or one per teacher ({len(teacher_names)}), got {args.teacher_lr}")
    teacher_lrs = args.teacher_lr * len(teacher_names) if len(args.teacher_lr) == 1 else args.teacher_lr
    set_cpu_threads(args.threads)
    state = PartialState(cpu=distributed_without_accelerator())
    output_dir = Path(args.output_dir)
    started = time.perf_counter()

    load = load_brain_tumor_mri if args.dataset == "brain_tumor_mri" else load_ham10000
    splits = load(args.data_dir, args.image_size)
    pool, classes = splits["train"], splits["train"].classes
    train_idx, val_idx = kdata.stratified_split_indices(pool.labels.numpy(), 0.1, seed=0)
    train_pool = pool.subset(train_idx).with_transform(hdkd_train_transforms(args.image_size))
    eval_tf = kdata.eval_transforms(args.image_size)
    splits = {"val": pool.subset(val_idx).with_transform(eval_tf), "test": splits["test"].with_transform(eval_tf)}
    if bad := [i for i in args.figure_indices or [] if not 0 <= i < len(splits["test"])]:
        parser.error(f"--figure-indices {bad} lie outside the test set of {len(splits['test'])} images")

    def per_class(count: int) -> kdata.ImageTensorDataset:
        indices = kdata.balanced_subset_indices(train_pool.labels.numpy(), count or None, args.seed)
        return train_pool.subset(indices)

    teacher_set, student_set = per_class(args.teacher_per_class), per_class(args.per_class)
    models: dict[str, nn.Module] = {}
    metrics: dict[str, dict] = {}
    for name, lr in zip(teacher_names, teacher_lrs):
        models[name] = create_model(name, len(classes), args.image_size, args.seed)
        metrics[name] = train_and_test(Supervised(models[name]), f"teacher_{name}", teacher_set, splits, args, teacher=True, lr=lr)
    teachers = list(models.values())

    student = create_model(args.student, len(classes), args.image_size, args.seed)
    losses = [LossTerm("ce", 1 - args.alpha), LossTerm("kl", args.alpha, temperature=args.temperature)]
    distiller = Distiller(teachers, student, losses=losses)
    metrics[STUDENT_KD] = train_and_test(distiller, STUDENT_KD, student_set, splits, args, teacher=False, lr=args.student_lr)
    models[STUDENT_KD] = student
    # The same initialisation and data order: the two students differ by the distillation alone.
    models[STUDENT_ALONE] = create_model(args.student, len(classes), args.image_size, args.seed)
    metrics[STUDENT_ALONE] = train_and_test(
        Supervised(models[STUDENT_ALONE]), STUDENT_ALONE, student_set, splits, args, teacher=False, lr=args.student_lr
    )

    if not state.is_main_process:
        return {}
    agreement, layers = explain(models, splits["test"], classes, args)
    results = {
        "config": vars(args),
        "classes": classes,
        "train_images": {"teachers": len(teacher_set), "students": len(student_set)},
        "models": {
            name: {
                "role": "student" if name in (STUDENT_KD, STUDENT_ALONE) else "teacher",
                "architecture": args.student if name in (STUDENT_KD, STUDENT_ALONE) else name,
                "parameters": sum(p.numel() for p in model.parameters()),
                "cam_layer": layers[name],
                "test": metrics[name],
            }
            for name, model in models.items()
        },
        "agreement": agreement,
        "minutes": round((time.perf_counter() - started) / 60, 2),
    }
    atomic_write_text(output_dir / "results.json", json.dumps(results, indent=2))
    atomic_write_text(output_dir / "results.md", results_markdown(results))
    print(results_markdown(results))
    print(f"results written to {output_dir}")
    return results


if __name__ == "__main__":
    main()
