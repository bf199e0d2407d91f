"""Deterministic weights and inputs for golden fixtures: logits that the authors' code gave for
weights rebuilt here from their ordered key list, so that no file of weights is kept."""
from typing import Dict, Iterable, Optional, Tuple

import torch


def golden_state_dict(keys: Iterable[Tuple[str, tuple]], scales: Optional[Dict[str, float]] = None):
    """Tensor ``i`` of the ordered (name, shape) list is drawn after ``torch.manual_seed(i)``.
    Weights of two or more dims ~ N(0, 1/fan_in), so attention is far from uniform; 1-D ``.weight``
    (the norms) 1 + N(0, 0.1^2); everything else N(0, 0.02^2), except names ending with a key of
    ``scales``, N(0, scale^2) (bias tables and layer scales large enough to show in the logits)."""
    sd = {}
    for i, (name, shape) in enumerate(keys):
        torch.manual_seed(i)
        v = torch.randn(shape, dtype=torch.float32)
        scale = next((s for suffix, s in (scales or {}).items() if name.endswith(suffix)), None)
        if scale is not None:
            v = scale * v
        elif name.endswith(".weight") and len(shape) >= 2:
            fan_in = 1
            for n in shape[1:]:
                fan_in *= n
            v = v / fan_in ** 0.5
        elif name.endswith(".weight"):
            v = 1 + 0.1 * v
        else:
            v = 0.02 * v
        sd[name] = v
    return sd


def golden_input(shape):
    g = torch.Generator().manual_seed(1234)
    return torch.randn(shape, generator=g, dtype=torch.float32)
