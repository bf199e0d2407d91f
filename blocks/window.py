"""Swin's (shifted) window attention as blocked neighborhood attention.

A shifted window is a blocked window on a grid offset by the shift and clipped at the borders:
exactly what Swin's cyclic roll plus attention mask computes. Following the Swin classification
code and timm, an axis no longer than the window gets one window over the whole axis and no shift;
a longer axis that is not a multiple of the window is zero-padded at the bottom/right (the padded
tokens are keys, as in Swin's detection code and timm) and cropped afterwards.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import na2d
from .attention import QKVAttention, bias_table, check_heads, check_positive, pair
from .layers import NHWC
from .registry import Pair, Prob, register


@register("mixer", "window")
class WindowAttention(QKVAttention):
    layout = NHWC
    no_weight_decay_names = ("rpb",)

    def __init__(self, dim: int, heads: int, window_size: Pair = 7, shift: bool = False,
                 qkv_bias: bool = True, proj_drop: Prob = 0.0):
        super().__init__(dim, heads, qkv_bias, proj_drop)
        self.window_size = pair(window_size)
        self.shift = shift
        self.rpb = bias_table(heads, self.window_size)

    @classmethod
    def check(cls, params: dict, ctx: dict) -> None:
        check_heads(params, ctx)
        check_positive(params, "window_size")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        kernel, offset, pads = [], [], []
        for n, w in zip((H, W), self.window_size):
            if n <= w:
                kernel.append(n), offset.append(0), pads.append(0)
            else:
                kernel.append(w), offset.append(w // 2 if self.shift else 0), pads.append(-n % w)
        if any(pads):
            x = F.pad(x, (0, 0, 0, pads[1], 0, pads[0]))
        rpb = self.rpb
        if kernel != list(self.window_size):  # a smaller window reads the centre of the table
            (wh, ww), (kh, kw) = self.window_size, kernel
            rpb = rpb[:, wh - kh:wh + kh - 1, ww - kw:ww + kw - 1]
        q, k, v = self.split_qkv(x)
        out = na2d(q, k, v, tuple(kernel), tuple(kernel), 1, window_offset=tuple(offset), rpb=rpb)
        if any(pads):
            out = out[:, :H, :W]
        return self.project(out)
