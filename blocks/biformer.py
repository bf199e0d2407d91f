"""BiFormer (Zhu et al., CVPR 2023): bi-level routing attention and the blocks around it.

Written from the authors' code (rayleizhu/BiFormer models/biformer.py, models/_common.py,
ops/bra_legacy.py). Where the code and the paper differ, the code is followed:

* Bi-level routing attention (BRA) scales both the region-level routing logits and the
  token-level attention logits by ``dim ** -0.5`` (the authors' ``qk_dim ** -0.5``), not by
  ``head_dim ** -0.5``.
* The routing is computed on detached region means and is not differentiable (the released
  models use neither ``param_routing`` nor ``soft_routing``); its top-k weights are unused.
* The local context enhancement (LePE) is a depth-wise conv on V in BRA, but on the attention's
  *input* in the last stage's global attention (the authors' ``AttentionLePE``), which is also
  built with the class's default of 8 heads and no qkv bias, not ``dim // head_dim`` heads.
* The stem and downsamplers use BatchNorm, and so does the final norm before pooling.

Any input size: the classification code asserts that the map is a multiple of ``n_win``; its
detection and segmentation backbones set ``auto_pad=True``, which zero-pads the (normalised)
attention input at the bottom/right to a multiple of ``n_win`` and crops the output. We always
do that (at 224 nothing is padded, so classification is unchanged). The padded tokens go through
the qkv projection (so they carry its bias), count in the region means, are keys like any other
token and are seen by the LePE conv, exactly as there.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import routed_attention
from .attention import QKVAttention, check_heads
from .layers import NCHW, NHWC, conv_length
from .registry import Positive, Prob, SpecError, register, spec_of
from .transformer import Activation, TransformerBlock


def _depthwise(dim: int, kernel: int) -> Optional[nn.Conv2d]:
    return nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim) if kernel else None


def _check_odd(params: dict, key: str) -> None:
    k = params[key]
    if k < 0 or (k and k % 2 == 0):
        raise SpecError(key, f"must be an odd kernel size or 0 (none), got {k}")


def _conv_nhwc(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


@register("mixer", "bi_level_routing")
class BiLevelRoutingAttention(QKVAttention):
    """Regions on an ``n_win x n_win`` grid; each query region routes to the ``topk`` regions of
    highest affinity between region-mean queries and keys, and its tokens attend over those
    regions' tokens (``zoo.kernels.routed_attention``). Plus LePE, a depth-wise conv on V.

    Only ``qk_dim == dim`` (every released variant), so q, k, v come from one ``dim -> 3 dim``
    projection, in the authors' column order (q, then k, then v, heads-major inside each).
    """
    layout = NHWC

    def __init__(self, dim: int, heads: int, n_win: int = 7, topk: int = 4, lepe_kernel: int = 5,
                 qkv_bias: bool = True, proj_drop: Prob = 0.0):
        super().__init__(dim, heads, qkv_bias, proj_drop)
        self.n_win = n_win
        self.topk = topk
        self.scale = dim ** -0.5  # the authors' qk_dim ** -0.5 (not head_dim), for routing and attention
        self.lepe = _depthwise(dim, lepe_kernel)

    @classmethod
    def check(cls, params: dict, ctx: dict) -> None:
        check_heads(params, ctx)
        if params["n_win"] < 1:
            raise SpecError("n_win", f"must be >= 1, got {params['n_win']}")
        if not 1 <= params["topk"] <= params["n_win"] ** 2:
            raise SpecError("topk", f"must be in [1, n_win**2 = {params['n_win'] ** 2}], got {params['topk']}")
        _check_odd(params, "lepe_kernel")

    def route(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Region indices (B, n_win**2, topk) from (B, H, W, heads, head_dim) q and k."""
        B, H, W, heads, d = q.shape
        n = self.n_win
        q_region = q.detach().reshape(B, n, H // n, n, W // n, heads * d).mean((2, 4)).flatten(1, 2)
        k_region = k.detach().reshape(B, n, H // n, n, W // n, heads * d).mean((2, 4)).flatten(1, 2)
        affinity = (q_region * self.scale) @ k_region.transpose(-1, -2)  # (B, n*n, n*n)
        return torch.topk(affinity, self.topk, dim=-1).indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        n = self.n_win
        pad_h, pad_w = -H % n, -W % n  # the authors' auto_pad (detection/segmentation code)
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        q, k, v = self.split_qkv(x)
        index = self.route(q, k)
        out = routed_attention(q, k, v, index, (Hp // n, Wp // n), scale=self.scale).flatten(-2)
        if self.lepe is not None:
            out = out + _conv_nhwc(self.lepe, v.flatten(-2))
        out = self.proj_drop(self.proj(out))
        if pad_h or pad_w:
            out = out[:, :H, :W].contiguous()
        return out


@register("mixer", "global_lepe")
class GlobalLePEAttention(QKVAttention):
    """Full attention over the map plus LePE, BiFormer's last stage (the authors' ``AttentionLePE``).

    The LePE conv reads the attention's input, not V (as the authors' code does). Global
    attention is routed attention over a single region holding the whole map.
    """
    layout = NHWC

    def __init__(self, dim: int, heads: int = 8, lepe_kernel: int = 5, qkv_bias: bool = False,
                 proj_drop: Prob = 0.0):
        super().__init__(dim, heads, qkv_bias, proj_drop)
        self.lepe = _depthwise(dim, lepe_kernel)

    @classmethod
    def check(cls, params: dict, ctx: dict) -> None:
        check_heads(params, ctx)
        _check_odd(params, "lepe_kernel")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q, k, v = self.split_qkv(x)
        whole = torch.zeros(B, 1, 1, dtype=torch.long, device=x.device)
        out = routed_attention(q, k, v, whole, (H, W)).flatten(-2)
        if self.lepe is not None:
            out = out + _conv_nhwc(self.lepe, x)
        return self.proj_drop(self.proj(out))


@register("block", "biformer")
class BiFormerBlock(TransformerBlock):
    """``x + dwconv(x)`` (the ``dwconv`` positional encoding, ``pos_kernel`` wide), then the
    pre-norm transformer block. Takes and returns NCHW, as the authors' block does; LayerNorms use
    eps 1e-6 (the authors: "important to avoid attention collapsing")."""
    layout = NCHW

    def __init__(self, dim: int, mixer: spec_of("mixer"), mlp_ratio: Positive = 3.0, pos_kernel: int = 3,
                 layer_scale: Optional[Positive] = None, act: Activation = "gelu", norm_eps: Positive = 1e-6,
                 proj_drop: Prob = 0.0, drop_path: float = 0.0):
        # The authors hard-code padding=1, i.e. "same" padding for their kernel of 3.
        pos = {"type": "dwconv", "kernel_size": pos_kernel} if pos_kernel else None
        super().__init__(dim, mixer, mlp_ratio, layer_scale, act, norm_eps, proj_drop, pos, drop_path)

    @classmethod
    def check(cls, params: dict, ctx: dict) -> None:
        super().check(params, ctx)
        _check_odd(params, "pos_kernel")

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1), ctx).permute(0, 3, 1, 2)


@register("stem", "biformer_stem")
class BiFormerStem(nn.Module):
    """Two 3x3 stride-2 convs, each followed by BatchNorm, GELU between (the authors' stem)."""
    layout = NCHW
    downscale = 4
    out_length = conv_length(3, 2, 1, convs=2)
    first_conv = "proj.0"

    def __init__(self, in_chans: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, out_dim // 2, 3, stride=2, padding=1),
            nn.BatchNorm2d(out_dim // 2),
            nn.GELU(),
            nn.Conv2d(out_dim // 2, out_dim, 3, stride=2, padding=1),
            nn.BatchNorm2d(out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@register("downsample", "biformer_downsample")
class BiFormerDownsample(nn.Module):
    """A 3x3 stride-2 conv (with bias), then BatchNorm."""
    layout = NCHW
    downscale = 2
    out_length = conv_length(3, 2, 1)

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x))
