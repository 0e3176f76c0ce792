"""Where a model looks: activation maps of tapped stages, and how much two models agree.

The HDKD paper's Figure 5 compares the stage-3 activation maps, averaged over channels, of
the teacher, the student alone and the distilled student. :func:`channel_mean_maps` computes
those maps for any model (CNN maps, or transformer tokens laid back out on their grid), and
:func:`map_agreement` turns "the student looks where the teacher looks" into numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapters import TokensToGrid, token_grid
from .taps import FeatureTaps, Selector, resolve_selector, unwrap_model

__all__ = ["channel_mean_maps", "map_agreement"]


def _as_grid(feature: Tensor, num_prefix_tokens: int | None, path: str) -> Tensor:
    if feature.ndim == 4:
        return feature
    if feature.ndim != 3:
        raise ValueError(f"activation maps need (B, C, H, W) maps or (B, N, C) tokens, {path!r} gave {tuple(feature.shape)}")
    prefix, grid = token_grid(feature.shape[1], num_prefix_tokens, "model", path)
    return TokensToGrid(prefix, grid)(feature)


@torch.no_grad()
def channel_mean_maps(model: nn.Module, images: Tensor, tap: Selector, *, normalise: bool = True) -> Tensor:
    """Returns the channel-averaged activation of one tapped module, at the input's size.

    Args:
        model: Any model; it is run in eval mode and left in the mode it had.
        images: ``(B, 3, H, W)`` normalised images.
        tap: A selector resolving to exactly one module (e.g. ``"stages.2"``).
        normalise: Min-max normalise each map to ``[0, 1]``.

    Returns:
        ``(B, H, W)`` float maps.
    """
    paths = resolve_selector(model, tap)
    if len(paths) != 1:
        raise ValueError(f"an activation map needs one tapped module, {tap!r} selects {paths}")
    was_training = model.training
    model.eval()
    try:
        with FeatureTaps(model, paths, "model") as taps:
            with taps.capture():
                model(images)
            (feature,) = taps.collect()
    finally:
        model.train(was_training)
    grid = _as_grid(feature.float(), getattr(unwrap_model(model), "num_prefix_tokens", None), paths[0])
    maps = F.interpolate(grid.mean(dim=1, keepdim=True), size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    if normalise:
        flat = maps.flatten(1)
        low, high = flat.min(dim=1).values, flat.max(dim=1).values
        maps = (maps - low[:, None, None]) / (high - low).clamp_min(1e-12)[:, None, None]
    return maps


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
