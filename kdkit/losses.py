"""Distillation losses and their registry.

Every loss is an ``nn.Module`` of one of three kinds, told apart by what the
:class:`~kdkit.Distiller` feeds it:

* :class:`LabelLoss` -- ``loss(student_logits, labels)``: supervised terms (cross-entropy).
* :class:`LogitLoss` -- ``loss(student_logits, teacher_logits, labels)``: response-based
  distillation, computed once per teacher. ``labels`` may be ``None`` (unlabelled batches);
  only losses that need them (``dkd``) raise then.
* :class:`FeatureLoss` -- ``loss(student_features, teacher_features)``: two equally long lists,
  one tensor per tapped pair, in tap order; computed once per teacher. A feature is NCHW
  ``(B, C, H, W)``, tokens ``(B, N, C)`` or a vector ``(B, C)``.

Registered losses (``build_loss(name, **kwargs)``):

=============  =============================  ================================================================
name           class                          method (defaults)
=============  =============================  ================================================================
``ce``         :class:`CrossEntropy`          cross-entropy on the labels (``label_smoothing=0``)
``kl``         :class:`LogitKL`               Hinton KD, ``KL(p_t || p_s) * T**2`` (``temperature=4``)
``hard``       :class:`HardLabel`             DeiT hard distillation: CE on the teacher's argmax
``dkd``        :class:`DKD`                   decoupled KD (``alpha=1, beta=8, temperature=4``); needs labels
``dist``       :class:`DIST`                  inter/intra-class Pearson relations (``beta=1, gamma=1, tau=1``)
``stage_mse``  :class:`StageWeightedMSE`      HDKD stage-weighted MSE (``w_j = j**alpha``, ``alpha=1``)
``fitnet``     :class:`FitNet`                FitNets hints: MSE of aligned features
``cosine``     :class:`CosineFeature`         ``1 - cos`` of aligned, flattened features
``at``         :class:`AttentionTransfer`     attention maps (``p=2, beta=1000``)
``sp``         :class:`SimilarityPreserving`  row-normalised batch similarity matrices
``rkd``        :class:`RKD`                   relational KD (``distance_weight=25, angle_weight=50``)
``pkt``        :class:`PKT`                   KL of cosine-kernel conditional probabilities
``cka``        :class:`CKALoss`               ``1 - linear CKA`` of flattened features
=============  =============================  ================================================================

Feature losses with ``requires_alignment = False`` (``sp``, ``rkd``, ``pkt``, ``cka``)
compare ``B x B`` relations within the batch, so student and teacher only need the same
batch size. All losses compute in at least float32 (bf16/fp16 inputs are upcast) and never
need the teacher's tensors to require grad.

Register your own with :func:`register_loss`::

    @kdkit.register_loss("feature_l1")
    class FeatureL1(kdkit.losses.FeatureLoss):
        def forward(self, student_feats, teacher_feats):
            return sum(F.l1_loss(s, t) for s, t in zip(student_feats, teacher_feats))
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import Registry

__all__ = [
    "DIST",
    "DKD",
    "LOSSES",
    "PKT",
    "RKD",
    "AttentionTransfer",
    "CKALoss",
    "CosineFeature",
    "CrossEntropy",
    "FeatureLoss",
    "FitNet",
    "HardLabel",
    "LabelLoss",
    "LogitKL",
    "LogitLoss",
    "SimilarityPreserving",
    "StageWeightedMSE",
    "build_loss",
    "list_losses",
    "register_loss",
]

LOSSES: Registry[nn.Module] = Registry("loss")
"""Every registered loss class, by name."""
register_loss = LOSSES.register
"""Decorator registering a loss class under a name: ``@register_loss("my_loss")``."""
build_loss = LOSSES.build
"""Builds a registered loss by name: ``build_loss("kl", temperature=2.0)``."""
list_losses = LOSSES.names
"""The registered loss names, sorted."""


class LabelLoss(nn.Module):
    """Base class of supervised terms: ``forward(student_logits, labels)``."""

    inputs: ClassVar[str] = "labels"


class LogitLoss(nn.Module):
    """Base class of logit terms: ``forward(student_logits, teacher_logits, labels=None)``."""

    inputs: ClassVar[str] = "logits"


class FeatureLoss(nn.Module):
    """Base class of feature terms: ``forward(student_feats, teacher_feats)``.

    Attributes:
        requires_alignment: When true (the default) the Distiller passes student features
            already mapped to the teacher's shape by its adapters. Losses that compare
            batch-level similarity matrices (SP, RKD, PKT, CKA) set it to false and receive
            the raw student features.
    """

    inputs: ClassVar[str] = "features"
    requires_alignment: ClassVar[bool] = True


# --------------------------------------------------------------------------- helpers


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _upcast(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Casts tensors to their common dtype, at least float32 (bf16/fp16 are upcast)."""
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    if dtype in (torch.float16, torch.bfloat16) or not dtype.is_floating_point:
        dtype = torch.float32
    return tuple(t.to(dtype) for t in tensors)


def _check_logits(name: str, student_logits: Tensor, teacher_logits: Tensor, *, any_rank: bool = False) -> None:
    for what, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: {what} must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name}: {what} must be floating point, got {x.dtype} of shape {_shape(x)}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"{name}: student logits {_shape(student_logits)} and teacher logits "
            f"{_shape(teacher_logits)} must have the same shape (batch, classes)"
        )
    if (student_logits.ndim < 2) if any_rank else (student_logits.ndim != 2):
        raise ValueError(f"{name} expects logits of shape (batch, classes); got {_shape(student_logits)}")


def _class_labels(name: str, labels: Tensor | None, logits: Tensor) -> Tensor:
    """Returns ``(B,)`` class indices from hard labels or ``(B, K)`` soft labels (argmax)."""
    if labels is None:
        raise ValueError(
            f"{name} needs the ground-truth labels of the batch (it splits the target class "
            "from the others) but got labels=None"
        )
    if labels.is_floating_point() and labels.shape == logits.shape:  # mixup / cutmix targets
        labels = labels.argmax(dim=-1)
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0] or labels.is_floating_point():
        raise ValueError(
            f"{name}: labels must be ({logits.shape[0]},) class indices or soft labels of the logits' "
            f"shape {_shape(logits)}; got {labels.dtype} labels of shape {_shape(labels)}"
        )
    return labels.long()


def _check_pairs(name: str, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> None:
    """Validates two feature lists: same non-zero length, batched floating tensors, same batch size."""
    if isinstance(student_feats, Tensor) or isinstance(teacher_feats, Tensor):
        raise TypeError(
            f"{name} takes sequences of feature tensors, one per tapped pair; wrap a single "
            "tensor in a list"
        )
    if not student_feats or not teacher_feats or len(student_feats) != len(teacher_feats):
        raise ValueError(
            f"{name} needs one student and one teacher feature per tapped pair (at least one pair); "
            f"got {len(student_feats)} student and {len(teacher_feats)} teacher features"
        )
    for j, (s, t) in enumerate(zip(student_feats, teacher_feats)):
        if not isinstance(s, Tensor) or not isinstance(t, Tensor):
            raise TypeError(f"{name}, pair {j}: features must be tensors, got {type(s).__name__} and {type(t).__name__}")
        if s.ndim < 2 or t.ndim < 2:
            raise ValueError(
                f"{name}, pair {j}: features must be batched, (B, C), (B, N, C) or (B, C, H, W); "
                f"got student {_shape(s)} and teacher {_shape(t)}"
            )
        if s.shape[0] != t.shape[0]:
            raise ValueError(
                f"{name}, pair {j}: student and teacher batch sizes differ; "
                f"got student {_shape(s)} and teacher {_shape(t)}"
            )
        if not s.is_floating_point() or not t.is_floating_point():
            raise ValueError(f"{name}, pair {j}: features must be floating point, got {s.dtype} and {t.dtype}")


def _check_same_shape(name: str, j: int, s: Tensor, t: Tensor) -> None:
    if s.shape != t.shape:
        raise ValueError(
            f"{name}, pair {j}: student and teacher features must have the same shape (map the "
            f"student's with an adapter); got student {_shape(s)} and teacher {_shape(t)}"
        )


def _zero_like_graph(x: Tensor) -> Tensor:
    """A float32-or-wider zero that depends on ``x``, so ``backward()`` still works."""
    return _upcast(x)[0].sum() * 0.0


# --------------------------------------------------------------------------- label losses


@register_loss("ce")
class CrossEntropy(LabelLoss):
    """Cross-entropy against the ground-truth labels.

    Args:
        label_smoothing: Passed to :func:`torch.nn.functional.cross_entropy`.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward(self, student_logits: Tensor, labels: Tensor) -> Tensor:
        (logits,) = _upcast(student_logits)
        if labels.is_floating_point():  # probability targets (mixup / cutmix)
            labels = labels.to(logits.dtype)
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}"


# --------------------------------------------------------------------------- logit losses


@register_loss("kl")
class LogitKL(LogitLoss):
    """Hinton et al. (2015), "Distilling the Knowledge in a Neural Network".

    ``KL(softmax(t / T) || softmax(s / T))``, multiplied by ``T**2`` so that the gradient
    scale does not shrink with the temperature. Classes are on the last dimension.

    Args:
        temperature: Softening temperature ``T``.
        scale_by_t2: Multiply by ``T**2``.
        reduction: ``"batchmean"`` (the mathematically correct KL per sample) or ``"mean"``,
            which also divides by the number of classes, as the HDKD authors' code does.
    """

    def __init__(
        self,
        temperature: float = 4.0,
        scale_by_t2: bool = True,
        reduction: Literal["batchmean", "mean"] = "batchmean",
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if reduction not in ("batchmean", "mean"):
            raise ValueError(f"reduction must be 'batchmean' or 'mean', got {reduction!r}")
        self.temperature = temperature
        self.scale_by_t2 = scale_by_t2
        self.reduction = reduction

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None) -> Tensor:
        _check_logits("kl", student_logits, teacher_logits, any_rank=True)
        s, t = _upcast(student_logits, teacher_logits)
        temp = self.temperature
        loss = F.kl_div(F.log_softmax(s / temp, dim=-1), F.log_softmax(t / temp, dim=-1), reduction="sum", log_target=True)
        # batchmean: per sample; mean: per element, i.e. batchmean / num_classes for (B, K) logits
        loss = loss / (s.shape[0] if self.reduction == "batchmean" else s.numel())
        return loss * temp * temp if self.scale_by_t2 else loss

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, scale_by_t2={self.scale_by_t2}, reduction={self.reduction!r}"


@register_loss("hard")
class HardLabel(LogitLoss):
    """Hard-label distillation of DeiT (Touvron et al., ICML 2021, "Training data-efficient
    image transformers & distillation through attention", Sec. 4).

    ``CE(s, argmax_k t_k)``: the teacher's top-1 prediction is used as a hard label. The
    ground-truth labels are ignored.

    Args:
        label_smoothing: Label smoothing of the teacher's hard label (DeiT: 0, the default;
            the paper notes smoothing can be combined with it, e.g. 0.1).
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None) -> Tensor:
        _check_logits("hard", student_logits, teacher_logits)
        (s,) = _upcast(student_logits)
        return F.cross_entropy(s, teacher_logits.argmax(dim=-1), label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}"


@register_loss("dkd")
class DKD(LogitLoss):
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022, "Decoupled Knowledge
    Distillation").

    With ``p = softmax(z / T)`` and ``g`` the ground-truth class:

    * TCKD ``= KL(b_t || b_s)``, ``b = [p_g, 1 - p_g]`` (target vs. all non-target classes);
    * NCKD ``= KL(p~_t || p~_s)``, ``p~ = softmax`` of the logits without class ``g``;
    * loss ``= T**2 * (alpha * TCKD + beta * NCKD)``, both KLs averaged over the batch,

    as in the authors' code (mdistiller). Their linear warm-up of the loss weight over the
    first epochs is left to the training loop. Soft ``(B, K)`` labels (mixup) use their
    argmax as the target class.

    Args:
        alpha: Weight of TCKD (paper: 1).
        beta: Weight of NCKD (paper: 8 on CIFAR-100; 0.5 on ImageNet).
        temperature: Softening temperature ``T`` (paper: 4; 1 on ImageNet).

    Raises:
        ValueError: ``labels`` is None, or there are fewer than two classes.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None) -> Tensor:
        _check_logits("dkd", student_logits, teacher_logits)
        target = _class_labels("dkd", labels, student_logits)
        batch, classes = student_logits.shape
        if classes < 2:
            raise ValueError(f"dkd needs at least two classes; got logits of shape {_shape(student_logits)}")
        s, t = _upcast(student_logits, teacher_logits)
        s, t = s / self.temperature, t / self.temperature
        is_target = F.one_hot(target, classes).bool()

        def binary(logits: Tensor) -> Tensor:  # log [p_g, 1 - p_g], stable
            log_p = F.log_softmax(logits, dim=1)
            log_target = log_p.gather(1, target[:, None])
            log_rest = log_p.masked_fill(is_target, float("-inf")).logsumexp(dim=1, keepdim=True)
            return torch.cat([log_target, log_rest], dim=1)

        tckd = F.kl_div(binary(s), binary(t), reduction="batchmean", log_target=True)
        # The non-target classes in order, by index: a boolean mask would need torch.nonzero, which
        # waits for the device (and has no meta-device form for the plan check).
        positions = torch.arange(classes - 1, device=s.device).expand(batch, -1)
        others = positions + (positions >= target[:, None])
        s_rest, t_rest = s.gather(1, others), t.gather(1, others)
        nckd = F.kl_div(
            F.log_softmax(s_rest, dim=1), F.log_softmax(t_rest, dim=1), reduction="batchmean", log_target=True
        )
        return (self.alpha * tckd + self.beta * nckd) * self.temperature**2

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}"


def _pearson(x: Tensor, y: Tensor, dim: int, eps: float) -> Tensor:
    x = x - x.mean(dim=dim, keepdim=True)
    y = y - y.mean(dim=dim, keepdim=True)
    return (x * y).sum(dim=dim) / (x.norm(dim=dim) * y.norm(dim=dim)).clamp_min(eps)


@register_loss("dist")
class DIST(LogitLoss):
    """DIST (Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher").

    With ``Y = softmax(z / tau)`` of shape ``(B, K)`` and ``rho`` the Pearson correlation:

    * inter-class ``= 1 - mean_i rho(Y_s[i, :], Y_t[i, :])`` (per sample, over classes);
    * intra-class ``= 1 - mean_k rho(Y_s[:, k], Y_t[:, k])`` (per class, over the batch);
    * loss ``= tau**2 * (beta * inter + gamma * intra)``.

    A batch of one sample has no intra-class relation; that term is then 0.

    Args:
        beta: Weight of the inter-class relation (paper: 1).
        gamma: Weight of the intra-class relation (paper: 1).
        tau: Softening temperature (paper: 1).
        eps: Guards the correlation's denominator.
    """

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0, eps: float = 1e-8) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.beta = beta
        self.gamma = gamma
        self.tau = tau
        self.eps = eps

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None) -> Tensor:
        _check_logits("dist", student_logits, teacher_logits)
        s, t = _upcast(student_logits, teacher_logits)
        y_s = F.softmax(s / self.tau, dim=1)
        y_t = F.softmax(t / self.tau, dim=1)
        inter = 1 - _pearson(y_s, y_t, dim=1, eps=self.eps).mean()
        if s.shape[0] > 1:
            intra = 1 - _pearson(y_s, y_t, dim=0, eps=self.eps).mean()
        else:
            intra = inter * 0.0
        return self.tau**2 * (self.beta * inter + self.gamma * intra)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, tau={self.tau}"


# --------------------------------------------------------------------------- feature losses


@register_loss("stage_mse")
class StageWeightedMSE(FeatureLoss):
    """Stage-weighted feature MSE of HDKD (EL-Assiouti et al., Eq. 7).

    ``sum_j w_j * mean((s_j - t_j)**2)`` over the tapped pairs ``j = 1..n``, with
    ``w_j = j**alpha`` unless explicit ``weights`` are given. Deeper stages weigh more.
    Student and teacher features of a pair must have the same shape.

    Args:
        alpha: Exponent of the stage index.
        weights: Explicit per-pair weights; overrides ``alpha``.
    """

    def __init__(self, alpha: float = 1.0, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.alpha = alpha
        self.weights = None if weights is None else [float(w) for w in weights]

    def stage_weights(self, n: int) -> list[float]:
        """Returns the weight of each of ``n`` tapped pairs."""
        if self.weights is None:
            return [float(j) ** self.alpha for j in range(1, n + 1)]
        if len(self.weights) != n:
            raise ValueError(f"stage_mse has {len(self.weights)} weights but there are {n} tapped pairs")
        return self.weights

    def forward(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
        _check_pairs("stage_mse", student_feats, teacher_feats)
        weights = self.stage_weights(len(student_feats))
        total = 0.0
        for j, (w, s, t) in enumerate(zip(weights, student_feats, teacher_feats)):
            _check_same_shape("stage_mse", j, s, t)
            total = total + w * F.mse_loss(*_upcast(s, t))
        return total

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}" if self.weights is None else f"weights={self.weights}"


@register_loss("fitnet")
class FitNet(FeatureLoss):
    """FitNets hints (Romero et al., ICLR 2015, "FitNets: Hints for Thin Deep Nets").

    ``sum_j mean((r(s_j) - t_j)**2)``: the mean squared error of each (adapted) student hint
    and teacher feature, **summed** over the tapped pairs. The Distiller's adapter plays the
    paper's regressor ``r``. (The paper writes ``1/2 ||t - r(s)||^2``; like common
    implementations this averages over elements instead, so the scale does not depend on the
    feature size.)
    """

    def forward(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
        _check_pairs("fitnet", student_feats, teacher_feats)
        total = 0.0
        for j, (s, t) in enumerate(zip(student_feats, teacher_feats)):
            _check_same_shape("fitnet", j, s, t)
            total = total + F.mse_loss(*_upcast(s, t))
        return total

    def extra_repr(self) -> str:
        return "mean over elements, sum over pairs"


@register_loss("cosine")
class CosineFeature(FeatureLoss):
    """Cosine feature distance: ``sum_j mean_b (1 - cos(s_j[b], t_j[b]))``.

    Each sample's (aligned) feature is flattened to one vector; the loss is 0 when student
    and teacher features point the same way, whatever their norms.

    Args:
        eps: Guards the cosine's denominator.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
        _check_pairs("cosine", student_feats, teacher_feats)
        total = 0.0
        for j, (s, t) in enumerate(zip(student_feats, teacher_feats)):
            _check_same_shape("cosine", j, s, t)
            s, t = _upcast(s.flatten(1), t.flatten(1))
            total = total + (1 - F.cosine_similarity(s, t, dim=1, eps=self.eps)).mean()
        return total

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


@register_loss("at")
class AttentionTransfer(FeatureLoss):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to
    Attention").

    The spatial attention map of a feature is ``Q = mean_c |f_c|**p`` flattened and
    L2-normalised per sample (mean or sum over channels is the same after normalising). The
    loss is ``beta * sum_j mean((Q_s - Q_t)**2)``, the authors' code form (the paper's Eq. 2
    uses the unsquared norm). ``beta = 1000`` as in RepDistiller; Zagoruyko's own code weighs
    it by ``beta / 2 = 500``.

    Only the spatial size must match; channels may differ. NCHW ``(B, C, H, W)`` (or
    ``(B, C, *spatial)``) features map over ``H * W``; tokens ``(B, N, C)`` are a 1-D map over
    the ``N`` tokens. Vectors ``(B, C)`` have no spatial extent and are rejected.

    Args:
        p: Exponent of the activation magnitudes (paper: 2).
        beta: Weight of the loss (1000).
    """

    def __init__(self, p: float = 2.0, beta: float = 1000.0) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"p must be positive, got {p}")
        self.p = p
        self.beta = beta

    def attention(self, feat: Tensor) -> Tensor:
        """Returns the ``(B, positions)`` L2-normalised attention map of one feature."""
        (feat,) = _upcast(feat)
        power = feat.abs().pow(self.p)
        q = power.mean(dim=2) if feat.ndim == 3 else power.mean(dim=1).flatten(1)
        return F.normalize(q, dim=1)

    def forward(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
        _check_pairs("at", student_feats, teacher_feats)
        total = 0.0
        for j, (s, t) in enumerate(zip(student_feats, teacher_feats)):
            if s.ndim == 2 or t.ndim == 2:
                raise ValueError(
                    f"at, pair {j}: attention transfer needs spatial features (B, C, H, W) or tokens "
                    f"(B, N, C), not vectors; got student {_shape(s)} and teacher {_shape(t)}"
                )
            spatial_s = s.shape[1:2] if s.ndim == 3 else s.shape[2:]
            spatial_t = t.shape[1:2] if t.ndim == 3 else t.shape[2:]
            if s.ndim != t.ndim or spatial_s != spatial_t:
                raise ValueError(
                    f"at, pair {j}: student and teacher must have the same layout and spatial size "
                    f"(channels may differ); got student {_shape(s)} and teacher {_shape(t)}"
                )
            total = total + (self.attention(s) - self.attention(t)).pow(2).mean()
        return self.beta * total

    def extra_repr(self) -> str:
        return f"p={self.p}, beta={self.beta}"


@register_loss("sp")
class SimilarityPreserving(FeatureLoss):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019, "Similarity-Preserving Knowledge
    Distillation").

    For features flattened to ``F`` of shape ``(B, D)``: ``G = F F^T`` with each row
    L2-normalised, and ``loss = sum_j ||G_s - G_t||_F**2 / B**2``. Only the batch sizes must
    match (``requires_alignment = False``). Weigh it with the paper's ``gamma`` (3000 on
    CIFAR-10) outside.

    Args:
        eps: Guards the row normalisation.
    """

    requires_alignment: ClassVar[bool] = False

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = eps

    def gram(self, feat: Tensor) -> Tensor:
        """Returns the row-normalised ``(B, B)`` similarity matrix of one feature."""
        (f,) = _upcast(feat.flatten(1))
        return F.normalize(f @ f.T, dim=1, eps=self.eps)

    def forward(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
        _check_pairs("sp", student_feats, teacher_feats)
        total = 0.0
        for s, t in zip(student_feats, teacher_feats):
            g_s, g_t = _upcast(self.gram(s), self.gram(t))
            total = total + (g_s - g_t).pow(2).sum() / s.shape[0] ** 2
        return total

    def extra_repr(self) -> str:
        return f"eps={self.eps}, requires_alignment=False"


@register_loss("rkd")
class RKD(FeatureLoss):
    """Relational knowledge distillation (Park et al., CVPR 2019, "Relational Knowledge
    Distillation").

    On features flattened to ``(B, D)``:

    * distance-wise: ``psi_D(i, j) = ||x_i - x_j|| / mu`` with ``mu`` the mean distance over
      the ``i != j`` pairs; Huber (smooth L1, delta 1) between student and teacher ``psi_D``,
      averaged over the ``B x B`` matrix (diagonal included, as in the authors' code);
    * angle-wise: ``psi_A(i, j, k) = cos`` of the angle at ``x_i`` between ``x_j`` and ``x_k``
      (0 when ``j = i`` or ``k = i``); Huber averaged over the ``B x B x B`` tensor;
    * loss ``= sum_j (distance_weight * L_D + angle_weight * L_A)``.

    Everything is computed from the ``B x B`` Gram matrix of batch-centred features, so
    memory is ``O(B**3)`` rather than ``O(B**2 * D)``. A batch of one sample has no relations
    and gives 0. ``requires_alignment = False``.

    Args:
        distance_weight: Weight of the distance-wise term (paper: 25).
        angle_weight: Weight of the angle-wise term (paper: 50).
        eps: Floor of squared distances and of denominators.
    """

    requires_alignment: ClassVar[bool] = False

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, eps: float = 1e-12) -> None:
        super().__init__()
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight
        self.eps = eps

    def relations(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        """Returns ``psi_D`` ``(B, B)`` and ``psi_A`` ``(B, B, B)`` of one feature."""
        (x,) = _upcast(feat.flatten(1))
        batch = x.shape[0]
        x = x - x.mean(dim=0, keepdim=True)  # distances and angles are translation invariant
        gram = x @ x.T
        sq_norm = gram.diagonal()
        off_diag = ~torch.eye(batch, dtype=torch.bool, device=x.device)
        sq_dist = (sq_norm[:, None] + sq_norm[None, :] - 2 * gram).clamp_min(self.eps)
        dist = torch.where(off_diag, sq_dist.sqrt(), torch.zeros_like(sq_dist))
        psi_d = dist / (dist.sum() / (batch * (batch - 1))).clamp_min(self.eps)  # diagonal is 0
        # <x_j - x_i, x_k - x_i> = G_jk - G_ij - G_ik + G_ii, at index [i, j, k]
        dots = gram[None, :, :] - gram[:, :, None] - gram[:, None, :] + sq_norm[:, None, None]
        denom = (dist[:, :, None] * dist[:, None, :]).clamp_min(self.eps)
        valid = off_diag[:, :, None] & off_diag[:, None, :]
        psi_a = torch.where(valid, dots / denom, torch.zeros_like(dots))
        return psi_d, psi_a

    def forward(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
        _check_pairs("rkd", student_feats, teacher_feats)
        total = 0.0
        for s, t in zip(student_feats, teacher_feats):
            if s.shape[0] < 2:
                total = total + _zero_like_graph(s)
                continue
            d_s, a_s = self.relations(s)
            d_t, a_t = self.relations(t)
            d_s, d_t = _upcast(d_s, d_t)
            a_s, a_t = _upcast(a_s, a_t)
            if self.distance_weight:
                total = total + self.distance_weight * F.smooth_l1_loss(d_s, d_t)
            if self.angle_weight:
                total = total + self.angle_weight * F.smooth_l1_loss(a_s, a_t)
        if isinstance(total, float):  # both weights zero
            total = _zero_like_graph(student_feats[0])
        return total

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}, requires_alignment=False"


@register_loss("pkt")
class PKT(FeatureLoss):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018, "Learning Deep
    Representations with Probabilistic Knowledge Transfer").

    Features flattened to ``(B, D)`` are L2-normalised; the cosine kernel
    ``K_ij = (cos(x_i, x_j) + 1) / 2`` is turned into conditional probabilities
    ``P_ij = K_ij / sum_k K_ik`` (rows sum to 1), and
    ``loss = sum_pairs mean_ij P^t_ij * log((P^t_ij + eps) / (P^s_ij + eps))``, i.e.
    ``KL(P^t || P^s)`` summed over rows and divided by ``B**2``, as in the authors' code.
    ``requires_alignment = False``.

    Args:
        eps: Guards the normalisation and the logarithm (authors' code: 1e-7).
    """

    requires_alignment: ClassVar[bool] = False

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = eps

    def probabilities(self, feat: Tensor) -> Tensor:
        """Returns the ``(B, B)`` row-stochastic similarity matrix of one feature."""
        (x,) = _upcast(feat.flatten(1))
        x = x / (x.norm(dim=1, keepdim=True) + self.eps)
        kernel = (x @ x.T + 1) / 2
        return kernel / kernel.sum(dim=1, keepdim=True)

    def forward(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
        _check_pairs("pkt", student_feats, teacher_feats)
        total = 0.0
        for s, t in zip(student_feats, teacher_feats):
            p_s, p_t = _upcast(self.probabilities(s), self.probabilities(t))
            total = total + (p_t * torch.log((p_t + self.eps) / (p_s + self.eps))).mean()
        return total

    def extra_repr(self) -> str:
        return f"eps={self.eps}, requires_alignment=False"


@register_loss("cka")
class CKALoss(FeatureLoss):
    """``1 - `` linear centred kernel alignment (Kornblith et al., ICML 2019, "Similarity of
    Neural Network Representations Revisited").

    For features flattened to ``X, Y`` of shape ``(B, D_s), (B, D_t)`` and centred over the
    batch, ``CKA = ||Y^T X||_F**2 / (||X^T X||_F ||Y^T Y||_F)``, computed through the
    ``B x B`` Gram matrices ``K = X X^T, L = Y Y^T`` as ``<K, L>_F / (||K||_F ||L||_F)``.
    ``loss = sum_pairs (1 - CKA)``; it is 0 when the features agree up to an isotropic
    scaling and an orthogonal transform, and ``requires_alignment = False``. A batch of one
    sample has no centred signal and gives 0.

    Args:
        eps: Guards the Gram matrices' norms.
    """

    requires_alignment: ClassVar[bool] = False

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = eps

    def normalized_gram(self, feat: Tensor) -> Tensor:
        """Returns the centred Gram matrix of one feature divided by its Frobenius norm."""
        (x,) = _upcast(feat.flatten(1))
        x = x - x.mean(dim=0, keepdim=True)
        gram = x @ x.T
        return gram / gram.norm().clamp_min(self.eps)

    def forward(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
        _check_pairs("cka", student_feats, teacher_feats)
        total = 0.0
        for s, t in zip(student_feats, teacher_feats):
            if s.shape[0] < 2:
                total = total + _zero_like_graph(s)
                continue
            k_s, k_t = _upcast(self.normalized_gram(s), self.normalized_gram(t))
            total = total + (1 - (k_s * k_t).sum())
        return total

    def extra_repr(self) -> str:
        return f"eps={self.eps}, requires_alignment=False"
