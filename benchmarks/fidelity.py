"""Fidelity to the HDKD paper: parameters and MACs of every registered ``hdkd_*`` variant.

    .venv/bin/python benchmarks/fidelity.py

Builds each model on the ``meta`` device (shapes only, no weights allocated), counts its
parameters, and counts the multiply-accumulates of one 224 x 224 image with
``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2), for 7 classes (HAM10000) and
4 classes (Brain Tumor MRI). The paper's figures stand beside them where the paper (as quoted in
issue 5) gives them; the ablations' cells stay empty otherwise. Takes a few seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch

import kdkit_zoo  # noqa: F401  (registers the HDKD models with timm)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, count_macs, markdown_table, run_metadata, write_results  # noqa: E402

# The paper's published figures (Tables 1-2; MACs counted by ptflops at 224 px). Parameter counts
# are per number of classes; the paper quotes one MAC figure per model.
PAPER: dict[str, dict[str, object]] = {
    "hdkd_teacher": {"params": {7: 3_948_677, 4: 3_948_290}, "gmacs": 5.879, "source": "Tables 1-2"},
    "hdkd_student": {"params": {7: 3_727_288}, "gmacs": 2.085, "source": "Tables 1-2"},
    "hdkd_student_nodistill": {"params": {7: 3_724_977}, "gmacs": 2.082, "source": "Tables 1-2"},
}
# The ablations, by name suffix, and the paper's table describing each (it quotes no figures for them).
ABLATIONS = {"_se": "Table 6", "_stem4": "Table 7"}


def base_variant(name: str) -> str:
    """Returns the variant an ablation modifies (``hdkd_student_se`` -> ``hdkd_student``)."""
    for suffix in ABLATIONS:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def display_order(name: str) -> tuple[int, int, str]:
    """Sort key: the paper's three models in order, each followed by its ablations."""
    base = base_variant(name)
    bases, suffixes = list(PAPER), ["", *ABLATIONS]
    return (bases.index(base) if base in bases else len(bases), suffixes.index(name.removeprefix(base)), name)


def measure(name: str, num_classes: int, image_size: int = 224) -> dict[str, object]:
    """Counts the parameters and the MACs of one forward pass of a batch of one image.

    Args:
        name: A registered timm model name.
        num_classes: Classifier width.
        image_size: Side of the square input image.

    Returns:
        ``params``, ``macs`` (FLOPs / 2) and ``macs_by_op`` (MACs per counted aten op).
    """
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=num_classes, img_size=image_size).eval()
    macs, by_op = count_macs(model, image_size)
    return {"params": sum(p.numel() for p in model.parameters()), "macs": macs, "macs_by_op": by_op}


def paper_figures(name: str, num_classes: int) -> dict[str, object]:
    """Returns the paper's parameter count, GMACs and table for a variant (None where not given)."""
    entry = PAPER.get(name)
    if entry is None:
        return {"params": None, "gmacs": None, "source": ABLATIONS.get(name.removeprefix(base_variant(name)))}
    return {"params": entry["params"].get(num_classes), "gmacs": entry["gmacs"], "source": entry["source"]}


def run(names: list[str], classes: list[int], image_size: int) -> list[dict[str, object]]:
    """Measures every variant at every class count, with the paper's figures and the ablation ratios."""
    rows = []
    for name in names:
        for num_classes in classes:
            measured = measure(name, num_classes, image_size)
            base = base_variant(name)
            base_macs = measured["macs"] if base == name else measure(base, num_classes, image_size)["macs"]
            rows.append(
                {
                    "model": name,
                    "num_classes": num_classes,
                    **measured,
                    "base_variant": base,
                    "macs_reduction_vs_base": base_macs / measured["macs"],
                    "paper": paper_figures(name, num_classes),
                }
            )
    return rows


def _fmt_int(value: int | None) -> str:
    return "" if value is None else f"{value:,d}"


def to_markdown(rows: list[dict[str, object]], image_size: int) -> str:
    """Formats the measurements as the results table plus the notes on how MACs are counted."""
    table = []
    for row in rows:
        paper = row["paper"]
        params_match = "" if paper["params"] is None else ("exact" if paper["params"] == row["params"] else "differs")
        gmacs = row["macs"] / 1e9
        ratio = "" if row["base_variant"] == row["model"] else f"{row['macs_reduction_vs_base']:.3f}"
        table.append(
            [
                f"`{row['model']}`",
                row["num_classes"],
                _fmt_int(row["params"]),
                _fmt_int(paper["params"]),
                params_match,
                f"{gmacs:.3f}",
                "" if paper["gmacs"] is None else f"{paper['gmacs']:.3f}",
                "" if paper["gmacs"] is None else f"{paper['gmacs'] / gmacs:.3f}",
                ratio,
                paper["source"] or "",
            ]
        )
    headers = [
        "Model",
        "Classes",
        "Params, kdkit",
        "Params, paper",
        "Params match",
        f"GMACs {image_size} px, kdkit",
        "GMACs, paper",
        "Paper / kdkit",
        "Base / this, MACs",
        "Paper",
    ]
    return f"""{markdown_table(headers, table, "lrrrlrrrrl")}

How the MACs are counted. kdkit's column is `torch.utils.flop_counter.FlopCounterMode` on the
`meta` device, one {image_size} x {image_size} image, MACs = FLOPs / 2, with the math attention
backend so the transformer's attention is counted as the matrix multiplications it is. The
counter only counts convolutions and matrix multiplications (about 5.70 G for the teacher and
2.02 G for the students). The paper's column was counted by `ptflops`, which also counts the
normalisation layers, activations, pooling and the attention gates' element-wise products, so
it is about 3% higher: the "Paper / kdkit" column. Parameter counts do not depend on how they are
counted and must agree exactly.

The paper quotes parameter counts for the teacher (7 and 4 classes), the HDKD student and the
non-distilled student (7 classes), and one MAC figure per model, shown for both class counts
(the classifier's width changes the count by under 0.001 G). For the Table 6 (`*_se`: MBConv with
squeeze-excitation instead of MBCSA) and Table 7 (`*_stem4`: a stride-4 stem) ablations it gives
no figures to set beside these, so those cells are empty. The "Base / this, MACs" column is the
measured MAC reduction relative to the variant each ablation modifies; Table 7 describes the
stride-4 stem as cutting the FLOPs about four-fold.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=224, help="input side in pixels (default: 224, the paper's)")
    parser.add_argument(
        "--classes", type=int, nargs="+", default=[7, 4], help="classifier widths to measure (default: 7 4)"
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS_DIR, help=f"directory for fidelity.json and .md (default: {RESULTS_DIR})"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Measures every registered ``hdkd_*`` variant, prints the table and writes the results."""
    args = parse_args(argv)
    rows = run(sorted(timm.list_models("hdkd_*"), key=display_order), args.classes, args.image_size)
    markdown = to_markdown(rows, args.image_size)
    print(markdown)
    json_path, md_path = write_results(
        "fidelity",
        "Fidelity to the HDKD paper: parameters and MACs",
        {"image_size": args.image_size, "batch_size": 1, "models": rows},
        markdown,
        run_metadata(),
        args.output,
    )
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
