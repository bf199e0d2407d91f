"""Models by name for train.py, eval.py and the benchmarks: zoo names, model YAMLs and timm names;
weights to start from; the wrappers to look through; autocast by recipe name."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from zoo.errors import CheckpointError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}


def is_zoo(name: str) -> bool:
    return name.startswith("zoo_") or name.endswith((".yaml", ".yml"))


def resolve_name(name: str) -> str:
    """The name ``build_model`` takes for a model YAML, a timm name or a zoo name (also without its
    ``zoo_`` prefix, where timm has no model of that name); ValueError naming the choices if none."""
    import timm
    if name.endswith((".yaml", ".yml")) or timm.is_model(name):
        return name
    if timm.is_model("zoo_" + name):
        return "zoo_" + name
    raise ValueError(f"unknown model {name!r}: a zoo name (python -m zoo list), a model YAML or a timm name")


def build_model(name: str, **kwargs) -> nn.Module:
    """A zoo model (see ``resolve_name``) or any timm model."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    name = resolve_name(name)
    if is_zoo(name):
        from zoo.registration import create_model
        return create_model(name, **kwargs)
    import timm
    return timm.create_model(name, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)


def autocast(device: torch.device, amp: Optional[str]):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def classifiers(model: Optional[nn.Module]) -> tuple:
    """The classifier module names of a model's pretrained_cfg (zoo models: ``head.fc``)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head.fc"
    return tuple(names) if isinstance(names, (list, tuple)) else (names,)


def load_initial_weights(model: nn.Module, path) -> None:
    """model.pretrained_file: weights to start from, converted from the authors' layout for zoo
    models. Every key of the body must fit; a classifier of another size is left as initialised."""
    from zoo.checkpoint import read_state_dict
    sd = read_state_dict(path)
    if hasattr(model, "cfg"):
        from zoo.convert import convert_checkpoint
        sd = convert_checkpoint(sd, model)  # names the keys that do not fit
    heads = classifiers(model)
    own = model.state_dict()
    for k in [k for k in sd if k.startswith(heads)]:
        if k not in own or sd[k].shape != own[k].shape:
            del sd[k]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(heads)]
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not fit the model ({len(missing)} missing, e.g. {missing[:3]}; "
                              f"{len(unexpected)} unexpected, e.g. {unexpected[:3]})")
