"""ConvNeXt's block and downsampler (Liu et al. 2022; V2's global response norm, Woo et al. 2023).

Not one of the zoo's attention families: a convolutional block to mix with them (a ConvNeXt
stage before attention stages, as in many hybrids). The parameter names are timm's, and a zoo
config of ConvNeXt-T (tests/configs/convnext_tiny.yaml) gives timm's ``convnext_tiny`` logits.
"""
from __future__ import annotations

from typing import Optional

import torch
from timm.layers import DropPath, GlobalResponseNormMlp, Mlp, trunc_normal_
from torch import nn

from .layers import ACTIVATIONS, NCHW, LayerNorm2d, check_centred_kernel, conv_length
from .registry import Positive, Prob, register
from .transformer import Activation


@register("block", "convnext")
class ConvNeXtBlock(nn.Module):
    """x + layer_scale * mlp(norm(dwconv(x))): a k x k depth-wise conv, LayerNorm over channels,
    a pointwise MLP (with V2's global response norm if ``grn``)."""
    layout = NCHW

    def __init__(self, dim: int, kernel_size: int = 7, mlp_ratio: Positive = 4.0,
                 layer_scale: Optional[Positive] = None, grn: bool = False, act: Activation = "gelu",
                 norm_eps: Positive = 1e-6, proj_drop: Prob = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        mlp = GlobalResponseNormMlp if grn else Mlp
        self.mlp = mlp(dim, int(dim * mlp_ratio), act_layer=ACTIVATIONS[act], drop=proj_drop)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim)) if layer_scale else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @classmethod
    def check(cls, params: dict, ctx: dict) -> None:
        check_centred_kernel(params, "kernel_size")

    def init_weights(self) -> None:
        _init_convnext(self)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        y = self.mlp(self.norm(self.conv_dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        if self.gamma is not None:
            y = y * self.gamma.view(1, -1, 1, 1)
        return x + self.drop_path(y)


@register("downsample", "convnext_downsample")
class ConvNeXtDownsample(nn.Sequential):
    """LayerNorm over channels, then a 2x2 stride-2 conv (an odd last row or column is dropped, as
    in timm's ConvNeXt)."""
    layout = NCHW
    downscale = 2
    out_length = conv_length(2, 2, 0)

    def __init__(self, in_dim: int, out_dim: int, norm_eps: Positive = 1e-6):
        super().__init__(LayerNorm2d(in_dim, eps=norm_eps), nn.Conv2d(in_dim, out_dim, 2, stride=2))

    def init_weights(self) -> None:
        _init_convnext(self)


def _init_convnext(module: nn.Module) -> None:
    """timm's ConvNeXt initialisation: truncated normal convs and linears, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
