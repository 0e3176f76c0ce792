"""Input pipeline: per-item torchvision augmentation against uint8 batches augmented on the device.

    .venv/bin/python benchmarks/input_pipeline.py
    .venv/bin/python benchmarks/input_pipeline.py --device cuda

Images per second delivered by (a) today's pipeline, the HDKD paper's augmentations
(``kdkit_zoo.hdkd.augmentations.hdkd_train_transforms``) applied to one image at a time in the
DataLoader (``make_loader``, with 0, 1 and 2 workers), which yields float32 batches, and (b)
uint8 batches (``ImageTensorDataset.as_uint8`` through the same loader) augmented as a whole by
``kdkit_zoo.hdkd.augmentations.batch_hdkd_train_transforms`` on the device. With
``--device cuda`` the loaders pin their memory and every batch is copied with
``non_blocking=True`` before (b) augments it on the GPU; (a) copies its float32 batches the
same way. The images are synthetic (random uint8 tensors, generated here), at the CPU
preset's 64 px and the paper's 224 px, batch 32. The bytes of one batch, uint8 against
float32, are what each copy to the device moves. The pipelines are timed in rotating rounds
(``--rounds``), so that background load hits all of them alike; each figure is a median.

Beside them, what the model consumes: images per second of one training step (AdamW
included) of the HDKD teacher alone (cross-entropy) and of the HDKD distillation step
(``kdkit.Distiller``, teacher to student, 0.5 CE + 0.5 KL + 10 stage MSE on the three conv
stages), both under bf16 autocast on the same device, on a fixed batch. The record then says,
per pipeline, how long it takes to deliver one batch against how long one step takes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

import kdkit
from kdkit.data import ImageTensorDataset, make_loader
from kdkit_zoo.hdkd.augmentations import batch_hdkd_train_transforms, hdkd_train_transforms

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, markdown_table, quartiles, run_metadata, write_results  # noqa: E402

NUM_CLASSES = 4
SEED = 0
LEARNING_RATE = 1e-4
HDKD_LOSSES = {"ce": 0.5, "kl": 0.5, "stage_mse": 10.0}
TAPS = ["stages.0", "stages.1", "stages.2"]
PER_ITEM = "per-item torchvision"
BATCHED = "uint8 batch + kornia"


def synthetic_dataset(count: int, image_size: int, seed: int = SEED) -> ImageTensorDataset:
    """``count`` random uint8 images of ``image_size`` px with random labels of 4 classes."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, image_size, image_size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (count,), generator=generator)
    return ImageTensorDataset(images, labels, [f"class{index}" for index in range(NUM_CLASSES)])


def _batches(loader: DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
    """The loader's batches, epoch after epoch (its workers persist between epochs)."""
    while True:
        yield from loader


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pipeline(
    loader: DataLoader, batches: int, device: torch.device, transform: nn.Module | None = None
) -> dict[str, float]:
    """Images per second of ``loader`` (copied to ``device`` and transformed there, if given).

    The first batch is not timed: it includes starting the workers.

    Args:
        loader: A training loader.
        batches: Timed batches after the first.
        device: Where each batch is copied (``non_blocking``; a no-op for the CPU).
        transform: Applied to each batch on ``device``, e.g. :func:`kdkit_zoo.hdkd.augmentations.batch_hdkd_train_transforms`.

    Returns:
        ``images``, ``seconds`` and ``images_per_s`` of the timed batches.
    """
    stream = _batches(loader)

    def deliver() -> int:
        images, labels = next(stream)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if transform is not None:
            images = transform(images)
        return len(labels)

    deliver()
    _synchronize(device)
    start = time.perf_counter()
    images = sum(deliver() for _ in range(batches))
    _synchronize(device)
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def pipeline_rows(
    dataset: ImageTensorDataset, args: argparse.Namespace, batches: int, device: torch.device
) -> list[dict[str, object]]:
    """Times (a) the per-item pipeline at every ``--workers`` count and (b) the batched one.

    The configurations run in ``--rounds`` rounds, in an order rotated every round, so that
    background load hits all of them alike; a row's figure is the median over its rounds.
    """
    size = dataset.images.shape[-1]
    pin = device.type == "cuda"
    per_item, raw = dataset.with_transform(hdkd_train_transforms(size)), dataset.as_uint8()
    rows = [{"pipeline": PER_ITEM, "workers": workers, "batch_dtype": "float32", "augmented_on": "cpu"}
            for workers in args.workers]  # fmt: skip
    rows.append({"pipeline": BATCHED, "workers": 0, "batch_dtype": "uint8", "augmented_on": device.type})
    for row in rows:
        row["images_per_round"], row["rounds_images_per_s"] = batches * args.batch_size, []
    for round_index in range(args.rounds):
        shift = round_index % len(rows)
        for row in rows[shift:] + rows[:shift]:
            source, transform = (raw, batch_hdkd_train_transforms(size)) if row["pipeline"] == BATCHED else (per_item, None)
            loader = make_loader(source, args.batch_size, train=True, workers=row["workers"], num_processes=1,
                                 pin_memory=pin)  # fmt: skip
            row["rounds_images_per_s"].append(time_pipeline(loader, batches, device, transform)["images_per_s"])
            del loader  # stops its persistent workers before the next configuration starts its own
    for row in rows:
        element = 1 if row["batch_dtype"] == "uint8" else 4
        row["bytes_per_batch"] = args.batch_size * 3 * size * size * element
        row["image_size"] = size
        row["images_per_s"] = statistics.median(row["rounds_images_per_s"])
    return rows


LossFn = Callable[[Tensor, Tensor], Tensor]


def teacher_step(image_size: int, device: torch.device) -> tuple[LossFn, list[nn.Parameter]]:
    """The teacher's supervised step (phase 1 of the recipe): cross-entropy on its logits."""
    torch.manual_seed(SEED)
    teacher = timm.create_model("hdkd_teacher", num_classes=NUM_CLASSES).to(device).train()
    return (lambda images, labels: F.cross_entropy(teacher(images), labels)), list(teacher.parameters())


def distillation_step(image_size: int, device: torch.device) -> tuple[LossFn, list[nn.Parameter]]:
    """The HDKD distillation step: ``kdkit.Distiller`` from the frozen teacher to the student."""
    torch.manual_seed(SEED)
    teacher = timm.create_model("hdkd_teacher", num_classes=NUM_CLASSES)
    student = timm.create_model("hdkd_student", num_classes=NUM_CLASSES, img_size=image_size)
    distiller = kdkit.Distiller(teacher, student, losses=HDKD_LOSSES, taps=TAPS, input_size=image_size)
    distiller = distiller.to(device).train()
    trainable = [parameter for parameter in distiller.parameters() if parameter.requires_grad]
    return (lambda images, labels: distiller(images, labels).loss), trainable


STEPS = {"hdkd_teacher (CE)": teacher_step, "HDKD distillation (kdkit.Distiller)": distillation_step}


def time_steps(
    name: str, image_size: int, args: argparse.Namespace, steps: int, device: torch.device
) -> dict[str, object]:
    """Median images per second of ``steps`` timed training steps after ``--warmup-steps``."""
    loss_fn, parameters = STEPS[name](image_size, device)
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(SEED)
    images = torch.randn(args.batch_size, 3, image_size, image_size, generator=generator).to(device)
    labels = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=generator).to(device)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(images, labels)
        loss.backward()
        optimizer.step()
        loss.item()  # waits for the device
        return time.perf_counter() - start

    for _ in range(args.warmup_steps):
        step()
    step_s = [step() for _ in range(steps)]
    median = statistics.median(step_s)
    return {"step": name, "image_size": image_size, "step_s": step_s, "median_step_s": median,
            "images_per_s": args.batch_size / median}  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, object]:
    """Times the pipelines and the steps at every size; returns the rows."""
    device = torch.device(args.device)
    pipelines, models = [], []
    for size, batches, steps in zip(args.sizes, args.batches, args.steps):
        dataset = synthetic_dataset(args.images, size)
        pipelines += pipeline_rows(dataset, args, batches, device)
        del dataset
        if steps:
            models += [time_steps(name, size, args, steps, device) for name in STEPS]
    return {"device": str(device), "batch_size": args.batch_size, "images": args.images, "rounds": args.rounds,
            "pipelines": pipelines, "models": models}  # fmt: skip


def to_markdown(results: dict[str, object], args: argparse.Namespace) -> str:
    """The three tables (pipelines, steps, pipeline against step) and how they were taken."""
    batch = results["batch_size"]
    pipelines, models = results["pipelines"], results["models"]
    per_size = " / ".join(f"{batches} ({size} px)" for size, batches in zip(args.sizes, args.batches))
    pipeline_table = markdown_table(
        ["Size (px)", "Pipeline", "Workers", "Augmented on", "Batch dtype", "Bytes per batch", "Images/s",
         "Range over rounds"],
        [
            [row["image_size"], row["pipeline"], row["workers"], row["augmented_on"], row["batch_dtype"],
             f"{row['bytes_per_batch']:,}", f"{row['images_per_s']:.0f}",
             f"{min(row['rounds_images_per_s']):.0f}-{max(row['rounds_images_per_s']):.0f}"]
            for row in pipelines
        ],
        "rlrllrrr",
    )  # fmt: skip
    lines = [
        f"Device: `{results['device']}`. Batch {batch}; {results['images']} synthetic uint8 images per size "
        f"(random pixels, 4 classes). Per round, a pipeline delivers {per_size} timed batches after one "
        "untimed batch (which starts the workers); its figure is the median over "
        f"{args.rounds} rotating rounds of the images per second of the timed batches. Each batch is copied to the device "
        f"(`non_blocking=True`, pinned memory on CUDA) and, for `{BATCHED}`, augmented there by "
        "`kdkit_zoo.hdkd.augmentations.batch_hdkd_train_transforms`. "
        f"`{PER_ITEM}` is `kdkit_zoo.hdkd.augmentations.hdkd_train_transforms` in the DataLoader, one image at a time, "
        "on the CPU.",
        "",
        "## Input pipelines",
        "",
        pipeline_table,
    ]
    if models:
        step_table = markdown_table(
            ["Size (px)", "Training step (bf16 autocast)", "Timed steps", "Median step (s)", "Step IQR (s)", "Images/s"],
            [
                [row["image_size"], row["step"], len(row["step_s"]), f"{row['median_step_s']:.3f}",
                 "-".join(f"{q:.3f}" for q in quartiles(row["step_s"])), f"{row['images_per_s']:.1f}"]
                for row in models
            ],
            "rlrrrr",
        )  # fmt: skip
        lines += [
            "",
            "## What the model consumes",
            "",
            f"One training step on a fixed batch of {batch}, AdamW included, after {args.warmup_steps} untimed "
            "step(s); median over the timed steps.",
            "",
            step_table,
            "",
            "## Does the input keep up?",
            "",
            "Time to deliver one batch against the time of one step (below 100%: the pipeline delivers faster than "
            "the step consumes). On the CPU the loader's workers, the batched augmentation and the step share the "
            "same cores, so the share is the part of each step the input would add when run in turn with it.",
            "",
            keeps_up_table(pipelines, models, batch),
        ]
    return "\n".join(lines)


def keeps_up_table(pipelines: list[dict], models: list[dict], batch: int) -> str:
    """Per size and pipeline: milliseconds per batch, and as a share of each step's time."""
    names = list(dict.fromkeys(row["step"] for row in models))
    rows = []
    for row in pipelines:
        steps = {model["step"]: model for model in models if model["image_size"] == row["image_size"]}
        batch_ms = 1e3 * batch / row["images_per_s"]
        shares = [f"{batch_ms / (1e3 * steps[name]['median_step_s']):.1%}" if name in steps else "" for name in names]
        rows.append([row["image_size"], row["pipeline"], row["workers"], f"{batch_ms:.1f}", *shares])
    return markdown_table(["Size (px)", "Pipeline", "Workers", "ms per batch", *[f"share of {name} step" for name in names]],
                          rows, "rlrr" + "r" * len(names))  # fmt: skip


def _per_size(parser: argparse.ArgumentParser, args: argparse.Namespace, name: str) -> None:
    values = getattr(args, name)
    if len(values) == 1:
        setattr(args, name, values * len(args.sizes))
    elif len(values) != len(args.sizes):
        parser.error(f"--{name} needs one value, or one per size ({len(args.sizes)})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224], help="image sides (default: 64 224)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch (default: 32)")
    parser.add_argument("--images", type=int, default=2048, help="synthetic images per size (default: 2048)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="worker counts of the per-item pipeline (default: 0 1 2)")  # fmt: skip
    parser.add_argument("--batches", type=int, nargs="+", default=[48, 16],
                        help="timed batches per pipeline, one value or one per size (default: 48 16)")  # fmt: skip
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 2],
                        help="timed training steps per model, one value or one per size; 0 skips the models "
                        "(default: 5 2)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="rotating rounds of the pipelines (default: 3)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="untimed steps per model (default: 1)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads (default: all cores)")
    parser.add_argument("--name", default=None, help="record name (default: input_pipeline_<device type>)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR, help="results directory (default: benchmarks/results)")
    args = parser.parse_args(argv)
    for name in ("batches", "steps"):
        _per_size(parser, args, name)
    if args.batch_size < 1 or args.images < args.batch_size or min(args.batches) < 1 or min(args.steps) < 0:
        parser.error("--batch-size and --batches must be positive, --images at least one batch, --steps non-negative")
    if args.warmup_steps < 0 or min(args.workers) < 0 or args.rounds < 1:
        parser.error("--warmup-steps and --workers must be non-negative, --rounds positive")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available")
    args.name = args.name or f"input_pipeline_{torch.device(args.device).type}"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)  # before the metadata, which records the thread count
    metadata = run_metadata()
    results = run(args)
    markdown = to_markdown(results, args)
    print(markdown)
    title = f"Input pipeline on {results['device']}: per-item torchvision against uint8 batches augmented by kornia"
    json_path, md_path = write_results(args.name, title, results, markdown, metadata, args.output)
    print(f"\nwritten: {json_path} and {md_path}")


if __name__ == "__main__":
    main()
