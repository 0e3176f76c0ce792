"""Tests for kdkit.augment's batched transforms, with the HDKD paper's augmentations of
kdkit_zoo.hdkd.augmentations inside: batched, per-sample device augmentation against the per-item
torchvision pipeline, its reproducibility, shapes, dtypes and devices."""

from __future__ import annotations

import pytest
import torch
from timm.data import IMAGENET_DEFAULT_STD

from kdkit.augment import BatchTransform, batch_eval_transforms
from kdkit.data import ImageTensorDataset, eval_transforms, make_loader
from kdkit_zoo.hdkd.augmentations import batch_hdkd_train_transforms, hdkd_train_transforms


def _images(count: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 images with both smooth structure (gradients) and fine detail (noise), distinct colours."""
    generator = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    gradients = torch.stack([x, y, (x + y) / 2]) * torch.rand(count, 3, 1, 1, generator=generator)
    noise = torch.rand(count, 3, size, size, generator=generator)
    return ((0.6 * gradients + 0.4 * noise) * 255).round().to(torch.uint8)


def _statistics(batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel figures that each augmentation moves: level, spread, sharpness, per-image jitter."""
    return {
        "mean": batch.mean(dim=(0, 2, 3)),
        "std": batch.std(dim=(0, 2, 3)),
        # mean absolute difference of neighbours: raised by sharpening, lowered by blurring
        "detail": (batch[..., 1:] - batch[..., :-1]).abs().mean(dim=(0, 2, 3)),
        # spread of the images' mean levels: widened by brightness and contrast jitter
        "jitter": batch.mean(dim=(2, 3)).std(dim=0),
    }


@pytest.mark.parametrize("input_size", [32, 40])
def test_batched_augmentation_matches_the_per_item_pipeline_in_distribution(input_size):
    images = _images(8, input_size)
    draws = 300
    per_item = hdkd_train_transforms(32)
    torch.manual_seed(0)
    reference = torch.stack([per_item(image) for _ in range(draws) for image in images])
    batched = batch_hdkd_train_transforms(32)
    torch.manual_seed(1)
    augmented = torch.cat([batched(images.repeat(10, 1, 1, 1)) for _ in range(draws // 10)])

    assert augmented.shape == reference.shape == (8 * draws, 3, 32, 32)
    expected, measured = _statistics(reference), _statistics(augmented)
    # The per-item pipeline rounds down to uint8 after each colour step, about one grey level
    # in all (0.02 after normalisation); the rest is sampling noise.
    torch.testing.assert_close(measured["mean"], expected["mean"], atol=0.05, rtol=0)
    torch.testing.assert_close(measured["std"], expected["std"], atol=0, rtol=0.04)
    # without the factor-2 sharpening "detail" drops by 17%, with kornia's default factor by 30%
    torch.testing.assert_close(measured["detail"], expected["detail"], atol=0, rtol=0.06)
    torch.testing.assert_close(measured["jitter"], expected["jitter"], atol=0, rtol=0.1)


def test_without_randomness_training_equals_evaluation_and_the_per_item_eval_pipeline():
    images = _images(4, 32)
    train = batch_hdkd_train_transforms(32)
    for augmentation in train.augmentation:
        augmentation.p = 0.0
    evaluation = batch_eval_transforms(32)
    torch.testing.assert_close(train(images), evaluation(images), atol=0, rtol=0)
    per_item = torch.stack([eval_transforms(32)(image) for image in images])
    torch.testing.assert_close(evaluation(images), per_item, atol=1e-6, rtol=0)
    # Resizing float rather than uint8 images moves pixels by at most one grey level (rounding).
    resized = torch.stack([eval_transforms(24)(image) for image in images])
    grey_level = 1.001 / 255 / min(IMAGENET_DEFAULT_STD)
    torch.testing.assert_close(batch_eval_transforms(24)(images), resized, atol=grey_level, rtol=0)


def test_the_same_seed_gives_the_same_augmentations_and_each_image_its_own():
    images = _images(1, 32).repeat(16, 1, 1, 1)
    transform = batch_hdkd_train_transforms(32)
    torch.manual_seed(0)
    first = transform(images)
    torch.manual_seed(0)
    again = transform(images)
    torch.manual_seed(1)
    other = transform(images)
    assert torch.equal(first, again) and not torch.equal(first, other)
    # 16 copies of one image, 16 different results
    distinct = {tuple(image.flatten()[::97].tolist()) for image in first}
    assert len(distinct) == 16


@pytest.mark.parametrize("make", [batch_hdkd_train_transforms, batch_eval_transforms])
def test_uint8_and_float_batches_give_normalised_float32_at_the_image_size(make):
    images = _images(3, 40)
    transform = make(32, mean=(0.5,) * 3, std=(0.5,) * 3)
    for batch in (images, images.float() / 255, images.to(torch.float64) / 255):
        out = transform(batch)
        assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32
        assert out.min() >= -1 and out.max() <= 1
    # under autocast too: the transform switches it off
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert transform(images).dtype == torch.float32
    torch.manual_seed(0)
    from_uint8 = transform(images)
    torch.manual_seed(0)
    torch.testing.assert_close(transform(images.float() / 255), from_uint8)


def test_bad_batches_are_rejected():
    transform = batch_eval_transforms(8)
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        transform(torch.zeros(3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        transform(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="int32"):
        transform(torch.zeros(2, 3, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="one entry per RGB channel"):
        BatchTransform(8, mean=(0.5,), std=(0.5,))


def test_transforms_run_on_the_meta_device():
    for transform in (batch_hdkd_train_transforms(32), batch_eval_transforms(32)):
        out = transform(torch.empty(4, 3, 40, 40, dtype=torch.uint8, device="meta"))
        assert out.device.type == "meta" and out.shape == (4, 3, 32, 32) and out.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_transforms_follow_the_batch_to_the_gpu():
    images = _images(4, 40).cuda()
    for transform in (batch_hdkd_train_transforms(32), batch_eval_transforms(32)):
        out = transform(images)
        assert out.is_cuda and out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(batch_eval_transforms(32)(images).cpu(), batch_eval_transforms(32)(images.cpu()))


def test_uint8_loader_batches_feed_the_batched_transforms():
    dataset = ImageTensorDataset(_images(6, 40), [0, 1] * 3, ["a", "b"])
    images, labels = next(iter(make_loader(dataset.as_uint8(), 4, train=True, num_processes=1)))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 40, 40) and labels.shape == (4,)
    assert batch_hdkd_train_transforms(32)(images).shape == (4, 3, 32, 32)
