"""Parameter and GMAC counts, on the meta device so even the largest variants cost nothing.

GMACs follow REFERENCE.md: ``FlopCounterMode`` total / 2 at 1 x 3 x 224 x 224, attention matmuls
included (the zoo's attention runs as einsums on the meta device, so they are counted).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gmacs(model: torch.nn.Module, img_size=(224, 224), in_chans: int = 3) -> float:
    device = next(model.parameters()).device
    x = torch.zeros(1, in_chans, *img_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2 / 1e9


def measure(name_or_path, img_size=(224, 224)) -> Tuple[int, float]:
    """(params, GMACs) of a zoo model, built on the meta device."""
    from zoo.registration import create_model
    with torch.device("meta"):
        model = create_model(name_or_path)
    model.eval()
    return count_params(model), count_gmacs(model, img_size, model.in_chans)
