"""Where a model looks: class-activation maps, activation maps of tapped stages, and how much
two models agree.

Three kinds of map, each ``(B, H, W)`` at the input's size and scaled to ``[0, 1]`` per image:

* :func:`class_activation_maps`: class-specific maps (Grad-CAM, Score-CAM and the other
  methods in :data:`CAM_METHODS`) computed by the ``grad-cam`` package;
* :func:`channel_mean_maps`: the channel-averaged activation of one tapped stage, the maps of
  the HDKD paper's Figure 5 (not class-specific);
* :func:`compare_maps`: either kind for several models (a teacher and its students) on the
  same images.

Token outputs ``(B, N, C)`` of transformer blocks (timm ViTs, HDKD's DFLT stage) are laid back
out on their square patch grid after dropping the class/distillation tokens, so the same calls
work for CNNs and token models. :func:`map_agreement` and :func:`agreement_by_class` turn "the
student looks where the teacher looks" into numbers.
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
import tqdm
from torch import Tensor, nn

from .adapters import TokensToGrid, token_grid
from .outputs import mean_of_heads
from .taps import FeatureTaps, Selector, resolve_selector, unwrap_model

__all__ = [
    "ACTIVATION_METHOD",
    "CAM_METHODS",
    "agreement_by_class",
    "channel_mean_maps",
    "class_activation_maps",
    "compare_maps",
    "feature_stage",
    "map_agreement",
]

logger = logging.getLogger(__name__)

CAM_METHODS: dict[str, str] = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
    "scorecam": "ScoreCAM",
    "eigencam": "EigenCAM",
}
"""The methods of :func:`class_activation_maps`: name -> class of the ``grad-cam`` package.

Score-CAM runs the model once per channel of the target layer for every image, so it costs
hundreds of forward passes per image; the gradient methods cost one forward and one backward
pass; EigenCAM (the first principal component of the activations) is not class-specific."""

ACTIVATION_METHOD = "activation"
"""The name :func:`compare_maps` gives :func:`channel_mean_maps`."""


# --------------------------------------------------------------------------- helpers


def _as_grid(feature: Tensor, num_prefix_tokens: int | None, path: str) -> Tensor:
    if feature.ndim == 4:
        return feature
    if feature.ndim != 3:
        raise ValueError(f"activation maps need (B, C, H, W) maps or (B, N, C) tokens, {path!r} gave {tuple(feature.shape)}")
    prefix, grid = token_grid(feature.shape[1], num_prefix_tokens, "model", path)
    return TokensToGrid(prefix, grid)(feature)


def _min_max(maps: Tensor) -> Tensor:
    flat = maps.flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    return (maps - low[:, None, None]) / (high - low).clamp_min(1e-12)[:, None, None]


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, C, H, W) tensor, got {shape}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch")


def _on_model_device(model: nn.Module, images: Tensor) -> Tensor:
    """``images`` on the device (and in the floating dtype) of the model's parameters.

    Figures are drawn from CPU images while the models trained on a GPU; a model without
    parameters takes the images as they are.
    """
    parameter = next(model.parameters(), None)
    if parameter is None:
        return images
    dtype = parameter.dtype if parameter.is_floating_point() and images.is_floating_point() else images.dtype
    return images.to(device=parameter.device, dtype=dtype, non_blocking=True)


@contextmanager
def _model_left_as_found(model: nn.Module) -> Iterator[None]:
    """Restores every module's train/eval flag and every parameter's ``requires_grad`` and ``.grad``.

    The CAM classes switch the model to eval mode and clear gradients; a model explained in the
    middle of training (or a frozen teacher) must come back exactly as it was.
    """
    modes = [(module, module.training) for module in model.modules()]
    parameters = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        for parameter, requires_grad, grad in parameters:
            parameter.requires_grad_(requires_grad)
            parameter.grad = grad


def _one_module_path(model: nn.Module, selector: Selector, requirement: str) -> str:
    """Resolves a selector that must name exactly one module; negative path indices count from the end."""
    if isinstance(selector, str):
        selector = _positive_indices(unwrap_model(model), selector)
    paths = resolve_selector(model, selector)
    if len(paths) != 1:
        raise ValueError(f"{requirement}, {selector!r} selects {len(paths)} modules: {paths}")
    return paths[0]


def _positive_indices(model: nn.Module, selector: str) -> str:
    """``"blocks.-1.norm1"`` -> ``"blocks.11.norm1"`` on a 12-block model.

    A path that does not walk (a glob, a missing name) is returned unchanged, so that
    :func:`~kdkit.taps.resolve_selector` reports it with its own message.
    """
    module, parts = model, []
    for part in selector.split("."):
        if part.startswith("-") and part[1:].isdigit():
            children = [name for name, _ in module.named_children()]
            if not 0 < int(part[1:]) <= len(children):
                raise ValueError(f"index {part} in {selector!r} is out of range: {'.'.join(parts) or 'the model'} has {len(children)} children")
            part = children[int(part)]
        child = dict(module.named_children()).get(part)
        if child is None:
            return selector
        module = child
        parts.append(part)
    return ".".join(parts)


class _Logits(nn.Module):
    """The model with its output reduced to one ``(B, classes)`` logit tensor (mean of CLS and distillation heads)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        logits = mean_of_heads(self.model(images))
        if logits.ndim != 2:
            raise ValueError(f"a class-activation map needs (B, classes) logits, the model returned {tuple(logits.shape)}")
        return logits.float()


class _ClassScore:
    """The logit of one class: the score a map explains (the ``grad-cam`` target protocol)."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __call__(self, logits: Tensor) -> Tensor:
        if self.index >= logits.shape[-1]:
            raise ValueError(f"target class {self.index} is out of range for a model with {logits.shape[-1]} classes")
        return logits[..., self.index]


def _class_targets(targets: Tensor | Sequence[int] | None, batch: int) -> list[int] | None:
    if targets is None:
        return None
    indices = [int(t) for t in torch.as_tensor(targets).flatten().tolist()]
    if len(indices) != batch:
        raise ValueError(f"targets must hold one class index per image: {len(indices)} targets for {batch} images")
    if any(index < 0 for index in indices):
        raise ValueError(f"target class indices must be non-negative, got {indices}")
    return indices


def _cam_class(method: str) -> type:
    try:
        import pytorch_grad_cam
    except ImportError as error:
        raise ImportError("class-activation maps need the grad-cam package: pip install 'kdkit[explain]'") from error
    return getattr(pytorch_grad_cam, CAM_METHODS[method])


@contextmanager
def _quiet_score_cam() -> Iterator[None]:
    # ScoreCAM draws one tqdm bar per image; in a log of thousands of images that is noise.
    import pytorch_grad_cam.score_cam

    if not hasattr(pytorch_grad_cam.score_cam, "tqdm"):
        yield
        return
    silent = types.SimpleNamespace(tqdm=functools.partial(tqdm.tqdm, disable=True))
    with mock.patch.object(pytorch_grad_cam.score_cam, "tqdm", silent):
        yield


# --------------------------------------------------------------------------- maps


def feature_stage(model: nn.Module, *, max_reduction: int | None = None) -> str:
    """Returns the path of the deepest timm ``feature_info`` stage within a stride limit.

    Class-activation maps are usually taken at the last convolutional stage; at the low
    resolutions of CPU training that stage (stride 32) is 2x2 at 64 px, too coarse to compare
    models, so ``max_reduction=16`` picks the deepest stage of at most stride 16 instead.

    Args:
        model: A timm model (any model with a ``feature_info`` list).
        max_reduction: Largest stride (input size / map size) allowed; ``None`` for the last stage.

    Raises:
        ValueError: The model has no ``feature_info``, or no stage is fine enough.
    """
    info = getattr(unwrap_model(model), "feature_info", None)
    if info is None:
        raise ValueError(f"{type(unwrap_model(model)).__name__} has no timm `feature_info`; name the target layer instead")
    entries = info.info if hasattr(info, "info") else info
    stages = [entry for entry in entries if max_reduction is None or entry["reduction"] <= max_reduction]
    if not stages:
        strides = [entry["reduction"] for entry in entries]
        raise ValueError(f"{type(unwrap_model(model)).__name__} has no feature stage of stride <= {max_reduction} (strides: {strides})")
    return stages[-1]["module"]


def class_activation_maps(
    model: nn.Module,
    images: Tensor,
    *,
    target_layer: Selector,
    method: str = "gradcam",
    targets: Tensor | Sequence[int] | None = None,
    batch_size: int = 16,
    num_prefix_tokens: int | None = None,
) -> Tensor:
    """Computes class-activation maps of one model with the ``grad-cam`` package.

    The model may be a CNN or a token model: a target layer that outputs ``(B, N, C)`` tokens
    has its prefix (class/distillation) tokens dropped and the rest laid out on the square patch
    grid; a 4-D output is read as ``(B, C, H, W)`` (tap a channels-first module of models that
    keep maps channels-last). A model returning a tuple of heads (a distilled student in training) is explained
    through the mean of its heads. The model is left as found: same train/eval flags, same
    ``requires_grad`` and ``.grad`` on every parameter, no hook behind; frozen models work.

    Args:
        model: A classifier returning ``(B, classes)`` logits (or a tuple of them).
        images: ``(B, C, H, W)`` images, normalised as the model expects.
        target_layer: Selector naming one module (see :mod:`kdkit.taps`), e.g. ``"layer3"``,
            ``"stages.2"`` or ``"blocks.-1.norm1"`` (negative indices count from the end).
            For a ViT whose head reads the class token, take ``norm1`` of the last block: the
            last block's own output patch tokens do not reach the head.
        method: A key of :data:`CAM_METHODS` (``"gradcam"``, ``"scorecam"``, ...).
        targets: Class index to explain for each image (e.g. the labels); ``None`` explains
            each image's predicted class.
        batch_size: Images per pass; Score-CAM also scores its masked copies in batches of this size.
        num_prefix_tokens: Class/distillation tokens ahead of the patch tokens; default: the
            model's ``num_prefix_tokens`` attribute, else inferred from the token count.

    Returns:
        ``(B, H, W)`` float32 maps on the CPU, each scaled to ``[0, 1]``; a map with no
        positive evidence for its class is all zeros.

    Raises:
        ValueError: Unknown method, a selector naming zero or several modules, a target layer
            whose output is neither a map nor tokens, logits that are not ``(B, classes)``,
            targets of the wrong length or out of range.
        ImportError: The ``grad-cam`` package is not installed.
    """
    if method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {sorted(CAM_METHODS)}")
    _check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    class_indices = _class_targets(targets, images.shape[0])
    images = _on_model_device(model, images)
    path = _one_module_path(model, target_layer, "a class-activation map needs one target layer")
    layer = unwrap_model(model).get_submodule(path)
    prefix = num_prefix_tokens if num_prefix_tokens is not None else getattr(unwrap_model(model), "num_prefix_tokens", None)

    def onto_grid(feature: Tensor) -> Tensor:
        # Applied by grad-cam to the layer's activations and gradients; numpy needs float32.
        return _as_grid(feature.float(), prefix, path)

    cam_class = _cam_class(method)
    chunks = []
    with _model_left_as_found(model), _quiet_score_cam():
        # Gradients are needed with respect to the activations only: frozen weights make the
        # backward pass cheaper, and a grad-requiring input makes it work for frozen teachers.
        model.requires_grad_(False)
        cam = cam_class(model=_Logits(model), target_layers=[layer], reshape_transform=onto_grid)
        cam.batch_size = batch_size  # Score-CAM's batch of masked images
        try:
            for start in range(0, images.shape[0], batch_size):
                batch = images[start : start + batch_size].detach().requires_grad_(cam.uses_gradients)
                batch_targets = None if class_indices is None else [_ClassScore(i) for i in class_indices[start : start + batch_size]]
                with torch.enable_grad():
                    chunks.append(torch.from_numpy(np.ascontiguousarray(cam(input_tensor=batch, targets=batch_targets))))
        finally:
            cam.activations_and_grads.release()
    maps = torch.cat(chunks).float().clamp_(0.0, 1.0)
    flat = int((maps.flatten(1).amax(dim=1) == 0).sum())
    if flat:
        logger.warning(
            "%s at %r: %d of %d maps are all zero (no positive evidence for the explained class)",
            method, path, flat, maps.shape[0],
        )
    return maps


@torch.no_grad()
def channel_mean_maps(model: nn.Module, images: Tensor, tap: Selector, *, normalise: bool = True) -> Tensor:
    """Returns the channel-averaged activation of one tapped module, at the input's size.

    Args:
        model: Any model; it is run in eval mode and left in the mode it had.
        images: ``(B, 3, H, W)`` normalised images.
        tap: A selector resolving to exactly one module (e.g. ``"stages.2"``; negative path
            indices count from the end, e.g. ``"blocks.-1"``).
        normalise: Min-max normalise each map to ``[0, 1]``.

    Returns:
        ``(B, H, W)`` float32 maps on the CPU (the images may be on any device: they are run
        on the model's).
    """
    _check_images(images)
    path = _one_module_path(model, tap, "an activation map needs one tapped module")
    with _model_left_as_found(model):
        model.eval()
        with FeatureTaps(model, [path], "model") as taps:
            with taps.capture():
                model(_on_model_device(model, images))
            (feature,) = taps.collect()
    grid = _as_grid(feature.float(), getattr(unwrap_model(model), "num_prefix_tokens", None), path)
    maps = F.interpolate(grid.mean(dim=1, keepdim=True), size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return (_min_max(maps) if normalise else maps).cpu()


def compare_maps(
    models: Mapping[str, nn.Module],
    images: Tensor,
    *,
    layers: Mapping[str, Selector],
    method: str = "gradcam",
    targets: Tensor | Sequence[int] | None = None,
    batch_size: int = 16,
) -> dict[str, Tensor]:
    """Computes one kind of map for several models on the same images.

    Args:
        models: Name -> model, e.g. ``{"teacher": teacher, "student": student}``.
        images: ``(B, C, H, W)`` images, normalised as every model expects.
        layers: Name -> selector of the layer to explain on that model.
        method: A key of :data:`CAM_METHODS`, or ``"activation"`` for :func:`channel_mean_maps`.
        targets: Class to explain per image, the same for every model (so that the maps answer
            the same question); ``None`` explains each model's own prediction. Ignored by
            ``"activation"``.
        batch_size: Images per pass.

    Returns:
        Name -> ``(B, H, W)`` maps in ``[0, 1]``, in the order of ``models``.

    Raises:
        ValueError: A model without a layer, or an unknown method.
    """
    if missing := [name for name in models if name not in layers]:
        raise ValueError(f"no target layer for models {missing}; layers are given for {sorted(layers)}")
    if method != ACTIVATION_METHOD and method not in CAM_METHODS:
        raise ValueError(f"unknown map method {method!r}; choose {ACTIVATION_METHOD!r} or one of {sorted(CAM_METHODS)}")
    maps = {}
    for name, model in models.items():
        if method == ACTIVATION_METHOD:
            maps[name] = torch.cat(
                [channel_mean_maps(model, images[i : i + batch_size], layers[name]).cpu() for i in range(0, len(images), batch_size)]
            )
        else:
            maps[name] = class_activation_maps(
                model, images, target_layer=layers[name], method=method, targets=targets, batch_size=batch_size
            )
    return maps


# --------------------------------------------------------------------------- agreement


def map_agreement(maps_a: Tensor, maps_b: Tensor, *, top_fraction: float = 0.2) -> dict[str, Tensor]:
    """Measures how much two sets of maps agree, per image.

    Args:
        maps_a: ``(B, H, W)`` maps.
        maps_b: ``(B, H, W)`` maps of the same images.
        top_fraction: Share of pixels forming each map's "hot" region for the IoU.

    Returns:
        ``{"pearson": (B,), "top_iou": (B,)}``: the Pearson correlation of the two maps, and
        the intersection over union of their top ``top_fraction`` regions.
    """
    if maps_a.shape != maps_b.shape or maps_a.ndim != 3:
        raise ValueError(f"map_agreement needs two (B, H, W) tensors of one shape, got {tuple(maps_a.shape)} and {tuple(maps_b.shape)}")
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must lie in (0, 1], got {top_fraction}")
    a, b = maps_a.flatten(1).double(), maps_b.flatten(1).double()
    a_c, b_c = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    pearson = (a_c * b_c).sum(1) / (a_c.norm(dim=1) * b_c.norm(dim=1)).clamp_min(1e-12)
    k = max(1, round(top_fraction * a.shape[1]))
    top_a = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, dim=1).indices, True)
    top_b = torch.zeros_like(b, dtype=torch.bool).scatter_(1, b.topk(k, dim=1).indices, True)
    iou = (top_a & top_b).sum(1).double() / (top_a | top_b).sum(1).double()
    return {"pearson": pearson.float(), "top_iou": iou.float()}


def _summary(values: Tensor) -> tuple[float | None, float | None]:
    if values.numel() == 0:
        return None, None
    spread = values.double().std().item() if values.numel() > 1 else 0.0
    return values.double().mean().item(), spread


def _agreement_row(pearson: Tensor, top_iou: Tensor, flat: Tensor) -> dict[str, float | int | None]:
    keep = ~flat
    pearson_mean, pearson_std = _summary(pearson[keep])
    iou_mean, iou_std = _summary(top_iou[keep])
    return {
        "pearson_mean": pearson_mean,
        "pearson_std": pearson_std,
        "top_iou_mean": iou_mean,
        "top_iou_std": iou_std,
        "images": int(keep.sum()),
        "flat_maps": int(flat.sum()),
    }


def agreement_by_class(
    reference_maps: Tensor,
    maps: Tensor,
    labels: Tensor | Sequence[int],
    class_names: Sequence[str],
    *,
    top_fraction: float = 0.2,
) -> dict[str, object]:
    """Agreement of ``maps`` with ``reference_maps`` (e.g. a student's with its teacher's), per class.

    Built on :func:`map_agreement`. An image where either map is flat (constant, e.g. a
    Grad-CAM with no positive evidence) has no defined correlation or hot region: it is left
    out of the means and counted in ``flat_maps``.

    Args:
        reference_maps: ``(B, H, W)`` maps of the reference model.
        maps: ``(B, H, W)`` maps of the compared model on the same images.
        labels: True class index of each image.
        class_names: Name of every class, indexed by label.
        top_fraction: Share of pixels forming each map's hot region for the IoU.

    Returns:
        ``{"per_class": {name: row}, "overall": row}``, where a row is ``{"pearson_mean",
        "pearson_std", "top_iou_mean", "top_iou_std", "images", "flat_maps"}``: means and sample
        standard deviations over the ``images`` compared (``None`` when there are none).

    Raises:
        ValueError: Maps of different shapes, a label per image missing, or a label without a name.
    """
    agreement = map_agreement(reference_maps, maps, top_fraction=top_fraction)
    labels = torch.as_tensor(labels).flatten().long().cpu()
    if labels.numel() != reference_maps.shape[0]:
        raise ValueError(f"{labels.numel()} labels for {reference_maps.shape[0]} maps")
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < len(class_names):
        raise ValueError(f"labels range over [{int(labels.min())}, {int(labels.max())}] but there are {len(class_names)} class names")

    def is_flat(batch: Tensor) -> Tensor:
        flat_view = batch.flatten(1)
        return (flat_view.amax(dim=1) - flat_view.amin(dim=1)) <= 1e-12

    flat = (is_flat(reference_maps) | is_flat(maps)).cpu()
    pearson, top_iou = agreement["pearson"].cpu(), agreement["top_iou"].cpu()
    per_class = {
        name: _agreement_row(pearson[labels == index], top_iou[labels == index], flat[labels == index])
        for index, name in enumerate(class_names)
    }
    return {"per_class": per_class, "overall": _agreement_row(pearson, top_iou, flat)}
