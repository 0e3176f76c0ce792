"""Tests of kdkit.train_setup: the Accelerator the Trainer creates, and what it sets on a given one."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kdkit.train_setup import configure_accelerator, create_accelerator
from kdkit.train_config import TrainConfig


class Task(nn.Module):
    def __init__(self, find_unused: bool = False) -> None:
        super().__init__()
        self.student = nn.Linear(2, 2)
        if find_unused:
            self.find_unused_parameters = True


def stub(device: str = "cpu", num_processes: int = 1, ddp_handler: object = None) -> SimpleNamespace:
    return SimpleNamespace(project_configuration=SimpleNamespace(automatic_checkpoint_naming=False),
                           gradient_accumulation_steps=1, device=torch.device(device), num_processes=num_processes,
                           ddp_handler=ddp_handler)


@pytest.fixture
def cuda_flags():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    yield lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def test_created_accelerator_copies_asynchronously_and_finds_unused_parameters(tmp_path: Path) -> None:
    config = TrainConfig(output_dir=tmp_path, grad_accum_steps=2)
    plain = create_accelerator(config, Task())
    assert plain.dataloader_config.non_blocking and plain.ddp_handler is None
    assert plain.gradient_accumulation_steps == 2
    wanting = create_accelerator(config, Task(find_unused=True))
    assert wanting.ddp_handler.find_unused_parameters is True


def test_tf32_and_cudnn_benchmark_are_set_on_cuda_only(cuda_flags) -> None:
    before = cuda_flags()
    configure_accelerator(stub("cpu"), TrainConfig(allow_tf32=not before[0], cudnn_benchmark=not before[2]), Task())
    assert cuda_flags() == before
    configure_accelerator(stub("cuda"), TrainConfig(allow_tf32=True, cudnn_benchmark=False), Task())
    assert cuda_flags() == (True, True, False)
    configure_accelerator(stub("cuda"), TrainConfig(allow_tf32=False, cudnn_benchmark=True), Task())
    assert cuda_flags() == (False, False, True)


def test_a_given_multi_process_accelerator_without_unused_parameter_search_is_warned_about(recwarn) -> None:
    from accelerate import DistributedDataParallelKwargs

    with pytest.warns(UserWarning, match=r"find_unused_parameters=True.*DistributedDataParallelKwargs"):
        configure_accelerator(stub(num_processes=2), TrainConfig(), Task(find_unused=True), given=True)
    handler = DistributedDataParallelKwargs(find_unused_parameters=True)
    configure_accelerator(stub(num_processes=2, ddp_handler=handler), TrainConfig(), Task(find_unused=True), given=True)
    configure_accelerator(stub(num_processes=1), TrainConfig(), Task(find_unused=True), given=True)  # no DDP
    configure_accelerator(stub(num_processes=2), TrainConfig(), Task(), given=True)  # nothing asked
    assert not [w for w in recwarn if "find_unused_parameters" in str(w.message)]


def test_grad_accumulation_is_applied_and_automatic_naming_refused() -> None:
    accelerator = stub()
    accelerator.gradient_accumulation_steps = 4
    with pytest.warns(UserWarning, match="gradient_accumulation_steps=4 is replaced"):
        configure_accelerator(accelerator, TrainConfig(grad_accum_steps=2), Task())
    assert accelerator.gradient_accumulation_steps == 2
    accelerator.project_configuration.automatic_checkpoint_naming = True
    with pytest.raises(ValueError, match="automatic_checkpoint_naming"):
        configure_accelerator(accelerator, TrainConfig(), Task())
