"""Stems: image (B, 3, H, W) -> first-stage tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import NHWC, conv_length
from .registry import Positive, SpecError, register


@register("stem", "conv_tokenizer")
class ConvTokenizer(nn.Module):
    """NAT/DiNAT: two 3x3 stride-2 convolutions (overlapping), then LayerNorm."""
    layout = NHWC
    downscale = 4
    out_length = conv_length(3, 2, 1, convs=2)
    first_conv = "proj.0"

    def __init__(self, in_chans: int, out_dim: int, norm: bool = True):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, out_dim // 2, 3, stride=2, padding=1),
            nn.Conv2d(out_dim // 2, out_dim, 3, stride=2, padding=1),
        )
        self.norm = nn.LayerNorm(out_dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


@register("stem", "patch_embed")
class PatchEmbed(nn.Module):
    """Swin: non-overlapping patch x patch convolution, then LayerNorm. Inputs that are not a
    multiple of the patch are zero-padded at the bottom/right, as Swin's detection code does."""
    layout = NHWC

    def __init__(self, in_chans: int, out_dim: int, patch_size: int = 4, norm: bool = True,
                 norm_eps: Positive = 1e-5):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, out_dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(out_dim, eps=norm_eps) if norm else nn.Identity()

    @staticmethod
    def downscale_of(params: dict) -> int:
        return params["patch_size"]

    @staticmethod
    def out_length(n: int, params: dict) -> int:
        return -(-n // params["patch_size"])  # padded to a multiple of the patch

    @classmethod
    def check(cls, params: dict, ctx: dict) -> None:
        if params["patch_size"] < 1:
            raise SpecError("patch_size", f"must be >= 1, got {params['patch_size']}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        pad_h, pad_w = -x.shape[2] % p, -x.shape[3] % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))
