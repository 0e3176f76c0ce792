"""Random tap selections and shapes either distil or fail with a clear error (hypothesis)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from kdkit import Distiller
from kdkit.losses import LOSSES

MODULES = ["stem", "stem.0", "stem.1", "stage", "stage.0", "pool", "head"]


class Net(nn.Module):
    def __init__(self, width: int, stride: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=stride, padding=1), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.stage(self.stem(x))).flatten(1))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    t_width=st.sampled_from([4, 8]),
    s_width=st.sampled_from([4, 6]),
    s_stride=st.sampled_from([1, 2]),
    pairs=st.lists(st.tuples(st.sampled_from(MODULES), st.sampled_from(MODULES)), min_size=1, max_size=3),
    loss=st.sampled_from(["stage_mse", "fitnet", "at", "sp", "rkd", "pkt", "cka", "cosine"]),
    align=st.sampled_from(["auto", "error"]),
)
def test_random_taps_work_or_fail_clearly(t_width, s_width, s_stride, pairs, loss, align):
    torch.manual_seed(0)
    teacher, student = Net(t_width, 2), Net(s_width, s_stride)
    try:
        distiller = Distiller(teacher, student, losses={loss: 1.0}, taps=pairs, input_size=16, align=align)
        images = torch.randn(4, 3, 16, 16)
        out = distiller(images, torch.tensor([0, 1, 2, 0]))
    except (ValueError, TypeError) as error:
        message = str(error)
        # A clear error names the module paths or the shapes it is about.
        assert any(path in message for pair in pairs for path in pair) or "(" in message, message
        return
    assert math.isfinite(out.loss.item())
    # Not silently wrong: the loss equals the registered loss on features captured by plain
    # forward hooks, paired in the order given and passed through the Distiller's own adapters.
    assert distiller._teacher_transforms == [[None] * len(pairs)]  # conv nets: no teacher-side reshaping
    captured: dict[tuple[str, str], torch.Tensor] = {}
    handles = [
        model.get_submodule(path).register_forward_hook(lambda m, i, o, key=(side, path): captured.__setitem__(key, o))
        for side, model in (("teacher", teacher), ("student", student))
        for path in {p[0 if side == "teacher" else 1] for p in pairs}
    ]
    with torch.no_grad():
        teacher(images)
        student(images)
    for handle in handles:
        handle.remove()
    module = LOSSES.build(loss)
    student_feats = []
    for index, (_, s_path) in enumerate(pairs):
        feature = captured["student", s_path]
        if module.requires_alignment and f"teacher0_pair{index}" in distiller.adapters:
            feature = distiller.adapters[f"teacher0_pair{index}"](feature)
        student_feats.append(feature)
    with torch.no_grad():
        expected = module(student_feats, [captured["teacher", t_path] for t_path, _ in pairs])
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert any(p.grad is not None for p in student.parameters())


@pytest.mark.parametrize("loss", ["stage_mse", "fitnet"])
def test_shape_mismatch_never_broadcasts_silently(loss):
    # (B, 8, 4, 4) vs (B, 8, 8, 8) would broadcast in a naive MSE; the Distiller must resize or refuse.
    teacher, student = Net(4, 1), Net(4, 2)
    with pytest.raises(ValueError, match=r"student tap 'stage' gives \(2, 8, 4, 4\) but teacher tap 'stage' gives \(2, 8, 8, 8\)"):
        Distiller(teacher, student, losses={loss: 1.0}, taps=["stage"], input_size=16, align="error")
    distiller = Distiller(teacher, student, losses={loss: 1.0}, taps=["stage"], input_size=16)
    assert "Resize(size=(8, 8))" in repr(distiller.adapters)
