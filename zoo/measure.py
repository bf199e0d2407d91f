"""Parameter and GMAC counts, on the meta device so even the largest variants cost nothing.

GMACs follow REFERENCE.md: ``FlopCounterMode`` total / 2 at 1 x 3 x 224 x 224, attention matmuls
included (the zoo's attention runs as einsums on the meta device, so they are counted).
Ops FlopCounterMode has no formula for get one from ``extra_flop_formulas`` (torchvision's
``deform_conv2d``, counted like the convolution it generalises; its bilinear sampling is not).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _deform_conv2d_flops(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    # out (B, C_out, H_out, W_out); weight (C_out, C_in / groups, kh, kw); 2 FLOPs per MAC.
    return 2 * math.prod(out_shape) * math.prod(weight_shape[1:])


def extra_flop_formulas() -> dict:
    """FLOP formulas for ops outside aten that zoo models use (only those whose library is loaded)."""
    formulas = {}
    try:
        import torchvision  # noqa: F401  (registers torch.ops.torchvision and its meta kernels)
        formulas[torch.ops.torchvision.deform_conv2d] = _deform_conv2d_flops
    except (ImportError, AttributeError, RuntimeError):
        pass
    return formulas


def count_gmacs(model: torch.nn.Module, img_size=(224, 224), in_chans: int = 3) -> float:
    """GMACs of one image, counted where the model lies. On the meta device (as ``measure``
    builds it) ``na2d`` counts its windows' own products; on real tensors, the products of the
    sliding-window tiles it runs, which are more (kernels/tiled.py)."""
    device = next(model.parameters()).device
    x = torch.zeros(1, in_chans, *img_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=extra_flop_formulas()) as counter:
        model(x)
    return counter.get_total_flops() / 2 / 1e9


def measure(name_or_path, img_size=(224, 224)) -> Tuple[int, float]:
    """(params, GMACs) of a zoo model, built on the meta device."""
    from zoo.registration import create_model
    with torch.device("meta"):
        model = create_model(name_or_path)
    model.eval()
    return count_params(model), count_gmacs(model, img_size, model.in_chans)
