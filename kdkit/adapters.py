"""Adapters that map a student feature onto the shape of its teacher feature.

Feature layouts are told apart by rank: ``(B, C, H, W)`` maps, ``(B, N, C)`` tokens and
``(B, C)`` vectors. :func:`build_alignment` composes parameter-free reshapes (tokens to a
grid, resizing, pooling) with one learnable channel projection taken from the adapter
registry, so a user can plug in a different projection with :func:`register_adapter`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .registry import Registry

__all__ = [
    "ADAPTERS",
    "Alignment",
    "Resize",
    "TokensToGrid",
    "build_alignment",
    "register_adapter",
    "token_grid",
]

ADAPTERS: Registry[nn.Module] = Registry("adapter")
"""Every registered channel-projection factory, by name."""
register_adapter = ADAPTERS.register
"""Registers a channel projection ``factory(in_channels, out_channels, layout) -> nn.Module``,
where ``layout`` is ``"map"`` (NCHW) or ``"tokens"``/``"vector"`` (channels last)."""


@register_adapter("conv1x1")
def _conv1x1(in_channels: int, out_channels: int, layout: str) -> nn.Module:
    """A 1x1 convolution on maps (the FitNets regressor), a linear layer otherwise."""
    if layout == "map":
        return nn.Conv2d(in_channels, out_channels, kernel_size=1)
    return nn.Linear(in_channels, out_channels)


@register_adapter("conv1x1_bn")
def _conv1x1_bn(in_channels: int, out_channels: int, layout: str) -> nn.Module:
    """A 1x1 convolution followed by BatchNorm on maps, linear + LayerNorm otherwise."""
    if layout == "map":
        return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
    return nn.Sequential(nn.Linear(in_channels, out_channels, bias=False), nn.LayerNorm(out_channels))


@register_adapter("conv3x3_bn")
def _conv3x3_bn(in_channels: int, out_channels: int, layout: str) -> nn.Module:
    """A 3x3 convolution with BatchNorm and ReLU on maps; linear otherwise."""
    if layout == "map":
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()
        )
    return nn.Linear(in_channels, out_channels)


class TokensToGrid(nn.Module):
    """``(B, N, C)`` tokens to a ``(B, C, H, W)`` map, dropping the leading prefix tokens."""

    def __init__(self, num_prefix_tokens: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.grid = grid

    def forward(self, x: Tensor) -> Tensor:
        return rearrange(x[:, self.num_prefix_tokens :], "b (h w) c -> b c h w", h=self.grid[0], w=self.grid[1])

    def extra_repr(self) -> str:
        return f"num_prefix_tokens={self.num_prefix_tokens}, grid={self.grid}"


class Resize(nn.Module):
    """Bilinear resizing of ``(B, C, H, W)`` maps to a fixed spatial size."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class _GlobalPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=tuple(range(2, x.ndim))) if x.ndim == 4 else x.mean(dim=1)


def token_grid(num_tokens: int, num_prefix_tokens: int | None, role: str, path: str) -> tuple[int, tuple[int, int]]:
    """Returns ``(prefix_tokens, (H, W))`` laying ``num_tokens`` out on a square grid.

    Args:
        num_tokens: Tokens per sample, prefix (class/distillation) tokens included.
        num_prefix_tokens: Known prefix count (timm's ``num_prefix_tokens``); tried as 0, 1, 2 if None.
        role: ``"student"``, ``"teacher"`` or ``"model"``, for the error message.
        path: The tapped module's path, for the error message.

    Raises:
        ValueError: No candidate prefix leaves a square number of tokens.
    """
    candidates = [num_prefix_tokens] if num_prefix_tokens is not None else [0, 1, 2]
    for prefix in candidates:
        side = math.isqrt(num_tokens - prefix)
        if side * side == num_tokens - prefix:
            return prefix, (side, side)
    raise ValueError(
        f"cannot lay the {num_tokens} tokens of {role} tap {path!r} out on a square grid "
        f"(prefix tokens tried: {candidates}); give the model a `num_prefix_tokens` attribute"
    )


def _onto_grid(
    shape: tuple[int, ...], prefix_tokens: int | None, role: str, path: str, steps: list[nn.Module]
) -> tuple[int, tuple[int, ...]]:
    """Appends the reshape a feature needs to become a map; returns its channels and size."""
    if len(shape) == 3:
        prefix, grid = token_grid(shape[1], prefix_tokens, role, path)
        steps.append(TokensToGrid(prefix, grid))
        return shape[2], grid
    return shape[1], tuple(shape[2:])


@dataclass
class Alignment:
    """How one tapped pair is brought to a common shape.

    Attributes:
        student: Applied to the student feature (learnable when channels differ), or ``None``.
        teacher: A parameter-free reshape of the teacher feature, or ``None``.
    """

    student: nn.Module | None
    teacher: nn.Module | None


def build_alignment(
    student_shape: tuple[int, ...],
    teacher_shape: tuple[int, ...],
    *,
    student_path: str,
    teacher_path: str,
    student_prefix_tokens: int | None = None,
    teacher_prefix_tokens: int | None = None,
    projection: str | Callable[[int, int, str], nn.Module] = "conv1x1",
) -> Alignment:
    """Builds the modules that map a student feature onto its teacher feature's shape.

    Args:
        student_shape: Shape of the student feature, batch first.
        teacher_shape: Shape of the teacher feature, batch first.
        student_path: Module path of the student tap, for error messages.
        teacher_path: Module path of the teacher tap, for error messages.
        student_prefix_tokens: Class/distillation tokens ahead of the patch tokens; inferred
            from the token count when ``None``.
        teacher_prefix_tokens: The same for the teacher.
        projection: Registered adapter name or factory for the channel projection.

    Returns:
        The `Alignment`; both sides are ``None`` when the shapes already agree.

    Raises:
        ValueError: The layouts cannot be aligned (e.g. a vector against a map).
    """
    if tuple(student_shape[1:]) == tuple(teacher_shape[1:]):
        return Alignment(None, None)
    make_projection = ADAPTERS.get(projection) if isinstance(projection, str) else projection
    student_steps: list[nn.Module] = []
    teacher_steps: list[nn.Module] = []
    s_rank, t_rank = len(student_shape), len(teacher_shape)

    def fail(reason: str) -> ValueError:
        return ValueError(
            f"cannot align student tap {student_path!r} {tuple(student_shape)} with teacher tap "
            f"{teacher_path!r} {tuple(teacher_shape)}: {reason}"
        )

    if s_rank not in (2, 3, 4) or t_rank not in (2, 3, 4):
        raise fail("features must be (B, C), (B, N, C) or (B, C, H, W)")

    if t_rank == 2:  # a vector target: pool the student down to one vector per sample
        if s_rank != 2:
            student_steps.append(_GlobalPool())
        s_channels = student_shape[1] if s_rank != 3 else student_shape[2]
        if s_channels != teacher_shape[1]:
            student_steps.append(make_projection(s_channels, teacher_shape[1], "vector"))
        return Alignment(nn.Sequential(*student_steps), None)
    if s_rank == 2:
        raise fail("a student vector cannot be expanded to a map or tokens")

    if s_rank == 3 and t_rank == 3 and student_shape[1] == teacher_shape[1]:
        return Alignment(make_projection(student_shape[2], teacher_shape[2], "tokens"), None)

    # Everything else meets on the (B, C, H, W) grid.
    s_channels, s_size = _onto_grid(student_shape, student_prefix_tokens, "student", student_path, student_steps)
    t_channels, t_size = _onto_grid(teacher_shape, teacher_prefix_tokens, "teacher", teacher_path, teacher_steps)
    if s_channels != t_channels:
        student_steps.append(make_projection(s_channels, t_channels, "map"))
    if s_size != t_size:
        student_steps.append(Resize(t_size))
    return Alignment(
        nn.Sequential(*student_steps) if student_steps else None,
        nn.Sequential(*teacher_steps) if teacher_steps else None,
    )
