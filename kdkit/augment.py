"""Batched transforms on the device: whole uint8 batches converted, resized, augmented and
normalised wherever they are.

Per-item transforms (:func:`kdkit.data.eval_transforms`) work on one image at a time in the
DataLoader, on the CPU. A :class:`BatchTransform` works on a whole batch at once, wherever the
batch is (a GPU after the copy, or the CPU), with any augmentation module in between, e.g. an
``nn.Sequential`` of :mod:`kornia.augmentation` modules, which give each image its own random
parameters. Feed it the uint8 batches of
:meth:`kdkit.data.ImageTensorDataset.as_uint8`: a quarter of the bytes of float32 to copy to the
device, and no per-image work left in the DataLoader.

Kornia's augmentations draw from torch's global random number generator, so
``torch.manual_seed`` (as the trainer does every epoch) makes them reproducible.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import kornia.augmentation as K
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["BatchTransform", "batch_eval_transforms"]


class BatchTransform(nn.Module):
    """uint8 or float batch in, float32 normalised batch at the training resolution out.

    In order: conversion to float32 in [0, 1], a resize to ``image_size x image_size`` (only
    when the batch has another size), the optional ``augmentation``, and normalisation. It holds
    no tensors tied to a device: it runs on the batch's device, the CPU, a GPU or ``meta``.
    Autocast is switched off inside, so the output is float32 also when called under it.

    Attributes:
        image_size: Side of the square output images.
        augmentation: Applied to the float batch in [0, 1] before normalisation, or None.
        normalize: ``kornia.augmentation.Normalize`` with the mean and standard deviation.
    """

    def __init__(
        self,
        image_size: int,
        augmentation: nn.Module | None = None,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        """Create the transform.

        Args:
            image_size: Side of the square output images.
            augmentation: A module on float ``B x 3 x H x W`` batches in [0, 1], e.g. an
                ``nn.Sequential`` of kornia augmentations; None for evaluation.
            mean: Per-channel mean of the normalisation.
            std: Per-channel standard deviation of the normalisation.

        Raises:
            ValueError: ``image_size`` is not positive, or ``mean``/``std`` do not have 3 entries.
        """
        super().__init__()
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need one entry per RGB channel, got {list(mean)} and {list(std)}")
        self.image_size = image_size
        self.augmentation = augmentation
        # Kornia keeps these on the CPU and copies them to the batch's device on each call.
        self.normalize = K.Normalize(mean=torch.tensor(list(mean)), std=torch.tensor(list(std)))

    def forward(self, images: Tensor) -> Tensor:
        """Transform a batch.

        Args:
            images: ``B x 3 x H x W``, uint8 or floating point in [0, 1].

        Returns:
            float32 ``B x 3 x image_size x image_size``, normalised, on the input's device.

        Raises:
            ValueError: Not a ``B x 3 x H x W`` batch, or neither uint8 nor floating point.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a B x 3 x H x W batch, got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            images = images.to(torch.float32).div_(255)
        elif images.is_floating_point():
            images = images.to(torch.float32)
        else:
            raise ValueError(f"expected uint8 or floating-point images, got {images.dtype}")
        with _autocast_off(images.device):
            images = self._resize(images)
            if self.augmentation is not None:
                images = self.augmentation(images)
            return self.normalize(images)

    def _resize(self, images: Tensor) -> Tensor:
        size = (self.image_size, self.image_size)
        if tuple(images.shape[-2:]) == size:
            return images
        # torch's antialiased bilinear resize is what torchvision's Resize(antialias=True) calls;
        # kornia's Resize antialiases with its own Gaussian pre-blur and gives other pixels.
        return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}"


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    # torch.amp.is_autocast_available is new in torch 2.4; before it, CPU and CUDA had autocast.
    is_available = getattr(torch.amp, "is_autocast_available", lambda kind: kind in ("cpu", "cuda"))
    if is_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()  # e.g. "meta", which has no autocast


def batch_eval_transforms(
    image_size: int,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> BatchTransform:
    """:func:`kdkit.data.eval_transforms` for whole batches: resize (if needed), float, normalise.

    Without a resize the output equals the per-item pipeline's; with one, pixels may differ by
    a grey level, as the resize runs on float32 rather than on uint8.

    Args:
        image_size: Side of the square output images.
        mean: Per-channel mean of the normalisation.
        std: Per-channel standard deviation of the normalisation.

    Returns:
        A module from uint8 (or float in [0, 1]) ``B x 3 x H x W`` batches to normalised float32
        ones, on the batch's device.
    """
    return BatchTransform(image_size, None, mean, std)
