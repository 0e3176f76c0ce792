"""Inference on CPU: the HDKD student beside its teacher and timm's mobile baselines, and ONNX.

    .venv/bin/python benchmarks/inference.py

For ``hdkd_student`` (the distilled model; in eval mode it averages its two heads),
``hdkd_teacher`` and timm's ``mobilenetv2_100``, ``efficientnet_b0`` and ``mobilevit_s`` (the
paper's Table 5 baselines), all with 4 classes at 224 px in float32 eager mode under
``torch.inference_mode``: the latency of one image (batch 1) and the throughput at batch 32.
The models are timed in rotating rounds so that background load hits all of them alike; every
figure is the median over the rounds. Then ``hdkd_student`` is exported to ONNX (dynamic batch
axis, torch's dynamo exporter), its outputs are checked against PyTorch, and onnxruntime's
latency and throughput are measured the same way (the paper's edge-deployment claim).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn

import kdkit_zoo  # noqa: F401  (registers the HDKD models with timm)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, count_macs, markdown_table, quartiles, run_metadata, write_results  # noqa: E402

MODELS = ["hdkd_student", "hdkd_teacher", "mobilenetv2_100", "efficientnet_b0", "mobilevit_s"]
ONNX_NAME = "hdkd_student (onnxruntime)"
NUM_CLASSES = 4
SEED = 0


def build_model(name: str, image_size: int, device: str | torch.device = "cpu") -> nn.Module:
    """Creates a randomly initialised model in eval mode (timing does not depend on the weights)."""
    torch.manual_seed(SEED)
    # Only the HDKD models size their position embeddings by the input; the CNNs take any size.
    kwargs = {"img_size": image_size} if name.startswith("hdkd_") else {}
    with torch.device(device):
        return timm.create_model(name, num_classes=NUM_CLASSES, **kwargs).eval()


def export_onnx(model: nn.Module, image_size: int, path: Path) -> dict[str, float]:
    """Exports ``model`` to one ONNX file (weights inside) with a dynamic batch axis, checked against PyTorch.

    Returns:
        The file size in MB and the largest absolute difference of the logits at batch 1 and 3.

    Raises:
        AssertionError: onnxruntime's logits differ from PyTorch's by more than 1e-4, or are NaN.
    """
    import onnxruntime

    example = torch.randn(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(
        model, (example,), str(path), input_names=["images"], output_names=["logits"],
        dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False,
    )  # fmt: skip
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for size in (1, 3):
        images = torch.randn(size, 3, image_size, image_size)
        with torch.inference_mode():
            expected = model(images).numpy()
        (logits,) = session.run(None, {"images": images.numpy()})
        difference = float(np.abs(logits - expected).max())
        if not difference <= 1e-4:  # NaN logits fail too
            raise AssertionError(f"onnxruntime and PyTorch logits of {path} differ by {difference:.2e} at batch {size}")
        worst = max(worst, difference)
    return {"size_mb": path.stat().st_size / 1e6, "max_abs_diff": worst}


def onnx_runner(path: Path, threads: int) -> Callable[[np.ndarray], object]:
    """An onnxruntime session on ``threads`` CPU threads, as a function of the input batch."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"images": images})


def _seconds(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def measure(
    runners: dict[str, Callable[[object], object]],
    inputs: dict[str, tuple[object, object]],
    *,
    rounds: int,
    latency_calls: int,
    warmup: int,
) -> dict[str, dict[str, list[float]]]:
    """Times every runner in rotating rounds.

    Args:
        runners: ``name -> function(batch)``.
        inputs: ``name -> (batch of one, large batch)`` in the runner's input type.
        rounds: Timed rounds; each times every runner once, in a rotated order.
        latency_calls: Batch-1 calls per round; the round's latency is their median.
        warmup: Untimed calls of each batch size per runner before the rounds.

    Returns:
        ``name -> {"latency_s": [per round], "batch_s": [per round]}``.
    """
    names = list(runners)
    for name in names:
        one, many = inputs[name]
        for _ in range(warmup):
            runners[name](one)
            runners[name](many)
    timings = {name: {"latency_s": [], "batch_s": []} for name in names}
    for round_index in range(rounds):
        for name in names[round_index % len(names):] + names[: round_index % len(names)]:
            one, many = inputs[name]
            run = runners[name]
            timings[name]["latency_s"].append(statistics.median(_seconds(lambda: run(one)) for _ in range(latency_calls)))
            timings[name]["batch_s"].append(_seconds(lambda: run(many)))
    return timings


def summarise(timing: dict[str, list[float]], batch_size: int) -> dict[str, float]:
    """Median batch-1 latency (ms, with quartiles) and median throughput (images/s)."""
    q1, q3 = quartiles(timing["latency_s"])
    return {
        "latency_ms": 1e3 * statistics.median(timing["latency_s"]),
        "latency_ms_q1_q3": [1e3 * q1, 1e3 * q3],
        "images_per_s": batch_size / statistics.median(timing["batch_s"]),
    }


def run(args: argparse.Namespace) -> dict[str, object]:
    """Builds the models, exports the student, times everything and returns the rows."""
    models = {name: build_model(name, args.image_size) for name in args.models}
    size = args.image_size
    generator = torch.Generator().manual_seed(SEED)
    one = torch.randn(1, 3, size, size, generator=generator)
    many = torch.randn(args.batch_size, 3, size, size, generator=generator)

    def eager(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(images: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return model(images)

        return forward

    runners: dict[str, Callable] = {name: eager(model) for name, model in models.items()}
    inputs: dict[str, tuple[object, object]] = {name: (one, many) for name in models}
    onnx_report = None
    with tempfile.TemporaryDirectory() as folder:
        if "hdkd_student" in models and not args.skip_onnx:
            path = Path(folder) / "hdkd_student.onnx"
            started = time.perf_counter()
            onnx_report = export_onnx(models["hdkd_student"], size, path)
            onnx_report["export_s"] = time.perf_counter() - started
            runners[ONNX_NAME] = onnx_runner(path, args.threads)
            inputs[ONNX_NAME] = (one.numpy(), many.numpy())
        timings = measure(runners, inputs, rounds=args.rounds, latency_calls=args.latency_calls, warmup=args.warmup)

    rows = []
    for name in runners:
        model = models[name if name in models else "hdkd_student"]
        macs, _ = count_macs(build_model(model.default_cfg["architecture"], size, device="meta"), size)
        rows.append(
            {
                "model": name,
                "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                "gmacs": macs / 1e9,
                **summarise(timings[name], args.batch_size),
                "timings": timings[name],
            }
        )
    return {"rows": rows, "onnx": onnx_report, "image_size": size, "batch_size": args.batch_size}


def to_markdown(results: dict[str, object], args: argparse.Namespace) -> str:
    """The results table, the ONNX check and how the figures were taken."""
    rows = results["rows"]
    student = next((row for row in rows if row["model"] == "hdkd_student"), None)
    table = markdown_table(
        ["Model", "Params (M)", "GMACs", "Latency, batch 1 (ms)", "Latency IQR (ms)", f"Throughput, batch {args.batch_size} (img/s)",
         "Latency / student's"],
        [
            [
                f"`{row['model']}`", f"{row['params_m']:.2f}", f"{row['gmacs']:.3f}", f"{row['latency_ms']:.1f}",
                f"{row['latency_ms_q1_q3'][0]:.1f}-{row['latency_ms_q1_q3'][1]:.1f}", f"{row['images_per_s']:.1f}",
                f"{row['latency_ms'] / student['latency_ms']:.2f}x" if student else "",
            ]
            for row in rows
        ],
        "lrrrrrr",
    )  # fmt: skip
    lines = [
        f"{args.image_size} px, {NUM_CLASSES} classes, float32, eager PyTorch under `torch.inference_mode()` "
        f"({args.threads} threads), {args.rounds} rotating rounds (batch-1 latency: median of {args.latency_calls} calls "
        "per round), medians over rounds. The last column divides each model's batch-1 latency by the "
        "student's (above 1: the student is faster).",
        "",
        table,
    ]
    onnx = results["onnx"]
    if onnx:
        lines += [
            "",
            f"ONNX: `hdkd_student` exported with torch's dynamo exporter (dynamic batch axis) in {onnx['export_s']:.0f} s, "
            f"{onnx['size_mb']:.1f} MB; onnxruntime's logits match PyTorch's to {onnx['max_abs_diff']:.1e} (batch 1 and 3).",
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224, help="input side (default: 224)")
    parser.add_argument("--batch-size", type=int, default=32, help="throughput batch (default: 32)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (default: 7)")
    parser.add_argument("--latency-calls", type=int, default=5, help="batch-1 calls per round (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per batch size and model (default: 2)")
    parser.add_argument("--models", nargs="+", default=MODELS, help=f"timm model names (default: {' '.join(MODELS)})")
    parser.add_argument("--skip-onnx", action="store_true", help="do not export and time the ONNX student")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads (default: all cores)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR, help="results directory (default: benchmarks/results)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.latency_calls < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--rounds, --latency-calls and --batch-size must be positive, --warmup non-negative")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)  # before the metadata, which records the thread count
    metadata = run_metadata()
    results = run(args)
    markdown = to_markdown(results, args)
    print(markdown)
    json_path, md_path = write_results("inference", "Inference on CPU: HDKD student, teacher, mobile baselines, ONNX", results,
                                       markdown, metadata, args.output)  # fmt: skip
    print(f"\nwritten: {json_path} and {md_path}")


if __name__ == "__main__":
    main()
