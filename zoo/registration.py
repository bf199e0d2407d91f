"""Registers every shipped config with timm as ``zoo_<file stem>``.

timm's ``register_model`` reads ``default_cfgs`` from the module that defines an entrypoint, so
the pretrained configs are collected here before the entrypoints are registered.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Optional

import timm
from timm.models import build_model_with_cfg, register_model
from timm.models._registry import _model_entrypoints, generate_default_cfgs

from zoo.backbone import Backbone
from zoo.blocks import lookup
from zoo.checkpoint import read_state_dict
from zoo.config import MIN_INPUT, NAMED_STATS, ModelConfig, config_paths, load_config, with_img_size
from zoo.convert import convert_checkpoint
from zoo.errors import ConfigError

PREFIX = "zoo_"
default_cfgs = {}
REGISTERED = {}


def pretrained_cfg_for(cfg: ModelConfig) -> dict:
    """timm's pretrained_cfg: input size, mean/std, crop, interpolation, first conv, classifier."""
    p = cfg.pretrained
    mean, std = p.get("mean", "imagenet"), p.get("std")
    if isinstance(mean, str):
        mean, std = NAMED_STATS[mean]
    first_conv = getattr(lookup("stem", cfg.stem["type"]), "first_conv", "proj")
    h, w = cfg.img_size
    out = dict(
        url="", num_classes=cfg.num_classes, input_size=(cfg.in_chans, h, w),
        pool_size=cfg.stages[-1].input_size,
        crop_pct=p.get("crop_pct", 0.875), crop_mode=p.get("crop_mode", "center"),
        interpolation=p.get("interpolation", "bicubic"), mean=tuple(mean), std=tuple(std),
        first_conv=f"stem.{first_conv}", classifier="head.fc", min_input_size=(cfg.in_chans, MIN_INPUT, MIN_INPUT),
        description=cfg.description or None,
    )
    source = cfg.reference.get("source")
    if source:  # the implementation the architecture follows: a repository and file, not a URL
        out["notes"] = (f"architecture as {source}",)
    for key in ("license", "paper_ids"):
        if key in p:
            out[key] = p[key]
    if "notes" in p:
        notes = p["notes"]
        out["notes"] = (*([notes] if isinstance(notes, str) else notes), *out.get("notes", ()))
    return out


def build(cfg: ModelConfig, variant: str, pretrained: bool = False, pretrained_cfg: Optional[dict] = None,
          **kwargs) -> Backbone:
    """timm's builder around Backbone: pretrained loading, features_only, pretrained_cfg."""
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    img_size = kwargs.pop("img_size", None)
    if img_size is not None:
        cfg = with_img_size(cfg, img_size)
        sized = pretrained_cfg_for(cfg)
        overlay = {"input_size": sized["input_size"], "pool_size": sized["pool_size"], **overlay}
    if pretrained and overlay.get("file") and not overlay.get("state_dict"):
        # Read it here so a missing or corrupt file gets an error that names it.
        overlay["state_dict"] = read_state_dict(overlay["file"])
    try:
        return build_model_with_cfg(
            Backbone, variant, pretrained, model_cfg=cfg, pretrained_cfg=pretrained_cfg,
            pretrained_cfg_overlay=overlay or None, pretrained_filter_fn=convert_checkpoint,
            feature_cfg=dict(feature_cls="getter", out_indices=tuple(range(len(cfg.stages)))), **kwargs)
    except RuntimeError as e:
        if not (pretrained and str(e).startswith("No pretrained weights exist")):
            raise
        # timm's words say to give up on weights; zoo's have no URL, they come from a file
        raise RuntimeError(
            f"{variant}: pretrained=True needs a weights file (zoo downloads nothing): pass "
            f"pretrained_cfg_overlay=dict(file=...) with zoo's .safetensors or the original checkpoint, "
            f"or zoo.create_model(<folder zoo.save_pretrained wrote>, pretrained=True)") from None


def _entrypoint(name: str, path: Path):
    def entry(pretrained: bool = False, **kwargs):
        return build(load_config(path, name=name), name, pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = f"zoo model from {path.name}"
    return entry


def register_all() -> None:
    """Register every config under configs/models/. A broken file is skipped with a warning naming
    its error, so that one bad YAML dropped there does not break ``import zoo``."""
    paths = config_paths()
    cfgs = {}
    for stem, path in paths.items():
        name = PREFIX + stem
        if name in _model_entrypoints and _model_entrypoints[name].__module__ != __name__:
            raise RuntimeError(f"{name} is already a timm model; zoo never shadows timm's names")
        try:
            cfgs[name] = pretrained_cfg_for(load_config(path, name=name))
        except ConfigError as e:
            warnings.warn(f"zoo: {name} is not registered: {e}", stacklevel=2)
    default_cfgs.update(generate_default_cfgs(cfgs))
    for stem, path in paths.items():
        name = PREFIX + stem
        if name not in cfgs:
            continue
        fn = _entrypoint(name, path)
        setattr(sys.modules[__name__], name, fn)
        register_model(fn)
        REGISTERED[name] = path


def create_model(name_or_path, pretrained: bool = False, **kwargs) -> Backbone:
    """A zoo model from a registered name (``zoo_nat_tiny`` or ``nat_tiny``), a YAML file of yours,
    a config dict (the YAML's content) or a folder ``zoo.save_pretrained`` wrote."""
    source = name_or_path if isinstance(name_or_path, dict) else str(name_or_path)
    if isinstance(source, str) and Path(source).is_dir():
        return _from_saved(Path(source), pretrained, **kwargs)
    if isinstance(source, dict) or source.endswith((".yaml", ".yml")) or Path(source).is_file():
        cfg = load_config(source)
        variant = PREFIX + cfg.name
        return build(cfg, variant, pretrained, pretrained_cfg=pretrained_cfg_for(cfg), **kwargs)
    name = source if source.startswith(PREFIX) else PREFIX + source
    if name not in REGISTERED:
        raise ValueError(f"unknown zoo model {name_or_path!r}; registered: {sorted(REGISTERED)}")
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def _from_saved(folder: Path, pretrained: bool, **kwargs) -> Backbone:
    """A folder ``zoo.save_pretrained`` wrote: the model from its YAML, with its weights if
    ``pretrained``."""
    from zoo.hub import MODEL_YAML
    for name in (MODEL_YAML, "config.json"):
        if not (folder / name).is_file():
            raise ValueError(f"{folder} has no {name}: not a folder zoo.save_pretrained wrote")
    arch = json.loads((folder / "config.json").read_text()).get("architecture", PREFIX + folder.name)
    cfg = load_config(folder / MODEL_YAML, name=arch.removeprefix(PREFIX))
    if pretrained:
        kwargs["pretrained_cfg_overlay"] = {"file": str(folder / "model.safetensors"),
                                            **(kwargs.get("pretrained_cfg_overlay") or {})}
    return build(cfg, PREFIX + cfg.name, pretrained, pretrained_cfg=pretrained_cfg_for(cfg), **kwargs)


def list_models() -> list:
    return sorted(REGISTERED)
