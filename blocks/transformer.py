"""The pre-norm transformer block shared by most families: x + mixer(norm(x)), x + mlp(norm(x)),
after an optional positional encoding of its input (``pos``, e.g. BiFormer's depth-wise conv)."""
from __future__ import annotations

from typing import Literal, Optional

import torch
from timm.layers import DropPath, LayerScale, Mlp
from torch import nn

from .layers import ACTIVATIONS, NHWC, run_mixer, to_layout
from .registry import Positive, Prob, SpecError, build, register, spec_of

Activation = Literal["gelu", "gelu_tanh", "relu", "silu", "hardswish"]


@register("block", "transformer")
class TransformerBlock(nn.Module):
    layout = NHWC

    def __init__(self, dim: int, mixer: spec_of("mixer"), mlp_ratio: Positive = 4.0,
                 layer_scale: Optional[Positive] = None, act: Activation = "gelu", norm_eps: Positive = 1e-5,
                 proj_drop: Prob = 0.0, pos: spec_of("pos") = None, drop_path: float = 0.0):
        super().__init__()
        self.pos_embed = build("pos", pos, dim=dim)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.mixer = build("mixer", mixer, dim=dim)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=ACTIVATIONS[act], drop=proj_drop)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @classmethod
    def check(cls, params: dict, ctx: dict) -> None:
        if params["mixer"] is None:
            raise SpecError("mixer", "a transformer block needs a mixer")

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        if self.pos_embed is not None:
            layout = self.pos_embed.layout
            x = to_layout(self.pos_embed(to_layout(x, NHWC, layout)), layout, NHWC)
        x = x + self.drop_path1(self.ls1(run_mixer(self.mixer, self.norm1(x), ctx)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
