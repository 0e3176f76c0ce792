"""The Distiller: a student, its frozen teachers, feature taps, adapters and loss terms."""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from os import PathLike
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapters import build_alignment
from .checkpoint import save_model
from .fingerprint import module_options
from .losses import LOSSES
from .outputs import (
    LogitsFrom,
    StepOutput,
    check_images,
    check_labels,
    check_soft_labels,
    stable_name,
    has_distillation_head,
    mean_of_heads,
    model_heads,
    select_output,
)
from .taps import FeatureTaps, TapSpec, match_taps, unwrap_model

__all__ = ["Distiller", "LossTerm"]

Head = Literal["cls", "dist", "mean"]
_INPUT_KINDS = ("labels", "logits", "features")
# Device types with an autocast implementation (the meta device of shape probes has none).
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


class LossTerm:
    """One weighted term of the distillation objective.

    Args:
        loss: A registered loss name (built with ``options``) or a loss module.
        weight: Multiplier of the term in the total loss.
        name: Key of the term in :attr:`StepOutput.terms`; defaults to the registry name.
        pairs: Indices of the tapped pairs a feature loss sees (all by default).
        **options: Keyword arguments of the registered loss.

    Example:
        >>> LossTerm("kl", 0.5, temperature=1.0)
        LossTerm('kl', weight=0.5)
    """

    def __init__(
        self,
        loss: str | nn.Module,
        weight: float = 1.0,
        *,
        name: str | None = None,
        pairs: Sequence[int] | None = None,
        **options: object,
    ) -> None:
        if isinstance(loss, str):
            self.module = LOSSES.build(loss, **options)
            self.name = name or loss
            self.loss_name = loss
        else:
            if options:
                raise TypeError(f"options {sorted(options)} only apply to a loss given by name")
            self.module = loss
            self.name = name or type(loss).__name__
            self.loss_name = type(loss).__qualname__
        kind = getattr(self.module, "inputs", None)
        if kind not in _INPUT_KINDS:
            raise TypeError(
                f"loss {self.name!r} ({type(self.module).__name__}) must derive from kdkit.losses.LabelLoss, "
                "LogitLoss or FeatureLoss so the Distiller knows what to feed it"
            )
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"loss {self.name!r} has weight {weight!r}: weights are finite numbers >= 0 "
                             "(a negative weight would maximise the term)")
        for option, value in module_options(self.module).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"loss {self.name!r}: option {option}={value} is not finite; every step's term would be NaN")
        self.kind: str = kind
        self.weight = float(weight)
        self.pairs = None if pairs is None else list(pairs)
        if self.pairs is not None and kind != "features":
            raise ValueError(f"loss {self.name!r} is not a feature loss, so it takes no `pairs`")

    def __repr__(self) -> str:
        return f"LossTerm({self.name!r}, weight={self.weight})"

    def describe(self) -> dict[str, object]:
        """The term as JSON: its loss, weight, pairs and the loss module's options (for fingerprints)."""
        return {"loss": self.loss_name, "class": type(self.module).__qualname__, "kind": self.kind,
                "weight": self.weight, "pairs": self.pairs, "options": module_options(self.module)}


def _as_terms(losses: Mapping[str, float] | Sequence[LossTerm] | None) -> list[LossTerm]:
    if losses is None:
        return [LossTerm("ce", 0.5), LossTerm("kl", 0.5)]
    if isinstance(losses, Mapping):
        terms = [LossTerm(name, weight) for name, weight in losses.items()]
    else:
        terms = [term if isinstance(term, LossTerm) else LossTerm(term) for term in losses]
    names = [term.name for term in terms]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"loss terms need distinct names; repeated: {duplicates} (pass name=...)")
    if not terms or all(term.weight == 0 for term in terms):
        raise ValueError(f"the objective has no term with a positive weight ({terms}): nothing would train")
    return terms


def _num_classes(model: nn.Module) -> int | None:
    value = getattr(unwrap_model(model), "num_classes", None)
    return value if isinstance(value, int) and value > 0 else None


def _normalisation(model: nn.Module) -> tuple[Sequence[float], Sequence[float]] | None:
    cfg = getattr(unwrap_model(model), "pretrained_cfg", None) or {}
    if "mean" in cfg and "std" in cfg:
        return cfg["mean"], cfg["std"]
    return None


class Distiller(nn.Module):
    """Distils one or several frozen teachers into a student.

    One call runs each teacher once without autograd and the student once, captures the
    tapped features with forward hooks, and returns the weighted sum of the loss terms::

        distiller = kdkit.Distiller(teacher, student)          # 0.5 * CE + 0.5 * KL(T=4)
        out = distiller(images, labels)
        out.loss.backward()

    The teachers are deliberately not submodules: ``state_dict()`` holds only the student and
    the adapters, optimizers never see teacher weights, and DDP never wraps a teacher. They
    still follow ``.to()`` / ``.cuda()`` (and so ``accelerator.prepare``).

    Args:
        teacher: A trained teacher, or a list of them.
        student: The student to train.
        losses: ``{"name": weight}`` of registered losses, or a list of :class:`LossTerm`.
            Default: ``{"ce": 0.5, "kl": 0.5}``.
        taps: Which modules' outputs feature losses compare (see :mod:`kdkit.taps`).
            Required when a feature loss is used.
        teacher_weights: Weight of each teacher in every distillation term (normalised to sum
            to one); equal by default.
        align: ``"auto"`` builds a learnable adapter for every tapped pair whose shapes differ;
            ``"error"`` raises instead.
        adapter: Registered adapter name (or factory) used for channel projections.
        input_size: ``(C, H, W)`` (or one side length) of the probe input used to measure
            feature shapes; default: the student's ``pretrained_cfg["input_size"]``.
        teacher_input_size: Resize the images to this side length (or ``(H, W)``) for the
            teachers, when they were trained at another resolution.
        renormalize: Re-normalise the student's input for each teacher when their
            ``pretrained_cfg`` mean/std differ (or pass ``((mean, std), (mean, std))`` for
            ``(student, teacher)``).
        teacher_dtype: Run the teachers in this dtype (e.g. ``torch.bfloat16``) to save time
            and memory; their outputs are cast back to float32. Default: the teachers' own
            dtype when they were given in a 16-bit one, else float32.
        label_head: For a student with two heads (CLS and distillation token): which head
            the label terms use. ``"cls"`` by default, as DeiT and HDKD.
        distill_head: Which head the logit-distillation terms use; ``"dist"`` by default.
        logits_from: Where the logits are in the student's output, for a student that returns
            more than its logits (``0`` for torchvision's Inception in training, ``"logits"``
            for a transformers output, or a callable). Two outputs are read as (CLS,
            distillation) heads only from a model that declares a distillation head.
    """

    def __init__(
        self,
        teacher: nn.Module | Sequence[nn.Module],
        student: nn.Module,
        *,
        losses: Mapping[str, float] | Sequence[LossTerm] | None = None,
        taps: TapSpec | None = None,
        teacher_weights: Sequence[float] | None = None,
        align: Literal["auto", "error"] = "auto",
        adapter: str | Callable[[int, int, str], nn.Module] = "conv1x1",
        input_size: int | Sequence[int] | None = None,
        teacher_input_size: int | Sequence[int] | None = None,
        renormalize: bool | tuple[tuple[Sequence[float], Sequence[float]], tuple[Sequence[float], Sequence[float]]] = False,
        teacher_dtype: torch.dtype | None = None,
        label_head: Head = "cls",
        distill_head: Head = "dist",
        logits_from: LogitsFrom = None,
    ) -> None:
        super().__init__()
        teachers = [teacher] if isinstance(teacher, nn.Module) else list(teacher)
        if not teachers:
            raise ValueError("the Distiller needs at least one teacher")
        if logits_from is not None and not isinstance(logits_from, (int, str)) and not callable(logits_from):
            raise TypeError(f"logits_from must be an index, a key or a callable, got {type(logits_from).__name__}")
        self.logits_from = logits_from
        teacher_dtype = _teacher_dtype(teachers, teacher_dtype)
        probe_size = _triple(input_size) if input_size is not None else None
        if align not in ("auto", "error"):
            raise ValueError(f"align must be 'auto' or 'error', got {align!r}")
        for head_name, head in (("label_head", label_head), ("distill_head", distill_head)):
            if head not in ("cls", "dist", "mean"):
                raise ValueError(f"{head_name} must be 'cls', 'dist' or 'mean', got {head!r}")
        self.student = student
        self.terms = _as_terms(losses)
        # Loss modules may hold state (buffers); keep them in the module tree, keyed by term name.
        self.loss_modules = nn.ModuleDict({term.name: term.module for term in self.terms})
        self.label_head = label_head
        self.distill_head = distill_head
        self.teacher_input_size = _pair(teacher_input_size) if teacher_input_size is not None else None

        # Plain attributes, not submodules: see the class docstring.
        self._teachers = teachers
        for model in teachers:
            model.requires_grad_(False)
            model.eval()
            if teacher_dtype is not None:
                model.to(dtype=teacher_dtype)
        self.teacher_dtype = teacher_dtype
        self.teacher_weights = _normalised_weights(teacher_weights, len(teachers))
        self._check_num_classes()
        # Buffers (not persisted): they follow the Distiller's device, whatever device the
        # teachers were on when the Distiller was built.
        self._renormalised: list[bool] = []
        for index, model in enumerate(teachers):
            norm = self._renormalisation(renormalize, model)
            self._renormalised.append(norm is not None)
            if norm is not None:
                self.register_buffer(f"_renorm_scale_{index}", norm[0], persistent=False)
                self.register_buffer(f"_renorm_shift_{index}", norm[1], persistent=False)

        if hasattr(unwrap_model(student), "set_distilled_training"):
            # timm's distilled models (DeiT, HDKD) return both heads in training only when asked.
            unwrap_model(student).set_distilled_training(True)

        feature_terms = [term for term in self.terms if term.kind == "features"]
        self._teacher_taps: list[FeatureTaps] = []
        self._student_taps: FeatureTaps | None = None
        self.tap_pairs: list[list[tuple[str, str]]] = []
        self.adapters = nn.ModuleDict()
        self._teacher_transforms: list[list[nn.Module | None]] = []
        self.probe_size: tuple[int, ...] | None = None  # the input the feature shapes were measured on
        self._probed_shapes: list[tuple[int, ...]] = []
        if feature_terms and taps is None:
            raise ValueError(
                f"feature losses {[term.name for term in feature_terms]} need `taps`: "
                "e.g. taps=['stages.1', 'stages.2'] or taps=[-3, -2, -1] (timm feature_info indices)"
            )
        if taps is not None and not feature_terms:
            raise ValueError("`taps` were given but no feature loss uses them; add one, e.g. losses={..., 'stage_mse': 1.0}")
        if feature_terms:
            self.tap_pairs = [match_taps(model, student, taps) for model in teachers]
            student_paths = [s for _, s in self.tap_pairs[0]]
            if any([s for _, s in pairs] != student_paths for pairs in self.tap_pairs[1:]):
                raise ValueError(f"every teacher must be matched to the same student taps, got {self.tap_pairs}")
            for term in feature_terms:
                bad = [i for i in term.pairs or [] if not 0 <= i < len(student_paths)]
                if bad:
                    raise ValueError(f"loss {term.name!r} selects tapped pairs {bad}; there are {len(student_paths)}")
            self._student_taps = FeatureTaps(student, student_paths, "student")
            self._teacher_taps = [
                FeatureTaps(model, [t for t, _ in pairs], "teacher") for model, pairs in zip(teachers, self.tap_pairs)
            ]
            # A feature loss aligns unless it says otherwise (kdkit.losses.FeatureLoss.requires_alignment).
            if any(getattr(term.module, "requires_alignment", True) for term in feature_terms):
                self._build_adapters(probe_size, align, adapter, feature_terms)
            else:
                self._teacher_transforms = [[None] * len(pairs) for pairs in self.tap_pairs]

    # ----------------------------------------------------------------- teachers
    @property
    def teachers(self) -> list[nn.Module]:
        """The frozen teachers, in the order given."""
        return list(self._teachers)

    @property
    def teacher(self) -> nn.Module:
        """The first (usually only) teacher."""
        return self._teachers[0]

    def _check_num_classes(self) -> None:
        student_classes = _num_classes(self.student)
        for index, model in enumerate(self._teachers):
            teacher_classes = _num_classes(model)
            if student_classes and teacher_classes and student_classes != teacher_classes:
                raise ValueError(
                    f"teacher {index} ({type(unwrap_model(model)).__name__}) predicts {teacher_classes} classes "
                    f"but the student ({type(unwrap_model(self.student)).__name__}) predicts {student_classes}"
                )

    def _renormalisation(self, renormalize: object, teacher: nn.Module) -> tuple[Tensor, Tensor] | None:
        """Returns ``(scale, shift)`` with ``x_teacher = x_student * scale + shift``, or None."""
        if renormalize is False:
            return None
        if renormalize is True:
            student_norm, teacher_norm = _normalisation(self.student), _normalisation(teacher)
            if student_norm is None or teacher_norm is None:
                raise ValueError(
                    "renormalize=True needs `pretrained_cfg` mean/std on both models; "
                    "pass renormalize=((student_mean, student_std), (teacher_mean, teacher_std))"
                )
        else:
            student_norm, teacher_norm = renormalize  # type: ignore[misc]
        s_mean, s_std, t_mean, t_std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (*student_norm, *teacher_norm))
        if torch.equal(s_mean, t_mean) and torch.equal(s_std, t_std):
            return None
        # x_s = (p - m_s) / s_s and x_t = (p - m_t) / s_t  =>  x_t = x_s * s_s / s_t + (m_s - m_t) / s_t
        return s_std / t_std, (s_mean - t_mean) / t_std

    def _teacher_input(self, index: int, images: Tensor) -> Tensor:
        if self._renormalised[index]:
            scale, shift = getattr(self, f"_renorm_scale_{index}"), getattr(self, f"_renorm_shift_{index}")
            images = images * scale.to(images) + shift.to(images)
        if self.teacher_input_size is not None and tuple(images.shape[-2:]) != self.teacher_input_size:
            images = F.interpolate(images, size=self.teacher_input_size, mode="bilinear", align_corners=False)
        if self.teacher_dtype is not None:
            images = images.to(self.teacher_dtype)
        return images

    @torch.no_grad()
    def _run_teacher(self, index: int, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        model = self._teachers[index]
        if model.training:  # someone called teacher.train(); a teacher's BN statistics must not move
            model.eval()
        inputs = self._teacher_input(index, images)
        if not self._teacher_taps:
            with self._teacher_precision(inputs.device):
                return self._teacher_logits(index, model(inputs)), []
        taps = self._teacher_taps[index]
        with taps.capture(), self._teacher_precision(inputs.device):
            logits = self._teacher_logits(index, model(inputs))
        features = [feature.float() for feature in taps.collect()]
        transforms = self._teacher_transforms[index]
        return logits, [t(f) if t is not None else f for t, f in zip(transforms, features)]

    def _teacher_logits(self, index: int, output: object) -> Tensor:
        heads = model_heads(output, self._teachers[index], what=f"teacher {index}",
                            fix="wrap the teacher in a module whose forward returns them")
        return mean_of_heads(heads).float()

    def _teacher_precision(self, device: torch.device) -> contextlib.AbstractContextManager[object]:
        """An autocast context of ``teacher_dtype``, whatever precision the student trains in.

        A bfloat16 teacher inside a float16 student step (or a float32 one inside a bfloat16
        step) would otherwise run under the student's autocast.
        """
        if self.teacher_dtype is None or device.type not in _AUTOCAST_DEVICES:
            return contextlib.nullcontext()
        if self.teacher_dtype in (torch.float16, torch.bfloat16):
            return torch.autocast(device.type, dtype=self.teacher_dtype)
        return torch.autocast(device.type, enabled=False)

    # ----------------------------------------------------------------- adapters
    def _build_adapters(
        self, input_size: tuple[int, int, int] | None, align: str, adapter: object, feature_terms: Sequence[LossTerm]
    ) -> None:
        """Measures every tapped feature's shape and builds the adapters the aligned terms use.

        Each model is probed on its own device (a teacher already on a GPU, a student still on
        the CPU, or either on the ``meta`` device), so no common device is needed. A pair that
        no aligned term reads gets no adapter: its parameters would never receive a gradient,
        which DDP refuses.
        """
        if input_size is None:
            cfg = getattr(unwrap_model(self.student), "pretrained_cfg", None) or {}
            input_size = tuple(cfg.get("input_size", (3, 224, 224)))  # type: ignore[assignment]
        num_pairs = len(self.tap_pairs[0])
        aligned_pairs: set[int] = set()
        for term in feature_terms:
            if getattr(term.module, "requires_alignment", True):
                aligned_pairs.update(range(num_pairs) if term.pairs is None else term.pairs)
        student_device = _device_of(self.student)
        student_was_training = self.student.training
        self.student.eval()
        self.probe_size = tuple(input_size)
        try:
            with torch.no_grad():
                assert self._student_taps is not None
                with self._student_taps.capture():
                    _probe(self.student, "the student", input_size,
                           lambda: self.student(torch.zeros(2, *input_size, device=student_device)))
                student_feats = self._student_taps.collect()
                teacher_feats = [
                    _probe(model, f"teacher {i}", input_size,
                           lambda i=i, model=model: self._probe_teacher(i, torch.zeros(2, *input_size, device=_device_of(model))))
                    for i, model in enumerate(self._teachers)
                ]
        finally:
            self.student.train(student_was_training)
        self._probed_shapes = [tuple(feature.shape[1:]) for feature in student_feats]
        student_prefix = getattr(unwrap_model(self.student), "num_prefix_tokens", None)
        for t_index, (pairs, feats) in enumerate(zip(self.tap_pairs, teacher_feats)):
            teacher_prefix = getattr(unwrap_model(self._teachers[t_index]), "num_prefix_tokens", None)
            transforms: list[nn.Module | None] = []
            for p_index, ((t_path, s_path), s_feat, t_feat) in enumerate(zip(pairs, student_feats, feats)):
                if align == "error" and tuple(s_feat.shape[1:]) != tuple(t_feat.shape[1:]):
                    raise ValueError(
                        f"student tap {s_path!r} gives {tuple(s_feat.shape)} but teacher tap {t_path!r} gives "
                        f"{tuple(t_feat.shape)} (align='error'; use align='auto' to learn an adapter)"
                    )
                alignment = build_alignment(
                    tuple(s_feat.shape),
                    tuple(t_feat.shape),
                    student_path=s_path,
                    teacher_path=t_path,
                    student_prefix_tokens=student_prefix,
                    teacher_prefix_tokens=teacher_prefix,
                    projection=adapter,  # type: ignore[arg-type]
                )
                if alignment.student is not None and p_index in aligned_pairs:
                    self.adapters[_adapter_key(t_index, p_index)] = alignment.student.to(student_device)
                transforms.append(alignment.teacher)
            self._teacher_transforms.append(transforms)

    @torch.no_grad()
    def _probe_teacher(self, index: int, probe: Tensor) -> list[Tensor]:
        taps = self._teacher_taps[index]
        with taps.capture(), self._teacher_precision(probe.device):
            self._teachers[index](self._teacher_input(index, probe))
        return taps.collect()

    # ----------------------------------------------------------------- forward
    def forward(self, images: Tensor, labels: Tensor | None = None) -> StepOutput:
        """Runs the teachers and the student and combines the loss terms.

        Args:
            images: A batch normalised for the student.
            labels: Class indices; label terms are skipped when ``None``.

        Returns:
            The step's `StepOutput`; ``terms`` holds each weighted term as a detached 0-dim
            tensor on the batch's device (``float(v)`` reads one; the Trainer reads them once
            per logging interval, so a step waits on no host sync).
        """
        check_images(images)
        if labels is not None:
            check_labels(labels, images.shape[0])
        teacher_outputs = [self._run_teacher(i, images) for i in range(len(self._teachers))]
        if self._student_taps is not None:
            with self._student_taps.capture():
                output = self.student(images)
            student_feats = self._student_taps.collect()
            self._check_feature_shapes(student_feats, images)
        else:
            output = self.student(images)
            student_feats = []
        output = self.student_logits(output, heads=True)
        logits = mean_of_heads(output)
        label_logits, distill_logits = self._pick_head(output, self.label_head), self._pick_head(output, self.distill_head)
        if labels is not None:
            check_soft_labels(labels, label_logits)
        for index, (teacher_logits, _) in enumerate(teacher_outputs):
            if teacher_logits.shape != distill_logits.shape:
                raise ValueError(
                    f"teacher {index} returned logits of shape {tuple(teacher_logits.shape)} "
                    f"but the student {tuple(distill_logits.shape)}"
                )

        total: Tensor | None = None
        terms: dict[str, Tensor] = {}
        for term in self.terms:
            if term.kind == "labels":
                if labels is None:
                    continue
                value = term.module(label_logits, labels)
            elif term.kind == "logits":
                value = sum(
                    w * term.module(distill_logits, t_logits, labels)
                    for w, (t_logits, _) in zip(self.teacher_weights, teacher_outputs)
                )
            else:
                value = sum(
                    w * self._feature_term(term, t_index, student_feats, t_feats)
                    for t_index, (w, (_, t_feats)) in enumerate(zip(self.teacher_weights, teacher_outputs))
                )
            weighted = term.weight * value
            terms[term.name] = weighted.detach()  # a tensor: no host sync in the step
            total = weighted if total is None else total + weighted
        # Detached: the loss is the only output with a graph, so DDP's search for unused parameters
        # (which starts from every output) never counts a head that the logits read and no term does.
        return StepOutput(loss=total, logits=logits.detach(), terms=terms)

    def student_logits(self, output: object, *, heads: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The logits in the student's ``output`` (see ``logits_from``): the mean of its two heads,
        or with ``heads`` the ``(cls, dist)`` pair itself.

        Raises:
            TypeError: The output holds more than logits and ``logits_from`` does not say where they are.
        """
        picked = model_heads(select_output(output, self.logits_from), self.student)
        return picked if heads else mean_of_heads(picked)

    def _pick_head(self, output: Tensor | tuple[Tensor, Tensor], head: Head) -> Tensor:
        if isinstance(output, Tensor) or head == "mean":
            return mean_of_heads(output)
        return output[0] if head == "cls" else output[1]

    def _check_feature_shapes(self, student_feats: Sequence[Tensor], images: Tensor) -> None:
        """Refuses tapped features whose shape differs from the probe's where an adapter was sized by it.

        A model that takes any input size (a dynamic-size ViT) gives other token counts at another
        size than the probe's; the adapters and teacher transforms were built for the probed ones.
        """
        if not self.adapters:
            return
        for index, (feature, probed) in enumerate(zip(student_feats, self._probed_shapes)):
            if tuple(feature.shape[1:]) != probed:
                s_path = self.tap_pairs[0][index][1]
                raise ValueError(
                    f"student tap {s_path!r} gives features of shape {tuple(feature.shape[1:])} on this batch of "
                    f"{tuple(images.shape[1:])} images, but {probed} on the {self.probe_size} probe that sized its "
                    "adapter: build the Distiller with input_size set to the training image size")

    def _feature_term(self, term: LossTerm, t_index: int, student_feats: list[Tensor], teacher_feats: list[Tensor]) -> Tensor:
        indices = term.pairs if term.pairs is not None else range(len(student_feats))
        aligned = getattr(term.module, "requires_alignment", True)
        s_list, t_list = [], []
        for p_index in indices:
            feature = student_feats[p_index]
            key = _adapter_key(t_index, p_index)
            if aligned and key in self.adapters:
                feature = self.adapters[key](feature)
            s_list.append(feature.float())
            t_list.append(teacher_feats[p_index])
        return term.module(s_list, t_list)

    def objective(self) -> dict[str, object]:
        """What this Distiller optimises, as JSON: the terms with their weights and options, the
        teacher weights, heads, taps and teacher input settings (for :mod:`kdkit.fingerprint`)."""
        return {
            "task": type(self).__name__,
            "terms": {term.name: term.describe() for term in self.terms},
            "teacher_weights": list(self.teacher_weights),
            "label_head": self.label_head,
            "distill_head": self.distill_head,
            "logits_from": stable_name(self.logits_from),
            "taps": [[list(pair) for pair in pairs] for pairs in self.tap_pairs],
            "adapters": sorted(self.adapters),
            "teacher_input_size": list(self.teacher_input_size) if self.teacher_input_size else None,
            "teacher_dtype": str(self.teacher_dtype) if self.teacher_dtype is not None else None,
            "renormalization": [
                [getattr(self, f"_renorm_{part}_{index}").flatten().tolist() for part in ("scale", "shift")] if renormalised else None
                for index, renormalised in enumerate(self._renormalised)
            ],
        }

    # ----------------------------------------------------------------- lifecycle
    def train(self, mode: bool = True) -> Distiller:
        """Sets the student and adapters to ``mode``; the teachers always stay in eval mode."""
        super().train(mode)
        for model in self._teachers:
            model.eval()
        return self

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Distiller:  # type: ignore[override]
        # Keeps the teachers on the student's device through .to(), .cuda() and accelerator.prepare.
        super()._apply(fn, recurse)
        for model in self._teachers:
            model._apply(fn, recurse)
        if self.teacher_dtype is not None:
            for model in self._teachers:
                model.to(dtype=self.teacher_dtype)
        return self

    def no_weight_decay(self) -> set[str]:
        """The student's timm ``no_weight_decay()`` names (position embeddings, tokens), as names in this module.

        The Trainer's optimizer also exempts every bias and normalisation weight, adapters' included.
        """
        names = getattr(unwrap_model(self.student), "no_weight_decay", None)
        return {f"student.{name}" for name in names()} if callable(names) else set()

    @property
    def find_unused_parameters(self) -> bool:
        """Whether some trainable parameters of the student get no gradient from this objective.

        True when no term reads the student's logits (feature terms only), or when a student
        with a CLS and a distillation head has one that no term reads (e.g. no logit term).
        Multi-process training then needs DDP's ``find_unused_parameters``, which the
        :class:`~kdkit.Trainer` sets through Accelerate when this is True.
        """
        heads: set[str] = set()
        for term in self.terms:
            if term.kind == "labels":
                heads.add(self.label_head)
            elif term.kind == "logits":
                heads.add(self.distill_head)
        if not heads:
            return True
        return has_distillation_head(self.student) and "mean" not in heads and heads != {"cls", "dist"}

    def remove_hooks(self) -> None:
        """Removes every feature-tap hook from the teachers and the student."""
        for taps in [*self._teacher_taps, *([self._student_taps] if self._student_taps else [])]:
            taps.remove()
        self._teacher_taps = []
        self._student_taps = None

    def __enter__(self) -> Distiller:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove_hooks()

    def export_student(self, path: str | PathLike[str], *, metadata: Mapping[str, object] | None = None) -> None:
        """Saves the student alone (no teacher, no adapters) as safetensors.

        Reload it with :func:`kdkit.checkpoint.load_model` into a freshly built student.
        """
        save_model(unwrap_model(self.student), path, metadata=dict(metadata or {}))

    def extra_repr(self) -> str:
        teachers = ", ".join(type(unwrap_model(m)).__name__ for m in self._teachers)
        lines = [f"teachers=[{teachers}], teacher_weights={self.teacher_weights}"]
        lines.append("terms=[" + ", ".join(f"{t.name}*{t.weight:g}" for t in self.terms) + "]")
        if self.tap_pairs:
            lines.append("taps=" + "; ".join(f"{t}->{s}" for t, s in self.tap_pairs[0]))
        return "\n".join(lines)


def _teacher_dtype(teachers: Sequence[nn.Module], given: torch.dtype | None) -> torch.dtype | None:
    """``teacher_dtype``, or the teachers' own 16-bit dtype when none is given (they cannot take float32 inputs).

    Raises:
        ValueError: Teachers in different 16-bit dtypes and no ``teacher_dtype``.
    """
    if given is not None:
        return given
    dtypes = set()
    for model in teachers:
        parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
        dtypes.add(parameter.dtype if parameter is not None else torch.float32)
    low = dtypes - {torch.float32}
    if not low:
        return None
    if len(dtypes) > 1:
        raise ValueError(f"the teachers' weights are in {sorted(map(str, dtypes))}: pass teacher_dtype= (e.g. torch.bfloat16) "
                         "to run them all in one")
    return low.pop()


def _probe(model: nn.Module, what: str, input_size: Sequence[int], run: Callable[[], object]) -> object:
    """``run()``, the probe of ``model`` on zeros of ``input_size``; its failure becomes a named error."""
    try:
        return run()
    except (RuntimeError, ValueError, AssertionError, TypeError) as error:
        raise ValueError(
            f"{what} ({type(unwrap_model(model)).__name__}) fails on the {tuple(input_size)} probe input that measures "
            f"the tapped features ({type(error).__name__}: {error}); set input_size to the (C, H, W) of the training images"
        ) from error


def _device_of(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); the CPU for a model with neither."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _adapter_key(teacher_index: int, pair_index: int) -> str:
    return f"teacher{teacher_index}_pair{pair_index}"


def _normalised_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count or any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"teacher_weights must be {count} non-negative numbers with a positive sum, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    values = tuple(int(v) for v in size)
    return values[-2:]  # type: ignore[return-value]


def _triple(size: int | Sequence[int]) -> tuple[int, int, int]:
    try:
        values = (3, operator.index(size), operator.index(size)) if not isinstance(size, Sequence) else tuple(
            operator.index(v) for v in size)
    except TypeError:
        values = ()
    if len(values) == 2:
        values = (3, *values)
    if len(values) != 3 or not all(v > 0 for v in values):
        raise ValueError(f"input_size is a positive int, (H, W) or (C, H, W) of positive ints, got {size!r}")
    return values  # type: ignore[return-value]
