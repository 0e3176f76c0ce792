"""The device tests: the training path on ``KDKIT_TEST_DEVICE`` (the CPU by default, ``cuda`` in
``benchmarks/gpu_check.sh``).

Each test puts the models where a GPU run puts them (a teacher trained on the device, a
student freshly built on the CPU, figure images on the CPU) and checks that the library moves
what it must. On the CPU they check the same code paths with one device; the ``meta`` device
stands in for a second one in tests/test_distiller.py.
"""

from __future__ import annotations

import os

import pytest
import timm
import torch
from torch.utils.data import DataLoader

import kdkit
from kdkit import Distiller, Supervised, TrainConfig, Trainer
from kdkit.augment import batch_eval_transforms
from kdkit.data import ImageTensorDataset, make_loader
from kdkit.explain import channel_mean_maps
from kdkit_zoo.hdkd.augmentations import batch_hdkd_train_transforms
from sync_counter import SyncCounter

DEVICE = torch.device(os.environ.get("KDKIT_TEST_DEVICE", "cpu"))
SIZE = 32
HDKD_TAPS = ["stages.0", "stages.1", "stages.2"]
HDKD_LOSSES = {"ce": 0.5, "kl": 0.5, "stage_mse": 10.0}

pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")


def _images(count: int, seed: int = 0) -> ImageTensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
    return ImageTensorDataset(images, torch.arange(count) % 4, ["a", "b", "c", "d"])


def test_distiller_built_from_a_teacher_on_the_device_and_a_student_on_the_cpu():
    teacher = timm.create_model("hdkd_teacher", num_classes=4).to(DEVICE)
    student = timm.create_model("hdkd_student", num_classes=4, img_size=SIZE)  # still on the CPU
    distiller = Distiller(teacher, student, losses=HDKD_LOSSES, taps=HDKD_TAPS, input_size=SIZE).to(DEVICE).train()
    images, labels = torch.randn(4, 3, SIZE, SIZE, device=DEVICE), torch.arange(4, device=DEVICE)
    with SyncCounter() as counter:
        out = distiller(images, labels)
        out.loss.backward()
    assert counter.calls == []
    assert out.loss.device.type == DEVICE.type and all(v.device.type == DEVICE.type for v in out.terms.values())
    assert all(p.grad is not None for p in distiller.parameters() if p.requires_grad)


def test_batched_augmentation_runs_where_the_batch_is():
    batch = _images(8).as_uint8().images.to(DEVICE)
    for transform in (batch_hdkd_train_transforms(SIZE), batch_eval_transforms(SIZE)):
        out = transform(batch)
        assert out.device.type == DEVICE.type and out.dtype == torch.float32 and out.shape == (8, 3, SIZE, SIZE)
        assert torch.isfinite(out).all()


def test_trainer_on_uint8_batches_with_device_augmentation(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=4)
    data = _images(32)
    config = TrainConfig(epochs=1, lr=1e-3, output_dir=tmp_path, progress=False, sched="none")
    trainer = Trainer(Supervised(model), config, class_names=data.classes,
                      train_transform=batch_hdkd_train_transforms(SIZE), eval_transform=batch_eval_transforms(SIZE))
    loader: DataLoader = make_loader(data.as_uint8(), 16, train=True)
    result = trainer.fit(loader, make_loader(data.as_uint8(), 16, train=False))
    assert result.best_model_path is not None
    metrics = trainer.test(make_loader(data.as_uint8(), 16, train=False))
    assert metrics["num_samples"] == len(data)


def test_activation_maps_of_a_model_on_the_device_from_cpu_images():
    model = timm.create_model("hdkd_student", num_classes=4, img_size=SIZE).to(DEVICE)
    maps = channel_mean_maps(model, torch.randn(2, 3, SIZE, SIZE), "stages.2")
    assert maps.shape == (2, SIZE, SIZE) and maps.device.type == "cpu"
    assert kdkit.unwrap_model(model) is model
