"""Checkpoint converters: the authors' (or timm's) parameter layouts -> the zoo's.

Each module here registers functions ``fn(state_dict, model) -> state_dict`` under a layout name;
a config names its layout in ``reference.layout``. ``convert_checkpoint`` is the
``pretrained_filter_fn`` that timm calls when loading weights into a zoo model; after converting,
it resizes relative position bias tables of another window or kernel size (``resize_rpb``).
"""
from __future__ import annotations

import importlib
import pkgutil
import warnings
from collections import Counter
from typing import Callable, Dict

import torch
from timm.layers import resize_rel_pos_bias_table

from zoo.checkpoint import misfit, unwrap
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
    out = resize_rpb(out, expected, model.cfg.name)
    first_conv = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    _check_fits(out, expected, model.cfg.name, layout, first_conv and f"{first_conv}.weight")
    return out


def resize_rpb(sd: dict, expected: dict, name: str) -> dict:
    """Fit every relative position bias table (the zoo's ``rpb``: (heads, 2h-1, 2w-1), Swin/MaxViT/
    GC-ViT windows, MaxViT grids, NAT/DiNAT kernels) that differs from the model's only in its window
    to the model's, with timm's ``resize_rel_pos_bias_table`` (as timm's Swin and MaxViT checkpoint
    filters do), and warn how many were resized from which size to which. A table with another
    head count is left as it is, for the fit check to report."""
    out, resized = {}, Counter()
    for k, v in sd.items():
        want = expected.get(k)
        if k.rsplit(".", 1)[-1] == "rpb" and want is not None and v.dim() == want.dim() == 3 \
                and v.shape != want.shape and v.shape[0] == want.shape[0]:
            resized[tuple(v.shape[1:]), tuple(want.shape[1:])] += 1
            with warnings.catch_warnings():  # torch's notes on timm's indexing, nothing a user can act on
                warnings.simplefilter("ignore", UserWarning)
                v = resize_rel_pos_bias_table(v, ((want.shape[1] + 1) // 2, (want.shape[2] + 1) // 2),
                                              want.shape)
        out[k] = v
    for (a, b), n in resized.items():
        warnings.warn(f"{name}: resized {n} relative position bias table(s) from {a[0]}x{a[1]} to "
                      f"{b[0]}x{b[1]} (window {(a[0] + 1) // 2}x{(a[1] + 1) // 2} -> "
                      f"{(b[0] + 1) // 2}x{(b[1] + 1) // 2}) to fit the model", stacklevel=2)
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

    problem = misfit(sd, expected, ignore=lambda k: k.startswith("head."), fits=fits)
    if problem:
        raise CheckpointError(f"checkpoint does not fit {name} (read as layout {layout!r}): {problem}")


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
