"""The GPU check: what the training path does on one accelerator, measured in a few minutes.

    python3 benchmarks/gpu_check.py --device cuda            # what benchmarks/gpu_check.sh runs
    python3 benchmarks/gpu_check.py --device cpu --quick     # a dry run of the same code on the CPU

With images it generates itself (the shared data sets are not on a lent GPU machine), at the
paper preset's 224 px and global batch 32 under bf16 autocast, it measures:

* the teacher's supervised step and the HDKD distillation step (``hdkd_teacher`` into
  ``hdkd_student``, the HDKD objective over the three shared stages), AdamW included, in
  images/s, and the peak device memory of each;
* the input pipeline alone: uint8 batches from :func:`kdkit.data.make_loader` (pinned memory,
  ``--workers`` worker processes), copied without blocking and augmented on the device by
  :func:`kdkit_zoo.hdkd.augmentations.batch_hdkd_train_transforms`, in images/s, beside the
  per-image CPU path;
* the two together, as training runs them: the fraction of each step's wall time spent
  waiting for the next augmented batch;
* then a short ``--preset paper`` HDKD experiment through ``accelerate launch`` (a few epochs,
  one size) on generated JPEGs in the Brain Tumor MRI layout, and its wall time.

It writes ``gpu_check_<device>.json`` and ``.md`` to ``--output`` and fails (non-zero exit)
on any error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import input_pipeline  # noqa: E402
from _common import RESULTS_DIR, markdown_table, run_metadata, write_results  # noqa: E402
from input_pipeline import NUM_CLASSES, synthetic_dataset  # noqa: E402
from input_pipeline import _synchronize as synchronize  # noqa: E402
from kdkit.data import ImageTensorDataset, make_loader  # noqa: E402
from kdkit_zoo.hdkd.augmentations import batch_hdkd_train_transforms, hdkd_train_transforms  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BRAIN_CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
# The model steps and the pipeline timing are input_pipeline.py's, so both records measure the same things.
STEP_KINDS = {"teacher": "hdkd_teacher (CE)", "distill": "HDKD distillation (kdkit.Distiller)"}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


# --------------------------------------------------------------------------- model steps
def build_step(kind: str, size: int, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One optimizer step of the teacher (``"teacher"``) or of HDKD (``"distill"``) under bf16 autocast, no sync."""
    loss_fn, parameters = input_pipeline.STEPS[STEP_KINDS[kind]](size, device)
    optimizer = torch.optim.AdamW(parameters, lr=input_pipeline.LEARNING_RATE)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(images, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_model_step(kind: str, size: int, batch: int, steps: int, warmup: int, device: torch.device) -> dict[str, float | None]:
    step = build_step(kind, size, device)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.arange(batch, device=device) % NUM_CLASSES
    for _ in range(warmup):
        step(images, labels)
    synchronize(device)
    reset_peak_memory(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(images, labels)
    synchronize(device)
    elapsed = time.perf_counter() - start
    return {"images_per_sec": batch * steps / elapsed, "step_ms": 1000 * elapsed / steps, "peak_memory_mib": peak_memory_mib(device)}


# --------------------------------------------------------------------------- input pipeline
def time_pipeline(dataset: ImageTensorDataset, batch: int, workers: int, batches: int, device: torch.device, *, on_device: bool) -> dict[str, float]:
    """Images/s of loading ``batches`` batches to the device, augmented there (or per image in the loader)."""
    size = dataset.images.shape[-1]
    source = dataset.as_uint8() if on_device else dataset.with_transform(hdkd_train_transforms(size))
    loader = make_loader(source, batch, train=True, workers=workers, pin_memory=device.type == "cuda", num_processes=1)
    measured = input_pipeline.time_pipeline(loader, batches, device, batch_hdkd_train_transforms(size) if on_device else None)
    return {"images_per_sec": measured["images_per_s"], "bytes_per_batch": int(batch * 3 * size * size * (1 if on_device else 4))}


def time_training_with_data(dataset: ImageTensorDataset, batch: int, workers: int, steps: int, device: torch.device) -> dict[str, float]:
    """Distillation steps fed by the device pipeline, run as training runs them (no sync per step).

    ``data_wait_fraction`` is the share of the wall time that the host spent blocked in the
    loader, waiting for the next batch: while it waits, the device finishes the work already
    queued and then idles, so this bounds the device's idle time from above. The augmentation
    on the device is part of the step's time here (the pipeline table times it alone).
    """
    size = dataset.images.shape[-1]
    step = build_step("distill", size, device)
    loader = make_loader(dataset.as_uint8(), batch, train=True, workers=workers, pin_memory=device.type == "cuda", num_processes=1)
    augment = batch_hdkd_train_transforms(size)
    iterator = iter(loader)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal iterator
        try:
            return next(iterator)
        except StopIteration:
            iterator = iter(loader)
            return next(iterator)

    for _ in range(2):  # warm-up: the workers' start, cuDNN's algorithm search
        images, labels = next_batch()
        step(augment(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True))
    synchronize(device)
    waiting, seen, start = 0.0, 0, time.perf_counter()
    for _ in range(steps):
        asked = time.perf_counter()
        images, labels = next_batch()
        waiting += time.perf_counter() - asked
        step(augment(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True))
        seen += images.shape[0]
    synchronize(device)
    total = time.perf_counter() - start
    return {"images_per_sec": seen / total, "data_wait_fraction": waiting / total}


# --------------------------------------------------------------------------- the experiment
def write_brain_layout(root: Path, train_per_class: int, test_per_class: int, size: int) -> Path:
    """JPEGs in the Kaggle Brain Tumor MRI layout (``brain_tumor_mri/Training|Testing/<class>/``)."""
    images = synthetic_dataset(NUM_CLASSES * (train_per_class + test_per_class), size, seed=1).images
    for index, image in enumerate(images):
        split = "Training" if index < NUM_CLASSES * train_per_class else "Testing"
        folder = root / "brain_tumor_mri" / split / BRAIN_CLASSES[index % NUM_CLASSES]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index:05d}.jpg", quality=90)
    return root


def run_experiment(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    """A short ``--preset paper`` HDKD run through ``accelerate launch``; its wall time and results."""
    data_root = write_brain_layout(workdir / "data", args.experiment_train_per_class, 20, args.image_size)
    output = workdir / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "bf16" if args.device == "cuda" else "no", "--dynamo_backend", "no",
        str(REPO / "examples" / "hdkd_brain.py"), "--preset", "paper", "--data-dir", str(data_root),
        "--output-dir", str(output), "--image-size", str(args.image_size),
        "--teacher-epochs", str(args.experiment_epochs), "--student-epochs", str(args.experiment_epochs),
        "--sizes", "50", "--seeds", "0",
    ]
    env = dict(os.environ, KDKIT_CACHE_DIR=str(workdir / "cache"), PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if args.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"
    start = time.perf_counter()
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.experiment_timeout)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-6000:] + completed.stderr[-6000:])
        raise RuntimeError(f"the --preset paper experiment failed (exit {completed.returncode}): {' '.join(command)}")
    results = json.loads((output / "results.json").read_text())
    used = results["config"]
    if args.device == "cuda" and (used["mixed_precision_used"] != "bf16" or not used["augment_on_device"]):
        raise RuntimeError(f"the --preset paper run on the GPU trained in {used['mixed_precision_used']} with augmentation "
                           f"{'on the device' if used['augment_on_device'] else 'in the loader'}: expected bf16, on the device")
    return {
        "command": "accelerate launch " + " ".join(command[3:]).replace(str(workdir), "$WORK").replace(str(REPO) + "/", ""),
        "wall_seconds": round(seconds, 1),
        "teacher_accuracy": results["teacher"]["accuracy"],
        "runs": {run["model"]: run["accuracy"] for run in results["runs"]},
        "mixed_precision": results["config"]["mixed_precision_used"],
    }


# --------------------------------------------------------------------------- report
def markdown(results: dict[str, object]) -> str:
    steps, pipes, fed = results["model_steps"], results["input_pipeline"], results["training_with_data"]
    lines = [
        f"Device: {results['device_name']}. Image size {results['image_size']} px, global batch {results['batch_size']}, "
        "bf16 autocast, AdamW; images generated by the script.",
        "",
        "## What the model consumes",
        "",
        markdown_table(["step", "images/s", "ms/step", "peak memory (MiB)"], [
            [name, f"{v['images_per_sec']:.0f}", f"{v['step_ms']:.1f}", "-" if v["peak_memory_mib"] is None else f"{v['peak_memory_mib']:.0f}"]
            for name, v in steps.items()], "lrrr"),
        "",
        "## What the input pipeline delivers",
        "",
        markdown_table(["pipeline", "workers", "images/s", "bytes per batch"], [
            [v["pipeline"], v["workers"], f"{v['images_per_sec']:.0f}", v["bytes_per_batch"]] for v in pipes], "lrrr"),
        "",
        "## Training fed by the device pipeline",
        "",
        "Distillation steps as training runs them (no sync per step); the last column is the share of the wall time the "
        "host spent blocked in the loader waiting for a batch, an upper bound of the time the GPU waits for data.",
        "",
        markdown_table(["workers", "images/s", "time waiting for data"], [
            [v["workers"], f"{v['images_per_sec']:.0f}", f"{100 * v['data_wait_fraction']:.1f}%"] for v in fed], "rrr"),
    ]
    if results.get("experiment"):
        experiment = results["experiment"]
        lines += ["", "## A short `--preset paper` experiment", "", f"`{experiment['command']}`", "",
                  f"Wall time {experiment['wall_seconds']} s (mixed precision {experiment['mixed_precision']}); "
                  f"teacher accuracy {experiment['teacher_accuracy']:.3f}, runs {experiment['runs']} "
                  "(generated images: the accuracies only show that it ran)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per model step")
    parser.add_argument("--workers", type=lambda text: [int(v) for v in text.split(",")], default=[0, 4, 8])
    parser.add_argument("--images", type=int, default=2048, help="generated images for the pipeline")
    parser.add_argument("--experiment-epochs", type=int, default=3)
    parser.add_argument("--experiment-train-per-class", type=int, default=60)
    parser.add_argument("--experiment-timeout", type=int, default=150)
    parser.add_argument("--no-experiment", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a dry run: 32 px, 2 steps, 1 epoch")
    parser.add_argument("--output", type=Path, default=Path(os.environ.get("OUT") or RESULTS_DIR))
    args = parser.parse_args(argv)
    if args.quick:
        args.image_size, args.steps, args.images, args.workers, args.experiment_epochs = 32, 2, 128, [0], 1
        args.experiment_train_per_class = 52
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: CUDA is not available (run with --device cpu for a dry run)")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    metadata = run_metadata()
    warmup = 2 if args.quick else 5
    results: dict[str, object] = {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "image_size": args.image_size,
        "batch_size": args.batch_size,
    }
    results["model_steps"] = {
        name: time_model_step(kind, args.image_size, args.batch_size, args.steps, warmup, device)
        for name, kind in (("teacher (supervised)", "teacher"), ("HDKD distillation", "distill"))
    }
    data = synthetic_dataset(args.images, args.image_size)
    batches = max(4, min(64, args.images // args.batch_size))
    pipes = []
    for workers in args.workers:
        for on_device in (False, True):
            measured = time_pipeline(data, args.batch_size, workers, batches, device, on_device=on_device)
            pipes.append({"pipeline": "uint8 + batched on the device" if on_device else "float32, per image in the loader", "workers": workers, **measured})
    results["input_pipeline"] = pipes
    results["training_with_data"] = [
        {"workers": workers, **time_training_with_data(data, args.batch_size, workers, args.steps, device)} for workers in args.workers
    ]
    if not args.no_experiment:
        workdir = Path(tempfile.mkdtemp(prefix="kdkit-gpu-check-"))
        try:
            results["experiment"] = run_experiment(args, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    name = f"gpu_check_{args.device}"
    write_results(name, f"GPU check ({results['device_name']})", results, markdown(results), metadata, args.output)
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
