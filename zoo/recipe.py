"""Training recipes: YAML files in configs/train/, validated like model configs.

A recipe has sections (model, data, augment, train, optimizer, schedule, ema, runtime, output);
each key has a type and a default, so a recipe states only what its paper sets. ``base:`` names
another recipe (a stem in configs/train/ or a path relative to the file; a dict may name one too)
and the recipe states what differs, merged as zoo.inherit describes; a ``null`` sets the key to
null. ``--set section.key=value`` overrides (the value is read
as YAML) are applied after the file and checked the same way. Every error is a ``ConfigError``
naming the file (or ``--set``) and the key path.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import yaml

from zoo import inherit, yamlio
from zoo.errors import ConfigError

REQUIRED = object()
NUM = (int, float)
OPT = type(None)


def _positive(v):
    return v > 0


def _nonneg(v):
    return v >= 0


def _prob(v):
    return 0 <= v <= 1


def _pair(v):
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, NUM) and not isinstance(x, bool)
                                                              for x in v)


def _triple(v):
    return isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, NUM) and not isinstance(x, bool)
                                                              for x in v)


# timm's schedules that are functions of the update count (plateau needs a metric: not offered)
SCHEDULES = ("cosine", "step", "multistep", "tanh", "poly")

# section -> key -> (types, default, check or None, rule shown when the check fails)
SCHEMA: Dict[str, Dict[str, tuple]] = {
    "model": {
        # a zoo name (zoo_nat_tiny), a model YAML file (relative to the recipe), or any timm name
        "name": (str, REQUIRED, None, ""),
        "num_classes": ((int, OPT), None, lambda v: v is None or v > 0, "must be positive (null: from the data)"),
        "drop_path_rate": ((NUM, OPT), None, lambda v: v is None or 0 <= v < 1, "must be in [0, 1)"),
        "drop_rate": ((NUM, OPT), None, lambda v: v is None or 0 <= v < 1, "must be in [0, 1)"),
        "pretrained_file": ((str, OPT), None, None, ""),  # initial weights (fine-tuning)
    },
    "data": {
        "root": ((str, OPT), None, None, ""),  # ImageFolder root with train/ and val/ (relative to the cwd)
        "train_split": (str, "train", None, ""),
        "val_split": ((str, OPT), "val", None, ""),
        "img_size": ((int, OPT), None, lambda v: v is None or v >= 32, "must be at least 32 (null: the model's)"),
        "crop_pct": ((NUM, OPT), None, lambda v: v is None or 0 < v <= 1, "must be in (0, 1]"),
        "interpolation": ((str, OPT), None, lambda v: v in (None, "bicubic", "bilinear", "nearest"),
                          "must be bicubic, bilinear or nearest"),
        "train_interpolation": (str, "random", lambda v: v in ("random", "bicubic", "bilinear", "nearest"),
                                "must be random, bicubic, bilinear or nearest"),
        "mean": ((list, OPT), None, lambda v: v is None or _triple(v), "must be a list of 3 numbers"),
        "std": ((list, OPT), None, lambda v: v is None or (_triple(v) and min(v) > 0),
                "must be a list of 3 positive numbers"),
        "workers": (int, 4, _nonneg, "must be >= 0"),
        "pin_memory": (bool, True, None, ""),
    },
    "augment": {
        "no_aug": (bool, False, None, ""),  # train on the eval transform (tests, debugging)
        "scale": (list, [0.08, 1.0], lambda v: _pair(v) and 0 < v[0] <= v[1] <= 1, "must be [min, max] in (0, 1]"),
        "ratio": (list, [0.75, 1.3333333333333333], lambda v: _pair(v) and 0 < v[0] <= v[1], "must be [min, max]"),
        "hflip": (NUM, 0.5, _prob, "must be a probability in [0, 1]"),
        "vflip": (NUM, 0.0, _prob, "must be a probability in [0, 1]"),
        "color_jitter": ((NUM, OPT), 0.4, lambda v: v is None or v >= 0, "must be >= 0"),
        "auto_augment": ((str, OPT), "rand-m9-mstd0.5-inc1", None, ""),  # timm's RandAugment spec
        "reprob": (NUM, 0.25, _prob, "must be a probability in [0, 1]"),  # random erasing
        "remode": (str, "pixel", lambda v: v in ("pixel", "rand", "const"), "must be pixel, rand or const"),
        "recount": (int, 1, _positive, "must be positive"),
        "mixup": (NUM, 0.8, _nonneg, "must be >= 0 (0 disables)"),
        "cutmix": (NUM, 1.0, _nonneg, "must be >= 0 (0 disables)"),
        "mixup_prob": (NUM, 1.0, _prob, "must be a probability in [0, 1]"),
        "mixup_switch_prob": (NUM, 0.5, _prob, "must be a probability in [0, 1]"),
        "mixup_mode": (str, "batch", lambda v: v in ("batch", "pair", "elem"), "must be batch, pair or elem"),
        "label_smoothing": (NUM, 0.1, lambda v: 0 <= v < 1, "must be in [0, 1)"),
    },
    "train": {
        "epochs": (int, REQUIRED, _positive, "must be positive"),
        "batch_size": (int, REQUIRED, _positive, "must be positive"),  # global, per optimizer update
        "accum_steps": (int, 1, _positive, "must be positive"),
        "seed": (int, 0, None, ""),
        "max_steps": ((int, OPT), None, lambda v: v is None or v > 0, "must be positive"),  # stop early (tests)
        "eval_every": (int, 1, _positive, "must be positive (epochs)"),
        "save_every_steps": ((int, OPT), None, lambda v: v is None or v > 0, "must be positive"),
        "log_every": (int, 10, _positive, "must be positive (updates)"),
        "progress": (bool, True, None, ""),
    },
    "optimizer": {
        "name": (str, "adamw", None, ""),  # any timm optimizer name
        "lr": ((NUM, OPT), None, lambda v: v is None or v > 0, "must be positive"),  # absolute; wins over lr_base
        "lr_base": (NUM, 1e-3, _positive, "must be positive"),
        "lr_base_size": (int, 1024, _positive, "must be positive"),
        "lr_base_scale": (str, "linear", lambda v: v in ("linear", "sqrt"), "must be linear or sqrt"),
        "weight_decay": (NUM, 0.05, _nonneg, "must be >= 0"),
        "betas": ((list, OPT), None, lambda v: v is None or (_pair(v) and all(0 <= b < 1 for b in v)),
                  "must be [beta1, beta2], each in [0, 1)"),
        "eps": ((NUM, OPT), None, lambda v: v is None or v > 0, "must be positive"),
        "momentum": (NUM, 0.9, _nonneg, "must be >= 0"),
        "layer_decay": ((NUM, OPT), None, lambda v: v is None or 0 < v <= 1, "must be in (0, 1]"),
        "clip_grad": ((NUM, OPT), None, lambda v: v is None or v > 0, "must be positive (null: no clipping)"),
        "clip_mode": (str, "norm", lambda v: v in ("norm", "value", "agc"), "must be norm, value or agc"),
    },
    "schedule": {
        "name": (str, "cosine", lambda v: v in SCHEDULES, f"must be one of {', '.join(SCHEDULES)}"),
        "decay_epochs": ((NUM, OPT), None, lambda v: v is None or v > 0, "must be positive"),  # step
        "decay_milestones": ((list, OPT), None, lambda v: v is None or (v and all(
            isinstance(e, int) and not isinstance(e, bool) and e > 0 for e in v) and v == sorted(set(v))),
            "must be a list of epochs in increasing order"),
        "decay_rate": (NUM, 0.1, lambda v: 0 < v <= 1, "must be in (0, 1]"),  # step, multistep
        # poly: lr ~ (1 - t/T) ** power; null: decay_rate, as timm's create_scheduler reads it
        "power": ((NUM, OPT), None, lambda v: v is None or v > 0, "must be positive"),
        "warmup_epochs": (NUM, 0, _nonneg, "must be >= 0"),
        "warmup_steps": ((int, OPT), None, lambda v: v is None or v >= 0, "must be >= 0"),  # wins over epochs
        "warmup_lr": (NUM, 1e-6, _nonneg, "must be >= 0"),
        "min_lr": (NUM, 1e-5, _nonneg, "must be >= 0"),
        "cooldown_epochs": (int, 0, _nonneg, "must be >= 0"),
        "step_on": (str, "update", lambda v: v in ("update", "epoch"), "must be update or epoch"),
    },
    "ema": {
        "enabled": (bool, False, None, ""),
        "decay": (NUM, 0.9998, lambda v: 0 < v < 1, "must be in (0, 1)"),
        "warmup": (bool, False, None, ""),
        "select_best": (bool, True, None, ""),  # best checkpoint judged on the EMA weights
    },
    "runtime": {
        "device": (str, "auto", lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v) is not None,
                   "must be auto, cpu, cuda, cuda:N or mps"),
        "amp": ((str, OPT), None, lambda v: v in (None, "bf16", "fp16"), "must be bf16, fp16 or null"),
        "channels_last": (bool, False, None, ""),
        "grad_checkpointing": (bool, False, None, ""),
        "compile": (bool, False, None, ""),
        "sync_batchnorm": (bool, False, None, ""),  # under torchrun on GPUs: BatchNorm over all ranks' batch
        # under torchrun, BatchNorm running statistics made equal on all ranks at each epoch's end (timm's --dist-bn)
        "dist_bn": ((str, OPT), "reduce", lambda v: v in (None, "reduce", "broadcast"),
                    "must be reduce (the mean over processes), broadcast (rank 0's) or null"),
        # under torchrun: minutes a process waits for the others in a collective before the run
        # stops with an error (null: torch's default, 10 for NCCL and 30 for gloo)
        "dist_timeout": ((NUM, OPT), None, lambda v: v is None or v > 0, "must be positive (minutes) or null"),
        "deterministic": (bool, False, None, ""),
        "threads": ((int, OPT), None, lambda v: v is None or v > 0, "must be positive"),
    },
    "output": {
        "dir": ((str, OPT), None, None, ""),  # default runs/<recipe name>
        "keep_last": (int, 1, _positive, "must be positive"),
        "plot": (bool, True, None, ""),
    },
}
TOP_KEYS = {"description", "base", "reference", *SCHEMA}


@dataclass
class Recipe:
    name: str
    file: Optional[Path]
    sections: Dict[str, Dict[str, Any]]
    description: str = ""
    reference: Optional[dict] = None

    def __getattr__(self, item):
        sections = self.__dict__.get("sections")
        if sections is not None and item in sections:
            return _Section(sections[item])
        raise AttributeError(item)

    def to_dict(self) -> dict:
        out = {"description": self.description}
        if self.reference:
            out["reference"] = self.reference
        out.update(copy.deepcopy(self.sections))
        return out

    def model_path(self) -> str:
        """The model name, or a model YAML resolved relative to the recipe file."""
        name = self.sections["model"]["name"]
        if name.endswith((".yaml", ".yml")) and self.file is not None and not Path(name).is_absolute():
            cand = self.file.parent / name
            if cand.is_file():
                return str(cand)
        return name

    def lr(self, batch_size: Optional[int] = None) -> float:
        """The peak learning rate: ``lr`` if set, else ``lr_base`` scaled by batch / lr_base_size."""
        o = self.sections["optimizer"]
        if o["lr"] is not None:
            return float(o["lr"])
        ratio = (batch_size or self.sections["train"]["batch_size"]) / o["lr_base_size"]
        return float(o["lr_base"]) * (math.sqrt(ratio) if o["lr_base_scale"] == "sqrt" else ratio)


class _Section(dict):
    def __getattr__(self, item):
        try:
            return self[item]
        except KeyError:
            raise AttributeError(item) from None


def recipes_dir() -> Path:
    return Path(str(resources.files("zoo.configs"))) / "train"


def list_recipes() -> Dict[str, Path]:
    return {p.stem: p for p in sorted(recipes_dir().glob("*.yaml"))}


# A null in a recipe is a value (no clipping, no AMP), so it overrides the base's rather than
# bringing back the default.
RECIPES = inherit.Kind("recipe", list_recipes, null_deletes=False)


def parse_overrides(items: Iterable[str]) -> Dict[str, Any]:
    """``["optimizer.lr=1e-3", "ema.enabled=true"]`` -> {"optimizer.lr": 0.001, ...} (values read as YAML)."""
    out = {}
    for item in items or ():
        if "=" not in item:
            raise ConfigError("--set", item, "expected section.key=value")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yamlio.load(value) if value.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError("--set", key, f"value is not valid YAML: {e}") from None
    return out


def load_recipe(source, overrides: Optional[Dict[str, Any]] = None) -> Recipe:
    """Load and validate a recipe from a path, a shipped recipe name, or a dict."""
    raw, prov, file, name = RECIPES.read(source)
    if isinstance(overrides, (list, tuple)):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        parts = key.split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError("--set", key, "overrides are written section.key=value")
        sec, k = parts
        if sec not in SCHEMA:
            raise ConfigError("--set", key, f"unknown section {sec!r}; sections: {sorted(SCHEMA)}")
        section = raw.setdefault(sec, {})
        if not isinstance(section, dict):
            raise ConfigError(prov.get(sec, file), sec, f"must be a mapping, got {section!r}")
        section[k] = value
        prov[key] = "--set"
    return _validate(raw, name, file, prov)


def _validate(raw: dict, name: str, file: Optional[Path], prov: dict) -> Recipe:
    def fail(keypath, message):
        raise ConfigError(prov.get(keypath, prov.get(keypath.split(".")[0], file)), keypath, message)

    for k in raw:
        if k not in TOP_KEYS:
            fail(str(k), f"unknown key; valid keys: {sorted(TOP_KEYS)}")
    sections = {}
    for sec, keys in SCHEMA.items():
        given = raw.get(sec) or {}
        if not isinstance(given, dict):
            fail(sec, f"must be a mapping, got {given!r}")
        out = {}
        for k in given:
            if k not in keys:
                fail(f"{sec}.{k}", f"unknown key; valid keys: {sorted(keys)}")
        for k, (types, default, check, rule) in keys.items():
            kp = f"{sec}.{k}"
            if k not in given:
                if default is REQUIRED:
                    fail(sec if sec in raw else kp, f"missing required key {kp!r}")
                out[k] = copy.deepcopy(default)
                continue
            v = given[k]
            kinds = _flat(types)
            if isinstance(v, bool) and bool not in kinds:
                ok = False
            else:
                ok = isinstance(v, kinds)
            if not ok:
                fail(kp, f"expected {'/'.join('null' if t is OPT else t.__name__ for t in kinds)}, got {v!r}")
            if isinstance(v, float) and not math.isfinite(v):
                fail(kp, f"must be a finite number, got {v!r}")
            if check is not None and not check(v):
                fail(kp, f"{rule}, got {v!r}")
            out[k] = v
        sections[sec] = out
    t, a = sections["train"], sections["augment"]
    if t["batch_size"] % t["accum_steps"]:
        fail("train.accum_steps", f"must divide train.batch_size ({t['batch_size']}), got {t['accum_steps']}")
    if sections["schedule"]["warmup_epochs"] >= t["epochs"] and sections["schedule"]["warmup_steps"] is None:
        fail("schedule.warmup_epochs", f"must be shorter than train.epochs ({t['epochs']}), "
                                       f"got {sections['schedule']['warmup_epochs']}")
    sch = sections["schedule"]
    for schedule, key in (("step", "decay_epochs"), ("multistep", "decay_milestones")):
        if sch["name"] == schedule and sch[key] is None:
            fail(f"schedule.{key}", f"the {schedule} schedule needs it (the epochs at which the lr decays)")
    opt = sections["optimizer"]["name"]
    from timm.optim import list_optimizers
    if opt.lower().removeprefix("lookahead_") not in list_optimizers():
        fail("optimizer.name", f"unknown optimizer {opt!r} (timm.optim.list_optimizers(): adamw, sgd, lamb, ...)")
    _check_model_name(sections["model"]["name"], file, fail)
    if a["auto_augment"] is not None:
        problem = _auto_augment_problem(a["auto_augment"])
        if problem:
            fail("augment.auto_augment", f"{problem}; expected a timm spec such as 'rand-m9-mstd0.5-inc1', "
                                         f"'augmix-m5-w4-d2', 'original' or '3a', got {a['auto_augment']!r}")
    return Recipe(name=name, file=file, sections=sections, description=str(raw.get("description", "")),
                  reference=raw.get("reference"))


def _auto_augment_problem(spec: str) -> str:
    """What is wrong with a timm auto-augment spec ('' if nothing): timm's parser asserts on some
    mistakes and silently skips a section without a number (``rand-m9-mstd``)."""
    from timm.data import create_transform
    loose = [c for c in spec.split("-")[1:]
             if not re.search(r"\d", c) and not (spec.startswith("rand") and c.startswith("t"))]
    if loose:
        return f"section(s) {loose} carry no value, which timm would ignore"
    try:
        create_transform(32, is_training=True, auto_augment=spec)
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        return f"timm does not take it ({e or 'unknown policy'})"
    return ""


def _check_model_name(name: str, file: Optional[Path], fail) -> None:
    """A zoo name, a model YAML (relative to the recipe or the working directory) or a timm name."""
    if name.endswith((".yaml", ".yml")):
        here = [Path(name)] + ([file.parent / name] if file is not None else [])
        if not any(p.is_file() for p in here):
            fail("model.name", f"model config {name!r} does not exist (looked for {', '.join(map(str, here))})")
        return
    from zoo.models import resolve_name
    try:
        resolve_name(name)
    except ValueError as e:
        fail("model.name", str(e))


def _flat(types) -> tuple:
    out = []
    for t in types if isinstance(types, tuple) else (types,):
        out.extend(t if isinstance(t, tuple) else (t,))
    return tuple(out)
