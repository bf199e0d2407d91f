"""What every attention mixer shares: the qkv projection into heads and the output projection."""
from __future__ import annotations

import torch
from torch import nn

from .registry import Prob, SpecError


def check_heads(params: dict, ctx: dict, heads_key: str = "heads") -> None:
    dim, heads = ctx["dim"], params[heads_key]
    if heads < 1:
        raise SpecError(heads_key, f"must be >= 1, got {heads}")
    if dim % heads:
        raise SpecError(heads_key, f"dim {dim} is not divisible by {heads} heads")


def pair(v) -> tuple:
    return (v, v) if isinstance(v, int) else tuple(v)


def check_positive(params: dict, key: str) -> None:
    """Every axis of ``params[key]`` (an int or a pair) is at least 1."""
    for v in pair(params[key]):
        if v < 1:
            raise SpecError(key, f"must be >= 1, got {v}")


def bias_table(heads: int, window) -> nn.Parameter:
    """A relative positional bias table (heads, 2*wh - 1, 2*ww - 1), indexed by key - query
    (NATTEN's convention, which ``zoo.kernels.na2d`` reads); tables of the other convention are
    flipped by the checkpoint converters."""
    wh, ww = pair(window)
    table = nn.Parameter(torch.zeros(heads, 2 * wh - 1, 2 * ww - 1))
    nn.init.trunc_normal_(table, std=0.02)
    return table


class QKVAttention(nn.Module):
    """Channels-last input (B, H, W, C) -> q, k, v as (B, H, W, heads, head_dim); then proj."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, proj_drop: Prob = 0.0):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def split_qkv(self, x: torch.Tensor):
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H, W, 3, self.heads, self.head_dim)
        return qkv.unbind(3)

    def project(self, out: torch.Tensor) -> torch.Tensor:
        """(B, H, W, heads, head_dim) -> (B, H, W, C)."""
        return self.proj_drop(self.proj(out.flatten(-2)))
