"""Shared parts of the benchmark scripts: the run metadata and the JSON + Markdown writer.

Every script records what was run and where (:func:`run_metadata`) and writes its figures with
:func:`write_results` as ``<name>.json`` and ``<name>.md`` under ``benchmarks/results/``.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import timm
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from kdkit.checkpoint import atomic_write_text

RESULTS_DIR = Path(__file__).resolve().parent / "results"

METADATA_LABELS = {
    "command": "Command",
    "date_utc": "Date (UTC)",
    "cpu_model": "CPU",
    "cpu_count": "CPU cores (`os.cpu_count()`)",
    "torch_threads": "torch threads",
    "python": "Python",
    "torch": "torch",
    "timm": "timm",
    "load_average_at_start": "Load average (1, 5, 15 min) at start",
}


def cpu_model() -> str:
    """Returns the CPU model name from ``/proc/cpuinfo``, or ``platform.processor()`` elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _relative(arg: str) -> str:
    """A path inside the working directory as typed from it, one under the home directory as
    ``~/...`` (records name no machine's folders)."""
    path = Path(arg)
    if path.is_absolute() and path.is_relative_to(Path.cwd()):
        return str(path.relative_to(Path.cwd()))
    home = str(Path.home())
    if home not in ("", "/"):  # also inside --flag=PATH
        arg = "~" if arg == home else arg.replace(f"={home}/", "=~/")
        if arg.startswith(f"{home}/"):
            arg = "~/" + arg[len(home) + 1:]
    return arg


def _quoted(arg: str) -> str:
    """``shlex.quote``, except that a ``~/`` the shell should expand stays outside the quotes."""
    for prefix in ("~/", "=~/"):
        head, sep, rest = arg.partition(prefix)
        if sep and (prefix == "=~/" or not head):
            return f"{shlex.quote(head) if head else ''}{sep}{shlex.quote(rest) if rest else ''}"
    return shlex.quote(arg)


SPEED_ENV_PREFIXES = ("MALLOC_", "OMP_", "MKL_", "LD_PRELOAD")
"""Environment variables written into a run's command line, since they change its speed."""


def _accelerate_launcher() -> tuple[list[str], dict[str, str]] | None:
    """The command line and environment of the ``accelerate launch`` that started this process.

    ``sys.orig_argv`` of a launched script is the launcher's child (``python script.py`` with the
    ``OMP_NUM_THREADS`` the launcher exported), not what was typed. Linux only (``/proc``);
    ``None`` when the parent is not ``accelerate launch`` or cannot be read.
    """
    try:
        parent = Path("/proc") / str(os.getppid())
        argv = (parent / "cmdline").read_bytes().decode().split("\0")[:-1]
        environ = (parent / "environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    names = [Path(arg).name for arg in argv]
    console = [i for i, pair in enumerate(zip(names, names[1:])) if pair == ("accelerate", "launch")]
    if console:
        argv = argv[console[0] :]  # the console script as typed, without its interpreter
    elif "accelerate.commands.launch" not in argv:
        return None
    return argv, dict(entry.split("=", 1) for entry in environ if "=" in entry)


def run_metadata(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Describes the run: the exact command line, the machine and its load, the library versions and the date.

    Args:
        argv: The command line, interpreter first; by default the command as typed: that of the
            ``accelerate launch`` that started this process, else ``sys.orig_argv``.

    Returns:
        A JSON-serialisable dict with the keys of :data:`METADATA_LABELS`.
    """
    environ: dict[str, str] = dict(os.environ)
    if argv is None:
        argv, environ = _accelerate_launcher() or (sys.orig_argv, environ)
    argv = [_relative(arg) for arg in argv]
    # Variables that change the speed of the same command (the allocator, the thread pools).
    settings = [f"{name}={value}" for name, value in sorted(environ.items()) if name.startswith(SPEED_ENV_PREFIXES)]
    return {
        "command": " ".join(_quoted(arg) for arg in settings + argv),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "load_average_at_start": " ".join(f"{load:.2f}" for load in os.getloadavg()),
    }


def count_macs(model: nn.Module, image_size: int) -> tuple[int, dict[str, int]]:
    """Counts the multiply-accumulates of one forward pass of one image (FLOPs / 2).

    ``FlopCounterMode`` sees convolutions and matrix multiplications only; the math attention
    backend decomposes attention into matmuls so that it is counted too. The model may live on
    the ``meta`` device (shapes only).

    Returns:
        The total MACs and the MACs per counted aten op.
    """
    device = next(model.parameters()).device
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, image_size, image_size, device=device))
    by_op = {str(op): flops // 2 for op, flops in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops() // 2, by_op


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """First and third quartiles of timings (inclusive method: never outside the measured range)."""
    if len(values) == 1:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """Formats rows as a GitHub Markdown table.

    Args:
        headers: Column titles.
        rows: One sequence of cells per row; cells are formatted with ``str``.
        align: One character per column, ``l`` or ``r``; all left-aligned by default.

    Returns:
        The table, one line per row, without a trailing newline.
    """
    align = align or "l" * len(headers)
    if len(align) != len(headers) or any(len(row) != len(headers) for row in rows):
        raise ValueError("every row and the alignment need one entry per header")
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [headers, rule, *[[str(cell) for cell in row] for row in rows]]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def write_results(
    name: str,
    title: str,
    results: dict[str, object],
    markdown: str,
    metadata: dict[str, object],
    output_dir: Path = RESULTS_DIR,
) -> tuple[Path, Path]:
    """Writes ``<name>.json`` (metadata and results) and ``<name>.md`` (metadata and ``markdown``).

    Args:
        name: File stem, e.g. ``"fidelity"``.
        title: Heading of the Markdown file.
        results: The figures, JSON-serialisable.
        markdown: The Markdown body (tables and notes) to put under the metadata.
        metadata: As returned by :func:`run_metadata`.
        output_dir: Directory to write to; created if missing.

    Returns:
        The paths of the JSON and the Markdown file.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / f"{name}.json", output_dir / f"{name}.md"
    atomic_write_text(json_path, json.dumps({"metadata": metadata, "results": results}, indent=2) + "\n")
    header = "\n".join(
        f"- {METADATA_LABELS.get(key, key)}: " + (f"`{value}`" if key == "command" else str(value))
        for key, value in metadata.items()
    )
    atomic_write_text(md_path, f"# {title}\n\n{header}\n\n{markdown.strip()}\n")
    return json_path, md_path
