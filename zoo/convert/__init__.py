"""Checkpoint converters: the authors' (or timm's) parameter layouts -> the zoo's.

Each module here registers functions ``fn(state_dict, model) -> state_dict`` under a layout name;
a config names its layout in ``reference.layout``. ``convert_checkpoint`` is the
``pretrained_filter_fn`` that timm calls when loading weights into a zoo model.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Dict

import torch

from zoo.checkpoint import unwrap
from zoo.errors import CheckpointError

CONVERTERS: Dict[str, Callable] = {}


def register_converter(layout: str):
    def deco(fn):
        CONVERTERS[layout] = fn
        return fn
    return deco


def convert_checkpoint(state_dict: dict, model: torch.nn.Module) -> dict:
    sd = unwrap(state_dict)
    expected = model.state_dict()
    if set(sd) == set(expected):
        out = sd
        layout = "zoo"
    else:
        layout = model.cfg.reference.get("layout")
        if layout is None or set(sd) <= set(expected):
            out, layout = sd, "zoo"
        else:
            if layout not in CONVERTERS:
                raise CheckpointError(f"{model.cfg.name}: no converter for layout {layout!r}; "
                                      f"known: {sorted(CONVERTERS)}")
            try:
                out = CONVERTERS[layout](sd, model)
            except (KeyError, AttributeError, IndexError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"checkpoint does not fit {model.cfg.name}: converting it from layout "
                                      f"{layout!r} failed ({type(e).__name__}: {e})") from e
    first_conv = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    _check_fits(out, expected, model.cfg.name, layout, first_conv and f"{first_conv}.weight")
    return out


def _check_fits(sd: dict, expected: dict, name: str, layout: str, first_conv: str = None) -> None:
    """Every key of the model's body is there with its shape. The head may differ (timm drops or
    re-initialises a classifier of another size) and so may the first conv's input channels
    (timm adapts it to ``in_chans`` after this filter)."""
    def fits(k):
        a, b = tuple(sd[k].shape), tuple(expected[k].shape)
        if k == first_conv and len(a) == len(b) == 4:
            return a[:1] + a[2:] == b[:1] + b[2:]
        return a == b

    missing = sorted(k for k in expected if k not in sd and not k.startswith("head."))
    unexpected = sorted(k for k in sd if k not in expected and not k.startswith("head."))
    wrong = sorted(k for k in sd if k in expected and not k.startswith("head.") and not fits(k))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:4]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:4]})")
        if wrong:
            parts.append("shape mismatch: " + ", ".join(
                f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:4]))
        raise CheckpointError(f"checkpoint does not fit {name} (read as layout {layout!r}): " + "; ".join(parts))


def rename(sd: dict, rules) -> dict:
    """Apply (regex, replacement) rules in order to every key; a None replacement drops the key."""
    import re
    out = {}
    for k, v in sd.items():
        for pattern, repl in rules:
            if re.search(pattern, k):
                if repl is None:
                    k = None
                    break
                k = re.sub(pattern, repl, k)
        if k is not None:
            out[k] = v
    return out


for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
