"""The HDKD paper's training augmentations, per image in the loader or batched on the device.

:func:`hdkd_train_transforms` augments one uint8 image at a time (torchvision ``transforms.v2``,
in the DataLoader, on the CPU). :func:`batch_hdkd_train_transforms` runs the same augmentations
on a whole uint8 batch wherever it is (a GPU after the copy, or the CPU), each image with its
own random draw, built on :mod:`kornia.augmentation` inside a :class:`kdkit.augment.BatchTransform`.
Evaluation needs no paper-specific step: :func:`kdkit.data.eval_transforms` and
:func:`kdkit.augment.batch_eval_transforms` resize, convert and normalise.

Both draw from torch's global random number generator, so ``torch.manual_seed`` (as the trainer
does every epoch) makes them reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import kornia.augmentation as K
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torchvision.transforms import v2

from kdkit.augment import BatchTransform

__all__ = ["batch_hdkd_train_transforms", "hdkd_train_transforms"]


def hdkd_train_transforms(
    image_size: int,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> v2.Compose:
    """The HDKD paper's training augmentations for uint8 ``C x H x W`` tensors.

    Resize, random rotation up to 180 degrees, horizontal and vertical flips, colour jitter
    (brightness and contrast 0.3), random sharpness (factor 2, p 0.5), Gaussian blur
    (kernel 3), then conversion to float in [0, 1] and normalisation.
    """
    return v2.Compose(
        [
            v2.Resize((image_size, image_size), antialias=True),
            v2.RandomRotation(degrees=180),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.ColorJitter(brightness=0.3, contrast=0.3),
            v2.RandomAdjustSharpness(sharpness_factor=2, p=0.5),
            v2.GaussianBlur(kernel_size=3),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def _paper_augmentation() -> nn.Sequential:
    """The augmentations of :func:`hdkd_train_transforms` after its resize, as kornia modules."""
    return nn.Sequential(
        # torchvision's RandomRotation(180) default: nearest, zero fill, about the image centre;
        # kornia's align_corners=True rotates about the same centre (pixel (W - 1) / 2).
        K.RandomRotation(degrees=180.0, resample="nearest", align_corners=True, p=1.0),
        K.RandomHorizontalFlip(p=0.5),
        K.RandomVerticalFlip(p=0.5),
        # kornia's ColorJitter uses torchvision's formulas and factor ranges ([0.7, 1.3] here).
        K.ColorJitter(brightness=0.3, contrast=0.3, p=1.0),
        # kornia's factor blends like torchvision's (0 blurred, 1 unchanged, 2 sharpened, same
        # 3 x 3 kernel, border kept); a scalar would draw it from [0, x], so pin it at 2.
        K.RandomSharpness(sharpness=(2.0, 2.0), p=0.5),
        # torchvision's GaussianBlur(3): one sigma per image from [0.1, 2.0], reflect padding.
        K.RandomGaussianBlur(kernel_size=(3, 3), sigma=(0.1, 2.0), border_type="reflect", p=1.0),
    )


def batch_hdkd_train_transforms(
    image_size: int,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> BatchTransform:
    """The HDKD paper's training augmentations of :func:`hdkd_train_transforms`, for whole batches.

    Every image of the batch gets its own draw of: a rotation by up to 180 degrees either way
    (nearest neighbour, zero fill), horizontal and vertical flips (p 0.5 each), colour jitter
    (brightness and contrast factors in [0.7, 1.3]), sharpening with factor 2 (p 0.5), and a
    3 x 3 Gaussian blur with sigma uniform in [0.1, 2.0]. Before them the batch is resized to
    ``image_size`` if it has another size; after them it is normalised.

    Each step computes what its torchvision counterpart computes, sharpness included (kornia's
    ``RandomSharpness`` with the factor range pinned to ``(2, 2)`` is torchvision's
    ``adjust_sharpness(image, 2)``), with three differences: the steps run on float32 rather
    than on uint8, so the per-step rounding of the per-item pipeline (under one grey level per
    step) is absent; kornia draws one order of brightness and contrast per batch where
    torchvision draws one per image (the two steps commute except where values clip at 0 or
    1); and nearest-neighbour rotation may pick the other of two equidistant pixels.

    Args:
        image_size: Side of the square output images.
        mean: Per-channel mean of the normalisation.
        std: Per-channel standard deviation of the normalisation.

    Returns:
        A module from uint8 (or float in [0, 1]) ``B x 3 x H x W`` batches to normalised float32
        ones, on the batch's device.
    """
    return BatchTransform(image_size, _paper_augmentation(), mean, std)
