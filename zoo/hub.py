"""Hugging Face Hub export: a directory timm loads with ``hf-hub:`` or ``local-dir:`` names.

The directory is timm's own layout (config.json with ``architecture`` and ``pretrained_cfg``, plus
model.safetensors), written by timm's ``save_for_hf``; zoo adds the resolved model YAML
(``zoo_model.yaml``) so the architecture is on record beside the weights: ``zoo.create_model(<dir>,
pretrained=True)`` rebuilds any zoo model from it. ``timm.create_model`` (``local-dir:``,
``hf-hub:``) rebuilds registered zoo names only (configs under configs/models/), so ``push_to_hub``
takes those only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from zoo.registration import REGISTERED
from zoo.snapshot import atomic_write_bytes, model_yaml

MODEL_YAML = "zoo_model.yaml"
# create_model's keywords that shape a zoo model, and the model-section key of its YAML that each sets
KEYWORD_KEYS = {"num_classes": ("num_classes",), "in_chans": ("in_chans",), "global_pool": ("head", "pool")}


def _architecture(model: torch.nn.Module, for_timm: bool) -> str:
    """The name the model is saved under; ValueError if it could not be rebuilt from the folder
    (by timm, if ``for_timm``; else by timm or zoo.create_model from the saved YAML)."""
    if not hasattr(model, "num_classes"):  # timm's feature wrappers (features_only=True)
        raise ValueError(f"{type(model).__name__} is a features_only wrapper; save the model it wraps "
                         f"(create it without features_only) and ask for features when loading")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if not arch:
        raise ValueError("the model has no pretrained_cfg['architecture']; build it with zoo.create_model or "
                         "timm.create_model")
    if arch.startswith("zoo_") and arch not in REGISTERED and (for_timm or not getattr(model, "cfg", None)):
        raise ValueError(f"{arch} is not a registered zoo model: timm could not rebuild it from config.json. "
                         f"Put its YAML under configs/models/ (registered as zoo_<file stem>), or save it with "
                         f"zoo.save_pretrained and load it with zoo.create_model(<dir>, pretrained=True).")
    own = getattr(model, "cfg", None)
    if arch in REGISTERED and own is not None:
        from zoo.config import load_config
        def body(raw):  # without what create_model's keywords set (img_size: the data config)
            model = {**raw["model"], "img_size": None}
            for path in KEYWORD_KEYS.values():
                _set(model, path, None)
            return model
        if body(load_config(REGISTERED[arch]).raw) != body(own.raw):
            raise ValueError(f"the model was built from {own.file or 'a dict'}, which shares the name {arch} with "
                             f"the registered {REGISTERED[arch]} but not its architecture: timm would rebuild the "
                             f"registered one from config.json. Give your YAML a name of its own and put it under "
                             f"configs/models/.")
    return arch


def _model_args(model: torch.nn.Module) -> dict:
    """The create_model arguments that shaped this model beyond its config (classes, input
    channels, pooling): config.json's ``model_args`` for timm, and laid into the saved YAML."""
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return {}
    default = {"num_classes": cfg.num_classes, "in_chans": cfg.in_chans, "global_pool": cfg.head["pool"]}
    return {k: getattr(model, k) for k in KEYWORD_KEYS if getattr(model, k) != default[k]}


def _set(model: dict, path: tuple, value) -> None:
    """Set the model-section key at ``path`` (copying the dicts on the way, not changing the caller's)."""
    *parents, last = path
    for key in parents:
        child = dict(model.get(key) or {})
        model[key] = child
        model = child
    model[last] = value


def _saved_yaml(model: torch.nn.Module, args: dict) -> str:
    """The model's YAML with ``_model_args``' values laid in at their ``KEYWORD_KEYS``."""
    section = dict(model.cfg.raw["model"])
    for k, v in args.items():
        _set(section, KEYWORD_KEYS[k], v)
    return model_yaml({**model.cfg.raw, "model": section}, {})


def save_pretrained(model: torch.nn.Module, save_dir, data_config: Optional[dict] = None,
                    label_names=None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ the model YAML) into ``save_dir``.

    Load it back with ``zoo.create_model(<save_dir>, pretrained=True)`` (any zoo model, from the
    saved YAML), with ``timm.create_model("local-dir:<save_dir>", pretrained=True)`` (without
    ``pretrained=True`` timm builds the architecture with random weights), from the Hub with
    ``timm.create_model("hf-hub:<repo>", pretrained=True)`` after ``push_to_hub``, or with
    ``timm.create_model(<architecture>, pretrained=True, pretrained_cfg_overlay=dict(file=<save_dir>/model.safetensors,
    num_classes=N))``: a file alone does not say how many classes it has, and timm replaces a
    classifier whose size differs from the pretrained_cfg's with a new random one.
    """
    from timm.models import save_for_hf
    _architecture(model, for_timm=False)  # refuses what could not be rebuilt from the folder
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    model_config = {}
    if label_names:
        model_config["label_names"] = list(label_names)
    args = _model_args(model)
    save_for_hf(model, str(save_dir), model_config=model_config, safe_serialization=True, data_config=data_config,
                model_args={k: v for k, v in args.items() if k != "global_pool"})
    if args:  # timm reads the pooling off the head, which for global_pool='' pools 1x1 maps ('avg')
        config = json.loads((save_dir / "config.json").read_text())
        config.setdefault("model_args", {}).update(args)
        atomic_write_bytes(save_dir / "config.json", json.dumps(config, indent=2).encode())
    if getattr(getattr(model, "cfg", None), "raw", None):
        (save_dir / MODEL_YAML).write_text(_saved_yaml(model, args))
    return save_dir


def push_to_hub(model: torch.nn.Module, repo_id: str, commit_message: str = "Add zoo model",
                token: Optional[str] = None, private: bool = False, revision: Optional[str] = None,
                data_config: Optional[dict] = None, label_names=None):
    """Create (or reuse) the Hub repo and upload what ``save_pretrained`` writes."""
    import tempfile

    from huggingface_hub import HfApi
    _architecture(model, for_timm=True)  # refused before a repo is created: hf-hub: names need timm
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, data_config=data_config, label_names=label_names)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision, commit_message=commit_message)
