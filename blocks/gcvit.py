"""GC-ViT (Hatamizadeh et al., ICML 2023): global context vision transformer.

A stage alternates local window attention with *global* window attention. The global blocks take
their queries not from the tokens but from one window-sized map of "global query" tokens that a
small conv tower (MBConv + max-pool, repeated) computes once from the stage input; every window
of the stage attends with those same queries over its own keys and values.

Pieces, named after timm's ``gcvit.py`` so its state dict maps over one to one:

* ``MBConvSE``: depthwise 3x3, GELU, squeeze-excite, pointwise 1x1, residual; no norm, no bias.
* stem ``gcvit_stem``: 3x3 stride-2 conv, then a ``gcvit_downsample`` that keeps the width.
* downsample ``gcvit_downsample``: LayerNorm2d, MBConvSE, 3x3 stride-2 conv, LayerNorm2d.
* context ``gcvit_global_query``: ``levels`` x (MBConvSE, 3x3 stride-2 max-pool) (one MBConvSE and
  no pooling when ``levels`` is 0); its output is the stage's global query map (B, C, h, w).
* mixer ``gcvit_window``: window attention with a relative position bias; ``global_query: true``
  drops the query projection (qkv is dim -> 2*dim) and uses the stage's global query instead.

Inputs that are not a multiple of the window (and global query maps that do not match the window)
are handled as the authors' detection code (NVlabs/GCVit detection/models/gc_vit.py) does: the
normed tokens are zero-padded at the bottom/right to a multiple of the window (padded tokens are
keys and values like any other) and the output is cropped; the global query map is resized to
the window with bicubic interpolation when its size differs, then used in every window. timm's
classifier accepts only sizes where all of this is exact (224 for the shipped configs), where
both agree with it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import SEModule
from torch import nn

from ..kernels import na2d
from .attention import bias_table, check_heads, check_positive, pair
from .layers import NCHW, NHWC, LayerNorm2d, conv_length
from .registry import Pair, Positive, Prob, SpecError, read_context, register


class MBConvSE(nn.Module):
    """GC-ViT's (inverted-bottleneck-free) MBConv: x + pw(se(gelu(dw(x)))), channels first."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, bias=False)
        self.act = nn.GELU()
        self.se = SEModule(dim, rd_ratio=0.25, bias=False, act_layer=nn.GELU)
        self.conv_pw = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_pw(self.se(self.act(self.conv_dw(x))))


@register("downsample", "gcvit_downsample")
class GCViTDownsample(nn.Module):
    """LayerNorm2d, MBConvSE, 3x3 stride-2 conv (any size: output is ceil(n / 2)), LayerNorm2d."""
    layout = NCHW
    downscale = 2
    out_length = conv_length(3, 2, 1)

    def __init__(self, in_dim: int, out_dim: int, norm_eps: Positive = 1e-5):
        super().__init__()
        self.norm1 = LayerNorm2d(in_dim, eps=norm_eps)
        self.conv_block = MBConvSE(in_dim)
        self.reduction = nn.Conv2d(in_dim, out_dim, 3, 2, 1, bias=False)
        self.norm2 = LayerNorm2d(out_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.reduction(self.conv_block(self.norm1(x))))


@register("stem", "gcvit_stem")
class GCViTStem(nn.Module):
    """3x3 stride-2 conv (with bias) to the first width, then a width-keeping downsample: /4."""
    layout = NCHW
    downscale = 4
    out_length = conv_length(3, 2, 1, convs=2)
    first_conv = "conv1"

    def __init__(self, in_chans: int, out_dim: int, norm_eps: Positive = 1e-5):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_dim, 3, 2, 1)
        self.down = GCViTDownsample(out_dim, out_dim, norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.conv1(x))


@register("context", "gcvit_global_query")
class GlobalQueryGenerator(nn.Module):
    """The stage's global query map: ``levels`` x (MBConvSE, max-pool 3x3/2), or one MBConvSE alone
    for ``levels: 0``. With the window ``w`` and the stage's feature map ``n`` at the config's
    image size, the authors choose ``levels = log2(n / w)`` so the map comes out window-sized."""
    layout = NCHW

    def __init__(self, dim: int, levels: int = 0):
        super().__init__()
        self.blocks = nn.Sequential()
        for i in range(max(1, levels)):
            self.blocks.add_module(f"conv{i + 1}", MBConvSE(dim))
            if i < levels:
                self.blocks.add_module(f"pool{i + 1}", nn.MaxPool2d(3, 2, 1))

    @classmethod
    def check(cls, params: dict, ctx: dict) -> None:
        if params["levels"] < 0:
            raise SpecError("levels", f"must be >= 0, got {params['levels']}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)  # (B, C, h, w); timm's global_norm is off in every GC-ViT


@register("mixer", "gcvit_window")
class GCViTWindowAttention(nn.Module):
    """Window attention (blocked, stride == window) with relative position bias; with
    ``global_query`` the queries are the stage's global query tokens, the same in every window."""
    layout = NHWC
    takes_context = True
    no_weight_decay_names = ("rpb",)

    def __init__(self, dim: int, heads: int, window_size: Pair = 7, global_query: bool = False,
                 qkv_bias: bool = True, proj_drop: Prob = 0.0):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.window_size = pair(window_size)
        self.global_query = global_query
        self.qkv = nn.Linear(dim, (2 if global_query else 3) * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rpb = bias_table(heads, self.window_size)  # timm's table is converted on loading

    @classmethod
    def check(cls, params: dict, ctx: dict) -> None:
        check_heads(params, ctx)
        check_positive(params, "window_size")
        if params["global_query"]:
            read_context(ctx, "gcvit_global_query", "global_query")

    def _global_queries(self, q_global: Optional[torch.Tensor], batch: int, grid) -> torch.Tensor:
        if q_global is None:
            raise ValueError("gcvit_window with global_query: true needs the stage's global query; "
                             "give the stage a `context: {type: gcvit_global_query, ...}`")
        if q_global.shape[0] != batch or q_global.shape[1] != self.heads * self.head_dim:
            raise ValueError(f"global query of shape {tuple(q_global.shape)} does not fit a batch of "
                             f"{batch} with {self.heads * self.head_dim} channels")
        if tuple(q_global.shape[-2:]) != self.window_size:
            # Authors' GlobalQueryGen (detection code): resize to the window when sizes differ.
            q_global = F.interpolate(q_global, size=self.window_size, mode="bicubic", align_corners=False)
        q = q_global.permute(0, 2, 3, 1).reshape(batch, *self.window_size, self.heads, self.head_dim)
        # Every window of an image gets that image's global queries: tile over the window grid.
        return q.repeat(1, grid[0], grid[1], 1, 1)

    def forward(self, x: torch.Tensor, ctx: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, H, W, C = x.shape
        wh, ww = self.window_size
        # Zero-pad bottom/right to whole windows after the norm, crop after (authors' detection code).
        pad_h, pad_w = -H % wh, -W % ww
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        if self.global_query:
            k, v = self.qkv(x).reshape(B, Hp, Wp, 2, self.heads, self.head_dim).unbind(3)
            q = self._global_queries(ctx, B, (Hp // wh, Wp // ww)).to(k.dtype)
        else:
            q, k, v = self.qkv(x).reshape(B, Hp, Wp, 3, self.heads, self.head_dim).unbind(3)
        out = na2d(q, k, v, self.window_size, self.window_size, 1, window_offset=(0, 0), rpb=self.rpb)
        if pad_h or pad_w:
            out = out[:, :H, :W]
        return self.proj_drop(self.proj(out.flatten(-2)))
