"""Neighborhood attention (NAT) and dilated neighborhood attention (DiNAT).

Follows the authors' NATLayer/NeighborhoodAttention2D: qkv and proj linears, a relative positional
bias table ``rpb`` of shape (heads, 2k-1, 2k-1), and, for maps smaller than kernel x dilation,
zero padding at the bottom/right that is cropped after attention (as NATTEN's module did).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import na2d
from .attention import QKVAttention, bias_table, check_heads, pair
from .layers import NHWC
from .registry import Pair, Prob, SpecError, register


@register("mixer", "neighborhood")
class NeighborhoodAttention(QKVAttention):
    layout = NHWC
    no_weight_decay_names = ("rpb",)

    def __init__(self, dim: int, heads: int, kernel_size: Pair = 7, dilation: Pair = 1,
                 qkv_bias: bool = True, rel_pos_bias: bool = True, proj_drop: Prob = 0.0):
        super().__init__(dim, heads, qkv_bias, proj_drop)
        self.kernel_size = pair(kernel_size)
        self.dilation = pair(dilation)
        if rel_pos_bias:
            self.rpb = bias_table(heads, self.kernel_size)
        else:
            self.register_parameter("rpb", None)

    @classmethod
    def check(cls, params: dict, ctx: dict) -> None:
        """Heads divide the width, the kernel is odd (a neighbourhood centred on its query), dilation
        >= 1. Nothing bounds kernel x dilation by the feature map: ``forward`` zero-pads a smaller
        map, as the authors' code does, so every image size the model accepts runs."""
        check_heads(params, ctx)
        for k in pair(params["kernel_size"]):
            if k < 1 or k % 2 == 0:
                raise SpecError("kernel_size", f"must be odd and >= 1 for sliding-window attention, got {k}")
        for d in pair(params["dilation"]):
            if d < 1:
                raise SpecError("dilation", f"must be >= 1, got {d}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        (kh, kw), (dh, dw) = self.kernel_size, self.dilation
        pad_h, pad_w = max(0, kh * dh - H), max(0, kw * dw - W)
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        q, k, v = self.split_qkv(x)
        out = na2d(q, k, v, self.kernel_size, 1, self.dilation, rpb=self.rpb)
        if pad_h or pad_w:
            out = out[:, :H, :W]
        return self.project(out)
