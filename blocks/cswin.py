"""CSWin Transformer: cross-shaped window attention with LePE, its stem and its downsampler.

Follows the authors' code (microsoft/CSWin-Transformer, models/cswin.py for classification and
segmentation/backbone/cswin_transformer.py for dense prediction):

* One qkv linear for the block; its q, k and v channels are split in two halves. The first half of
  the heads attends inside vertical stripes (full height, ``split_size`` columns), the second half
  inside horizontal stripes (``split_size`` rows, full width); the halves are concatenated and
  projected. The last stage (``full: true``) has a single branch with all heads attending over the
  whole map (the code's ``last_stage`` branch; there it is also taken when the map side equals
  ``split_size``, which at 224 is only the last stage).
* LePE: a depth-wise 3x3 convolution of V added to the attention output. The code runs it on each
  stripe window separately, so the convolution sees zeros beyond the stripe borders, not the
  neighbouring stripe; so does this module. The one convolution here holds both branches' channels
  (a depth-wise conv is per channel, so the authors' two ``get_v`` convs concatenate exactly).
* Stripes are blocked rectangular windows of ``zoo.kernels.na2d`` (kernel = stride = stripe).
* Any input size: like the segmentation backbone, a branch whose axis is not a multiple of the
  stripe width pads q, k and v (after the qkv linear, so padded tokens are exact zeros) on both
  sides, ``pad // 2`` before and the rest after, and crops after attention. The padded keys are
  not masked: they take part in the softmax with logit 0 and value 0, as in the authors' code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import na2d
from .attention import QKVAttention, check_heads
from .layers import NHWC, conv_length
from .registry import Prob, SpecError, register


@register("mixer", "cswin")
class CSWinAttention(QKVAttention):
    layout = NHWC

    def __init__(self, dim: int, heads: int, split_size: int = 7, full: bool = False,
                 qkv_bias: bool = True, proj_drop: Prob = 0.0):
        super().__init__(dim, heads, qkv_bias, proj_drop)
        self.split_size = split_size
        self.full = full
        self.lepe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    @classmethod
    def check(cls, params: dict, ctx: dict) -> None:
        check_heads(params, ctx)
        if params["split_size"] < 1:
            raise SpecError("split_size", f"must be >= 1, got {params['split_size']}")
        if not params["full"] and params["heads"] % 2:
            raise SpecError("heads", f"cross-shaped attention splits the heads into two halves; "
                                     f"{params['heads']} is odd")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[1:3]
        q, k, v = self.split_qkv(x)
        if self.full:
            out = self._attend(q, k, v, (H, W), 0)
        else:
            s, half = self.split_size, self.heads // 2
            vertical = self._attend(q[..., :half, :], k[..., :half, :], v[..., :half, :], (H, s), 0)
            horizontal = self._attend(q[..., half:, :], k[..., half:, :], v[..., half:, :], (s, W),
                                      half * self.head_dim)
            out = torch.cat([vertical, horizontal], dim=3)
        return self.project(out)

    def _attend(self, q, k, v, window, first_channel: int) -> torch.Tensor:
        """Blocked attention over ``window``-sized cells plus LePE, for one group of heads whose
        channels start at ``first_channel`` of the LePE convolution."""
        H, W = q.shape[1:3]
        wh, ww = window
        pad_h, pad_w = -H % wh, -W % ww
        top, left = pad_h // 2, pad_w // 2
        if pad_h or pad_w:  # the segmentation backbone's centred zero padding
            pad = (0, 0, 0, 0, left, pad_w - left, top, pad_h - top)
            q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
        out = na2d(q, k, v, window, window)
        out = out + self._lepe(v, window, first_channel)
        if pad_h or pad_w:
            out = out[:, top:top + H, left:left + W]
        return out

    def _lepe(self, v: torch.Tensor, window, first_channel: int) -> torch.Tensor:
        """Depth-wise 3x3 conv of V inside each window (zeros beyond the window's borders)."""
        B, H, W, heads, d = v.shape
        (wh, ww), c = window, heads * d
        nh, nw = H // wh, W // ww
        cells = v.reshape(B, nh, wh, nw, ww, c).permute(0, 1, 3, 5, 2, 4).reshape(-1, c, wh, ww)
        weight = self.lepe.weight[first_channel:first_channel + c]
        bias = self.lepe.bias[first_channel:first_channel + c]
        cells = F.conv2d(cells, weight, bias, padding=1, groups=c)
        return cells.reshape(B, nh, nw, c, wh, ww).permute(0, 1, 4, 2, 5, 3).reshape(B, H, W, heads, d)


@register("stem", "cswin_stem")
class CSWinStem(nn.Module):
    """Overlapping 7x7 stride-4 convolution (padding 2), then LayerNorm. Any input size runs:
    the convolution itself needs no padding to a multiple (the authors' code pads nothing here)."""
    layout = NHWC
    downscale = 4
    out_length = conv_length(7, 4, 2)
    first_conv = "proj"

    def __init__(self, in_chans: int, out_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, out_dim, 7, stride=4, padding=2)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


@register("downsample", "cswin_merge")
class CSWinMerge(nn.Module):
    """The authors' Merge_Block: 3x3 stride-2 convolution with bias (padding 1), then LayerNorm."""
    layout = NHWC
    downscale = 2
    out_length = conv_length(3, 2, 1)

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
