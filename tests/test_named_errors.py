"""Numbers that would train silently wrong, and torch errors a user could not place, are named errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from kdkit import Distiller, LossTerm
from kdkit.train import Supervised, TrainConfig, Trainer

CLASSES = ["a", "b", "c"]


def net(seed: int = 0, batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8) if batch_norm else nn.Identity(), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def images(count: int = 16, labels: torch.Tensor | None = None) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(count, 3, 8, 8, generator=g), torch.arange(count) % 3 if labels is None else labels)


def trainer(folder: Path, model: nn.Module | None = None, classes=CLASSES, **config) -> Trainer:
    settings = dict(epochs=1, lr=0.01, output_dir=folder, progress=False) | config
    return Trainer(Supervised(model if model is not None else net()), TrainConfig(**settings), class_names=classes)


# --------------------------------------------------------------------------- the objective
@pytest.mark.parametrize(("losses", "message"), [
    (lambda: {"ce": 0.5, "kl": -1.0}, r"loss 'kl' has weight -1\.0: weights are finite numbers >= 0"),
    (lambda: {"ce": 0.0, "kl": 0.0}, r"the objective has no term with a positive weight"),
    (lambda: [LossTerm("ce", 0.5), LossTerm("kl", 0.5, temperature=float("nan"))], r"loss 'kl': option temperature=nan is not finite"),
    (lambda: [LossTerm("dkd", 1.0, beta=float("inf"))], r"loss 'dkd': option beta=inf is not finite"),
])
def test_an_objective_that_cannot_train_is_refused_when_it_is_built(losses, message):
    with pytest.raises(ValueError, match=message):
        Distiller(net(1), net(2), losses=losses())


def test_a_warmup_as_long_as_the_run_is_refused():
    with pytest.raises(ValueError, match=r"warmup_epochs \(3\) must be smaller than epochs \(3\): the learning rate would never reach lr"):
        TrainConfig(epochs=3, sched="cosine", warmup_epochs=3)
    TrainConfig(epochs=3, sched="cosine", warmup_epochs=2)


# --------------------------------------------------------------------------- labels
class Opaque(Dataset):
    """Labels kdkit cannot see before training (no tensors or label attributes to look at)."""

    def __init__(self, labels: list[int]) -> None:
        self.items = images(len(labels), torch.tensor(labels))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def test_labels_outside_the_classes_are_refused_before_training_or_at_the_first_read(tmp_path: Path):
    labels = torch.arange(16) % 3
    labels[5] = -100  # a cross-entropy ignores it without a word
    with pytest.raises(ValueError, match=r"the train data's labels range over -100\.\.2, outside the 3 classes"):
        trainer(tmp_path / "known").fit(DataLoader(images(labels=labels), batch_size=8))
    assert not (tmp_path / "known" / "metrics.jsonl").exists()  # before any training
    opaque = [0, 1, 2, 0, 1, 2, 0, 1] + [0, 1, 2, 3, 0, 1, 2, 0]  # class 3 of 3 in the second batch
    with pytest.raises(ValueError, match=r"batch 2/2 of epoch 1 has labels 0\.\.3, outside the student's 3 classes"):
        trainer(tmp_path / "opaque").fit(DataLoader(Opaque(opaque), batch_size=8))
    # -100 passes the cross-entropy (ignored): the device-side check finds it, read at the interval's end
    ignored = [0, 1, 2, 0, 1, 2, 0, 1] + [0, 1, 2, -100, 0, 1, 2, 0]
    with pytest.raises(ValueError, match=r"batch 2/2 of epoch 1 has labels -100\.\.2, outside the student's 3 classes"):
        trainer(tmp_path / "ignored").fit(DataLoader(Opaque(ignored), batch_size=8))


@pytest.mark.parametrize(("labels", "error", "message"), [
    (torch.zeros(8), TypeError, r"labels are torch\.float32 of shape \(8,\): class indices must be int64"),
    (torch.zeros(8, dtype=torch.int32), TypeError, r"labels are torch\.int32: class indices must be int64 \(use labels\.long\(\)\)"),
    (torch.zeros(8, 1, dtype=torch.int64), ValueError, r"labels have shape \(8, 1\): class indices are \(B,\); use labels\.squeeze\(1\)"),
])
def test_labels_of_another_type_or_shape_are_named(tmp_path: Path, labels, error, message):
    with pytest.raises(error, match=message):
        trainer(tmp_path).fit(DataLoader(images(8, labels), batch_size=8))
    with pytest.raises(error, match=message):
        Distiller(net(1), net(2))(torch.randn(8, 3, 8, 8), labels)


def test_labels_the_logits_cannot_hold_are_named_even_when_the_classes_are_unknown(tmp_path: Path):
    plain = nn.Sequential(nn.Flatten(), nn.Linear(192, 3))  # no num_classes, and no class_names given
    run = Trainer(Supervised(plain), TrainConfig(epochs=1, lr=0.01, output_dir=tmp_path / "plain", progress=False))
    with pytest.raises(ValueError, match=r"batch 1/2 of epoch 1 has labels 0\.\.3, which the loss cannot find among the "
                                         r"student's logits: Target 3 is out of bounds"):
        run.fit(DataLoader(Opaque([0, 1, 2, 3] * 4), batch_size=8))
    with pytest.raises(ValueError, match=r"labels 0\.\.3, which the loss cannot find among the student's logits \(4 class_names\)"):
        trainer(tmp_path / "names", nn.Sequential(nn.Flatten(), nn.Linear(192, 3)), classes=[*CLASSES, "d"]).fit(
            DataLoader(Opaque([0, 1, 2, 3] * 4), batch_size=8))


def test_soft_labels_of_another_width_are_named():
    logits_model = net()
    with pytest.raises(ValueError, match=r"soft labels of shape \(4, 4\) for logits of shape \(4, 3\)"):
        Supervised(logits_model)(torch.randn(4, 3, 8, 8), torch.full((4, 4), 0.25))
    with pytest.raises(ValueError, match=r"soft labels of shape \(4, 4\) for logits of shape \(4, 3\)"):
        Distiller(net(1), net(2))(torch.randn(4, 3, 8, 8), torch.full((4, 4), 0.25))
    Supervised(logits_model)(torch.randn(4, 3, 8, 8), torch.full((4, 3), 1 / 3))  # the right width trains


def test_more_class_names_than_outputs_are_refused(tmp_path: Path):
    with pytest.raises(ValueError, match=r"4 class_names \(\['a', 'b', 'c', 'd'\]\) for a student with 3 outputs"):
        trainer(tmp_path, classes=[*CLASSES, "d"]).fit(DataLoader(images(), batch_size=8))
    student = timm.create_model("resnet10t", num_classes=3)  # declares its outputs: refused before the first batch
    with pytest.raises(ValueError, match=r"4 class_names .* for a student with 3 outputs"):
        trainer(tmp_path / "timm", student, classes=[*CLASSES, "d"]).fit(DataLoader(images(), batch_size=8))


# --------------------------------------------------------------------------- validation
class NaNOnMarked(nn.Module):
    """A classifier whose logits are NaN for an image marked by a huge first pixel, in evaluation only."""

    def __init__(self) -> None:
        super().__init__()
        self.body = net()

    def forward(self, x):
        logits = self.body(x)
        if not self.training:
            logits = torch.where(x[:, :1, 0, 0] > 100, torch.full_like(logits, float("nan")), logits)
        return logits


def test_a_nan_validation_loss_never_selects_the_best_model(tmp_path: Path, caplog):
    val = images(6)
    val.tensors[0][0, 0, 0, 0] = 1000.0
    run = trainer(tmp_path, NaNOnMarked(), epochs=2)
    with caplog.at_level(logging.WARNING, logger="kdkit.train"):
        result = run.fit(DataLoader(images(), batch_size=8), DataLoader(val, batch_size=6))
    assert result.best_epoch is None and not (tmp_path / "best_model.safetensors").exists()
    assert "the validation loss is nan, so this epoch's model is not taken as the best" in caplog.text


# --------------------------------------------------------------------------- batches
def pooled_batch_norm() -> nn.Module:
    """Batch norm after pooling: one value per channel in a batch of one image, which cannot train."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))


def test_a_training_batch_of_one_under_batch_norm_is_refused_before_training(tmp_path: Path):
    with pytest.raises(ValueError, match=r"last batch holds one image \(17 images at batch size 8\), and the student's batch "
                                         r"norm cannot train on one: use drop_last=True"):
        trainer(tmp_path, pooled_batch_norm()).fit(DataLoader(images(17), batch_size=8))
    assert not (tmp_path / "metrics.jsonl").exists()  # before any training
    # batch norm over 8 x 8 maps trains on one image: not refused
    trainer(tmp_path / "maps", net(batch_norm=True)).fit(DataLoader(images(17), batch_size=8))


def test_a_training_batch_of_one_under_batch_norm_found_only_in_training_is_named(tmp_path: Path):
    from torch.utils.data import BatchSampler, SequentialSampler

    data = images(17)
    loader = DataLoader(data, batch_sampler=BatchSampler(SequentialSampler(data), 8, drop_last=False))  # no batch_size to check
    with pytest.raises(ValueError, match=r"batch 3/3 of epoch 1 holds 1 image\(s\) per batch-norm channel, and batch norm "
                                         r"cannot train on one: drop the last partial batch"):
        trainer(tmp_path, pooled_batch_norm()).fit(loader)


def test_images_the_models_cannot_take_are_named():
    distiller = Distiller(net(1), net(2))
    with pytest.raises(TypeError, match=r"images are torch\.uint8: models take float batches"):
        distiller(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"input_size is a positive int.*got 0"):
        Distiller(net(1), net(2), losses={"stage_mse": 1.0}, taps=["0"], input_size=0)
    with pytest.raises(ValueError, match=r"the student \(Sequential\) fails on the \(1, 8, 8\) probe input .*set input_size"):
        Distiller(net(1), net(2), losses={"stage_mse": 1.0}, taps=["0"], input_size=(1, 8, 8))


def test_a_16_bit_teacher_runs_in_its_own_dtype_without_teacher_dtype():
    teacher = net(1).to(torch.bfloat16)
    distiller = Distiller(teacher, net(2))
    assert distiller.teacher_dtype == torch.bfloat16
    out = distiller(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match=r"the teachers' weights are in \['torch\.bfloat16', 'torch\.float16'\]"):
        Distiller([net(1).to(torch.bfloat16), net(3).to(torch.float16)], net(2))


# --------------------------------------------------------------------------- two outputs
class MainAndAux(nn.Module):
    """torchvision's Inception in training: (main logits, auxiliary logits), no distillation head."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.aux = net(2), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))

    def forward(self, x):
        main = self.body(x)
        return (main, self.aux(x)) if self.training else main


class LogitsAndFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = net(2)

    def forward(self, x):
        return self.body(x), x.mean((2, 3))


@pytest.mark.parametrize("student", [MainAndAux, LogitsAndFeatures])
def test_two_outputs_are_read_as_two_heads_only_from_a_model_that_declares_them(student):
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    model = student().train()
    with pytest.raises(TypeError, match=rf"the student \({student.__name__}\) returned a tuple of 2 outputs .* in training; "
                                        r"which of them are the logits\?.*logits_from=0"):
        Distiller(net(1), model)(x, y)
    distiller = Distiller(net(1), model, losses={"kl": 1.0}, logits_from=0)
    main = model.body(x)
    teacher = net(1)(x)
    expected = torch.nn.functional.kl_div(torch.log_softmax(main / 4, -1), torch.softmax(teacher / 4, -1), reduction="batchmean") * 16
    assert torch.allclose(distiller(x, y).loss, expected, atol=1e-6)  # the KL term reads the main logits


@pytest.mark.parametrize("distilled", [False, True])
def test_logits_from_leaves_an_evaluation_tensor_whole(tmp_path: Path, distilled: bool):
    model = MainAndAux()  # a tuple in training, its logits alone in evaluation
    task = Distiller(net(1), model, logits_from=0) if distilled else Supervised(model, logits_from=0)
    run = Trainer(task, TrainConfig(epochs=1, lr=0.01, output_dir=tmp_path, progress=False), class_names=CLASSES)
    result = run.fit(DataLoader(images(), batch_size=8), DataLoader(images(8), batch_size=8))
    assert result.best_epoch == 1 and result.final_val_metrics["num_samples"] == 8


def test_a_dynamic_size_vit_run_at_another_size_than_its_probe_is_named():
    teacher = timm.create_model("resnet10t", num_classes=3)
    student = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3, dynamic_img_size=True)
    distiller = Distiller(teacher, student, losses={"ce": 1.0, "stage_mse": 1.0},
                          taps={"teacher": ["layer3"], "student": ["blocks.1"]}, input_size=32)
    distiller(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"student tap 'blocks\.1' gives features of shape \(37, 192\) on this batch of "
                                         r"\(3, 48, 48\) images, but \(17, 192\) on the \(3, 32, 32\) probe"):
        distiller(torch.randn(2, 3, 48, 48), torch.tensor([0, 1]))


def test_callables_are_named_the_same_in_every_process():
    import functools
    import operator

    from kdkit.outputs import stable_name

    def pick(output, index):
        return output[index]

    assert stable_name(functools.partial(pick, index=1)) == f"functools.partial({__name__}.test_callables_are_named_the_same_in_every_process.<locals>.pick, *(), **{{'index': 1}})"
    assert stable_name(operator.itemgetter(0)) == "operator.itemgetter(0)" != stable_name(operator.itemgetter(1))
    assert " at 0x" not in str(stable_name(type("Picker", (), {"__call__": lambda self, o: o})()))
