"""Activation maps, class-activation maps and their agreement (kdkit.explain), and their figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from kdkit.explain import (
    CAM_METHODS,
    agreement_by_class,
    channel_mean_maps,
    class_activation_maps,
    compare_maps,
    feature_stage,
    map_agreement,
)
from kdkit.plots import plot_activation_grid


@pytest.fixture(autouse=True)
def one_thread():
    # Score-CAM runs hundreds of tiny forward passes; on a busy machine, thread contention makes
    # them many times slower than one thread would be.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# --------------------------------------------------------------------------- class-activation maps

CAM_MODELS = [
    ("resnet10t", {}, "layer3"),
    ("hdkd_student", {"img_size": 32}, "stages.2"),  # the conv stage shared with the HDKD teacher
    ("hdkd_student", {"img_size": 32}, "blocks.-1.norm1"),  # DFLT tokens behind a class and a distillation token
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 1}, "blocks.-1.norm1"),
]


@pytest.mark.parametrize("method", ["gradcam", "scorecam"])
@pytest.mark.parametrize("name, kwargs, layer", CAM_MODELS, ids=[f"{m[0]}-{m[2]}" for m in CAM_MODELS])
def test_class_activation_maps_have_the_input_size_and_leave_the_model_as_found(name, kwargs, layer, method):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4, **kwargs).train()
    if hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)  # train-mode forward returns (cls, dist) logits
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    marked = list(model.parameters())[-1]
    marked.grad = torch.full_like(marked, 7.0)
    images = torch.randn(2, 3, 32, 32)

    maps = class_activation_maps(model, images, target_layer=layer, method=method, targets=[1, 3])

    assert maps.shape == (2, 32, 32) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert maps.amax() == pytest.approx(1.0, abs=1e-5)  # not every map is flat
    assert all(module.training for module in model.modules())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert not frozen.requires_grad and all(p.requires_grad for p in list(model.parameters())[1:])
    assert torch.equal(marked.grad, torch.full_like(marked, 7.0))
    assert all(p.grad is None for p in list(model.parameters())[:-1])


class OneRegionTokenModel(nn.Module):
    """Tokens of 8x8-pixel patches (their mean colour) behind two prefix tokens, as HDKD's DFLT stage.

    Class 0 reads only the red channel of the patch in grid row 0, column 3; class 1 only the
    green channel of the patch in row 2, column 1. Both positions sit off the diagonal, so a
    transposed (or shifted) token layout puts the hot region elsewhere.
    """

    num_prefix_tokens = 2
    regions = {0: (0, 3), 1: (2, 1)}

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.block = nn.Identity()

    def forward(self, images):
        patches = nn.functional.avg_pool2d(images, 8) * self.scale  # (B, 3, 4, 4)
        tokens = patches.flatten(2).transpose(1, 2)  # (B, 16, 3), row-major as patch embeddings
        tokens = self.block(torch.cat([torch.zeros_like(tokens[:, :2]), tokens], dim=1))
        (r0, c0), (r1, c1) = self.regions[0], self.regions[1]
        return torch.stack([tokens[:, 2 + 4 * r0 + c0, 0], tokens[:, 2 + 4 * r1 + c1, 1]], dim=1)


def _region_images() -> torch.Tensor:
    images = torch.full((1, 3, 32, 32), 0.05)
    images[:, 0, 0:8, 24:32] = 1.0  # red where class 0 looks
    images[:, 1, 16:24, 8:16] = 2.0  # green where class 1 looks (class 1 is also the prediction)
    return images


def _hottest_patch(single_map: torch.Tensor) -> tuple[int, int]:
    patch_means = nn.functional.avg_pool2d(single_map[None, None], 8)[0, 0]
    index = int(patch_means.argmax())
    return divmod(index, patch_means.shape[1])


@pytest.mark.parametrize("method", ["gradcam", "scorecam", "layercam"])
def test_a_map_is_hot_where_the_model_looks(method):
    model, images = OneRegionTokenModel(), _region_images()
    for target, region in OneRegionTokenModel.regions.items():
        (cam,) = class_activation_maps(model, images, target_layer="block", method=method, targets=[target])
        assert _hottest_patch(cam) == region, (target, _hottest_patch(cam))
        row, column = region
        assert cam[8 * row + 4, 8 * column + 4] > 0.75  # Score-CAM blends channels by softmax: about 0.8
        assert cam[28, 4] < 0.05  # bottom-left corner, far from both regions
    (predicted,) = class_activation_maps(model, images, target_layer="block", method=method)
    assert _hottest_patch(predicted) == OneRegionTokenModel.regions[1]


def test_channel_mean_tokens_keep_their_layout():
    images = _region_images()
    images[:, 1] = 0.05  # only the red patch stands out
    (activation,) = channel_mean_maps(OneRegionTokenModel(), images, "block")
    assert _hottest_patch(activation) == OneRegionTokenModel.regions[0]


def test_negative_path_indices_count_from_the_end():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=32, patch_size=8, depth=2).eval()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(channel_mean_maps(vit, images, "blocks.-1"), channel_mean_maps(vit, images, "blocks.1"))
    with pytest.raises(ValueError, match=r"index -3 in 'blocks.-3' is out of range: blocks has 2 children"):
        channel_mean_maps(vit, images, "blocks.-3")


def test_class_activation_map_errors_name_the_problem():
    model = timm.create_model("resnet10t", num_classes=4)
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="unknown CAM method 'gradcam2'"):
        class_activation_maps(model, images, target_layer="layer3", method="gradcam2")
    with pytest.raises(ValueError, match=r"needs one target layer, 'layer\*' selects 4 modules"):
        class_activation_maps(model, images, target_layer="layer*")
    with pytest.raises(ValueError, match="has no module 'layer9'"):
        class_activation_maps(model, images, target_layer="layer9")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) maps or \(B, N, C\) tokens, 'fc' gave \(2, 4\)"):
        class_activation_maps(model, images, target_layer="fc")
    assert not any(m._forward_hooks for m in model.modules())  # released after the failure
    with pytest.raises(ValueError, match="3 targets for 2 images"):
        class_activation_maps(model, images, target_layer="layer3", targets=[0, 1, 2])
    with pytest.raises(ValueError, match="target class 4 is out of range for a model with 4 classes"):
        class_activation_maps(model, images, target_layer="layer3", targets=[0, 4])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) tensor, got \(3, 32, 32\)"):
        class_activation_maps(model, images[0], target_layer="layer3")
    seven_tokens = nn.Sequential(nn.Conv2d(3, 7, 3), nn.Flatten(2), nn.AdaptiveAvgPool1d(1), nn.Flatten(1))
    with pytest.raises(ValueError, match="cannot lay the 7 tokens of model tap '1' out on a square grid"):
        class_activation_maps(seven_tokens, images, target_layer="1")
    with pytest.raises(ValueError, match=r"needs \(B, classes\) logits, the model returned \(2, 7, 900\)"):
        class_activation_maps(seven_tokens[:2], images, target_layer="0")


def test_compare_maps_gives_one_map_set_per_model():
    torch.manual_seed(0)
    models = {
        "teacher": timm.create_model("resnet10t", num_classes=4),
        "student": timm.create_model("hdkd_student", num_classes=4, img_size=32),
    }
    layers = {"teacher": "layer3", "student": "stages.2"}
    images = torch.randn(3, 3, 32, 32)
    cams = compare_maps(models, images, layers=layers, method="gradcam", targets=torch.tensor([0, 1, 2]))
    assert list(cams) == ["teacher", "student"] and all(m.shape == (3, 32, 32) for m in cams.values())
    torch.testing.assert_close(
        cams["student"], class_activation_maps(models["student"], images, target_layer="stages.2", targets=[0, 1, 2])
    )
    activations = compare_maps(models, images, layers=layers, method="activation", batch_size=2)
    torch.testing.assert_close(activations["teacher"], channel_mean_maps(models["teacher"], images, "layer3"))
    with pytest.raises(ValueError, match=r"no target layer for models \['student'\]"):
        compare_maps(models, images, layers={"teacher": "layer3"})
    with pytest.raises(ValueError, match="unknown map method 'cam'"):
        compare_maps(models, images, layers=layers, method="cam")
    assert {"gradcam", "scorecam", "gradcam++", "layercam", "eigencam"} <= set(CAM_METHODS)


def test_feature_stage_picks_the_deepest_stage_within_the_stride():
    model = timm.create_model("resnet10t")
    assert feature_stage(model) == "layer4"
    assert feature_stage(model, max_reduction=16) == "layer3"
    assert feature_stage(timm.create_model("hdkd_student", img_size=32), max_reduction=16) == "stages.2"
    with pytest.raises(ValueError, match=r"no feature stage of stride <= 1 \(strides: \[2, 4, 8, 16, 32\]\)"):
        feature_stage(model, max_reduction=1)
    with pytest.raises(ValueError, match="Sequential has no timm `feature_info`"):
        feature_stage(nn.Sequential(nn.Conv2d(3, 3, 1)))


# --------------------------------------------------------------------------- agreement per class


def test_agreement_by_class_with_known_answers():
    torch.manual_seed(0)
    reference = torch.rand(7, 8, 8)
    compared = reference.clone()
    labels = torch.tensor([0, 0, 0, 2, 2, 0, 2])
    compared[3:5] = 1 - reference[3:5]  # class 2: inverted maps, r = -1 and disjoint hot regions
    compared[6] = 2 * reference[6] + 1  # class 2: a rescaled map agrees perfectly
    compared[5] = 0.0  # class 0: a flat map (no evidence) is left out
    out = agreement_by_class(reference, compared, labels, ["a", "b", "c"])

    a, b, c, overall = out["per_class"]["a"], out["per_class"]["b"], out["per_class"]["c"], out["overall"]
    assert (a["images"], a["flat_maps"]) == (3, 1)
    assert a["pearson_mean"] == pytest.approx(1.0) and a["pearson_std"] == pytest.approx(0.0, abs=1e-6)
    assert a["top_iou_mean"] == pytest.approx(1.0)
    assert b == {"pearson_mean": None, "pearson_std": None, "top_iou_mean": None, "top_iou_std": None, "images": 0, "flat_maps": 0}
    assert c["images"] == 3
    assert c["pearson_mean"] == pytest.approx(-1 / 3, abs=1e-5)  # (-1 - 1 + 1) / 3
    assert c["pearson_std"] == pytest.approx(torch.tensor([-1.0, -1.0, 1.0]).std().item(), abs=1e-5)
    assert c["top_iou_mean"] == pytest.approx(1 / 3)
    assert (overall["images"], overall["flat_maps"]) == (6, 1)
    assert overall["pearson_mean"] == pytest.approx((3 - 1 - 1 + 1) / 6, abs=1e-5)

    unrelated = agreement_by_class(reference, torch.rand(7, 8, 8), labels, ["a", "b", "c"])["overall"]
    assert abs(unrelated["pearson_mean"]) < 0.3 and unrelated["top_iou_mean"] < 0.4
    with pytest.raises(ValueError, match="6 labels for 7 maps"):
        agreement_by_class(reference, compared, labels[:6], ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"labels range over \[0, 2\] but there are 2 class names"):
        agreement_by_class(reference, compared, labels, ["a", "b"])


# --------------------------------------------------------------------------- figure


def test_map_grid_png_has_the_figure_size(tmp_path):
    torch.manual_seed(0)
    raw = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    maps = {"teacher": torch.rand(2, 32, 32), "student": torch.rand(2, 32, 32)}
    path = plot_activation_grid(raw, maps, tmp_path / "maps.png", row_labels=["#3 glioma", "#9 notumor"], title="Grad-CAM")
    assert Path(path).stat().st_size > 5000
    with Image.open(path) as image:
        # 2.2 inches per column (input + 2 maps) and per row, plus 0.3 inch of titles, at 120 dpi
        assert image.format == "PNG" and image.size == (792, 564)
        assert len(np.unique(np.asarray(image.convert("L")))) > 50  # images and heat maps were drawn
    with pytest.raises(ValueError, match="1 row labels for 2 images"):
        plot_activation_grid(raw, maps, tmp_path / "bad.png", row_labels=["x"])


def test_maps_run_on_the_models_device_and_dtype_and_come_back_to_the_cpu():
    # A model trained in bfloat16 (or on a GPU) and CPU float32 figure images: the images move
    # to the model, the maps come back as CPU float32.
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=3).to(torch.bfloat16)
    images = torch.randn(2, 3, 32, 32)
    maps = channel_mean_maps(model, images, "layer3")
    assert maps.shape == (2, 32, 32) and maps.dtype == torch.float32 and maps.device.type == "cpu"
    cams = class_activation_maps(model.float(), images.to(torch.float64), target_layer="layer3")
    assert cams.shape == (2, 32, 32) and torch.isfinite(cams).all()


def test_maps_feed_a_model_on_another_device_its_own_device():
    # `meta` stands in for a GPU: the model must receive images on its device, not the CPU's.
    model = timm.create_model("resnet10t", num_classes=3).to("meta")
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].device.type))
    with pytest.raises((NotImplementedError, RuntimeError)):  # a meta map cannot be read back
        channel_mean_maps(model, torch.randn(2, 3, 32, 32), "layer3")
    assert seen == ["meta"]
