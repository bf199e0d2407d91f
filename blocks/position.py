"""Positional encodings a block adds to its input (``pos:`` in a transformer block's spec).

Each works at any map size. Encodings that live inside an attention (relative position bias
tables, CSWin's and BiFormer's LePE, FasterViT's continuous bias) stay with their mixers.
"""
from __future__ import annotations

import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from torch import nn

from .layers import NCHW, NHWC, check_centred_kernel
from .registry import Positive, SpecError, register


@register("pos", "dwconv")
class ConvPosEnc(nn.Conv2d):
    """x + depthwise_conv(x), the conditional positional encoding of CPVT (Chu et al. 2021) that
    BiFormer puts before each block: position read from zero padding at the borders."""
    layout = NCHW

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    @classmethod
    def check(cls, params: dict, ctx: dict) -> None:
        check_centred_kernel(params, "kernel_size")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


@register("pos", "sincos")
class SinCosPosEnc(nn.Module):
    """x + the fixed 2-D sine-cosine embedding of each token's (row, column) (MAE's, timm's
    ``build_sincos2d_pos_embed``: a quarter of the channels each for sin and cos of row and
    column), computed for the map's own size. No parameters."""
    layout = NHWC

    def __init__(self, dim: int, temperature: Positive = 10000.0):
        super().__init__()
        self.temperature = temperature

    @classmethod
    def check(cls, params: dict, ctx: dict) -> None:
        if ctx["dim"] % 4:
            raise SpecError(None, f"needs a width divisible by 4 (sin and cos of row and column), got {ctx['dim']}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        pe = build_sincos2d_pos_embed([H, W], C, self.temperature, device=x.device)
        return x + pe.to(x.dtype).reshape(H, W, C)
