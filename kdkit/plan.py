"""One check of a training plan before anything trains.

An experiment of many runs (a teacher, then students at several training-set sizes and seeds)
must not fail hours in, when its twentieth run turns out to give a process no batch. The
check here takes every planned run at once, computes what each data-parallel process will
iterate under :func:`kdkit.data.make_loader`'s policy (the batch size is the *global* batch,
split evenly across processes) and Accelerate's sharding, and reports every run that cannot
train, in one error::

    from kdkit.plan import PlannedTraining, check_plan

    check_plan([PlannedTraining("teacher", 5137), PlannedTraining("student_50_seed0", 200)],
               batch_size=32, num_processes=8)

A teacher that trains for ten epochs must not be followed by a student tap that names no module.
:func:`check_distillation` builds the teacher, the student and the :class:`~kdkit.Distiller` on
the ``meta`` device (shapes only: no memory, no compute) and runs one training step of each on a
batch at the image size, so that a model that cannot take the size, a tap that names no module,
an unknown loss or a bad weight, and epochs, batch or image sizes below one all fail at once,
naming the setting to change::

    from kdkit.plan import PlannedModel, check_distillation

    check_distillation(PlannedModel.timm("resnet18", 10, role="the teacher model"),
                       PlannedModel.timm("resnet10t", 10, role="the student model"),
                       losses={"ce": 0.5, "kl": 0.5, "fitnet": 1}, taps=["layer3"], image_size=64,
                       epochs=10, teacher_epochs=10, names={"image_size": "--image-size"})

:func:`check_fresh_starts` refuses, before anything trains, a fresh start over run folders that
hold results, listing all of them.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from . import data as kdata
from .checkpoint_manager import RunExistsError, describe_run
from .distiller import Distiller, LossTerm
from .taps import TapSpec
from .tasks import Supervised

__all__ = [
    "CLI_FLAGS",
    "PlanError",
    "PlannedModel",
    "PlannedTraining",
    "ProbedModels",
    "check_distillation",
    "check_fresh_starts",
    "check_plan",
    "probe_model",
    "resume_overwrite_conflict",
    "steps_per_process",
]

logger = logging.getLogger(__name__)

PROBE_BATCH = 2
"""Images of the probe batch at most: batch norm needs two values per channel, more add nothing on the meta device."""


class PlanError(ValueError):
    """A planned run cannot train as configured; raised before any run starts.

    Attributes:
        problems: One line per run that cannot train.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


@dataclass(frozen=True)
class PlannedTraining:
    """One run of a plan: its name and the number of training images it iterates per epoch.

    Attributes:
        name: How the run is named in messages and output folders (e.g. ``"hdkd_50_seed0"``).
        num_images: Training images per epoch (after subsetting and oversampling).
        grad_accum_steps: Batches per optimizer update.
        batch_size: The run's global batch, where it differs from the plan's.
    """

    name: str
    num_images: int
    grad_accum_steps: int = 1
    batch_size: int | None = None


def steps_per_process(num_images: int, batch_size: int, num_processes: int, grad_accum_steps: int = 1) -> int:
    """Optimizer updates per epoch on each process, for a training loader of ``num_images``.

    Args:
        num_images: Training images per epoch.
        batch_size: The global batch (all processes together).
        num_processes: Data-parallel processes.
        grad_accum_steps: Batches per optimizer update.

    Raises:
        ValueError: ``batch_size`` does not divide by ``num_processes``.
    """
    batches = kdata.batches_per_process(num_images, batch_size, train=True, num_processes=num_processes)
    return math.ceil(batches / grad_accum_steps)


def check_plan(runs: Sequence[PlannedTraining], *, batch_size: int, num_processes: int) -> dict[str, int]:
    """Checks that every planned run gives each process at least one optimizer update per epoch.

    A run also needs at least as many images as processes: with fewer, Accelerate fills the
    missing places of a batch with repeated images, and a process would train on copies only.

    Args:
        runs: Every run of the plan.
        batch_size: The global batch size.
        num_processes: Data-parallel processes (``accelerate launch --num_processes``).

    Returns:
        ``{run name: optimizer updates per epoch on each process}``.

    Raises:
        PlanError: The batch size does not divide by the process count, or some runs cannot
            train; the message names every such run with its size and the process count.
    """
    for batch in sorted({batch_size, *(run.batch_size for run in runs if run.batch_size is not None)}):
        try:
            kdata.per_process_batch_size(batch, num_processes)
        except ValueError as error:
            raise PlanError(f"the plan cannot run: {error}", [str(error)]) from None
    steps: dict[str, int] = {}
    problems: list[str] = []
    for run in runs:
        run_batch = run.batch_size or batch_size
        if run.num_images < max(1, num_processes):
            problems.append(
                f"run {run.name!r} has {run.num_images} training image(s) for {num_processes} process(es): "
                "each process needs at least one image of its own"
            )
            continue
        steps[run.name] = steps_per_process(run.num_images, run_batch, num_processes, run.grad_accum_steps)
        if steps[run.name] < 1:
            problems.append(
                f"run {run.name!r} ({run.num_images} training images) gives no optimizer update per process "
                f"at a global batch of {run_batch} on {num_processes} process(es)"
            )
    if problems:
        raise PlanError(
            f"{len(problems)} planned run(s) cannot train; nothing was started:\n  " + "\n  ".join(problems)
            + "\nLower the batch size (--batch-size is the global batch), use fewer processes, or train on more images.",
            problems,
        )
    return steps


# --------------------------------------------------------------------------- the models and the objective


@dataclass(frozen=True)
class PlannedModel:
    """A model of the plan: how messages name it, and how it is built.

    Attributes:
        name: How messages name it, e.g. its timm name ``"resnet18"``.
        build: Builds a fresh model; the checks call it under ``torch.device("meta")``.
        role: What it is in messages, e.g. ``"the teacher model"`` or ``"baseline"``.
    """

    name: str
    build: Callable[[], nn.Module] = field(repr=False)
    role: str = "the model"

    @classmethod
    def timm(cls, name: str, num_classes: int, *, role: str = "the model", **kwargs: object) -> PlannedModel:
        """The timm model ``name`` with ``num_classes`` outputs (and ``kwargs``, e.g. ``img_size``)."""
        return cls(name, functools.partial(timm.create_model, name, num_classes=num_classes, **kwargs), role)


@dataclass
class ProbedModels:
    """The ``meta``-device models :func:`check_distillation` built and ran, for further shape checks.

    Attributes:
        teachers: The teachers, in the order given.
        student: The distilled student.
        trained_alone: The models trained on labels alone, in the order given.
    """

    teachers: list[nn.Module]
    student: nn.Module
    trained_alone: list[nn.Module]


def _namer(names: Mapping[str, str] | None) -> Callable[[str], str]:
    """How messages name a setting: ``names[setting]`` (a command line's flag), else the keyword itself."""
    names = dict(names or {})
    return lambda setting: names.get(setting, setting)


def _describe(error: BaseException) -> str:
    """``Type: message``; a KeyError's message without the quotes ``str()`` adds."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return f"{type(error).__name__}: {text}"


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _probe_batch(image_size: int, batch_size: int) -> tuple[Tensor, Tensor]:
    """A ``meta`` batch of ``min(batch_size, PROBE_BATCH)`` RGB images and their labels.

    A process that trains on one image per batch must be probed with one: batch norm over a
    1 x 1 feature map of one image fails in training, and nowhere else.
    """
    count = max(1, min(batch_size, PROBE_BATCH))
    images = torch.empty(count, 3, image_size, image_size, device="meta")
    return images, torch.zeros(count, dtype=torch.long, device="meta")


def _training_step(task: nn.Module, images: Tensor, labels: Tensor) -> None:
    """The forward half of one training step of ``task`` (labels, the loss), as the Trainer runs it.

    Raises:
        ValueError: The step gives no scalar loss, or one without a gradient (backward would fail).
    """
    task.train()
    loss = getattr(task(images, labels), "loss", None)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError(f"the training step gives {type(loss).__name__} as its loss, not a scalar tensor")
    if not loss.requires_grad:
        raise ValueError("the training step's loss depends on no trainable parameter, so backward() would fail")


def _probe(
    model: PlannedModel, image_size: int, batch_size: int, train: bool, name: Callable[[str], str],
    batch_setting: str = "batch_size",
) -> tuple[nn.Module | None, str | None]:
    """``(the meta model or None, the problem or None)``: :func:`probe_model` without raising."""
    size = f"{image_size} x {image_size}"
    try:
        with torch.device("meta"):
            built = model.build()
    except Exception as error:  # whatever a model raises for a size it cannot be built for
        return None, (f"{model.role} {model.name!r} cannot be built for {size} images ({_describe(error)}); "
                      f"choose another model, or another {name('image_size')}")
    images, labels = _probe_batch(image_size, batch_size)
    try:
        if train:
            _training_step(Supervised(built), images, labels)
        else:  # a trained model the plan only runs (a teacher loaded from a checkpoint)
            with torch.no_grad():
                built.eval()(images)
    except Exception as error:  # whatever the model raises on the wrong size
        step = f"in a training step of {len(images)} image(s)" if train else "in evaluation"
        advice = f"choose a model without a fixed input size, or another {name('image_size')}"
        if train and len(images) == 1:
            advice += f", or a larger {name(batch_setting)} (batch norm needs two images)"
        return built, f"{model.role} {model.name!r} cannot take {size} images ({_describe(error)}) {step}; {advice}"
    return built, None


def probe_model(
    model: PlannedModel, image_size: int, *, batch_size: int = PROBE_BATCH, train: bool = True,
    names: Mapping[str, str] | None = None,
) -> nn.Module:
    """Builds ``model`` on the ``meta`` device and runs one training step on ``image_size`` images.

    Shapes only: no memory, no compute. The step is the forward pass on a labelled batch and the
    cross-entropy, in training mode (batch norm in training fails on a one-image 1 x 1 map).

    Args:
        model: The model.
        image_size: Side of the square RGB training images.
        batch_size: The batch each process trains on (at most :data:`PROBE_BATCH` are probed).
        train: ``False`` runs the model in evaluation only (a trained model the plan uses as is).
        names: How messages name the settings (``{"image_size": "--image-size"}``).

    Returns:
        The ``meta`` model, after its step.

    Raises:
        PlanError: The model cannot be built, or cannot take the images; the message names it,
            its error and the setting to change.
    """
    built, problem = _probe(model, image_size, batch_size, train, _namer(names))
    if problem is not None:
        raise PlanError(problem, [problem])
    return built  # type: ignore[return-value]


def _setting_problems(
    name: Callable[[str], str], *, image_size: object, batch_size: object, epochs: object, teacher_epochs: object,
    val_fraction: object, teacher_batch_size: object = None,
) -> list[str]:
    counts = {"image_size": image_size, "batch_size": batch_size, "teacher_batch_size": teacher_batch_size, "epochs": epochs,
              "teacher_epochs": teacher_epochs}
    problems = [
        f"{name(setting)} must be a whole number of at least 1, got {value!r}"
        for setting, value in counts.items() if value is not None and not _is_count(value)
    ]
    if val_fraction is not None and not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
        problems.append(f"{name('val_fraction')} must lie strictly between 0 and 1, got {val_fraction!r}")
    return problems


def _loss_terms(
    losses: Mapping[str, float] | Sequence[LossTerm] | None, taps: TapSpec | None, name: Callable[[str], str]
) -> tuple[list[LossTerm] | None, list[str]]:
    """The objective's terms (``None``: the Distiller's default, CE and KL), and what is wrong with them."""
    terms: list[LossTerm] | None = None
    if losses is not None:
        terms, problems = [], []
        for item in losses.items() if isinstance(losses, Mapping) else losses:
            try:
                term = item if isinstance(item, LossTerm) else LossTerm(*item) if isinstance(item, tuple) else LossTerm(item)
            except Exception as error:  # an unknown name, a weight that is negative, no number or not finite
                problems.append(f"{name('losses')}: {_describe(error)}")
                continue
            terms.append(term)
        if not terms and not problems:
            problems.append(f"{name('losses')} names no loss")
        elif not problems and all(term.weight == 0 for term in terms):
            problems.append(f"{name('losses')}: every weight is 0, so the student would learn nothing")
        if problems:
            return None, problems
    features = [term.name for term in terms or [] if term.kind == "features"]
    if features and taps is None:
        return None, [f"the feature loss(es) {features} of {name('losses')} compare tapped features, but no {name('taps')} "
                      "are given: name the modules to compare (e.g. layer3, or -1 for timm's last feature stage)"]
    if taps is not None and not features:
        objective = f"of {name('losses')}" if losses is not None else "in the default objective (CE and KL)"
        return None, [f"{name('taps')} are given, but no feature loss {objective} uses them: add one to {name('losses')} "
                      "(e.g. fitnet=1, at=1 or stage_mse=1) or leave the taps out"]
    return terms, []


def check_distillation(
    teacher: PlannedModel | Sequence[PlannedModel],
    student: PlannedModel,
    *,
    image_size: int,
    losses: Mapping[str, float] | Sequence[LossTerm] | None = None,
    taps: TapSpec | None = None,
    batch_size: int = PROBE_BATCH,
    teacher_batch_size: int | None = None,
    epochs: int | None = None,
    teacher_epochs: int | None = None,
    trained_alone: Sequence[PlannedModel] = (),
    val_fraction: float | None = None,
    distiller_options: Mapping[str, object] | None = None,
    names: Mapping[str, str] | None = None,
) -> ProbedModels:
    """Checks a whole distillation plan before anything trains: its settings, its models and one step of each.

    The models are built on the ``meta`` device (shapes only: no memory, no compute). Each
    teacher runs one training step when it trains here (``teacher_epochs``; else one evaluation
    pass), the student and every model of ``trained_alone`` one training step, then the
    :class:`~kdkit.Distiller` of the teachers and the student is built with ``losses`` and
    ``taps`` and runs one training step (labels, the loss). Every problem found is reported in
    one error, each naming the setting to change.

    Args:
        teacher: The teacher, or several.
        student: The distilled student.
        image_size: Side of the square RGB training images.
        losses: The Distiller's ``losses`` (``{"name": weight}`` or :class:`~kdkit.LossTerm` s);
            ``None``: its default. Every name must be registered and every weight at least 0.
        taps: The Distiller's ``taps``; needed by a feature loss, and only with one.
        batch_size: The batch each process trains on (at most :data:`PROBE_BATCH` are probed).
        teacher_batch_size: The batch each process trains the teachers on, where it differs
            from ``batch_size`` (messages name it as ``teacher_batch_size``).
        epochs: The student's epochs, at least 1 (``None``: not checked).
        teacher_epochs: The teachers' epochs when they train here, at least 1; ``None``: they
            come trained (from a checkpoint) and only run in evaluation.
        trained_alone: Models trained on labels alone beside (a student without distillation,
            baselines).
        val_fraction: The share held out for validation, in (0, 1) (``None``: not checked).
        distiller_options: Further keyword arguments of the Distiller; ``input_size`` defaults
            to ``image_size``.
        names: How messages name each setting, by keyword (``image_size``, ``batch_size``,
            ``epochs``, ``teacher_epochs``, ``val_fraction``, ``losses``, ``taps``); a command
            line passes its flags, e.g. ``{"image_size": "--image-size"}``.

    Returns:
        The ``meta`` models, for further shape checks (a tap of a figure).

    Raises:
        PlanError: Everything that would fail, one line each in ``problems``.
    """
    name = _namer(names)
    teachers = [teacher] if isinstance(teacher, PlannedModel) else list(teacher)
    problems = _setting_problems(name, image_size=image_size, batch_size=batch_size, epochs=epochs,
                                 teacher_epochs=teacher_epochs, val_fraction=val_fraction, teacher_batch_size=teacher_batch_size)
    terms, loss_problems = _loss_terms(losses, taps, name)
    problems += loss_problems
    teacher_batch, teacher_setting = (batch_size, "batch_size") if teacher_batch_size is None else (teacher_batch_size, "teacher_batch_size")
    if not (_is_count(image_size) and _is_count(batch_size) and _is_count(teacher_batch)):  # no batch to probe with
        _raise_if(problems)
    built_teachers = [_probe(model, image_size, teacher_batch, teacher_epochs is not None, name, teacher_setting) for model in teachers]
    built_student = _probe(student, image_size, batch_size, True, name)
    built_alone = [_probe(model, image_size, batch_size, True, name) for model in trained_alone]
    model_problems = [problem for _, problem in (*built_teachers, built_student, *built_alone) if problem is not None]
    problems += model_problems
    if not model_problems and not loss_problems:
        problems += _distillation_problems(
            [model for model, _ in built_teachers], built_student[0], teachers, student, terms, taps, image_size,  # type: ignore[arg-type]
            batch_size, distiller_options, name,
        )
    _raise_if(problems)
    return ProbedModels([model for model, _ in built_teachers], built_student[0], [model for model, _ in built_alone])  # type: ignore[arg-type]


def _distillation_problems(
    teachers: list[nn.Module], student: nn.Module, planned_teachers: list[PlannedModel], planned_student: PlannedModel,
    terms: list[LossTerm] | None, taps: TapSpec | None, image_size: int, batch_size: int,
    options: Mapping[str, object] | None, name: Callable[[str], str],
) -> list[str]:
    """The Distiller built on the meta models and one training step of it; what fails, if anything."""
    pair = f"{' + '.join(model.name for model in planned_teachers)} -> {planned_student.name}"
    try:
        distiller = Distiller(teachers if len(teachers) > 1 else teachers[0], student, losses=terms, taps=taps,
                              **{"input_size": image_size, **(options or {})})
    except Exception as error:  # a tap naming no module, shapes that cannot be aligned
        if taps is None:
            return [f"the Distiller {pair} cannot be built: {_describe(error)}"]
        return [f"the distilled taps {taps!r} do not fit {pair}: {_describe(error)}; change {name('taps')}"]
    try:
        _training_step(distiller, *_probe_batch(image_size, batch_size))
    except Exception as error:  # a loss that cannot compare what it is given
        return [f"a distillation step {pair} fails on {image_size} x {image_size} images ({_describe(error)}); "
                f"check {name('losses')}, {name('taps')} and {name('image_size')}"]
    finally:
        distiller.remove_hooks()  # the meta models carry no hooks out of the check
    return []


def _raise_if(problems: Sequence[str]) -> None:
    if problems:
        raise PlanError(
            f"{len(problems)} problem(s) with the plan; nothing was started:\n  " + "\n  ".join(problems),
            problems,
        )


# --------------------------------------------------------------------------- fresh starts


CLI_FLAGS = {"resume": "--resume", "overwrite": "--overwrite", "output_dir": "--output-dir"}
"""The command-line flags of the settings :func:`resume_overwrite_conflict` and :func:`check_fresh_starts` name."""


def resume_overwrite_conflict(resume: bool, overwrite: bool, names: Mapping[str, str] | None = None) -> str | None:
    """What is wrong with asking for both ``resume`` and ``overwrite`` (one continues the runs, the
    other replaces them), in words naming the settings by ``names``; ``None`` when not both."""
    if not (resume and overwrite):
        return None
    name = _namer(names)
    return (f"{name('resume')} continues the runs in {name('output_dir')} and {name('overwrite')} replaces them: "
            "pass one of them, not both")


def check_fresh_starts(
    folders: Mapping[str, str | os.PathLike[str]], *, resume: bool, overwrite: bool, names: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Refuses, before anything trains, a fresh start over run folders that hold a run's results.

    :meth:`kdkit.Trainer.fit` refuses one such folder when its run starts; a plan of several runs
    must not train the first ones and then stop at the fifth: every folder is looked at first
    (:func:`kdkit.checkpoint_manager.describe_run`), and all that hold results are listed at once.

    Args:
        folders: ``{run name: its output folder}`` of every run the plan trains.
        resume: The runs continue (or are collected): nothing is replaced, nothing is checked.
        overwrite: Start afresh anyway; the folders' results are replaced.
        names: How messages name the settings ``resume``, ``overwrite`` and ``output_dir``
            (``{"resume": "--resume"}``).

    Returns:
        ``{run name: what its folder holds}`` for the runs a fresh start replaces (empty
        unless ``overwrite``).

    Raises:
        PlanError: Both ``resume`` and ``overwrite``.
        kdkit.train.RunExistsError: Some folders hold results, and neither ``resume`` nor
            ``overwrite`` was given; the message names each with what it holds.
    """
    name = _namer(names)
    if (message := resume_overwrite_conflict(resume, overwrite, names)) is not None:
        raise PlanError(message, [message])
    if resume:
        return {}
    held = {run: found for run, folder in folders.items() if (found := describe_run(Path(folder))) is not None}
    if held and not overwrite:
        raise RunExistsError(
            f"{len(held)} run folder(s) of this plan hold results that a fresh start would replace; nothing was started:\n  "
            + "\n  ".join(f"{run}: {found}" for run, found in held.items())
            + f"\nPass {name('resume')} to continue or collect them, {name('overwrite')} to train them again from scratch, "
            f"or choose another {name('output_dir')}"
        )
    for run, found in held.items():
        logger.warning("%s: %s will be replaced (%s)", run, found, name("overwrite"))
    return held
