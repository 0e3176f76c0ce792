"""A few deterministic Distiller steps through Accelerate, for the multi-process test.

    python tests/scripts/distill_ddp.py OUTPUT_DIR [--feature-weight 1.0]
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 tests/scripts/distill_ddp.py OUTPUT_DIR

Every step uses one global batch of ``GLOBAL_BATCH`` images; each of ``P`` processes takes its
contiguous ``1/P`` share, so one process and two processes see the same global batch. The
student has no BatchNorm (per-process batch statistics would legitimately differ). At the end
the main process writes ``OUTPUT_DIR/result.json`` and ``OUTPUT_DIR/state.safetensors``
(the Distiller's ``state_dict``: the student and its adapters).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kdkit import Distiller, LossTerm
from kdkit.checkpoint import save_safetensors

GLOBAL_BATCH = 8
STEPS = 4
NUM_CLASSES = 3


def make_net(width: int, *, batch_norm: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    norm = nn.BatchNorm2d(width) if batch_norm else nn.Identity()
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, width, 3, padding=1), norm, nn.ReLU()),
        nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, NUM_CLASSES),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--feature-weight", type=float, default=1.0)
    args = parser.parse_args()

    accelerator = Accelerator(cpu=True)
    teacher = make_net(12, batch_norm=True, seed=0)  # frozen: its BatchNorm uses running statistics
    student = make_net(8, batch_norm=False, seed=1)
    losses = [LossTerm("ce", 0.5), LossTerm("kl", 0.5, temperature=2.0), LossTerm("fitnet", args.feature_weight)]
    torch.manual_seed(2)  # the adapters' initialisation
    distiller = Distiller(teacher, student, losses=losses, taps=["0", "1"], input_size=(3, 16, 16))
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(distiller, optimizer)

    teacher_ids = {id(p) for p in teacher.parameters()}
    wrapped = isinstance(model, DistributedDataParallel)
    report = {
        "num_processes": accelerator.num_processes,
        "student_wrapped": wrapped,
        "teacher_in_wrapper_parameters": any(id(p) in teacher_ids for p in model.parameters()),
        "teacher_is_plain_module": type(accelerator.unwrap_model(model).teacher) is nn.Sequential,
        "fitnet_terms": [],
    }

    generator = torch.Generator().manual_seed(3)
    images = torch.randn(STEPS, GLOBAL_BATCH, 3, 16, 16, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (STEPS, GLOBAL_BATCH), generator=generator)
    share = GLOBAL_BATCH // accelerator.num_processes
    local = slice(accelerator.process_index * share, (accelerator.process_index + 1) * share)
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    model.train()
    for step in range(STEPS):
        out = model(images[step, local].to(accelerator.device), labels[step, local].to(accelerator.device))
        optimizer.zero_grad()
        accelerator.backward(out.loss)
        optimizer.step()
        # The feature term as every process computed it: proof that the taps captured under DDP.
        report["fitnet_terms"].append(accelerator.gather(torch.tensor([out.terms["fitnet"]])).tolist())
    report["teacher_unchanged"] = all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters()))
    report["teacher_training_mode"] = teacher.training

    if accelerator.is_main_process:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        save_safetensors(state, args.output_dir / "state.safetensors")
        (args.output_dir / "result.json").write_text(json.dumps(report, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
