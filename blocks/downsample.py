"""Downsamplers between stages: halve the resolution, change the width."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import NHWC, conv_length, padded_length
from .registry import register


@register("downsample", "conv_downsample")
class ConvDownsample(nn.Module):
    """NAT/DiNAT: 3x3 stride-2 convolution without bias, then LayerNorm."""
    layout = NHWC
    downscale = 2
    out_length = conv_length(3, 2, 1)

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


@register("downsample", "patch_merging")
class PatchMerging(nn.Module):
    """Swin: concatenate each 2x2 neighbourhood (odd sizes zero-padded), LayerNorm, linear."""
    layout = NHWC
    downscale = 2
    out_length = padded_length(2)

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * in_dim)
        self.reduction = nn.Linear(4 * in_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        # Channel order (x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2]) as in Swin.
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))
