"""Distillation training-step speed on CPU: kdkit against the floor, the authors' loop and torchdistill.

    .venv/bin/python benchmarks/distill_speed.py

One training step of the HDKD pair (``hdkd_teacher`` -> ``hdkd_student``, 4 classes) on one
fixed batch of random images: the frozen teacher without autograd, the student forward and
backward, and an AdamW step, with the HDKD objective
``0.5 * CE + 0.5 * KL(T=1) + 10 * stage-weighted MSE`` on the three conv stages. Variants:

  kdkit          (a) kdkit.Distiller, features captured by forward hooks in one pass each
  floor          (b) the floor: one teacher pass (no autograd) and one student pass, the stage
                     maps taken from ``forward_intermediates``, no hooks, no framework
  rerun          (c) the HDKD authors' loop: full forwards for the logits, then for every
                     distilled stage j the prefix stages[0..j] run again from the input,
                     for the teacher and the student
  torchdistill   (d) torchdistill's ForwardHookManager capturing the same stage outputs
  kdkit_channels_last, kdkit_bf16, kdkit_channels_last_bf16, kdkit_compile
                 (a) in channels_last memory format, under bf16 autocast, both, or with
                     torch.compile(student)

On request (``--variants``), the recipe's two supervised steps, cross-entropy only, in the same
four settings: ``teacher``, ``teacher_channels_last``, ``teacher_bf16``,
``teacher_channels_last_bf16`` (phase 1, ``hdkd_teacher``) and the same for ``student``
(``hdkd_student_nodistill``, the student alone). For every step that ran both with and without
channels_last, the record says whether channels_last made it faster, paired by round.

Every variant owns a copy of the same initial weights and the same batch. After the warm-up
steps, the timed steps run in rounds, one step of each variant per round in a rotating order,
so background load hits all variants alike; the figure is the median over the rounds. Peak
memory is measured separately, one fresh process per variant.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from scipy.stats import quantile_test
from torch import Tensor, nn

from kdkit import Distiller, LossTerm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, markdown_table, quartiles, run_metadata, write_results  # noqa: E402

NUM_CLASSES = 4
TAPS = ["stages.0", "stages.1", "stages.2"]
CE_WEIGHT, KL_WEIGHT, FEATURE_WEIGHT, TEMPERATURE = 0.5, 0.5, 10.0, 1.0
LEARNING_RATE = 1e-4
SEED = 0
STUDENT_ALONE = "hdkd_student_nodistill"  # the recipe's student trained alone
# Targets are judged on the median of per-round step-time ratios at this confidence.
CONFIDENCE = 0.95
# "Not slower" than torchdistill: kdkit's step may take at most this much longer (upper confidence bound).
NOT_SLOWER_MARGIN = 0.01
MEMORY_STEPS = 2  # steps of each memory probe: the first allocates AdamW's state, the second reuses it

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Variant:
    """How one benchmarked training step is built.

    Attributes:
        method: Which loss builder of :data:`METHODS` computes the loss.
        label: Short description for the tables.
        channels_last: Convert both models and the batch to channels_last.
        bf16: Run the forward passes under ``torch.autocast("cpu", dtype=torch.bfloat16)``.
        compile: Wrap the student in ``torch.compile``.
    """

    method: str
    label: str
    channels_last: bool = False
    bf16: bool = False
    compile: bool = False


VARIANTS = {
    "kdkit": Variant("kdkit", "(a) kdkit Distiller"),
    "floor": Variant("floor", "(b) floor: one pass each, no hooks"),
    "rerun": Variant("rerun", "(c) authors' loop, stage prefixes re-run"),
    "torchdistill": Variant("torchdistill", "(d) torchdistill ForwardHookManager"),
    "kdkit_channels_last": Variant("kdkit", "(a) + channels_last", channels_last=True),
    "kdkit_bf16": Variant("kdkit", "(a) + bf16 autocast", bf16=True),
    "kdkit_channels_last_bf16": Variant("kdkit", "(a) + channels_last + bf16 autocast", channels_last=True, bf16=True),
    "kdkit_compile": Variant("kdkit", "(a) + torch.compile(student)", compile=True),
    **{
        f"{model}{suffix}": Variant(f"{model}_ce", f"{model} alone (CE){label}", channels_last="channels_last" in suffix, bf16="bf16" in suffix)
        for model in ("teacher", "student")
        for suffix, label in (
            ("", ""),
            ("_channels_last", " + channels_last"),
            ("_bf16", " + bf16 autocast"),
            ("_channels_last_bf16", " + channels_last + bf16 autocast"),
        )
    },  # fmt: skip
}


# --------------------------------------------------------------------------- the compared steps


def build_pair(image_size: int, seed: int = SEED) -> tuple[nn.Module, nn.Module]:
    """Builds the HDKD teacher (frozen, eval mode) and the distilled student (training mode).

    Args:
        image_size: Input side; sets the student's position-embedding grid.
        seed: Seed of the weight initialisation.

    Returns:
        ``(teacher, student)``; the student returns ``(cls_logits, dist_logits)`` in training.
    """
    torch.manual_seed(seed)
    teacher = timm.create_model("hdkd_teacher", num_classes=NUM_CLASSES, img_size=image_size)
    student = timm.create_model("hdkd_student", num_classes=NUM_CLASSES, img_size=image_size)
    teacher.eval().requires_grad_(False)
    student.train().set_distilled_training(True)
    return teacher, student


def hdkd_objective(
    cls_logits: Tensor,
    dist_logits: Tensor,
    teacher_logits: Tensor,
    student_feats: list[Tensor],
    teacher_feats: list[Tensor],
    labels: Tensor,
) -> Tensor:
    """The HDKD loss as kdkit's terms compute it, written out with plain ``torch.nn.functional``.

    ``0.5 * CE(cls head) + 0.5 * KL(dist head || teacher, T=1, per sample)
    + 10 * sum_j j * MSE(stage j)``.
    """
    ce = F.cross_entropy(cls_logits, labels)
    kl = F.kl_div(
        F.log_softmax(dist_logits / TEMPERATURE, dim=-1),
        F.log_softmax(teacher_logits / TEMPERATURE, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    mse = sum(j * F.mse_loss(s, t) for j, (s, t) in enumerate(zip(student_feats, teacher_feats), start=1))
    return CE_WEIGHT * ce + KL_WEIGHT * kl * TEMPERATURE**2 + FEATURE_WEIGHT * mse


def kdkit_loss(teacher: nn.Module, student: nn.Module, image_size: int) -> tuple[LossFn, nn.Module]:
    """(a) kdkit's Distiller with the HDKD terms and stage taps.

    The loss builders of :data:`METHODS` share this signature.

    Args:
        teacher: The frozen teacher.
        student: The student, in training mode with distilled training enabled.
        image_size: Input side (the Distiller's shape probe uses it; the other builders ignore it).

    Returns:
        The loss function ``(images, labels) -> loss`` and the module whose parameters train.
    """
    distiller = Distiller(
        teacher,
        student,
        losses=[
            LossTerm("ce", CE_WEIGHT),
            LossTerm("kl", KL_WEIGHT, temperature=TEMPERATURE),
            LossTerm("stage_mse", FEATURE_WEIGHT),
        ],
        taps=TAPS,
        input_size=image_size,
    )

    def loss_fn(images: Tensor, labels: Tensor) -> Tensor:
        return distiller(images, labels).loss

    return loss_fn, distiller


def floor_loss(teacher: nn.Module, student: nn.Module, image_size: int) -> tuple[LossFn, nn.Module]:
    """(b) The floor: one teacher pass without autograd and one student pass, maps included.

    ``forward_intermediates`` returns the stage maps and the final features of the same pass, so
    nothing runs twice and no hook fires. Arguments and return value as :func:`kdkit_loss`.
    """

    def loss_fn(images: Tensor, labels: Tensor) -> Tensor:
        with torch.no_grad():
            last_map, teacher_feats = teacher.forward_intermediates(images)
            teacher_logits = teacher.forward_head(last_map)
        tokens, student_feats = student.forward_intermediates(images)
        cls_logits, dist_logits = student.forward_head(tokens)
        return hdkd_objective(cls_logits, dist_logits, teacher_logits, student_feats, teacher_feats, labels)

    return loss_fn, student


def rerun_loss(teacher: nn.Module, student: nn.Module, image_size: int) -> tuple[LossFn, nn.Module]:
    """(c) The HDKD authors' loop: full forwards, then each stage prefix re-run from the input.

    For distilled stage ``j`` the authors build ``nn.Sequential`` of the first ``j + 1`` stages
    and run it on the images, for the teacher (without autograd) and the student. Arguments and
    return value as :func:`kdkit_loss`.
    """

    def loss_fn(images: Tensor, labels: Tensor) -> Tensor:
        with torch.no_grad():
            teacher_logits = teacher(images)
            teacher_feats = [teacher.stages[: j + 1](images) for j in range(len(TAPS))]
        cls_logits, dist_logits = student(images)
        student_feats = [student.stages[: j + 1](images) for j in range(len(TAPS))]
        return hdkd_objective(cls_logits, dist_logits, teacher_logits, student_feats, teacher_feats, labels)

    return loss_fn, student


def torchdistill_loss(teacher: nn.Module, student: nn.Module, image_size: int) -> tuple[LossFn, nn.Module]:
    """(d) torchdistill's forward-hook feature extraction: a ``ForwardHookManager`` per model.

    Its hooks store each tapped module's output in an I/O dict, popped after each forward.
    Arguments and return value as :func:`kdkit_loss`.
    """
    from torchdistill.core.forward_hook import ForwardHookManager  # optional dependency: the `bench` extra

    teacher_hooks, student_hooks = ForwardHookManager("cpu"), ForwardHookManager("cpu")
    for path in TAPS:
        teacher_hooks.add_hook(teacher, path, requires_input=False, requires_output=True)
        student_hooks.add_hook(student, path, requires_input=False, requires_output=True)

    def loss_fn(images: Tensor, labels: Tensor) -> Tensor:
        with torch.no_grad():
            teacher_logits = teacher(images)
        teacher_io = teacher_hooks.pop_io_dict()
        cls_logits, dist_logits = student(images)
        student_io = student_hooks.pop_io_dict()
        student_feats = [student_io[path]["output"] for path in TAPS]
        teacher_feats = [teacher_io[path]["output"] for path in TAPS]
        return hdkd_objective(cls_logits, dist_logits, teacher_logits, student_feats, teacher_feats, labels)

    return loss_fn, student


def teacher_ce_loss(teacher: nn.Module, student: nn.Module, image_size: int) -> tuple[LossFn, nn.Module]:
    """Phase 1 of the recipe: the teacher alone, trained with cross-entropy. Arguments as :func:`kdkit_loss`."""
    teacher.train().requires_grad_(True)
    return (lambda images, labels: F.cross_entropy(teacher(images), labels)), teacher


def student_ce_loss(teacher: nn.Module, student: nn.Module, image_size: int) -> tuple[LossFn, nn.Module]:
    """The student alone (``hdkd_student_nodistill`` from :func:`build_step`), cross-entropy only."""
    return (lambda images, labels: F.cross_entropy(student(images), labels)), student


METHODS: dict[str, Callable[[nn.Module, nn.Module, int], tuple[LossFn, nn.Module]]] = {
    "kdkit": kdkit_loss,
    "floor": floor_loss,
    "rerun": rerun_loss,
    "torchdistill": torchdistill_loss,
    "teacher_ce": teacher_ce_loss,
    "student_ce": student_ce_loss,
}
DISTILLATION_VARIANTS = [name for name, variant in VARIANTS.items() if variant.method not in ("teacher_ce", "student_ce")]
"""What runs by default: the distillation steps the issue's targets are about."""


@dataclass
class TrainStep:
    """One variant's training step on its fixed batch: zero grads, forward, backward, AdamW step."""

    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    images: Tensor
    labels: Tensor
    bf16: bool

    def __call__(self) -> float:
        """Runs one step and returns its loss."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss_fn(self.images, self.labels)
        loss.backward()
        self.optimizer.step()
        return loss.item()


def make_batch(batch_size: int, image_size: int, seed: int = SEED) -> tuple[Tensor, Tensor]:
    """Returns a fixed batch of random images and labels."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
    return images, labels


def build_student_alone(image_size: int) -> nn.Module:
    """The recipe's student alone (no distillation token), from the benchmark's seed."""
    torch.manual_seed(SEED)
    return timm.create_model(STUDENT_ALONE, num_classes=NUM_CLASSES, img_size=image_size)


def build_step(
    name: str,
    teacher: nn.Module,
    student: nn.Module,
    images: Tensor,
    labels: Tensor,
    copy_models: bool = True,
) -> TrainStep:
    """Builds variant ``name``.

    Args:
        name: A key of :data:`VARIANTS`.
        teacher: The teacher.
        student: The student (every variant starts from the same weights).
        images: The batch; converted to channels_last when the variant asks for it.
        labels: Its labels.
        copy_models: Work on copies of the models, so that several variants can share a pair.
    """
    variant = VARIANTS[name]
    if copy_models:
        teacher, student = copy.deepcopy(teacher), copy.deepcopy(student)
    if variant.method == "student_ce" and student.pretrained_cfg["architecture"] != STUDENT_ALONE:
        student = build_student_alone(images.shape[-1])
    if variant.channels_last:
        teacher.to(memory_format=torch.channels_last)
        student.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    if variant.compile:
        student = torch.compile(student)
    loss_fn, trainable = METHODS[variant.method](teacher, student, images.shape[-1])
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=LEARNING_RATE)
    return TrainStep(loss_fn, optimizer, images, labels, variant.bf16)


# --------------------------------------------------------------------------- peak memory


def _status_kib(field: str) -> int:
    """Reads one ``kB`` field (``VmRSS``, ``VmHWM``) of ``/proc/self/status``."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def probe_memory(name: str, batch_size: int, image_size: int, threads: int, steps: int) -> dict[str, float]:
    """Measures the peak resident memory of one variant's setup and ``steps`` training steps.

    Meant for a fresh process. Once the libraries are imported and the two models and the batch
    exist, it hands freed heap memory back to the system (glibc's ``malloc_trim``), takes the
    resident size as the baseline and resets the kernel's RSS high-water mark
    (``/proc/self/clear_refs``). It then builds the variant on those models (the Distiller or the
    hooks, the optimizer) and runs the steps, and reads the high-water mark (``VmHWM`` in
    ``/proc/self/status``). The difference is what distilling adds, as the operating system sees
    it: activations, gradients, AdamW's state, runtime caches warmed on first use and allocator
    slack. Every variant has the same baseline contents, whatever its setup does before the first step.

    Returns:
        ``baseline_rss_mib``, ``peak_rss_mib`` and ``peak_rss_delta_mib``.
    """
    torch.set_num_threads(threads)
    teacher, student = build_pair(image_size)
    images, labels = make_batch(batch_size, image_size)
    if VARIANTS[name].method == "torchdistill":
        import torchdistill.core.forward_hook  # noqa: F401  (a library's import is not training memory)
    if VARIANTS[name].method == "student_ce":  # its own model, in the baseline like the others'
        student = build_student_alone(image_size)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS
    step = build_step(name, teacher, student, images, labels, copy_models=False)
    for _ in range(steps):
        step()
    peak = _status_kib("VmHWM")
    return {
        "baseline_rss_mib": baseline / 1024,
        "peak_rss_mib": peak / 1024,
        "peak_rss_delta_mib": (peak - baseline) / 1024,
    }


def measure_memory(names: list[str], batch_size: int, image_size: int, threads: int, steps: int) -> dict[str, dict]:
    """Runs :func:`probe_memory` for each variant, each in a new spawned process, one at a time."""
    results = {}
    context = multiprocessing.get_context("spawn")
    for name in names:
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            results[name] = pool.submit(probe_memory, name, batch_size, image_size, threads, steps).result()
        print(f"  {name:26s} peak RSS +{results[name]['peak_rss_delta_mib']:7.1f} MiB", flush=True)
    return results


# --------------------------------------------------------------------------- timing


def measure_speed(names: list[str], batch_size: int, image_size: int, warmup: int, iters: int) -> dict[str, dict]:
    """Times every variant's training step, interleaved in rounds.

    Each variant is built (``setup_s``) and warmed up (``warmup_s``, one entry per step; the
    first includes any compilation). Then ``iters`` rounds run one step of each variant, the
    order rotating by one each round.

    Returns:
        Per variant: ``setup_s``, ``warmup_s``, ``first_loss`` (the loss of the first step, taken
        from identical weights and batch in every variant) and ``step_s`` (the timed steps).
    """
    teacher, student = build_pair(image_size)
    images, labels = make_batch(batch_size, image_size)
    steps, results = {}, {}
    for name in names:
        start = time.perf_counter()
        steps[name] = build_step(name, teacher, student, images, labels)
        results[name] = {"setup_s": time.perf_counter() - start, "warmup_s": [], "step_s": []}
        for index in range(warmup):
            start = time.perf_counter()
            loss = steps[name]()
            results[name]["warmup_s"].append(time.perf_counter() - start)
            if index == 0:
                results[name]["first_loss"] = loss
        print(f"  {name:26s} built and warmed up; first step {results[name]['warmup_s'][0]:.2f} s", flush=True)
    for round_index in range(iters):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            steps[name]()
            results[name]["step_s"].append(time.perf_counter() - start)
    return results


def summarise(name: str, timing: dict, memory: dict, batch_size: int) -> dict[str, object]:
    """Combines one variant's timings and memory into the reported figures."""
    step_s = timing["step_s"]
    q1, q3 = quartiles(step_s)
    variant = VARIANTS[name]
    return {
        "variant": name,
        "label": variant.label,
        "channels_last": variant.channels_last,
        "bf16_autocast": variant.bf16,
        "compiled_student": variant.compile,
        "median_step_s": statistics.median(step_s),
        "images_per_s": batch_size / statistics.median(step_s),
        "step_s_q1_q3": [q1, q3],
        "images_per_s_q1_q3": [batch_size / q3, batch_size / q1],
        **timing,
        **memory,
    }


def target_checks(by_name: dict[str, dict]) -> list[dict[str, object]]:
    """Checks issue 5's targets for (a) kdkit against (b), (c) and (d) (only for variants that ran).

    The rounds interleave the variants, so each round gives one ratio of kdkit's step time to the
    other's, taken under the same background load. A target passes when it holds at the upper end
    of the confidence interval of the median ratio, so that noise cannot pass it. "Not slower"
    than torchdistill, which captures the same stage outputs with the same kind of hooks, is
    read as at most ``NOT_SLOWER_MARGIN`` slower: no timing resolves a difference of zero.
    """
    if "kdkit" not in by_name:
        return []
    kdkit = by_name["kdkit"]
    targets = [
        ("floor", "kdkit within 5% of the floor (b)", 1.05),
        ("rerun", "kdkit at least 1.5x faster than the authors' loop (c)", 1 / 1.5),
        ("torchdistill", f"kdkit not slower than torchdistill (d), within {NOT_SLOWER_MARGIN:.0%}", 1 + NOT_SLOWER_MARGIN),
    ]
    checks = []
    for other_name, target, highest_ratio in targets:
        if other_name not in by_name:
            continue
        median, interval = paired_ratio(kdkit["step_s"], by_name[other_name]["step_s"])
        checks.append(
            {
                "target": target,
                "compared_with": other_name,
                "step_time_ratio": median,  # kdkit's step time relative to the other's
                "ratio_interval": interval,
                "confidence": CONFIDENCE,
                "rounds": len(kdkit["step_s"]),
                "highest_ratio_allowed": highest_ratio,
                "speedup": 1 / median,
                "passed": interval is not None and interval[1] <= highest_ratio,
            }
        )
    return checks


def paired_ratio(step_s: list[float], other_step_s: list[float]) -> tuple[float, list[float] | None]:
    """The median over rounds of one step time divided by the other's, and its confidence interval.

    Returns:
        The median ratio and its distribution-free (order-statistic) :data:`CONFIDENCE` interval,
        ``None`` when there are too few rounds for one.
    """
    ratios = [mine / theirs for mine, theirs in zip(step_s, other_step_s, strict=True)]
    median = statistics.median(ratios)
    interval = quantile_test(ratios, q=median, p=0.5).confidence_interval(CONFIDENCE)  # q only sets the unused p-value
    bounded = math.isfinite(interval.low) and math.isfinite(interval.high)
    return median, [float(interval.low), float(interval.high)] if bounded else None


def channels_last_effects(by_name: dict[str, dict]) -> list[dict[str, object]]:
    """For each step run with and without channels_last (same precision): its effect, paired by round.

    ``verdict`` is ``faster`` or ``slower`` when the whole confidence interval of the step-time
    ratio lies on one side of 1, else ``undecided``.
    """
    effects = []
    for plain, with_format in [
        (f"{model}{precision}", f"{model}_channels_last{precision}")
        for model in ("kdkit", "teacher", "student")
        for precision in ("", "_bf16")
    ]:
        if plain not in by_name or with_format not in by_name:
            continue
        median, interval = paired_ratio(by_name[with_format]["step_s"], by_name[plain]["step_s"])
        verdict = "undecided"
        if interval is not None and interval[1] < 1:
            verdict = "faster"
        elif interval is not None and interval[0] > 1:
            verdict = "slower"
        effects.append({"variant": with_format, "compared_with": plain, "step_time_ratio": median, "ratio_interval": interval, "verdict": verdict})
    return effects


def describe_check(check: dict[str, object]) -> str:
    """One PASS/FAIL line of the Markdown for a result of :func:`target_checks`."""
    if check["ratio_interval"] is None:
        interval = f"{check['rounds']} paired rounds are too few for a {check['confidence']:.0%} confidence interval"
    else:
        low, high = check["ratio_interval"]
        interval = f"{check['confidence']:.0%} confidence interval {low - 1:+.1%} to {high - 1:+.1%}, {check['rounds']} paired rounds"
    return (
        f"- {'PASS' if check['passed'] else 'FAIL'}: {check['target']}: kdkit's step takes "
        f"{check['step_time_ratio'] - 1:+.1%} vs. `{check['compared_with']}` ({check['speedup']:.2f}x its speed; "
        f"{interval}; allowed at most {check['highest_ratio_allowed'] - 1:+.1%})"
    )


def to_markdown(
    rows: list[dict[str, object]], checks: list[dict[str, object]], effects: list[dict[str, object]], args: argparse.Namespace
) -> str:
    """Formats the speed table, the target checks, the effects of channels_last and the notes."""
    by_name = {row["variant"]: row for row in rows}
    reference = by_name.get("kdkit")
    table = []
    for row in rows:
        low, high = row["images_per_s_q1_q3"]
        table.append(
            [
                f"`{row['variant']}`",
                row["label"],
                f"{row['images_per_s']:.1f}",
                f"{low:.1f} - {high:.1f}",
                f"{row['median_step_s'] * 1000:.0f}",
                "" if reference is None or row["variant"] not in DISTILLATION_VARIANTS
                else f"{reference['median_step_s'] / row['median_step_s']:.3f}",
                f"{row['peak_rss_delta_mib']:.0f}",
                f"{row['peak_rss_mib']:.0f}",
                f"{row['setup_s'] + sum(row['warmup_s']):.1f}",
                f"{row['first_loss']:.5f}",
            ]
        )
    headers = [
        "Variant",
        "What runs",
        "images/s (median)",
        "images/s (interquartile)",
        "ms/step",
        "speed vs. kdkit (ratio of medians)",
        "peak RSS delta, MiB",
        "peak RSS, MiB",
        "setup + warm-up, s",
        "loss at step 1",
    ]
    lines = [markdown_table(headers, table, "llrrrrrrrr"), ""]
    if checks:
        lines += ["Targets (issue 5), on the ratio of step times paired by round (the median and its confidence interval):", ""]
        lines += [describe_check(check) for check in checks]
        lines.append("")
    if effects:
        lines += ["channels_last, step time with it relative to without (median of the paired rounds, "
                  f"{CONFIDENCE:.0%} confidence interval):", ""]  # fmt: skip
        for effect in effects:
            interval = "interval n/a: too few rounds" if effect["ratio_interval"] is None else (
                "interval {:+.1%} to {:+.1%}".format(*(bound - 1 for bound in effect["ratio_interval"]))
            )  # fmt: skip
            lines.append(
                f"- `{effect['variant']}` vs. `{effect['compared_with']}`: {effect['step_time_ratio'] - 1:+.1%} "
                f"({interval}): {effect['verdict']}"
            )
        lines.append("")
    kdkit_rows = [row for row in rows if VARIANTS[row["variant"]].method == "kdkit"]
    if len(kdkit_rows) > 1:
        winner = max(kdkit_rows, key=lambda row: row["images_per_s"])
        lines += [f"Fastest kdkit configuration: `{winner['variant']}` ({winner['images_per_s']:.1f} images/s).", ""]
    if "kdkit_compile" in by_name and reference is not None:
        compiled = by_name["kdkit_compile"]
        extra = compiled["setup_s"] + sum(compiled["warmup_s"]) - reference["setup_s"] - sum(reference["warmup_s"])
        lines += [
            f"torch.compile: setup and {args.warmup} warm-up steps took {extra:.1f} s longer than for `kdkit`: "
            "the compilation time, with an empty inductor cache (a fresh `TORCHINDUCTOR_CACHE_DIR`).",
            "",
        ]
    lines += [
        f"Setup: `hdkd_teacher` -> `hdkd_student`, {NUM_CLASSES} classes, batch {args.batch_size}, "
        f"{args.image_size} x {args.image_size} px, {args.threads} torch threads, one fixed batch of random images, "
        f"AdamW (lr {LEARNING_RATE}) step included in every variant. Objective in every variant: {CE_WEIGHT} CE + "
        f"{KL_WEIGHT} KL (T = {TEMPERATURE:g}) + {FEATURE_WEIGHT:g} x stage-weighted MSE on `{', '.join(TAPS)}` "
        "(weights 1, 2, 3). All variants start from the same weights and batch, so their step-1 losses agree "
        "(under bf16 autocast up to rounding)."
        + (" The `teacher` and `student` variants instead train that model alone with cross-entropy, as the recipe's "
           "phase 1 and student-alone runs do (the student alone is `hdkd_student_nodistill`)."
           if any(row["variant"] not in DISTILLATION_VARIANTS for row in rows) else ""),
        "",
        f"Timing: {args.warmup} untimed warm-up steps per variant, then {args.iters} rounds of one step of every "
        "variant, the order rotating each round so background load hits all alike; images/s = batch / median "
        "step time, with the interquartile range over the rounds. The targets instead divide kdkit's step time by the "
        f"other variant's in the same round and take the median of these ratios, with its {CONFIDENCE:.0%} confidence interval "
        "(order statistics, `scipy.stats.quantile_test`); a target passes when it holds at the interval's upper end.",
        "",
        "Peak memory: each variant runs again in a fresh process (spawned, same threads). Once the libraries are "
        "imported and the two models and the batch exist, freed heap memory is returned to the system (glibc "
        "`malloc_trim`), the resident size is taken as the baseline and the kernel's RSS high-water mark is reset "
        "(`/proc/self/clear_refs`); then the variant is set up (Distiller or hooks, optimizer) and runs "
        f"{MEMORY_STEPS} steps, and `VmHWM` is read from `/proc/self/status`. \"Peak RSS "
        "delta\" is that peak minus the baseline: activations, gradients, AdamW's state, runtime caches warmed on "
        "first use and allocator slack, as the operating system sees them (torch has no `max_memory_allocated` on "
        "CPU). \"Peak RSS\" is the whole process. torch.compile's compiler worker processes are not included.",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32, help="images per step (default: 32)")
    parser.add_argument("--image-size", type=int, default=112, help="input side, a multiple of 16 (default: 112)")
    parser.add_argument(
        "--iters", type=int, default=20, help="timed rounds, one step of each variant per round (default: 20)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant, at least 1 (default: 3)")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=DISTILLATION_VARIANTS,
        metavar="VARIANT",
        help=f"variants to run (default: the distillation steps, {', '.join(DISTILLATION_VARIANTS)}); also: "
        + ", ".join(name for name in VARIANTS if name not in DISTILLATION_VARIANTS),
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help=f"torch.set_num_threads (default: all {os.cpu_count()} cores)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS_DIR,
        help=f"directory for distill_speed.json and .md (default: {RESULTS_DIR})",
    )
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.iters < 1:
        parser.error("--warmup and --iters must be at least 1")
    if args.image_size % 16:
        parser.error("--image-size must be a multiple of 16 (the student's patch grid)")
    return args


def main(argv: list[str] | None = None) -> None:
    """Times the variants, measures their memory, prints the figures and writes the results."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    names = list(dict.fromkeys(args.variants))
    metadata = run_metadata()
    print(f"timing {names}: batch {args.batch_size}, {args.image_size} px, {args.threads} threads", flush=True)
    # An empty inductor cache, so torch.compile's time is that of a first compilation; the spawned
    # memory probes inherit it through the environment.
    with tempfile.TemporaryDirectory(prefix="distill_speed_inductor_") as inductor_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache
        timing = measure_speed(names, args.batch_size, args.image_size, args.warmup, args.iters)
        print("peak memory, one fresh process per variant:", flush=True)
        memory = measure_memory(names, args.batch_size, args.image_size, args.threads, MEMORY_STEPS)
    rows = [summarise(name, timing[name], memory[name], args.batch_size) for name in names]
    by_name = {row["variant"]: row for row in rows}
    checks, effects = target_checks(by_name), channels_last_effects(by_name)
    markdown = to_markdown(rows, checks, effects, args)
    print(markdown)
    json_path, md_path = write_results(
        "distill_speed",
        "Distillation training-step speed on CPU",
        {
            "batch_size": args.batch_size,
            "image_size": args.image_size,
            "warmup": args.warmup,
            "iters": args.iters,
            "threads": args.threads,
            "variants": rows,
            "targets": checks,
            "channels_last_effects": effects,
        },
        markdown,
        metadata,
        args.output,
    )
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
