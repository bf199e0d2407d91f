"""MaxViT (Tu et al., ECCV 2022): conv stem, MBConv, grid attention; block attention is ``window``.

Follows timm's ``maxvit_*_tf`` models, which are ports of the authors' TensorFlow code:

* stem: 3x3 stride-2 conv with TF 'SAME' padding, BatchNorm (eps 1e-3) + tanh-GELU, 3x3 conv.
  No norm after the second conv: the first MBConv's pre-norm follows it.
* MBConv: pre-norm BatchNorm (no activation), 1x1 expansion to ``expand_ratio * out_dim``
  (computed from the *output* width, as the TF code does), BatchNorm + GELU, depthwise kxk
  (stride 2 in a stage's first block, 'SAME' padding), BatchNorm + GELU, squeeze-excitation
  (``se_ratio * out_dim`` channels, SiLU), 1x1 projection with bias. Its shortcut downsamples with
  a 2x2 average pool and a biased 1x1 conv where the width changes.
* block attention: blocked windows of ``window_size`` (the zoo's ``window`` mixer, unshifted);
  grid attention (below): a ``grid_size`` x ``grid_size`` grid of tokens spread over the whole map,
  which is blocked attention with dilation ``H / grid_size``. timm fixes both at 7 in every stage
  (img_size // 32), so grid attention at 224 has dilations 8, 4, 2, 1.
* Sizes: timm and the TF code reject maps that are not multiples of the window/grid, and the
  authors' repository (google-research/maxvit) holds classification only. Both mixers zero-pad
  the map at the bottom/right to the next multiple (padded tokens are keys, as in Swin's
  detection code) and crop; an axis no longer than the window/grid is one window over the whole
  axis. Convolutions and the shortcut pool use TF's 'SAME' rule: a stride-2 step gives ceil(H/2).

The stride-2 MBConv that opens every stage is the stage's downsampler (``downsample: {type:
mbconv}``): it sets ``replaces_first_block`` so the stage does not build the first unit's own MBConv.
The parameter count and the order of operations are those of timm's stage, whose first MBConv has
stride 2.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from timm.layers import DropPath, create_conv2d
from torch import nn

from ..kernels import na2d
from .attention import QKVAttention, bias_table, check_heads, check_positive, pair
from .layers import ACTIVATIONS, NCHW, NHWC, padded_length
from .registry import Pair, Positive, PositiveInt, Prob, SpecError, register

Activation = Literal["gelu", "gelu_tanh", "relu", "silu", "hardswish"]


def _init_conv(module: nn.Module) -> None:
    """EfficientNet-style init of convolutions (timm's ``vit_eff`` scheme for MaxViT's conv parts)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@register("stem", "maxvit_stem")
class MaxViTStem(nn.Module):
    layout = NCHW
    downscale = 2
    out_length = padded_length(2)
    first_conv = "conv1"

    def __init__(self, in_chans: int, out_dim: int, width: Optional[PositiveInt] = None,
                 act: Activation = "gelu_tanh", bn_eps: Positive = 1e-3):
        super().__init__()
        # ``width``: the stem's own width (64 in MaxViT-T/S/B), widened by stage 0's MBConv.
        out_dim = out_dim if width is None else width
        # 'same' = TensorFlow's SAME padding: for stride 2 it pads (total - total // 2) at the
        # bottom/right, which PyTorch's symmetric padding cannot express.
        self.conv1 = create_conv2d(in_chans, out_dim, 3, stride=2, padding="same", bias=True)
        self.norm1 = nn.BatchNorm2d(out_dim, eps=bn_eps)
        self.act1 = ACTIVATIONS[act]()
        self.conv2 = create_conv2d(out_dim, out_dim, 3, stride=1, padding="same", bias=True)

    def init_weights(self) -> None:
        _init_conv(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act1(self.norm1(self.conv1(x))))


class SqueezeExcite(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.reduce = nn.Conv2d(dim, hidden, 1)
        self.act = nn.SiLU()
        self.expand = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.expand(self.act(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * s.sigmoid()


class MBConv(nn.Module):
    """Pre-norm inverted bottleneck with squeeze-excitation; stride 1 or 2 (NCHW)."""
    layout = NCHW

    def __init__(self, in_dim: int, out_dim: int, stride: int, expand_ratio: Positive, kernel_size: int,
                 se_ratio: float, act: str, bn_eps: Positive, drop_path: float):
        super().__init__()
        hidden = _make_divisible(out_dim * expand_ratio)
        self.stride = stride
        # Shortcut: TF's 'SAME' 2x2 average pool, then a 1x1 conv where the width changes.
        self.shortcut_proj = nn.Conv2d(in_dim, out_dim, 1) if in_dim != out_dim else None
        self.pre_norm = nn.BatchNorm2d(in_dim, eps=bn_eps)
        self.expand_conv = nn.Conv2d(in_dim, hidden, 1, bias=False)
        self.expand_norm = nn.BatchNorm2d(hidden, eps=bn_eps)
        self.dw_conv = create_conv2d(hidden, hidden, kernel_size, stride=stride, padding="same",
                                     depthwise=True, bias=False)
        self.dw_norm = nn.BatchNorm2d(hidden, eps=bn_eps)
        self.act = ACTIVATIONS[act]()
        self.se = SqueezeExcite(hidden, int(se_ratio * out_dim)) if se_ratio > 0 else nn.Identity()
        self.proj_conv = nn.Conv2d(hidden, out_dim, 1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def init_weights(self) -> None:
        _init_conv(self)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            # ceil_mode without padding = TF's SAME pooling: output ceil(H/2), and the last window
            # of an odd axis averages only its real pixel (TF does not count the padding; timm's
            # AvgPool2dSame would, but timm cannot run maxvit at such sizes anyway).
            x = F.avg_pool2d(x, 2, 2, ceil_mode=True)
        return x if self.shortcut_proj is None else self.shortcut_proj(x)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        y = self.act(self.expand_norm(self.expand_conv(self.pre_norm(x))))
        y = self.se(self.act(self.dw_norm(self.dw_conv(y))))
        return self.shortcut(x) + self.drop_path(self.proj_conv(y))


def _make_divisible(v: float, divisor: int = 8) -> int:
    """timm's make_divisible (round to a multiple of 8, never more than 10% down)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _check_mbconv(params: dict, out_dim: int) -> None:
    if params["kernel_size"] < 1 or params["kernel_size"] % 2 == 0:
        raise SpecError("kernel_size", f"must be odd and >= 1, got {params['kernel_size']}")
    if not 0 <= params["se_ratio"] <= 1:
        raise SpecError("se_ratio", f"must be in [0, 1], got {params['se_ratio']}")
    if params["se_ratio"] > 0 and int(params["se_ratio"] * out_dim) == 0:
        raise SpecError("se_ratio", f"gives no squeeze-excitation channels at width {out_dim} "
                                    f"(int({params['se_ratio']} * {out_dim}) = 0); use 0 for none")


@register("block", "mbconv")
class MBConvBlock(MBConv):
    """A stride-1 MBConv inside a stage (width unchanged)."""

    def __init__(self, dim: int, expand_ratio: Positive = 4.0, kernel_size: int = 3, se_ratio: float = 0.25,
                 act: Activation = "gelu_tanh", bn_eps: Positive = 1e-3, drop_path: float = 0.0):
        super().__init__(dim, dim, 1, expand_ratio, kernel_size, se_ratio, act, bn_eps, drop_path)

    @classmethod
    def check(cls, params: dict, ctx: dict) -> None:
        _check_mbconv(params, ctx["dim"])


@register("downsample", "mbconv")
class MBConvDownsample(MBConv):
    """The stride-2 MBConv that opens a MaxViT stage: it is the first unit's MBConv, so the stage
    skips building that one (``replaces_first_block``) and gives this one its drop-path rate.
    Its parameters must match the stage's MBConv block (the defaults of both are MaxViT's)."""
    downscale = 2
    out_length = padded_length(2)
    replaces_first_block = "mbconv"  # the block type it stands in for (checked by the config)

    def __init__(self, in_dim: int, out_dim: int, expand_ratio: Positive = 4.0, kernel_size: int = 3,
                 se_ratio: float = 0.25, act: Activation = "gelu_tanh", bn_eps: Positive = 1e-3,
                 drop_path: float = 0.0):
        super().__init__(in_dim, out_dim, 2, expand_ratio, kernel_size, se_ratio, act, bn_eps, drop_path)

    @classmethod
    def check(cls, params: dict, ctx: dict) -> None:
        _check_mbconv(params, ctx["out_dim"])


@register("mixer", "grid")
class GridAttention(QKVAttention):
    """MaxViT's grid attention: a fixed ``grid_size`` grid whose tokens are spread evenly over the
    map, i.e. blocked attention (kernel = stride = grid) with dilation ``H / grid``.

    timm and the authors' code need maps divisible by the grid. For any other size the map is
    zero-padded at the bottom/right to the next multiple of the grid and cropped after attention,
    the padded tokens being keys, as the zoo's window attention (Swin's detection code) does; an
    axis no longer than the grid is one window over the whole axis (the grid clipped to the map).
    """
    layout = NHWC
    no_weight_decay_names = ("rpb",)

    def __init__(self, dim: int, heads: int, grid_size: Pair = 7, qkv_bias: bool = True,
                 proj_drop: Prob = 0.0):
        super().__init__(dim, heads, qkv_bias, proj_drop)
        self.grid_size = pair(grid_size)
        self.rpb = bias_table(heads, self.grid_size)  # in grid coordinates, as TF MaxViT's table

    @classmethod
    def check(cls, params: dict, ctx: dict) -> None:
        check_heads(params, ctx)
        check_positive(params, "grid_size")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        kernel, dilation, pads = [], [], []
        for n, g in zip((H, W), self.grid_size):
            if n <= g:
                kernel.append(n), dilation.append(1), pads.append(0)
            else:
                pad = -n % g
                kernel.append(g), dilation.append((n + pad) // g), pads.append(pad)
        if any(pads):
            x = F.pad(x, (0, 0, 0, pads[1], 0, pads[0]))
        rpb = self.rpb
        if kernel != list(self.grid_size):  # a smaller grid reads the centre of the table
            (gh, gw), (kh, kw) = self.grid_size, kernel
            rpb = rpb[:, gh - kh:gh + kh - 1, gw - kw:gw + kw - 1]
        q, k, v = self.split_qkv(x)
        out = na2d(q, k, v, tuple(kernel), tuple(kernel), tuple(dilation), window_offset=0, rpb=rpb)
        if any(pads):
            out = out[:, :H, :W]
        return self.project(out)
