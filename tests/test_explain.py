"""Activation maps and their agreement (kdkit.explain)."""

from __future__ import annotations

import pytest
import timm
import torch

from kdkit.explain import channel_mean_maps, map_agreement


@pytest.mark.parametrize(
    "name, kwargs, tap",
    [
        ("resnet10t", {}, "layer3"),
        ("hdkd_student", {"img_size": 32}, "stages.2"),
        ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 1}, "blocks.0"),
    ],
)
def test_maps_have_the_input_size_and_are_finite(name, kwargs, tap):
    model = timm.create_model(name, num_classes=4, **kwargs).train()
    images = torch.randn(3, 3, 32, 32)
    maps = channel_mean_maps(model, images, tap)
    assert maps.shape == (3, 32, 32)
    assert torch.isfinite(maps).all()
    assert maps.amin() == 0 and maps.amax() == pytest.approx(1.0)
    assert model.training  # the model's mode is restored
    assert not any(m._forward_hooks for m in model.modules())  # no hook left behind


def test_one_module_only():
    with pytest.raises(ValueError, match="needs one tapped module"):
        channel_mean_maps(timm.create_model("resnet10t"), torch.randn(1, 3, 32, 32), "layer*")


def test_agreement_is_one_for_identical_maps_and_lower_for_unrelated():
    torch.manual_seed(0)
    maps = torch.rand(4, 16, 16)
    same = map_agreement(maps, maps)
    torch.testing.assert_close(same["pearson"], torch.ones(4))
    torch.testing.assert_close(same["top_iou"], torch.ones(4))
    other = map_agreement(maps, torch.rand(4, 16, 16))
    assert (other["pearson"].abs() < 0.5).all() and (other["top_iou"] < 0.5).all()
    inverted = map_agreement(maps, 1 - maps)
    torch.testing.assert_close(inverted["pearson"], -torch.ones(4))
    assert (inverted["top_iou"] == 0).all()


def test_agreement_by_hand():
    a = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    b = torch.tensor([[[0.0, 1.0], [3.0, 2.0]]])
    # centred: a = (-1.5, -.5, .5, 1.5), b = (-1.5, -.5, 1.5, .5): dot 2.25+.25+.75+.75 = 4, norms^2 = 5
    out = map_agreement(a, b, top_fraction=0.5)
    assert out["pearson"].item() == pytest.approx(0.8)
    assert out["top_iou"].item() == pytest.approx(1.0)  # both top halves are the last two pixels
    with pytest.raises(ValueError, match="one shape"):
        map_agreement(a, b[:, :1])
