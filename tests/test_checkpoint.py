"""Tests of kdkit.checkpoint: atomic writes, safetensors model files, strict loading."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

from kdkit.checkpoint import (
    CheckpointError,
    atomic_write,
    atomic_write_text,
    load_model,
    load_safetensors,
    read_metadata,
    save_model,
    save_safetensors,
    unwrap_model,
)


def tiny_net(num_classes: int = 3, width: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )


def perturbed(model: nn.Module) -> nn.Module:
    """Gives every parameter and BN statistic a non-default value."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            tensor.add_(torch.randn_like(tensor) * 0.1).abs_()
    return model


def test_save_load_roundtrip_identical_outputs_and_metadata(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = perturbed(tiny_net()).eval()
    path = save_model(model, tmp_path / "m.safetensors",
                      metadata={"classes": ["a", "b", "c"], "model_name": "tiny", "image_size": 8, "num_classes": 3})
    fresh = tiny_net().eval()
    x = torch.randn(2, 3, 8, 8)
    assert not torch.equal(fresh(x), model(x))
    meta = load_model(fresh, path, expected_classes=["a", "b", "c"])
    assert torch.equal(fresh(x), model(x))
    assert meta["classes"] == ["a", "b", "c"] and meta["image_size"] == 8 and meta["model_name"] == "tiny"
    assert read_metadata(path)["num_classes"] == 3
    assert read_metadata(path)["format"] == "pt"
    # every tensor, buffers included, is restored
    for (k, a), (k2, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_tied_weights_are_saved_and_loaded(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

    model = Tied()
    save_model(model, tmp_path / "tied.safetensors")
    fresh = Tied()
    load_model(fresh, tmp_path / "tied.safetensors")
    assert torch.equal(fresh.a.weight, model.a.weight)
    assert fresh.b.weight is fresh.a.weight


def test_wrapped_models_are_unwrapped(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = perturbed(tiny_net())
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert unwrap_model(compiled) is model
    save_model(compiled, tmp_path / "c.safetensors")
    tensors, _ = load_safetensors(tmp_path / "c.safetensors")
    assert set(tensors) == set(model.state_dict())  # no wrapper prefix in the file

    # A file written with DDP's `module.` prefix loads into a plain model and into a compiled one.
    save_safetensors({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ddp.safetensors")
    fresh = tiny_net()
    load_model(torch.compile(fresh), tmp_path / "ddp.safetensors")
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_a_submodule_named_module_keeps_its_name(tmp_path: Path) -> None:
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(3, 2)

    model = Holder()
    save_model(model, tmp_path / "h.safetensors")
    tensors, _ = load_safetensors(tmp_path / "h.safetensors")
    assert set(tensors) == {"module.weight", "module.bias"}  # loadable by plain load_state_dict too
    fresh = Holder()
    load_model(fresh, tmp_path / "h.safetensors")
    assert torch.equal(fresh.module.weight, model.module.weight)


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    save_model(tiny_net(), tmp_path / "m.safetensors")
    bigger = nn.Sequential(*tiny_net(), nn.Linear(3, 3))  # adds 6.weight / 6.bias
    with pytest.raises(CheckpointError) as info:
        load_model(bigger, tmp_path / "m.safetensors")
    message = str(info.value)
    assert "missing keys (2)" in message and "6.weight" in message and "6.bias" in message
    assert "m.safetensors" in message

    smaller = nn.Sequential(*list(tiny_net())[:3])  # no Linear: 5.weight / 5.bias unexpected
    with pytest.raises(CheckpointError) as info:
        load_model(smaller, tmp_path / "m.safetensors")
    assert "unexpected keys (2)" in str(info.value) and "5.weight" in str(info.value)


def test_shape_mismatch_names_key_and_shapes(tmp_path: Path) -> None:
    save_model(tiny_net(num_classes=3), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_model(tiny_net(num_classes=5), tmp_path / "m.safetensors")
    message = str(info.value)
    assert "5.weight: checkpoint (3, 4) vs model (5, 4)" in message
    assert "5.bias: checkpoint (3,) vs model (5,)" in message


def test_model_left_untouched_when_loading_fails(tmp_path: Path) -> None:
    save_model(perturbed(tiny_net(num_classes=3)), tmp_path / "m.safetensors")
    target = tiny_net(num_classes=5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError):
        load_model(target, tmp_path / "m.safetensors")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_error_names_the_file(tmp_path: Path, damage: str) -> None:
    path = save_model(tiny_net(), tmp_path / "broken.safetensors")
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00not a safetensors file" * 20, "empty": b""}[damage])
    with pytest.raises(CheckpointError) as info:
        load_model(tiny_net(), path)
    assert str(path) in str(info.value)
    assert "corrupt" in str(info.value)
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        read_metadata(path)


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_model(tiny_net(), tmp_path / "nope.safetensors")


def test_class_name_mismatch_shows_both_lists(tmp_path: Path) -> None:
    save_model(tiny_net(), tmp_path / "m.safetensors", metadata={"classes": ["cat", "dog", "eel"]})
    with pytest.raises(CheckpointError) as info:
        load_model(tiny_net(), tmp_path / "m.safetensors", expected_classes=["cat", "eel", "dog"])
    message = str(info.value)
    assert "['cat', 'dog', 'eel']" in message and "['cat', 'eel', 'dog']" in message
    # without recorded classes the check cannot pass silently
    save_model(tiny_net(), tmp_path / "nolabels.safetensors")
    with pytest.raises(CheckpointError, match="records no class names"):
        load_model(tiny_net(), tmp_path / "nolabels.safetensors", expected_classes=["cat", "dog", "eel"])


def test_atomic_write_crash_keeps_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    atomic_write(path, lambda tmp: tmp.write_bytes(b"version 1"))

    def crash(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            handle.write(b"half of version 2")
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="simulated"):
        atomic_write(path, crash)
    assert path.read_bytes() == b"version 1"
    assert sorted(os.listdir(tmp_path)) == ["data.bin"]  # no temporary file left behind


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_atomic_write_gives_the_permissions_of_a_plain_write(tmp_path: Path) -> None:
    previous_umask = os.umask(0o027)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("reference")
        fresh = atomic_write_text(tmp_path / "fresh.txt", "new file")
        assert stat.S_IMODE(fresh.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o640
        # replacing a file keeps the mode its owner gave it, as writing into it would
        os.chmod(fresh, 0o604)
        atomic_write_text(fresh, "second version")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o604
        assert fresh.read_text() == "second version"
        weights = save_model(tiny_net(), tmp_path / "model.safetensors")
        assert stat.S_IMODE(weights.stat().st_mode) == 0o640
    finally:
        os.umask(previous_umask)


def test_save_model_crash_midway_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    torch.manual_seed(0)
    good = perturbed(tiny_net())
    path = save_model(good, tmp_path / "model.safetensors", metadata={"epoch": 1})

    def half_write(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt("killed while writing (simulated)")

    real_save = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(KeyboardInterrupt):
        save_model(tiny_net(), path, metadata={"epoch": 2})
    monkeypatch.undo()

    fresh = tiny_net()
    assert load_model(fresh, path)["epoch"] == 1
    assert torch.equal(fresh[0].weight, good[0].weight)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


def test_metadata_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        save_model(tiny_net(), tmp_path / "m.safetensors", metadata={"bad": object()})
    assert not (tmp_path / "m.safetensors").exists()
