"""The Distiller: taps, adapters, loss routing, teacher handling and wrappers."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from accelerate import Accelerator
from torch import nn

import kdkit
from kdkit import Distiller, LossTerm
from kdkit.losses import FeatureLoss
from sync_counter import SyncCounter

NUM_CLASSES = 3


class TinyNet(nn.Module):
    """Two conv stages and a linear head, with a timm-style `feature_info`."""

    def __init__(self, width: int = 8, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.unused = nn.Linear(4, 4)
        self.head = nn.Linear(2 * width, num_classes)
        self.num_classes = num_classes
        self.feature_info = [dict(module="stem", num_chs=width), dict(module="stage", num_chs=2 * width)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage(self.stem(x)).mean(dim=(2, 3)))


class TwoHeadNet(TinyNet):
    """Returns (cls, dist) logits in training like timm's distilled DeiT."""

    def __init__(self, width: int = 8) -> None:
        super().__init__(width)
        self.head_dist = nn.Linear(2 * width, NUM_CLASSES)

    def forward(self, x: torch.Tensor):
        pooled = self.stage(self.stem(x)).mean(dim=(2, 3))
        cls, dist = self.head(pooled), self.head_dist(pooled)
        return (cls, dist) if self.training else (cls + dist) / 2


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 1])


def test_default_objective_is_half_ce_half_kl(batch):
    images, labels = batch
    teacher, student = TinyNet(), TinyNet()
    distiller = Distiller(teacher, student)
    out = distiller(images, labels)
    s_logits, t_logits = student(images), teacher(images)
    expected_kl = F.kl_div(F.log_softmax(s_logits / 4, -1), F.softmax(t_logits / 4, -1), reduction="batchmean") * 16
    expected = 0.5 * F.cross_entropy(s_logits, labels) + 0.5 * expected_kl
    torch.testing.assert_close(out.loss, expected)
    assert set(out.terms) == {"ce", "kl"}
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad for v in out.terms.values())
    assert float(out.terms["ce"] + out.terms["kl"]) == pytest.approx(out.loss.item(), rel=1e-5)
    torch.testing.assert_close(out.logits, s_logits)


def test_teacher_is_frozen_in_eval_mode_and_not_in_state_dict(batch):
    images, labels = batch
    teacher, student = TinyNet(), TinyNet()
    stats_before = teacher.stem[1].running_mean.clone()
    distiller = Distiller(teacher, student).train()
    teacher.train()  # a careless caller; the Distiller must put it back
    distiller(images, labels).loss.backward()
    assert not teacher.training and student.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.head.parameters())
    torch.testing.assert_close(teacher.stem[1].running_mean, stats_before)
    keys = distiller.state_dict().keys()
    assert keys and all(k.startswith("student.") for k in keys)
    assert {id(p) for p in distiller.parameters()} == {id(p) for p in student.parameters()}


def test_teachers_follow_to(batch):
    teacher, student = TinyNet(), TinyNet()
    distiller = Distiller(teacher, student).to(torch.float64)
    assert teacher.head.weight.dtype == torch.float64
    assert distiller(batch[0].double(), batch[1]).loss.dtype == torch.float64


@pytest.mark.parametrize(
    "taps, expected",
    [
        (["stem", "stage"], [("stem", "stem"), ("stage", "stage")]),
        (["st*"], [("stem", "stem"), ("stage", "stage")]),
        ([-1], [("stage", "stage")]),
        ([lambda path, module: path == "stage"], [("stage", "stage")]),
        ([("stage", "stem")], [("stage", "stem")]),
        ({"teacher": ["stem.2"], "student": ["stem"]}, [("stem.2", "stem")]),
    ],
)
def test_selectors(taps, expected):
    distiller = Distiller(TinyNet(), TinyNet(), losses={"stage_mse": 1.0}, taps=taps, input_size=16)
    assert distiller.tap_pairs == [expected]


def test_unknown_path_lists_closest_names():
    with pytest.raises(ValueError, match=r"no module 'stag'.*closest: 'stage'"):
        Distiller(TinyNet(), TinyNet(), losses={"stage_mse": 1.0}, taps=["stag"])


def test_mismatched_tap_counts_are_reported():
    with pytest.raises(ValueError, match="2 teacher modules .* 1 student modules"):
        Distiller(TinyNet(), TinyNet(), losses={"stage_mse": 1.0}, taps={"teacher": ["st*"], "student": ["stage"]})


def test_tap_on_module_that_never_runs():
    with pytest.raises(RuntimeError, match=r"\['unused'\] did not run"):
        Distiller(TinyNet(), TinyNet(), losses={"stage_mse": 1.0}, taps=["unused"], input_size=16)


def test_taps_without_feature_loss_and_feature_loss_without_taps_are_errors():
    with pytest.raises(ValueError, match="no feature loss"):
        Distiller(TinyNet(), TinyNet(), taps=["stage"])
    with pytest.raises(ValueError, match="need `taps`"):
        Distiller(TinyNet(), TinyNet(), losses={"stage_mse": 1.0})


def test_class_count_mismatch():
    with pytest.raises(ValueError, match="predicts 5 classes but the student .* predicts 3"):
        Distiller(TinyNet(num_classes=5), TinyNet())


def test_stage_mse_matches_hand_computation(batch):
    images, labels = batch
    teacher, student = TinyNet(), TinyNet()
    distiller = Distiller(teacher, student, losses={"stage_mse": 10.0}, taps=["stem", "stage"], input_size=16)
    assert len(distiller.adapters) == 0  # equal shapes: no adapter
    out = distiller(images, labels)
    t1, s1 = teacher.stem(images), student.stem(images)
    expected = 10 * (1 * F.mse_loss(s1, t1) + 2 * F.mse_loss(student.stage(s1), teacher.stage(t1)))
    torch.testing.assert_close(out.loss, expected)


def test_adapters_for_different_widths_and_resolutions(batch):
    images, labels = batch
    teacher = TinyNet(width=16)
    student = TinyNet(width=4)
    student.stem[0].stride = (1, 1)  # student maps twice the teacher's size
    distiller = Distiller(teacher, student, losses={"ce": 1.0, "fitnet": 1.0}, taps=["stem", "stage"], input_size=16)
    assert len(distiller.adapters) == 2
    text = repr(distiller)
    assert "Conv2d(4, 16" in text and "Resize(size=(8, 8))" in text
    adapter_params = {id(p) for p in distiller.adapters.parameters()}
    assert adapter_params <= {id(p) for p in distiller.parameters()}
    distiller(images, labels).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.adapters.parameters())
    assert any(k.startswith("adapters.") for k in distiller.state_dict())


def test_align_error_names_paths_and_shapes():
    with pytest.raises(ValueError, match=r"student tap 'stage' gives \(2, 8, 4, 4\) but teacher tap 'stage' gives \(2, 32, 4, 4\)"):
        Distiller(TinyNet(16), TinyNet(4), losses={"fitnet": 1.0}, taps=["stage"], input_size=16, align="error")


def test_unaligned_losses_get_raw_features(batch):
    distiller = Distiller(TinyNet(16), TinyNet(4), losses={"sp": 1.0}, taps=["stage"], input_size=16)
    assert len(distiller.adapters) == 0
    assert torch.isfinite(distiller(*batch).loss)


def test_custom_registered_loss_and_pair_selection(batch):
    images, labels = batch
    seen = {}

    class CountPairs(FeatureLoss):
        def forward(self, student_feats, teacher_feats):
            seen["shapes"] = [tuple(f.shape) for f in student_feats]
            return sum(s.sum() * 0 for s in student_feats) + len(student_feats)

    distiller = Distiller(
        TinyNet(), TinyNet(), losses=[LossTerm(CountPairs(), 2.0, name="count", pairs=[1])], taps=["stem", "stage"], input_size=16
    )
    out = distiller(images, labels)
    assert out.terms == {"count": 2.0}
    assert seen["shapes"] == [(4, 16, 4, 4)]


def test_loss_terms_validate():
    with pytest.raises(TypeError, match="must derive from kdkit.losses"):
        LossTerm(nn.MSELoss())
    with pytest.raises(ValueError, match="distinct names"):
        Distiller(TinyNet(), TinyNet(), losses=[LossTerm("kl"), LossTerm("kl", temperature=1.0)])
    with pytest.raises(KeyError, match="did you mean 'kl'"):
        LossTerm("kll")


def test_distillation_token_routing(batch):
    images, labels = batch
    teacher, student = TinyNet(), TwoHeadNet()
    distiller = Distiller(teacher, student, losses=[LossTerm("ce"), LossTerm("kl", temperature=1.0)]).train()
    out = distiller(images, labels)
    cls, dist = student(images)
    t_logits = teacher(images)
    torch.testing.assert_close(out.terms["ce"], F.cross_entropy(cls, labels))
    expected_kl = F.kl_div(F.log_softmax(dist, -1), F.softmax(t_logits, -1), reduction="batchmean")
    assert float(out.terms["kl"]) == pytest.approx(expected_kl.item(), rel=1e-5)
    torch.testing.assert_close(out.logits, (cls + dist) / 2)
    swapped = Distiller(teacher, student, losses=["ce"], label_head="dist")(images, labels)
    assert float(swapped.terms["ce"]) == pytest.approx(F.cross_entropy(dist, labels).item(), rel=1e-5)


def test_several_teachers_are_weighted(batch):
    images, labels = batch
    teachers = [TinyNet(), TinyNet()]
    student = TinyNet()
    out = Distiller(teachers, student, losses={"kl": 1.0}, teacher_weights=[3, 1])(images, labels)
    kl = kdkit.build_loss("kl")
    s_logits = student(images)
    expected = 0.75 * kl(s_logits, teachers[0](images)) + 0.25 * kl(s_logits, teachers[1](images))
    torch.testing.assert_close(out.loss, expected)
    with pytest.raises(ValueError, match="teacher_weights"):
        Distiller(teachers, student, teacher_weights=[1.0])


def test_renormalisation_and_teacher_resolution():
    received = {}

    class Recorder(TinyNet):
        def forward(self, x):
            received["x"] = x
            return super().forward(x)

    teacher, student = Recorder(), TinyNet()
    norms = (([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]), ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]))
    distiller = Distiller(teacher, student, renormalize=norms, teacher_input_size=8)
    pixels = torch.rand(2, 3, 16, 16)
    distiller((pixels - 0.5) / 0.5, torch.tensor([0, 1]))
    torch.testing.assert_close(received["x"], F.interpolate(pixels, size=(8, 8), mode="bilinear"))


def test_teacher_in_bf16(batch):
    teacher, student = TinyNet(), TinyNet()
    out = Distiller(teacher, student, teacher_dtype=torch.bfloat16, losses={"kl": 1.0, "fitnet": 1.0}, taps=["stage"], input_size=16)(*batch)
    assert teacher.head.weight.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_one_forward_each_and_captures_released(batch):
    calls = {"teacher": 0, "student": 0}
    teacher, student = TinyNet(), TinyNet()
    distiller = Distiller(teacher, student, losses={"stage_mse": 1.0}, taps=["stem", "stage"], input_size=16)
    teacher.stem.register_forward_hook(lambda *a: calls.__setitem__("teacher", calls["teacher"] + 1))
    student.stem.register_forward_hook(lambda *a: calls.__setitem__("student", calls["student"] + 1))
    distiller(*batch)
    assert calls == {"teacher": 1, "student": 1}
    assert not distiller._student_taps._captured and not distiller._teacher_taps[0]._captured
    student(batch[0])  # outside the Distiller: hooks record nothing
    assert not distiller._student_taps._captured


def test_hooks_are_removed():
    teacher, student = TinyNet(), TinyNet()
    with Distiller(teacher, student, losses={"stage_mse": 1.0}, taps=["stem", "stage"], input_size=16):
        assert student.stem._forward_hooks and teacher.stage._forward_hooks
    assert not student.stem._forward_hooks and not teacher.stage._forward_hooks


def test_wrapped_student_paths_resolve_on_unwrapped_model(batch):
    student = TinyNet()
    wrapped = nn.DataParallel(student)  # runs the module directly on CPU, but adds `module.`
    distiller = Distiller(TinyNet(), wrapped, losses={"stage_mse": 1.0}, taps=["stage"], input_size=16)
    assert distiller.tap_pairs == [[("stage", "stage")]]
    assert torch.isfinite(distiller(*batch).loss)


def test_compiled_student_gives_the_same_loss(batch):
    teacher, student = TinyNet(), TinyNet()
    eager = Distiller(teacher, student, losses={"ce": 0.5, "kl": 0.5, "stage_mse": 1.0}, taps=["stem", "stage"], input_size=16)
    expected = eager(*batch).loss
    eager.remove_hooks()
    compiled = Distiller(
        # aot_eager exercises what matters here (dynamo tracing through the tap hooks) without
        # inductor's C++ build, which takes minutes on a cold cache.
        teacher, torch.compile(student, backend="aot_eager"), losses={"ce": 0.5, "kl": 0.5, "stage_mse": 1.0}, taps=["stem", "stage"], input_size=16
    )
    out = compiled(*batch)
    torch.testing.assert_close(out.loss, expected, rtol=1e-4, atol=1e-5)
    out.loss.backward()
    assert student.head.weight.grad is not None


def test_timm_cnn_to_vit_tokens():
    teacher = timm.create_model("resnet10t", num_classes=NUM_CLASSES)
    student = timm.create_model(
        "vit_tiny_patch16_224", num_classes=NUM_CLASSES, img_size=32, patch_size=8, depth=2, embed_dim=24, num_heads=2
    )
    distiller = Distiller(teacher, student, losses={"ce": 1.0, "fitnet": 1.0}, taps=[("layer3", "blocks.1")], input_size=32)
    adapter = distiller.adapters["teacher0_pair0"]
    assert "TokensToGrid(num_prefix_tokens=1, grid=(4, 4))" in repr(adapter)
    out = distiller(torch.randn(2, 3, 32, 32), torch.tensor([0, 2]))
    out.loss.backward()
    assert student.blocks[0].attn.qkv.weight.grad is not None


def test_torchvision_teacher_with_timm_student():
    teacher = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    student = timm.create_model("resnet10t", num_classes=NUM_CLASSES)
    distiller = Distiller(teacher, student, losses={"kl": 1.0, "at": 1.0}, taps=[("layer4", "layer4")], input_size=32)
    assert torch.isfinite(distiller(torch.randn(2, 3, 32, 32), torch.tensor([0, 1])).loss)


def test_accelerate_prepare_and_backward(batch):
    accelerator = Accelerator(cpu=True)
    teacher, student = TinyNet(), TinyNet()
    distiller = Distiller(teacher, student, losses={"ce": 0.5, "kl": 0.5, "fitnet": 1.0}, taps=["stage"], input_size=16)
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.1)
    distiller, optimizer = accelerator.prepare(distiller, optimizer)
    before = copy.deepcopy(student.head.weight.detach())
    out = distiller(*batch)
    accelerator.backward(out.loss)
    optimizer.step()
    assert not torch.equal(before, student.head.weight)
    assert all(not p.requires_grad for p in teacher.parameters())


def test_export_student_round_trip(tmp_path, batch):
    teacher, student = TinyNet(), TinyNet()
    distiller = Distiller(teacher, student, losses={"fitnet": 1.0}, taps=["stage"], input_size=16)
    path = tmp_path / "student.safetensors"
    distiller.export_student(path, metadata={"classes": ["a", "b", "c"]})
    from kdkit.checkpoint import load_model

    fresh = TinyNet()
    load_model(fresh, path, expected_classes=["a", "b", "c"])
    student.eval(), fresh.eval()
    torch.testing.assert_close(fresh(batch[0]), student(batch[0]), rtol=0, atol=0)


# --------------------------------------------------------------------------- multi-process
def _run_distill_script(output: Path, *extra: str, processes: int) -> None:
    script = Path(__file__).parent / "scripts" / "distill_ddp.py"
    env = dict(os.environ, PYTHONPATH=str(script.parents[2]), OMP_NUM_THREADS="1")
    if processes == 1:
        cmd = [sys.executable, str(script), str(output), *extra]
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env["ACCELERATE_USE_CPU"] = "true"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), str(script), str(output), *extra]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_reach_the_parameters_of_one_with_the_same_global_batch(tmp_path):
    """`accelerate launch` with 2 CPU processes == 1 process on the global batch; taps capture
    on every process; the teacher is neither wrapped nor trained."""
    from kdkit.checkpoint import load_safetensors

    _run_distill_script(tmp_path / "one", processes=1)
    _run_distill_script(tmp_path / "two", processes=2)
    _run_distill_script(tmp_path / "no_features", "--feature-weight", "0", processes=1)
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert (one["num_processes"], two["num_processes"]) == (1, 2) and two["student_wrapped"]
    for report in (one, two):
        assert not report["teacher_in_wrapper_parameters"] and report["teacher_is_plain_module"]
        assert report["teacher_unchanged"] and not report["teacher_training_mode"]
    assert all(len(step) == 2 and min(step) > 0 for step in two["fitnet_terms"])

    state_one, _ = load_safetensors(tmp_path / "one" / "state.safetensors")
    state_two, _ = load_safetensors(tmp_path / "two" / "state.safetensors")
    assert state_one.keys() == state_two.keys() and any(key.startswith("adapters") for key in state_one)
    assert not any(key.startswith("teacher") for key in state_one)
    for key in state_one:
        torch.testing.assert_close(state_two[key], state_one[key], rtol=1e-5, atol=1e-6, msg=key)
    # The comparison is sensitive to the feature term: without it the parameters differ.
    without, _ = load_safetensors(tmp_path / "no_features" / "state.safetensors")
    assert any(not torch.allclose(without[key], state_one[key], atol=1e-4) for key in state_one if key.startswith("student"))


# --------------------------------------------------------------------------- devices, syncs, gradients
def test_sync_counter_counts_what_it_should():
    with SyncCounter() as counter:
        value = torch.ones(2).sum()
        value.item(), bool(value > 0), float(value)
    assert counter.calls == ["item", "__bool__", "__float__"]


@pytest.mark.parametrize("losses, taps", [
    ({"ce": 0.5, "kl": 0.5}, None),
    ({"ce": 0.5, "kl": 0.5, "stage_mse": 10.0}, ["stem", "stage"]),
    ({"ce": 1.0, "fitnet": 1.0, "at": 1.0}, ["stem", "stage"]),
])
def test_forward_reads_no_tensor_on_the_host(batch, losses, taps):
    teacher, student = TinyNet(16), TwoHeadNet(4)
    distiller = Distiller(teacher, student, losses=losses, taps=taps, input_size=16).train()
    with SyncCounter() as counter:
        out = distiller(*batch)
        out.loss.backward()
    assert counter.calls == []
    assert all(isinstance(value, torch.Tensor) for value in out.terms.values())


def test_teacher_on_another_device_is_probed_there(batch):
    # The recipe's case: the teacher was trained (and left) on the accelerator, the student is
    # built on the CPU. `meta` stands in for the second device.
    teacher = TinyNet(16).to("meta")
    student = TinyNet(4)
    student.stem[0].stride = (1, 1)
    distiller = Distiller(teacher, student, losses={"ce": 0.5, "fitnet": 1.0}, taps=["stem", "stage"], input_size=16,
                          renormalize=(([0.5] * 3, [0.5] * 3), ([0.0] * 3, [1.0] * 3)))
    assert len(distiller.adapters) == 2
    assert all(p.device.type == "cpu" for p in distiller.parameters())
    assert teacher.head.weight.device.type == "meta"
    distiller.to("meta")  # everything follows the Distiller, the renormalisation buffers included
    assert {b.device.type for b in distiller.buffers()} == {"meta"}
    assert not any(k.startswith("_renorm") for k in distiller.state_dict())


def test_hdkd_teacher_on_meta_with_student_on_cpu():
    teacher = timm.create_model("hdkd_teacher", num_classes=4).to("meta")
    student = timm.create_model("hdkd_student", num_classes=4, img_size=32)
    distiller = Distiller(teacher, student, losses={"ce": 0.5, "kl": 0.5, "stage_mse": 10.0},
                          taps=["stages.0", "stages.1", "stages.2"], input_size=32)
    assert len(distiller.tap_pairs[0]) == 3 and len(distiller.adapters) == 0


def _parameters_without_gradient(module: nn.Module) -> list[str]:
    return [name for name, p in module.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]


def test_every_trainable_parameter_gets_a_gradient_from_the_hdkd_objective():
    torch.manual_seed(0)
    teacher = timm.create_model("hdkd_teacher", num_classes=4)
    student = timm.create_model("hdkd_student", num_classes=4, img_size=32)
    distiller = Distiller(teacher, student, losses={"ce": 0.5, "kl": 0.5, "stage_mse": 10.0},
                          taps=["stages.0", "stages.1", "stages.2"], input_size=32).train()
    distiller(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])).loss.backward()
    assert _parameters_without_gradient(distiller) == []
    assert not distiller.find_unused_parameters


def test_no_adapter_for_a_pair_no_aligned_term_reads(batch):
    teacher, student = TinyNet(16), TinyNet(4)
    distiller = Distiller(teacher, student, losses=[LossTerm("ce"), LossTerm("fitnet", pairs=[1])], taps=["stem", "stage"], input_size=16)
    assert list(distiller.adapters) == ["teacher0_pair1"]
    distiller.train()(*batch).loss.backward()
    assert [n for n in _parameters_without_gradient(distiller) if not n.startswith("student.unused")] == []


@pytest.mark.parametrize("losses, label_head, unused", [
    ({"ce": 0.5, "kl": 0.5}, "cls", False),
    ({"ce": 1.0}, "cls", True),          # the distillation head is read by no term
    ({"ce": 1.0}, "mean", False),
    ({"stage_mse": 1.0}, "cls", True),   # no term reads any logits
])
def test_unused_heads_are_declared_for_ddp(batch, losses, label_head, unused):
    taps = ["stage"] if "stage_mse" in losses else None
    distiller = Distiller(TinyNet(), TwoHeadNet(), losses=losses, taps=taps, input_size=16, label_head=label_head).train()
    assert distiller.find_unused_parameters is unused
    distiller(*batch).loss.backward()
    missing = [n for n in _parameters_without_gradient(distiller) if not n.startswith("student.unused")]
    assert bool(missing) is unused


def test_teacher_dtype_is_an_autocast_context_whatever_the_student_runs_in(batch):
    seen = {}

    class Recorder(TinyNet):
        def forward(self, x):
            out = super().forward(x)
            seen["dtype"] = out.dtype
            return out

    distiller = Distiller(Recorder(), TinyNet(), teacher_dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        distiller(*batch)
    assert seen["dtype"] == torch.float32  # not the student's bfloat16
    distiller = Distiller(Recorder(), TinyNet(), teacher_dtype=torch.bfloat16)
    distiller(*batch)
    assert seen["dtype"] == torch.bfloat16


def test_no_weight_decay_names_are_the_students_within_the_distiller():
    student = timm.create_model("hdkd_student", num_classes=4, img_size=32)
    distiller = Distiller(timm.create_model("hdkd_teacher", num_classes=4), student)
    names = dict(distiller.named_parameters())
    assert distiller.no_weight_decay() and distiller.no_weight_decay() <= set(names)
    assert Distiller(TinyNet(), TinyNet()).no_weight_decay() == set()


def test_a_feature_loss_that_does_not_say_is_aligned(batch):
    # Not a FeatureLoss subclass, no `requires_alignment`: aligned, as FeatureLoss's default.
    class PlainMSE(nn.Module):
        inputs = "features"

        def forward(self, student_feats, teacher_feats):
            return sum(F.mse_loss(s, t) for s, t in zip(student_feats, teacher_feats))

    distiller = Distiller(TinyNet(16), TinyNet(4), losses=[LossTerm("fitnet", pairs=[0]), LossTerm(PlainMSE(), name="plain", pairs=[1])],
                          taps=["stem", "stage"], input_size=16)
    assert sorted(distiller.adapters) == ["teacher0_pair0", "teacher0_pair1"]
    assert torch.isfinite(distiller(*batch).loss)
    alone = Distiller(TinyNet(16), TinyNet(4), losses=[LossTerm(PlainMSE(), name="plain")], taps=["stage"], input_size=16)
    assert list(alone.adapters) == ["teacher0_pair0"] and torch.isfinite(alone(*batch).loss)
