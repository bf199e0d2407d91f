"""LITv2 (Pan et al., "Fast Vision Transformers with HiLo Attention", NeurIPS 2022).

Three pieces, following the authors' code (ziplab/LITv2, classification/models and the detection
backbone, which is the version that accepts any input size):

* ``hilo`` mixer: a fraction ``alpha`` of the heads (rounded down) is Lo-Fi, global attention of
  every query to keys/values average-pooled over ``window_size`` x ``window_size`` cells; the other
  heads are Hi-Fi, attention inside non-overlapping ``window_size`` windows (blocked neighborhood
  attention). Each branch has its own projections (``h_qkv``/``h_proj``, ``l_q``/``l_kv``/``l_proj``,
  the authors' names) and the outputs are concatenated Hi-Fi first. ``window_size == 1`` turns
  every head into Lo-Fi, i.e. plain global attention (the code does this; the paper only says the
  last stage uses standard MSA).
* ``litv2`` block: pre-norm residual block whose FFN has a 3x3 depth-wise convolution between its
  two linears (fc1 -> dwconv -> GELU -> fc2, no activation before the conv). Without a mixer it is
  the attention-free block of the first two stages (``has_msa = [0, 0, 1, 1]``): norm2 + FFN only.
* ``deformable_merging`` downsampler (DTM): a 2x2 stride-2 deformable convolution whose offsets
  come from a plain 2x2 stride-2 convolution (zero-initialised), then BatchNorm and GELU.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from ..kernels import na2d
from .attention import check_heads
from .layers import NCHW, NHWC, conv_length, run_mixer
from .registry import Positive, Prob, SpecError, build, register, spec_of


@register("mixer", "hilo")
class HiLoAttention(nn.Module):
    layout = NHWC

    def __init__(self, dim: int, heads: int, window_size: int = 2, alpha: float = 0.5,
                 qkv_bias: bool = True):
        super().__init__()
        head_dim = dim // heads
        self.head_dim = head_dim
        self.window_size = window_size
        self.scale = head_dim ** -0.5
        if window_size == 1:  # the authors' rule: ws == 1 is standard MSA, all heads Lo-Fi
            self.l_heads = heads
        else:
            self.l_heads = int(heads * alpha)
        self.h_heads = heads - self.l_heads
        self.l_dim, self.h_dim = self.l_heads * head_dim, self.h_heads * head_dim
        if self.l_heads:
            self.l_q = nn.Linear(dim, self.l_dim, bias=qkv_bias)
            self.l_kv = nn.Linear(dim, 2 * self.l_dim, bias=qkv_bias)
            self.l_proj = nn.Linear(self.l_dim, self.l_dim)
        if self.h_heads:
            self.h_qkv = nn.Linear(dim, 3 * self.h_dim, bias=qkv_bias)
            self.h_proj = nn.Linear(self.h_dim, self.h_dim)

    @classmethod
    def check(cls, params: dict, ctx: dict) -> None:
        check_heads(params, ctx)
        if params["window_size"] < 1:
            raise SpecError("window_size", f"must be >= 1, got {params['window_size']}")
        if not 0.0 <= params["alpha"] <= 1.0:
            raise SpecError("alpha", f"must be in [0, 1], got {params['alpha']}")

    def hifi(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        q, k, v = self.h_qkv(x).reshape(B, H, W, 3, self.h_heads, self.head_dim).unbind(3)
        ws = self.window_size
        # stride == kernel on a multiple of the window: non-overlapping windows.
        out = na2d(q, k, v, ws, ws, 1, scale=self.scale)
        return self.h_proj(out.flatten(-2))

    def lofi(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q = self.l_q(x).reshape(B, H * W, self.l_heads, self.head_dim).transpose(1, 2)
        if self.window_size > 1:
            x = F.avg_pool2d(x.permute(0, 3, 1, 2), self.window_size).flatten(2).transpose(1, 2)
        else:
            x = x.reshape(B, H * W, C)
        k, v = self.l_kv(x).reshape(B, x.shape[1], 2, self.l_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.l_proj(out.transpose(1, 2).reshape(B, H, W, self.l_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        # As the authors' detection/segmentation HiLo: zero-pad bottom/right to a multiple of the
        # window (padded tokens are Hi-Fi keys and enter the Lo-Fi pooling), then crop.
        ws = self.window_size
        pad_h, pad_w = -H % ws, -W % ws
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        outs = []
        if self.h_heads:
            outs.append(self.hifi(x))
        if self.l_heads:
            outs.append(self.lofi(x))
        out = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        if pad_h or pad_w:
            out = out[:, :H, :W]
        return out


class DWConvMlp(nn.Module):
    """fc1 -> 3x3 depth-wise conv -> GELU -> fc2, channels-last in and out."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def init_weights(self) -> None:
        # The authors' DWMlp init: trunc-normal linears, He-normal (fan-out) depth-wise conv.
        for fc in (self.fc1, self.fc2):
            trunc_normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)
        fan_out = 9 * self.dwconv.out_channels // self.dwconv.groups
        nn.init.normal_(self.dwconv.weight, 0.0, math.sqrt(2.0 / fan_out))
        nn.init.zeros_(self.dwconv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = self.drop(self.act(x))
        return self.drop(self.fc2(x))


@register("block", "litv2")
class LITv2Block(nn.Module):
    """x + mixer(norm1(x)) (when there is a mixer), then x + mlp(norm2(x)) with the DWConv FFN."""
    layout = NHWC

    def __init__(self, dim: int, mixer: spec_of("mixer") = None, mlp_ratio: Positive = 4.0,
                 norm_eps: Positive = 1e-5, proj_drop: Prob = 0.0, drop_path: float = 0.0):
        super().__init__()
        if mixer is not None:
            self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
            self.mixer = build("mixer", mixer, dim=dim)
        else:
            self.norm1 = self.mixer = None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = DWConvMlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        if self.mixer is not None:
            x = x + self.drop_path(run_mixer(self.mixer, self.norm1(x), ctx))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DeformConv2d(nn.Module):
    """Deformable convolution (DCNv1, no modulation) with its offsets predicted by a plain conv of
    the same kernel/stride (``conv_offset``, zero-initialised: it starts as a plain conv)."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, stride: int):
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_dim))
        self.conv_offset = nn.Conv2d(in_dim, 2 * kernel_size * kernel_size, kernel_size, stride=stride)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.weight[0].numel())
        nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Imported here: torchvision is only needed by models that use this layer. Its offset
        # layout (per kernel tap: dy, dx) and zero outside the map are those of the DCN kernels
        # the authors ship.
        from torchvision.ops import deform_conv2d
        offset = self.conv_offset(x)  # under autocast: low precision, whatever x is
        # torchvision has no bf16 kernel (nor fp16 on a CPU) and no CPU autocast rule: run it in
        # fp32 (fp64 stays fp64) with autocast off, and return x's dtype, as its CUDA autocast does
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        device = x.device.type  # the meta device (shape and FLOP counting) has no autocast
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
            y = deform_conv2d(x.to(dt), offset.to(dt), self.weight.to(dt), self.bias.to(dt), stride=self.stride)
        return y.to(x.dtype)


@register("downsample", "deformable_merging")
class DeformableTokenMerging(nn.Module):
    """LITv2's DTM: 2x2 stride-2 deformable conv, BatchNorm, GELU (NCHW).

    As in the authors' detection backbone nothing is padded: an odd height or width loses its
    last row or column (the stride-2 kernel-2 convolution floors the size).
    """
    layout = NCHW
    downscale = 2
    out_length = conv_length(2, 2, 0)

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.dconv = DeformConv2d(in_dim, out_dim, 2, 2)
        self.norm = nn.BatchNorm2d(out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.dconv(x)))
