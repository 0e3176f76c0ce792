"""A tiny, deterministic training run used by the subprocess tests of kdkit.train.

    python tests/scripts/train_tiny.py OUTPUT_DIR [--epochs 3] [--resume] [--sleep 0.0]
    accelerate launch --num_processes 2 --cpu tests/scripts/train_tiny.py OUTPUT_DIR ...

At the end the main process writes ``OUTPUT_DIR/result.json`` (the FitResult, JSON) and
``OUTPUT_DIR/final_task.safetensors`` (every parameter and buffer of the task).
``--sleep`` slows every training step down so that a test can kill the process mid-run;
``--crash-at N`` raises at the N-th training step of this process (a simulated failure);
``--nan-at N`` makes the N-th training loss of the first process (``RANK`` 0) NaN: every process
then writes the ``NonFiniteLossError`` it raised to ``OUTPUT_DIR/non_finite_<process>.json``.
``--distil-ce-only`` trains a student with a class and a distillation head through a Distiller
whose only term (cross-entropy) reads the class head: the distillation head gets no gradient,
which DDP accepts only with ``find_unused_parameters``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdkit import Distiller
from kdkit.checkpoint import save_safetensors
from kdkit.train import NonFiniteLossError, Supervised, TrainConfig, Trainer


class NoisyBlobs(Dataset):
    """Three separable classes of 8x8 images; a random flip augmentation drawn per item."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 3
        self.images = torch.randn(n, 3, 8, 8, generator=g) * 0.5
        for c in range(3):
            self.images[self.labels == c, c] += 1.0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if torch.rand(()) < 0.5:  # augmentation randomness: must be reproducible on resume
            image = image.flip(-1)
        return image, self.labels[index]


def build_model() -> nn.Module:
    torch.manual_seed(1234)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


class TwoHeads(nn.Module):
    """A class head and a distillation head (both in training, their mean in eval), like DeiT's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(99)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 3)
        self.head_dist = nn.Linear(8, 3)
        self.num_classes = 3

    def forward(self, x: torch.Tensor):
        pooled = self.features(x)
        cls, dist = self.head(pooled), self.head_dist(pooled)
        return (cls, dist) if self.training else (cls + dist) / 2


class SlowCE(nn.Module):
    def __init__(self, sleep: float, crash_at: int | None, nan_at: int | None = None) -> None:
        super().__init__()
        self._slowed_by = sleep
        self._fault_crash = crash_at  # named apart from its argument: a fault, not an option of the objective
        self._fault_nan = nan_at if int(os.environ.get("RANK", "0")) == 0 else None
        self.calls = 0

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # val_loss: neither slowed down nor counted as a training step
            return nn.functional.cross_entropy(logits, labels)
        self.calls += 1
        if self._fault_crash is not None and self.calls == self._fault_crash:
            raise SystemExit(3)
        if self._slowed_by:
            time.sleep(self._slowed_by)
        loss = nn.functional.cross_entropy(logits, labels)
        return loss * float("nan") if self.calls == self._fault_nan else loss


def run(output_dir: str | Path, *, epochs: int = 3, resume: bool = False, sleep: float = 0.0,
        crash_at: int | None = None, nan_at: int | None = None, workers: int = 0, val_size: int = 24,
        distil_ce_only: bool = False) -> dict:
    """Trains the tiny model; returns (and, on the main process, writes) the result."""
    config = TrainConfig(
        epochs=epochs, opt="adamw", lr=0.02, weight_decay=0.01, sched="cosine", warmup_epochs=1,
        output_dir=output_dir, progress=False, seed=7, keep_last=2,
    )
    if distil_ce_only:
        task: nn.Module = Distiller(build_model(), TwoHeads(), losses={"ce": 1.0})
    else:
        task = Supervised(build_model(), loss=SlowCE(sleep, crash_at, nan_at), name="ce")
    trainer = Trainer(task, config, class_names=["red", "green", "blue"])
    train_loader = DataLoader(NoisyBlobs(48, seed=0), batch_size=8, shuffle=True, num_workers=workers)
    val_loader = DataLoader(NoisyBlobs(val_size, seed=1), batch_size=8)
    try:
        result = trainer.fit(train_loader, val_loader, resume=resume)
    except NonFiniteLossError as error:
        report = {"message": str(error), "terms": error.terms, "epoch": error.epoch, "batch": error.batch, "step": error.step}
        (Path(output_dir) / f"non_finite_{trainer.accelerator.process_index}.json").write_text(json.dumps(report))
        raise

    payload = {
        "best_metric": result.best_metric,
        "best_epoch": result.best_epoch,
        "history": result.history,
        "final_val_metrics": result.final_val_metrics,
        "num_processes": trainer.accelerator.num_processes,
    }
    if trainer.accelerator.is_main_process:
        out = Path(output_dir)
        task = trainer.task.module if hasattr(trainer.task, "module") else trainer.task
        save_safetensors(task.state_dict(), out / "final_task.safetensors")
        (out / "result.json").write_text(json.dumps(payload))
    trainer.accelerator.wait_for_everyone()
    return payload


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--crash-at", type=int, default=None)
    parser.add_argument("--nan-at", type=int, default=None)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--val-size", type=int, default=24)
    parser.add_argument("--distil-ce-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(args.output_dir, epochs=args.epochs, resume=args.resume, sleep=args.sleep, crash_at=args.crash_at,
        nan_at=args.nan_at, workers=args.workers, val_size=args.val_size, distil_ce_only=args.distil_ce_only)


if __name__ == "__main__":
    main()
