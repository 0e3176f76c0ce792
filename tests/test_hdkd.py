"""Tests for the HDKD model family registered in timm by ``kdkit_zoo``."""

from __future__ import annotations

import math
import shutil

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SEModule, resample_abs_pos_embed
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import kdkit_zoo  # noqa: F401  (registers the models)
from kdkit_zoo.hdkd import Cbam, DfltPatchEmbed, MbcsaBlock

ALL_VARIANTS = timm.list_models("hdkd_*")
TEACHERS = [name for name in ALL_VARIANTS if name.startswith("hdkd_teacher")]
STUDENTS = [name for name in ALL_VARIANTS if name.startswith("hdkd_student")]
DISTILLED = [name for name in STUDENTS if "nodistill" not in name]
NON_DISTILLED = [name for name in STUDENTS if "nodistill" in name]
ABLATIONS = [name for name in ALL_VARIANTS if name.endswith(("_stem4", "_se"))]

EMBED_DIM = 256
STAGE_CHANNELS = (64, 96, 192)
# MBCSA blocks per model in the paper: teacher 6 + 9, student 2 + 3.
MBCSA_BLOCKS = {"hdkd_teacher": 15, "hdkd_student": 5, "hdkd_student_nodistill": 5}
# Conv/matmul-only MACs at 224 px (the paper's ptflops figures also count norms and activations).
MACS_224 = {"hdkd_teacher": 5.70e9, "hdkd_student": 2.02e9, "hdkd_student_nodistill": 2.02e9}


def base_variant(name: str) -> str:
    return name.removesuffix("_stem4").removesuffix("_se")


def stem_stride(name: str) -> int:
    return 4 if name.endswith("_stem4") else 2


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def create_on_meta(name: str, **kwargs) -> nn.Module:
    """Builds a model without allocating or initialising real weights (shapes and counts only)."""
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def measured_macs(name: str, size: int = 224) -> float:
    model = create_on_meta(name, num_classes=7).eval()
    # The math SDPA backend decomposes attention into matmuls the counter sees on every device.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, size, size, device="meta"))
    return counter.get_total_flops() / 2  # the counter reports FLOPs = 2 * MACs


def test_registered_names():
    assert set(ALL_VARIANTS) == {
        "hdkd_teacher",
        "hdkd_teacher_stem4",
        "hdkd_teacher_se",
        "hdkd_student",
        "hdkd_student_stem4",
        "hdkd_student_se",
        "hdkd_student_nodistill",
        "hdkd_student_nodistill_stem4",
        "hdkd_student_nodistill_se",
    }


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_forward_backward(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3, img_size=32).train()
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3)
    F.cross_entropy(logits, torch.tensor([0, 2])).backward()
    without_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not without_grad
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "num_classes", "expected"),
    [
        ("hdkd_teacher", 7, 3_948_677),
        ("hdkd_teacher", 4, 3_948_290),
        ("hdkd_student", 7, 3_727_288),
        ("hdkd_student_nodistill", 7, 3_724_977),
    ],
)
def test_parity_parameter_counts(name, num_classes, expected):
    assert param_count(create_on_meta(name, num_classes=num_classes)) == expected


@pytest.mark.parametrize("name", ABLATIONS)
def test_ablation_parameter_counts(name):
    base = param_count(create_on_meta(base_variant(name), num_classes=7))
    count = param_count(create_on_meta(name, num_classes=7))
    if name.endswith("_stem4"):
        # Same layers; only the student's position-embedding grid shrinks, from 14x14 to 7x7 at 224 px.
        removed_positions = (224 // 16) ** 2 - (224 // 32) ** 2 if name in STUDENTS else 0
        assert count == base - removed_positions * EMBED_DIM
    else:
        # SE's MLP has as many weights as CBAM's channel MLP; the 7x7 spatial conv (2 * 49) goes.
        assert count == base - 98 * MBCSA_BLOCKS[base_variant(name)]


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_macs_at_224(name):
    expected = MACS_224[base_variant(name)] / (4 if name.endswith("_stem4") else 1)
    assert measured_macs(name) == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_feature_info_and_features_only(name):
    stride = stem_stride(name)
    expected_info = [
        dict(num_chs=64, reduction=stride, module="stages.0"),
        dict(num_chs=96, reduction=2 * stride, module="stages.1"),
        dict(num_chs=192, reduction=4 * stride, module="stages.2"),
    ]
    assert create_on_meta(name).feature_info == expected_info

    extractor = timm.create_model(name, features_only=True, img_size=64).eval()
    maps = extractor(torch.randn(2, 3, 64, 64))
    expected_shapes = [(2, info["num_chs"], 64 // info["reduction"], 64 // info["reduction"]) for info in expected_info]
    assert [m.shape for m in maps] == expected_shapes
    assert extractor.feature_info.channels() == list(STAGE_CHANNELS)

    last_two = timm.create_model(name, features_only=True, out_indices=(1, 2), img_size=64)
    assert [m.shape[1] for m in last_two(torch.randn(2, 3, 64, 64))] == [96, 192]


@pytest.mark.parametrize("ablation", ["", "_stem4", "_se"])
def test_teacher_and_student_stage_shapes_match(ablation):
    names = [f"hdkd_teacher{ablation}", f"hdkd_student{ablation}", f"hdkd_student_nodistill{ablation}"]
    stride = 4 if ablation == "_stem4" else 2
    # 224 px on the meta device (shapes only), 64 px for real.
    for size, device in ((224, "meta"), (64, "cpu")):
        expected = [(1, c, size // (stride * 2**i), size // (stride * 2**i)) for i, c in enumerate(STAGE_CHANNELS)]
        with torch.device(device):
            x = torch.randn(1, 3, size, size)
            for name in names:
                model = timm.create_model(name, img_size=size).eval()
                maps = model.forward_intermediates(x, intermediates_only=True)
                assert [m.shape for m in maps] == expected, (name, size)


@pytest.mark.parametrize("name", DISTILLED)
def test_eval_output_is_average_of_both_heads(name):
    model = timm.create_model(name, num_classes=5, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        cls_logits, dist_logits = model.head(tokens[:, 0]), model.head_dist(tokens[:, 1])
        assert not torch.allclose(cls_logits, dist_logits)
        torch.testing.assert_close(model(x), (cls_logits + dist_logits) / 2)


@pytest.mark.parametrize("name", NON_DISTILLED)
def test_non_distilled_student_classifies_the_class_token(name):
    model = timm.create_model(name, num_classes=5, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.head(model.forward_features(x)[:, 0]))


@pytest.mark.parametrize("name", TEACHERS)
def test_teacher_head_is_pooled_two_linears(name):
    model = timm.create_model(name, num_classes=5, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feature_map = model.forward_features(x)
        hidden = model.head.pre_logits(feature_map.mean(dim=(2, 3)))
        torch.testing.assert_close(model.forward_head(feature_map, pre_logits=True), hidden)
        torch.testing.assert_close(model(x), model.head.fc(hidden))
    assert (model.head.pre_logits.in_features, model.head.pre_logits.out_features) == (192, 128)


def test_dflt_block_layout():
    model = timm.create_model("hdkd_student", img_size=32)
    block = model.blocks[0].eval()
    assert len(model.blocks) == 3
    assert block.attn.qkv.bias is None and block.attn.proj.bias is not None
    assert (block.attn.num_heads, block.attn.head_dim) == (8, 32)
    assert (block.mlp.fc1.out_features, type(block.mlp.act)) == (1024, nn.GELU)
    x = torch.randn(2, 5, EMBED_DIM)
    with torch.no_grad():
        after_attn = x + block.attn(block.norm1(x))
        torch.testing.assert_close(block(x), after_attn + block.mlp(after_attn))


@pytest.mark.parametrize("name", DISTILLED)
def test_set_distilled_training(name):
    model = timm.create_model(name, num_classes=5, img_size=32).train()
    x = torch.randn(2, 3, 32, 32)
    assert model.distilled_training is False
    averaged = model(x)
    assert isinstance(averaged, torch.Tensor)

    model.set_distilled_training()
    cls_logits, dist_logits = model(x)
    assert cls_logits.shape == dist_logits.shape == (2, 5)
    torch.testing.assert_close((cls_logits + dist_logits) / 2, averaged)

    assert isinstance(model.eval()(x), torch.Tensor)
    model.train().set_distilled_training(False)
    assert isinstance(model(x), torch.Tensor)


@pytest.mark.parametrize("name", STUDENTS)
def test_prefix_tokens(name):
    model = create_on_meta(name)
    distilled = name in DISTILLED
    assert model.num_prefix_tokens == (2 if distilled else 1)
    assert hasattr(model, "dist_token") == hasattr(model, "head_dist") == distilled
    assert hasattr(model, "set_distilled_training") == distilled
    assert model.pos_embed.shape == (1, model.num_prefix_tokens + model.patch_embed.num_patches, EMBED_DIM)


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_reset_classifier(name):
    model = timm.create_model(name, num_classes=3, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)

    model.reset_classifier(5)
    assert model(x).shape == (2, 5)
    assert model.num_classes == 5
    heads = model.get_classifier()
    classifier_names = model.pretrained_cfg["classifier"]
    classifier_names = [classifier_names] if isinstance(classifier_names, str) else classifier_names
    assert [model.get_submodule(n) for n in classifier_names] == list(heads if isinstance(heads, tuple) else [heads])
    assert all(model.get_submodule(n).out_features == 5 for n in classifier_names)

    model.reset_classifier(0)
    with torch.no_grad():
        pre_logits = model(x)
        assert pre_logits.shape == (2, model.head_hidden_size)
        torch.testing.assert_close(pre_logits, model.forward_head(model.forward_features(x), pre_logits=True))
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(5, global_pool="max")


def test_head_sizes():
    teacher = create_on_meta("hdkd_teacher")
    assert (teacher.num_features, teacher.head_hidden_size) == (192, 128)
    assert create_on_meta("hdkd_student").num_features == create_on_meta("hdkd_student").head_hidden_size == EMBED_DIM


@pytest.mark.parametrize("size", [64, 96, 112, 224])
@pytest.mark.parametrize("name", STUDENTS)
def test_student_img_size(name, size):
    multiple = 8 * stem_stride(name)
    if size % multiple:
        with pytest.raises(ValueError, match=rf"{size}x{size}.*multiple of {multiple}"):
            timm.create_model(name, img_size=size)
        return
    model = timm.create_model(name, num_classes=4, img_size=size).eval()
    assert model.pretrained_cfg["input_size"] == (3, size, size)
    assert model.pos_embed.shape[1] == model.num_prefix_tokens + (size // multiple) ** 2
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 4)


@pytest.mark.parametrize("size", [64, 96, 112])
@pytest.mark.parametrize("name", TEACHERS)
def test_teacher_img_size(name, size):
    model = timm.create_model(name, num_classes=4, img_size=size).eval()
    assert model.pretrained_cfg["input_size"] == (3, size, size)
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 4)


@pytest.mark.parametrize("name", STUDENTS)
def test_other_input_size_resamples_position_embedding(name):
    torch.manual_seed(0)
    multiple = 8 * stem_stride(name)
    built, used = 4 * multiple, 6 * multiple
    model = timm.create_model(name, num_classes=3, img_size=built).eval()
    reference = timm.create_model(name, num_classes=3, img_size=used).eval()
    state = model.state_dict()
    state["pos_embed"] = resample_abs_pos_embed(
        state["pos_embed"], new_size=(6, 6), old_size=(4, 4), num_prefix_tokens=model.num_prefix_tokens
    )
    reference.load_state_dict(state)
    x = torch.randn(2, 3, used, used)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


@pytest.mark.parametrize("name", STUDENTS)
def test_input_size_not_multiple_raises_clear_error(name):
    multiple = 8 * stem_stride(name)
    model = timm.create_model(name, img_size=64).eval()
    x = torch.randn(1, 3, 40, 40)
    with pytest.raises(ValueError, match=rf"input size 40x40 is not a multiple of {multiple}"):
        model(x)
    with pytest.raises(ValueError, match="40x40"):
        model.forward_intermediates(x)
    # The conv stages alone accept the size.
    assert len(model.forward_intermediates(x, intermediates_only=True)) == 3


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_forward_intermediates(name):
    model = timm.create_model(name, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [m.shape for m in maps] == [
            (2, info["num_chs"], 64 // info["reduction"], 64 // info["reduction"]) for info in model.feature_info
        ]
        if name in STUDENTS:
            assert final.shape == (2, model.num_prefix_tokens + model.patch_embed.num_patches, EMBED_DIM)
        else:
            assert final.shape == maps[-1].shape

        last = model.forward_intermediates(x, indices=1, intermediates_only=True)
        first = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
    assert len(last) == len(first) == 1
    torch.testing.assert_close(last[0], maps[-1])
    torch.testing.assert_close(first[0], maps[0])
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NLC")


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_pretrained_cfg(name):
    model = timm.create_model(name)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224)
    assert (cfg["mean"], cfg["std"]) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert not cfg.get("url") and not cfg.get("hf_hub_id")
    first_conv = model.get_submodule(cfg["first_conv"])
    assert isinstance(first_conv, nn.Conv2d) and first_conv.in_channels == 3
    assert first_conv.stride == (stem_stride(name),) * 2

    gray = timm.create_model(name, in_chans=1, img_size=64)
    assert gray.pretrained_cfg["input_size"] == (1, 64, 64)
    assert gray.get_submodule(cfg["first_conv"]).in_channels == 1


def test_pretrained_weights_are_not_offered():
    with pytest.raises(RuntimeError, match="pretrained"):
        timm.create_model("hdkd_student", pretrained=True)


def test_mlp_prenorm_option():
    default = create_on_meta("hdkd_student", num_classes=7)
    prenorm = create_on_meta("hdkd_student", num_classes=7, mlp_prenorm=True)
    assert all(isinstance(block.norm2, nn.Identity) for block in default.blocks)
    assert all(isinstance(block.norm2, nn.LayerNorm) for block in prenorm.blocks)
    assert param_count(prenorm) == param_count(default) + len(default.blocks) * 2 * EMBED_DIM
    small = timm.create_model("hdkd_student", num_classes=7, mlp_prenorm=True, img_size=32).eval()
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_stochastic_depth_and_dropout():
    model = timm.create_model("hdkd_student", num_classes=3, img_size=32, drop_rate=0.5, drop_path_rate=0.2)
    mbcsa_rates = [getattr(block.drop_path, "drop_prob", 0.0) for stage in model.stages[1:] for block in stage]
    dflt_rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in model.blocks]
    # Rising linearly from 0 over the 5 MBCSA blocks, then the 3 transformer blocks.
    assert mbcsa_rates + dflt_rates == pytest.approx([0.2 * i / 7 for i in range(8)])
    assert model.head_drop.p == 0.5
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(x), model(x))


@pytest.mark.parametrize("name", ["hdkd_teacher", "hdkd_student"])
def test_init(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
        elif isinstance(module, nn.Linear) and module.bias is not None:
            assert torch.all(module.bias == 0)
    first_expand = model.stages[1][0].conv_pw.weight  # 64 -> 256, fan-out 256
    assert first_expand.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.1)
    depthwise = model.stages[1][0].conv_dw.weight  # fan-out per group 9
    assert depthwise.std().item() == pytest.approx(math.sqrt(2 / 9), rel=0.1)
    if name == "hdkd_student":
        assert model.patch_embed.proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)
        assert 0 < model.cls_token.abs().max().item() < 0.1
        assert 0 < model.dist_token.abs().max().item() < 0.1


@pytest.mark.parametrize("name", STUDENTS)
def test_no_weight_decay(name):
    model = create_on_meta(name)
    names = model.no_weight_decay()
    assert names <= dict(model.named_parameters()).keys()
    assert {"pos_embed", "cls_token"} <= names
    assert ("dist_token" in names) == (name in DISTILLED)


def test_cbam_follows_its_definition():
    torch.manual_seed(0)
    cbam = Cbam(32).eval()
    x = torch.randn(2, 32, 5, 5)
    w = cbam.state_dict()

    def mlp(pooled):
        return F.conv2d(F.gelu(F.conv2d(pooled, w["channel_attn.fc1.weight"])), w["channel_attn.fc2.weight"])

    channel_gate = torch.sigmoid(mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True)))
    attended = x * channel_gate
    spatial_in = torch.cat([attended.mean(1, keepdim=True), attended.amax(1, keepdim=True)], dim=1)
    spatial_gate = torch.sigmoid(F.conv2d(spatial_in, w["spatial_attn.conv.weight"], padding=3))
    with torch.no_grad():
        torch.testing.assert_close(cbam(x), attended * spatial_gate + x)
    assert w["channel_attn.fc1.weight"].shape == (2, 32, 1, 1)
    assert param_count(cbam) == 2 * 32 * 2 + 2 * 7 * 7


def test_mbcsa_block_shortcut_and_layout():
    torch.manual_seed(0)
    block = MbcsaBlock(16, 24, downsample=True).eval()
    x = torch.randn(2, 16, 9, 9)
    assert block(x).shape == (2, 24, 5, 5)
    assert block.conv_pw.stride == (2, 2) and block.conv_pw.out_channels == 64
    assert block.conv_dw.groups == 64 and isinstance(block.attn, Cbam)
    assert all(conv.bias is None for conv in block.modules() if isinstance(conv, nn.Conv2d))
    # Zeroing the last BN silences the branch and leaves the max-pool + 1x1 shortcut.
    nn.init.zeros_(block.bn3.weight)
    nn.init.zeros_(block.bn3.bias)
    with torch.no_grad():
        expected = F.conv2d(F.max_pool2d(x, 3, 2, 1), block.shortcut.proj.weight)
        torch.testing.assert_close(block(x), expected)

    identity_block = MbcsaBlock(24, 24).eval()
    nn.init.zeros_(identity_block.bn3.weight)
    y = torch.randn(2, 24, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(identity_block(y), y)
    with pytest.raises(ValueError, match="16 -> 24"):
        MbcsaBlock(16, 24)


def test_se_ablation_block():
    block = MbcsaBlock(96, 96, attn_layer="se")
    assert isinstance(block.attn, SEModule)
    assert block.attn.fc1.out_channels == 96 // 4 and block.attn.fc1.in_channels == 4 * 96
    assert block.attn.fc1.bias is None and isinstance(block.attn.act, nn.GELU)
    with pytest.raises(ValueError, match="attn_layer"):
        MbcsaBlock(96, 96, attn_layer="eca")


def test_patch_embed_token_layout():
    embed = DfltPatchEmbed(3, 12, grid_size=(2, 2))
    embed.patch_norm, embed.proj, embed.norm = nn.Identity(), nn.Identity(), nn.Identity()
    x = torch.randn(1, 3, 4, 4)
    tokens = embed(x)
    assert tokens.shape == (1, 4, 12)
    # Token 1 is the top-right patch, flattened as (row, column, channel).
    torch.testing.assert_close(tokens[0, 1], x[0, :, 0:2, 2:4].permute(1, 2, 0).reshape(-1))


@pytest.mark.parametrize("name", ["hdkd_student", "hdkd_student_nodistill"])
def test_traces_as_one_graph(name):
    torch._dynamo.reset()
    model = timm.create_model(name, num_classes=3, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(not any(map(shutil.which, ("c++", "g++", "clang++"))), reason="inductor needs a C++ compiler")
def test_inductor_compiled_student_matches_eager():
    torch._dynamo.reset()
    model = timm.create_model("hdkd_student", num_classes=3, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)
