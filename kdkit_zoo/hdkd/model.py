"""HDKD teacher and student models, registered in timm.

Paper: `HDKD: Hybrid Data-Efficient Knowledge Distillation Network for Medical Image Classification`
(EL-Assiouti et al.) - https://arxiv.org/abs/2407.07516

HDKD distils a pure-CNN teacher into a hybrid CNN-transformer student. Both share the same three
convolutional stages (a 3x3 conv stem stack and two stages of MBCSA blocks, MBConv with CBAM
attention), so at any input size their stage maps have identical shapes and feature distillation
needs no adapter. The student then cuts the last map into 2x2 patches and runs a small transformer
(the DFLT stage) with a class token and, in the distilled model, a DeiT-style distillation token.

The default layout reproduces the authors' models parameter for parameter; the ``*_stem4`` and
``*_se`` variants are the paper's stem-stride and attention ablations (Tables 6 and 7).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Literal

import torch
from einops import rearrange
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    Attention,
    DropPath,
    Mlp,
    SEModule,
    calculate_drop_path_rates,
    resample_abs_pos_embed,
    to_2tuple,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

__all__ = ["Cbam", "MbcsaBlock", "DfltBlock", "DfltPatchEmbed", "HdkdTeacher", "HdkdStudent", "HdkdStudentDistilled"]

AttnLayer = Literal["cbam", "se"]


class ChannelAttention(nn.Module):
    """CBAM channel attention: a sigmoid gate from a shared MLP over global average and max pools.

    Args:
        channels: Number of input channels.
        reduction: Channel reduction of the shared MLP's hidden layer.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden_chs = channels // reduction
        self.fc1 = nn.Conv2d(channels, hidden_chs, 1, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_chs, channels, 1, bias=False)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg_pooled = x.mean(dim=(2, 3), keepdim=True)
        max_pooled = x.amax(dim=(2, 3), keepdim=True)
        return torch.sigmoid(self._mlp(avg_pooled) + self._mlp(max_pooled))


class SpatialAttention(nn.Module):
    """CBAM spatial attention: a sigmoid gate from a conv over the channel-wise mean and max maps.

    Args:
        kernel_size: Size of the square convolution kernel.
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class Cbam(nn.Module):
    """Convolutional block attention module with its own residual connection, as in HDKD.

    Channel attention is applied first, spatial attention to its result, and the input is added
    back: ``out = x' * spatial(x') + x`` with ``x' = x * channel(x)``.

    Args:
        channels: Number of input channels.
        reduction: Channel reduction of the channel-attention MLP.
        kernel_size: Kernel size of the spatial-attention convolution.
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel_attn = ChannelAttention(channels, reduction)
        self.spatial_attn = SpatialAttention(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended = x * self.channel_attn(x)
        return attended * self.spatial_attn(attended) + x


class MbcsaBlock(nn.Module):
    """Mobile channel-spatial attention (MBCSA) block: a pre-norm inverted bottleneck with CBAM.

    Branch: BN -> 1x1 expand (stride 2 when downsampling) -> BN -> GELU -> 3x3 depthwise -> BN ->
    GELU -> attention -> 1x1 project -> BN. Shortcut: identity, or max-pool -> 1x1 conv when
    downsampling. With ``attn_layer="se"`` the block is the MBConv of the paper's Table 6 ablation:
    timm's ``SEModule`` on the expanded channels, reduced to a quarter of the block's *input*
    channels (the MBConv/EfficientNet convention the authors follow), GELU, no biases. That swap
    removes exactly the 98 weights of CBAM's 7x7 spatial conv, since both MLPs then hold
    ``2 * in_chs**2`` weights.

    Args:
        in_chs: Input channels.
        out_chs: Output channels; must equal ``in_chs`` unless downsampling.
        downsample: Halve the resolution (and allow a channel change) in this block.
        attn_layer: ``"cbam"`` (MBCSA) or ``"se"`` (MBConv ablation).
        expansion: Expansion ratio of the inverted bottleneck.
        drop_path: Stochastic-depth rate of the branch.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        downsample: bool = False,
        attn_layer: AttnLayer = "cbam",
        expansion: int = 4,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if not downsample and in_chs != out_chs:
            raise ValueError(f"a block without downsampling keeps its width, got {in_chs} -> {out_chs} channels")
        mid_chs = in_chs * expansion
        if downsample:
            self.shortcut = nn.Sequential(
                OrderedDict(
                    pool=nn.MaxPool2d(3, stride=2, padding=1),
                    proj=nn.Conv2d(in_chs, out_chs, 1, bias=False),
                )
            )
        else:
            self.shortcut = nn.Identity()
        self.pre_norm = nn.BatchNorm2d(in_chs)
        self.conv_pw = nn.Conv2d(in_chs, mid_chs, 1, stride=2 if downsample else 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_chs)
        self.act1 = nn.GELU()
        self.conv_dw = nn.Conv2d(mid_chs, mid_chs, 3, padding=1, groups=mid_chs, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_chs)
        self.act2 = nn.GELU()
        if attn_layer == "cbam":
            self.attn = Cbam(mid_chs)
        elif attn_layer == "se":
            self.attn = SEModule(mid_chs, rd_channels=in_chs // 4, bias=False, act_layer=nn.GELU)
        else:
            raise ValueError(f"attn_layer must be 'cbam' or 'se', got {attn_layer!r}")
        self.conv_pwl = nn.Conv2d(mid_chs, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.act1(self.bn1(self.conv_pw(self.pre_norm(x))))
        branch = self.act2(self.bn2(self.conv_dw(branch)))
        branch = self.bn3(self.conv_pwl(self.attn(branch)))
        return self.shortcut(x) + self.drop_path(branch)


class DfltPatchEmbed(nn.Module):
    """Tokenises a conv feature map into 2x2 patches: flatten -> LayerNorm -> Linear -> LayerNorm.

    Each patch is flattened in (row, column, channel) order, the authors' layout, so their
    checkpoints map onto ``proj`` unchanged.

    Args:
        in_chs: Channels of the feature map.
        embed_dim: Token width.
        grid_size: Patch grid (rows, columns) at the nominal input size; sizes the position embedding.
        patch_size: Side of the square patches.
    """

    def __init__(self, in_chs: int, embed_dim: int, grid_size: tuple[int, int], patch_size: int = 2) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = grid_size
        self.num_patches = grid_size[0] * grid_size[1]
        patch_dim = in_chs * patch_size * patch_size
        self.patch_norm = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=self.patch_size, p2=self.patch_size)
        return self.norm(self.proj(self.patch_norm(x)))


class DfltBlock(nn.Module):
    """Transformer layer of the DFLT stage: pre-norm attention, then an MLP.

    Args:
        dim: Token width.
        num_heads: Attention heads (head width ``dim // num_heads``).
        mlp_ratio: MLP hidden width relative to ``dim``.
        mlp_prenorm: Put a LayerNorm before the MLP (conventional ViT). The authors' model has none,
            so the default keeps parity with their parameter count and outputs.
        drop_path: Stochastic-depth rate of both residual branches.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        mlp_prenorm: bool = False,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=False)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim) if mlp_prenorm else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def _conv_bn_gelu(in_chs: int, out_chs: int, stride: int) -> nn.Sequential:
    # Padding 1 at any stride, as in the authors' code: a stride-4 stem then gives exactly a quarter-size map.
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False),
            bn=nn.BatchNorm2d(out_chs),
            act=nn.GELU(),
        )
    )


def _build_conv_stages(
    in_chans: int,
    widths: tuple[int, int, int],
    depths: tuple[int, int, int],
    stem_stride: int,
    attn_layer: AttnLayer,
    drop_path_rates: list[float],
) -> tuple[nn.Sequential, list[dict]]:
    """Builds the three conv stages shared by teacher and student, and their ``feature_info``.

    Args:
        in_chans: Image channels.
        widths: Output channels of the stem stack and the two MBCSA stages.
        depths: Convs in the stem stack, blocks in each MBCSA stage.
        stem_stride: Stride of the first stem conv (2, or 4 for the Table 7 ablation).
        attn_layer: Attention inside the MBCSA blocks.
        drop_path_rates: One stochastic-depth rate per MBCSA block, in order.

    Returns:
        The stages as an ``nn.Sequential`` and one ``feature_info`` dict per stage.
    """
    stem = nn.Sequential(
        *[
            _conv_bn_gelu(in_chans if i == 0 else widths[0], widths[0], stride=stem_stride if i == 0 else 1)
            for i in range(depths[0])
        ]
    )
    stages = [stem]
    feature_info = [dict(num_chs=widths[0], reduction=stem_stride, module="stages.0")]
    rates = iter(drop_path_rates)
    for stage_idx in (1, 2):
        in_chs, out_chs = widths[stage_idx - 1], widths[stage_idx]
        blocks = [
            MbcsaBlock(
                in_chs if i == 0 else out_chs,
                out_chs,
                downsample=i == 0,
                attn_layer=attn_layer,
                drop_path=next(rates),
            )
            for i in range(depths[stage_idx])
        ]
        stages.append(nn.Sequential(*blocks))
        feature_info.append(dict(num_chs=out_chs, reduction=stem_stride * 2**stage_idx, module=f"stages.{stage_idx}"))
    return nn.Sequential(*stages), feature_info


def _stage_intermediates(
    stages: nn.Sequential,
    x: torch.Tensor,
    indices: int | list[int] | None,
    stop_early: bool,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Runs the conv stages, collecting the maps selected by ``indices`` (timm semantics)."""
    take_indices, max_index = feature_take_indices(len(stages), indices)
    intermediates = []
    for stage_idx, stage in enumerate(stages[: max_index + 1] if stop_early else stages):
        x = stage(x)
        if stage_idx in take_indices:
            intermediates.append(x)
    return x, intermediates


def _check_output_fmt(output_fmt: str) -> None:
    if output_fmt != "NCHW":
        raise ValueError(f"the conv-stage intermediates are only available as NCHW, got output_fmt={output_fmt!r}")


def _init_weights(module: nn.Module) -> None:
    """timm-style init: truncated normal linears, fan-out (group-aware) He normal convs, unit norms."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, std=math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class TeacherHead(nn.Module):
    """Teacher classifier: global average pool -> Linear to a hidden width -> Linear to the classes.

    There is no activation between the two linears, as in the authors' code.

    Args:
        in_features: Channels of the last conv stage.
        hidden_size: Width of the hidden linear (the pre-logits features).
        num_classes: Number of classes; 0 makes ``fc`` an identity.
        drop_rate: Dropout before ``fc``.
    """

    def __init__(self, in_features: int, hidden_size: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.pre_logits = nn.Linear(in_features, hidden_size)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int) -> None:
        """Replaces the final linear, keeping the hidden one (it is part of the trained trunk)."""
        self.fc = nn.Linear(self.pre_logits.out_features, num_classes) if num_classes > 0 else nn.Identity()
        self.fc.to(self.pre_logits.weight.device, self.pre_logits.weight.dtype)
        _init_weights(self.fc)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.pre_logits(x.mean(dim=(2, 3))))
        return x if pre_logits else self.fc(x)


class HdkdTeacher(nn.Module):
    """HDKD teacher: the three shared conv stages, then a pooled two-layer classifier.

    Args:
        in_chans: Image channels.
        num_classes: Number of classes; 0 for a model without classifier.
        widths: Channels of the stem stack and the two MBCSA stages.
        depths: Stem convs and MBCSA blocks per stage (the paper's teacher uses 6, 6, 9).
        stem_stride: Stride of the first stem conv; 4 is the Table 7 ablation.
        attn_layer: ``"cbam"`` (MBCSA) or ``"se"`` (the Table 6 MBConv ablation).
        head_hidden_size: Width of the head's hidden linear.
        drop_rate: Dropout before the final linear.
        drop_path_rate: Stochastic-depth rate, rising linearly over the MBCSA blocks.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        widths: tuple[int, int, int] = (64, 96, 192),
        depths: tuple[int, int, int] = (6, 6, 9),
        stem_stride: int = 2,
        attn_layer: AttnLayer = "cbam",
        head_hidden_size: int = 128,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = widths[-1]
        self.head_hidden_size = head_hidden_size
        self.global_pool = "avg"
        drop_path_rates = calculate_drop_path_rates(drop_path_rate, depths[1] + depths[2])
        self.stages, self.feature_info = _build_conv_stages(
            in_chans, widths, depths, stem_stride, attn_layer, drop_path_rates
        )
        self.head = TeacherHead(self.num_features, head_hidden_size, num_classes, drop_rate)
        self.apply(_init_weights)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replaces the final linear with one for ``num_classes`` classes (0 removes it).

        Raises:
            ValueError: ``global_pool`` is neither None nor ``"avg"`` (the head's hidden linear needs a pooled vector).
        """
        if global_pool not in (None, "avg"):
            raise ValueError(f"the HDKD teacher pools by average only, got global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.head.reset(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward pass that also returns the conv-stage maps (the ``feature_info`` entries).

        Args:
            x: Input images.
            indices: Last n stages if an int, all if None, else the listed stage indices.
            norm: Accepted for timm compatibility; the conv stages end without a norm layer.
            stop_early: Stop after the last requested stage.
            output_fmt: Layout of the maps; only ``"NCHW"``.
            intermediates_only: Return only the maps.

        Returns:
            The list of maps, or ``(features, maps)`` where ``features`` is the last stage's output.
        """
        _check_output_fmt(output_fmt)
        x, intermediates = _stage_intermediates(self.stages, x, indices, stop_early)
        return intermediates if intermediates_only else (x, intermediates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class HdkdStudent(nn.Module):
    """HDKD hybrid student without a distillation token: conv stages, then the DFLT transformer.

    The position embedding covers the class token and the patch grid of ``img_size``; other input
    sizes (multiples of ``input_size_multiple``) get a bicubic resample of its grid part.

    Args:
        img_size: Nominal input size; sets the position-embedding grid.
        in_chans: Image channels.
        num_classes: Number of classes; 0 for a model without classifier.
        widths: Channels of the stem stack and the two MBCSA stages.
        depths: Stem convs and MBCSA blocks per stage (the paper's student uses 2, 2, 3).
        stem_stride: Stride of the first stem conv; 4 is the Table 7 ablation.
        attn_layer: ``"cbam"`` (MBCSA) or ``"se"`` (the Table 6 MBConv ablation).
        embed_dim: Token width of the DFLT stage.
        depth: Transformer layers.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden width relative to ``embed_dim``.
        mlp_prenorm: LayerNorm before each MLP (off in the authors' model).
        drop_rate: Dropout before the classifier(s).
        drop_path_rate: Stochastic-depth rate, rising linearly over MBCSA and transformer blocks.

    Raises:
        ValueError: ``img_size`` is not a multiple of the stride of the last conv stage times the patch size.
    """

    num_prefix_tokens = 1

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        widths: tuple[int, int, int] = (64, 96, 192),
        depths: tuple[int, int, int] = (2, 2, 3),
        stem_stride: int = 2,
        attn_layer: AttnLayer = "cbam",
        embed_dim: int = 256,
        depth: int = 3,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        mlp_prenorm: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.global_pool = "token"
        drop_path_rates = calculate_drop_path_rates(drop_path_rate, depths[1] + depths[2] + depth)
        self.stages, self.feature_info = _build_conv_stages(
            in_chans, widths, depths, stem_stride, attn_layer, drop_path_rates[: depths[1] + depths[2]]
        )

        patch_size = 2
        self.input_size_multiple = self.feature_info[-1]["reduction"] * patch_size
        img_size = to_2tuple(img_size)
        self._check_input_size(*img_size)
        grid_size = (img_size[0] // self.input_size_multiple, img_size[1] // self.input_size_multiple)
        self.patch_embed = DfltPatchEmbed(widths[-1], embed_dim, grid_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.patch_embed.num_patches, embed_dim))
        self.blocks = nn.Sequential(
            *[
                DfltBlock(embed_dim, num_heads, mlp_ratio, mlp_prenorm, drop_path=rate)
                for rate in drop_path_rates[depths[1] + depths[2] :]
            ]
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(_init_weights)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def _new_head(self, num_classes: int) -> nn.Module:
        head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        head.to(self.cls_token.device, self.cls_token.dtype)
        _init_weights(head)
        return head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replaces the classifier with one for ``num_classes`` classes (0 removes it).

        Raises:
            ValueError: ``global_pool`` is neither None nor ``"token"`` (the head reads the class token).
        """
        if global_pool not in (None, "token"):
            raise ValueError(f"the HDKD student classifies from its prefix tokens, got global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.head = self._new_head(num_classes)

    def _check_input_size(self, height: int, width: int) -> None:
        if height % self.input_size_multiple or width % self.input_size_multiple:
            raise ValueError(
                f"input size {height}x{width} is not a multiple of {self.input_size_multiple}: the DFLT stage needs "
                f"the last conv map (1/{self.input_size_multiple // 2} of the input) to split into whole 2x2 patches"
            )

    def _prefix_tokens(self, batch_size: int) -> torch.Tensor:
        return self.cls_token.expand(batch_size, -1, -1)

    def _forward_dflt(self, x: torch.Tensor) -> torch.Tensor:
        """Tokenises the last conv map and runs the transformer; returns the normed token sequence."""
        grid_size = (x.shape[-2] // self.patch_embed.patch_size, x.shape[-1] // self.patch_embed.patch_size)
        x = self.patch_embed(x)
        x = torch.cat([self._prefix_tokens(x.shape[0]), x], dim=1)
        x = x + resample_abs_pos_embed(
            self.pos_embed,
            new_size=grid_size,
            old_size=self.patch_embed.grid_size,
            num_prefix_tokens=self.num_prefix_tokens,
        )
        return self.norm(self.blocks(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the normed token sequence (prefix tokens first), shape ``(B, prefix + patches, embed_dim)``."""
        self._check_input_size(x.shape[-2], x.shape[-1])
        return self._forward_dflt(self.stages(x))

    def forward_head(
        self, x: torch.Tensor, pre_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = self.head_drop(x[:, 0])
        return x if pre_logits else self.head(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward pass that also returns the conv-stage maps (the ``feature_info`` entries).

        These are the maps the teacher shares, so teacher and student intermediates line up index
        for index.

        Args:
            x: Input images.
            indices: Last n stages if an int, all if None, else the listed stage indices.
            norm: Accepted for timm compatibility; the conv stages end without a norm layer.
            stop_early: Stop after the last requested stage; only with ``intermediates_only``, since
                the final features need every stage.
            output_fmt: Layout of the maps; only ``"NCHW"``.
            intermediates_only: Return only the maps (any input size then works).

        Returns:
            The list of maps, or ``(features, maps)`` with ``features`` as from ``forward_features``.
        """
        _check_output_fmt(output_fmt)
        if not intermediates_only:
            self._check_input_size(x.shape[-2], x.shape[-1])
        x, intermediates = _stage_intermediates(self.stages, x, indices, stop_early and intermediates_only)
        return intermediates if intermediates_only else (self._forward_dflt(x), intermediates)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.forward_head(self.forward_features(x))


class HdkdStudentDistilled(HdkdStudent):
    """HDKD hybrid student with a DeiT-style distillation token and head (the paper's HDKD model).

    Follows timm's distilled DeiT: with ``set_distilled_training`` enabled and in train mode,
    ``forward`` returns ``(cls_logits, dist_logits)``; otherwise it returns their average.
    The position embedding also covers the distillation token. Arguments as ``HdkdStudent``.
    """

    num_prefix_tokens = 2

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dist_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        trunc_normal_(self.dist_token, std=0.02)
        self.head_dist = self._new_head(self.num_classes)
        self.distilled_training = False

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"dist_token"}

    @torch.jit.ignore
    def get_classifier(self) -> tuple[nn.Module, nn.Module]:
        return self.head, self.head_dist

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        self.head_dist = self._new_head(num_classes)

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        """Makes train-mode ``forward`` return the class and distillation logits separately."""
        self.distilled_training = enable

    def _prefix_tokens(self, batch_size: int) -> torch.Tensor:
        return torch.cat([self.cls_token, self.dist_token], dim=1).expand(batch_size, -1, -1)

    def forward_head(
        self, x: torch.Tensor, pre_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x_cls, x_dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
        if pre_logits:
            return (x_cls + x_dist) / 2
        x_cls, x_dist = self.head(x_cls), self.head_dist(x_dist)
        if self.distilled_training and self.training:
            return x_cls, x_dist
        return (x_cls + x_dist) / 2


def _create_hdkd(
    variant: str,
    pretrained: bool = False,
    model_cls: type[nn.Module] = HdkdStudentDistilled,
    **kwargs,
) -> nn.Module:
    img_size = kwargs.get("img_size")
    if img_size is not None:
        # Record the size the model was built for, for code that reads it from the config.
        input_size = (kwargs.get("in_chans", 3), *to_2tuple(img_size))
        kwargs["pretrained_cfg_overlay"] = {"input_size": input_size, **(kwargs.get("pretrained_cfg_overlay") or {})}
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        feature_cfg=dict(out_indices=(0, 1, 2), flatten_sequential=True),
        # The CNN teacher takes any size; img_size only lands in its pretrained_cfg.
        kwargs_filter=("img_size",) if model_cls is HdkdTeacher else None,
        **kwargs,
    )


def _cfg(**kwargs) -> dict:
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stages.0.0.conv",
        "classifier": "head",
        "paper_ids": "arXiv:2407.07516",
        "paper_name": "HDKD: Hybrid Data-Efficient Knowledge Distillation Network for Medical Image Classification",
        **kwargs,
    }


_TEACHER_CFG = dict(classifier="head.fc")
_DISTILLED_CFG = dict(classifier=("head", "head_dist"))

default_cfgs = generate_default_cfgs(
    {
        "hdkd_teacher": _cfg(pool_size=(28, 28), **_TEACHER_CFG),
        "hdkd_teacher_stem4": _cfg(pool_size=(14, 14), **_TEACHER_CFG),
        "hdkd_teacher_se": _cfg(pool_size=(28, 28), **_TEACHER_CFG),
        "hdkd_student": _cfg(**_DISTILLED_CFG),
        "hdkd_student_stem4": _cfg(**_DISTILLED_CFG),
        "hdkd_student_se": _cfg(**_DISTILLED_CFG),
        "hdkd_student_nodistill": _cfg(),
        "hdkd_student_nodistill_stem4": _cfg(),
        "hdkd_student_nodistill_se": _cfg(),
    }
)


@register_model
def hdkd_teacher(pretrained: bool = False, **kwargs) -> HdkdTeacher:
    """HDKD CNN teacher (6 stem convs, 6 + 9 MBCSA blocks) from `HDKD: Hybrid Data-Efficient
    Knowledge Distillation Network for Medical Image Classification` (EL-Assiouti et al.)."""
    return _create_hdkd("hdkd_teacher", pretrained, model_cls=HdkdTeacher, **kwargs)


@register_model
def hdkd_teacher_stem4(pretrained: bool = False, **kwargs) -> HdkdTeacher:
    """HDKD teacher with a stride-4 stem (Table 7 ablation of the HDKD paper, EL-Assiouti et al.)."""
    return _create_hdkd("hdkd_teacher_stem4", pretrained, model_cls=HdkdTeacher, **dict(stem_stride=4) | kwargs)


@register_model
def hdkd_teacher_se(pretrained: bool = False, **kwargs) -> HdkdTeacher:
    """HDKD teacher with squeeze-excitation MBConv blocks (Table 6 ablation of the HDKD paper, EL-Assiouti et al.)."""
    return _create_hdkd("hdkd_teacher_se", pretrained, model_cls=HdkdTeacher, **dict(attn_layer="se") | kwargs)


@register_model
def hdkd_student(pretrained: bool = False, **kwargs) -> HdkdStudentDistilled:
    """HDKD hybrid student with distillation token, the HDKD model of `HDKD: Hybrid Data-Efficient
    Knowledge Distillation Network for Medical Image Classification` (EL-Assiouti et al.)."""
    return _create_hdkd("hdkd_student", pretrained, model_cls=HdkdStudentDistilled, **kwargs)


@register_model
def hdkd_student_stem4(pretrained: bool = False, **kwargs) -> HdkdStudentDistilled:
    """Distilled HDKD student with a stride-4 stem (Table 7 ablation of the HDKD paper, EL-Assiouti et al.)."""
    return _create_hdkd(
        "hdkd_student_stem4", pretrained, model_cls=HdkdStudentDistilled, **dict(stem_stride=4) | kwargs
    )


@register_model
def hdkd_student_se(pretrained: bool = False, **kwargs) -> HdkdStudentDistilled:
    """Distilled HDKD student with squeeze-excitation MBConv blocks (Table 6 ablation of the HDKD paper,
    EL-Assiouti et al.)."""
    return _create_hdkd("hdkd_student_se", pretrained, model_cls=HdkdStudentDistilled, **dict(attn_layer="se") | kwargs)


@register_model
def hdkd_student_nodistill(pretrained: bool = False, **kwargs) -> HdkdStudent:
    """HDKD hybrid student without distillation token (baseline of the HDKD paper, EL-Assiouti et al.)."""
    return _create_hdkd("hdkd_student_nodistill", pretrained, model_cls=HdkdStudent, **kwargs)


@register_model
def hdkd_student_nodistill_stem4(pretrained: bool = False, **kwargs) -> HdkdStudent:
    """HDKD student without distillation token, stride-4 stem (Table 7 ablation of the HDKD paper,
    EL-Assiouti et al.)."""
    return _create_hdkd(
        "hdkd_student_nodistill_stem4", pretrained, model_cls=HdkdStudent, **dict(stem_stride=4) | kwargs
    )


@register_model
def hdkd_student_nodistill_se(pretrained: bool = False, **kwargs) -> HdkdStudent:
    """HDKD student without distillation token, squeeze-excitation MBConv blocks (Table 6 ablation of the
    HDKD paper, EL-Assiouti et al.)."""
    return _create_hdkd(
        "hdkd_student_nodistill_se", pretrained, model_cls=HdkdStudent, **dict(attn_layer="se") | kwargs
    )
