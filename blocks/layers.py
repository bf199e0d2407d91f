"""Small shared layers: layouts, norms by name, activations by name, output-size rules."""
from __future__ import annotations

import torch
from torch import nn

from .registry import Positive, Prob, SpecError, register

NHWC, NCHW = "nhwc", "nchw"


def to_layout(x: torch.Tensor, current: str, wanted: str) -> torch.Tensor:
    """Permute a 4-D feature map between channels-last (B, H, W, C) and (B, C, H, W)."""
    if current == wanted:
        return x
    if wanted == NHWC:
        return x.permute(0, 2, 3, 1)
    return x.permute(0, 3, 1, 2)


def run_mixer(mixer: nn.Module, x: torch.Tensor, ctx=None) -> torch.Tensor:
    """A block's call of its token mixer: with the stage's context state when the mixer reads it
    (``takes_context``, GC-ViT's global queries), so any block can host any mixer."""
    return mixer(x, ctx) if getattr(mixer, "takes_context", False) else mixer(x)


def check_centred_kernel(params: dict, key: str) -> None:
    """SpecError unless ``params[key]`` is a positive odd kernel size (a conv centred on its
    position, padded by kernel // 2 to keep the map's size)."""
    k = params[key]
    if k < 1 or k % 2 == 0:
        raise SpecError(key, f"must be a positive odd number (a centred depth-wise conv), got {k}")


def conv_length(kernel: int, stride: int, padding: int, convs: int = 1):
    """``out_length`` of a stem or downsampler whose resolution changes only in ``convs``
    convolutions of this geometry: floor((n + 2 * padding - kernel) / stride) + 1 each."""
    def out_length(n: int, params: dict) -> int:
        for _ in range(convs):
            n = (n + 2 * padding - kernel) // stride + 1
        return n
    return staticmethod(out_length)


def padded_length(stride: int):
    """``out_length`` of a module that zero-pads each axis to a multiple of ``stride`` and then
    strides by it (Swin's padding, TF's 'SAME' convolutions): ceil(n / stride)."""
    return staticmethod(lambda n, params: -(-n // stride))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@register("norm", "layernorm")
class LayerNormNHWC(nn.LayerNorm):
    """LayerNorm over channels, channels-last."""
    layout = NHWC

    def __init__(self, dim: int, eps: Positive = 1e-5):
        super().__init__(dim, eps=eps)


@register("norm", "layernorm2d")
class LayerNormNCHW(LayerNorm2d):
    layout = NCHW

    def __init__(self, dim: int, eps: Positive = 1e-5):
        super().__init__(dim, eps=eps)


@register("norm", "batchnorm2d")
class BatchNormNCHW(nn.BatchNorm2d):
    layout = NCHW

    def __init__(self, dim: int, eps: Positive = 1e-5, momentum: Prob = 0.1):
        super().__init__(dim, eps=eps, momentum=momentum)


ACTIVATIONS = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU,
               "silu": nn.SiLU, "hardswish": nn.Hardswish, "tanh": nn.Tanh, "identity": nn.Identity}


def activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


def norm_layer(name: str, dim: int, eps: Positive = 1e-5) -> nn.Module:
    """A channels-last norm by name, for use inside blocks."""
    if name == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {name!r}; known: ['layernorm']")
