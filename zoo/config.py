"""Model configs: YAML files with bases, merged and validated before any module is built.

A file is ``{description, base, reference, pretrained, model}``. ``base`` names another config
(a stem in configs/models/, or a path relative to the file); the variant states only what
differs, merged as zoo.inherit describes (lists of stages merge stage by stage, so a variant can
change one; ``null`` removes a key). A variant does not inherit the base's ``description`` or
reference figures (``params``, ``gmacs``, ``published``): they describe the base's architecture;
``reference.source`` and ``reference.layout`` (the checkpoint layout) carry over.

Each spec is checked against its registered class's ``__init__`` signature (zoo.specs, see
blocks/registry.py), so a new block type needs no edit here. A list given to a parameter whose
annotation is not a sequence is a per-block cycle over the stage (DiNAT's ``dilation: [1, 8, 1]``,
Swin's ``shift: [false, true]``); it repeats over the blocks, and its last repetition may be cut
short (GC-ViT's local/global ``[false, true]`` over a stage of 3 or 19 blocks), but it must not be
longer than the stage depth. For per-axis (``Pair``) parameters a list is always such a cycle, and
a rectangular value is written ``{h: 7, w: 9}``.
"""
from __future__ import annotations

import copy
import inspect
import re
from dataclasses import dataclass, field, replace
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, List, NoReturn, Optional, Tuple

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import get_act_layer

from zoo import inherit
from zoo.blocks import registry
from zoo.blocks.layers import NCHW
from zoo.errors import ConfigError
from zoo.specs import validate_spec, with_defaults

TOP_KEYS = {"description", "base", "reference", "pretrained", "model"}
MODEL_KEYS = {"in_chans", "num_classes", "img_size", "drop_rate", "drop_path_rate", "stem", "block",
              "downsample", "stages", "norm", "head"}
STAGE_KEYS = {"depth", "dim", "block", "downsample", "context"}
HEAD_KEYS = {"pool", "norm", "hidden_size", "hidden_act"}
REFERENCE_KEYS = {"params", "gmacs", "published", "source", "layout"}
PUBLISHED_KEYS = {"params", "gmacs", "top1", "note"}
PRETRAINED_KEYS = {"mean", "std", "crop_pct", "crop_mode", "interpolation", "license", "paper_ids", "notes"}
# pretrained.mean may name a pair of (mean, std) instead of giving both as lists
NAMED_STATS = {"imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), "inception": ((0.5,) * 3, (0.5,) * 3)}
MIN_INPUT = 32
# The model keys that create_model's keywords may also set: (types, default, check, rule). The
# config and Backbone's keywords are checked by the same rules (``value_problem``).
MODEL_OVERRIDES = {
    "in_chans": (int, 3, lambda v: v > 0, "must be positive"),
    "num_classes": (int, 1000, lambda v: v >= 0, "must be >= 0"),
    "drop_rate": ((int, float), 0.0, lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "drop_path_rate": ((int, float), 0.0, lambda v: 0 <= v < 1, "must be in [0, 1)"),
}
# The head's pooling (timm's global_pool): '' keeps the map and runs the head at every position.
# catavgmax doubles the pooled width, which a head with a norm cannot take.
POOLS = ("avg", "max", "avgmax", "catavgmax", "")


def models_dir() -> Path:
    return Path(str(resources.files("zoo.configs"))) / "models"


def config_paths() -> Dict[str, Path]:
    """Every shipped model config by file stem (configs/models/ and its sub-folders)."""
    found: Dict[str, Path] = {}
    for path in sorted(models_dir().rglob("*.yaml")):
        if path.stem in found:
            raise ConfigError(path, "", f"duplicate model name {path.stem!r} (also {found[path.stem]})")
        found[path.stem] = path
    return found


# A variant inherits its base's architecture, reference source and checkpoint layout, but neither its
# description nor its figures.
MODEL_CONFIGS = inherit.Kind("model config", config_paths, null_deletes=True, prefix="zoo_",
                             not_inherited=("description", "reference.params", "reference.gmacs", "reference.published"))


# ----------------------------------------------------------------------------------------------
# The validated config


@dataclass
class StageConfig:
    depth: int
    dim: int
    units: List[List[dict]]  # units[i] = the resolved block specs of repetition i
    downsample: Optional[dict]
    context: Optional[dict]
    reduction: int  # nominal stride of this stage's output relative to the input image
    input_size: Tuple[int, int]  # the stage's feature map (after its downsampler) at the config's img_size


@dataclass
class ModelConfig:
    name: str
    file: Optional[Path]
    in_chans: int
    num_classes: int
    img_size: Tuple[int, int]
    drop_rate: float
    drop_path_rate: float
    stem: dict
    stages: List[StageConfig]
    norm: Optional[dict]
    head: dict
    reference: dict = field(default_factory=dict)
    pretrained: dict = field(default_factory=dict)
    description: str = ""
    raw: dict = field(default_factory=dict)  # the merged YAML, for saving beside checkpoints

    @property
    def num_features(self) -> int:
        return self.stages[-1].dim


def with_img_size(cfg: ModelConfig, img_size) -> ModelConfig:
    """``cfg`` validated again at another ``model.img_size`` (timm's ``img_size`` keyword): the
    size-dependent checks and the pretrained_cfg's input and pool sizes follow it. The model
    itself runs at any input size either way."""
    raw = {k: v for k, v in copy.deepcopy(cfg.raw).items() if k != "base"}  # already merged
    raw["model"]["img_size"] = list(img_size) if isinstance(img_size, (tuple, list)) else img_size
    try:
        resized = load_config(raw, name=cfg.name)
    except ConfigError as e:
        raise ConfigError(f"{cfg.file or cfg.name} at img_size={img_size!r}", e.keypath, e.message) from None
    return replace(resized, file=cfg.file, raw={**cfg.raw, "model": raw["model"]})


def _as_pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def load_config(source, name: Optional[str] = None) -> ModelConfig:
    """Load and validate a model config from a path, a shipped name, or a dict."""
    raw, prov, file, stem = MODEL_CONFIGS.read(source)
    return _validate(raw, name or stem, file, prov)


# ----------------------------------------------------------------------------------------------
# Validating the merged YAML


class _Reporter:
    """Raises a merged config's ConfigErrors: ``where`` names the key where the YAML writes it and
    the file that set it (``prov``: key path -> file); ``keys`` and ``typed`` check plain keys."""

    def __init__(self, raw: dict, file: Optional[Path], prov: Dict[str, Path]):
        self.raw, self.file, self.prov = raw, file, prov

    def where(self, keypath: str, message: str, stage: Optional[int] = None) -> NoReturn:
        # A stage's block or downsample merges over the model-level spec: name a key where the
        # YAML writes it, and the stage it was being resolved for.
        inherited = re.match(r"model\.stages\[\d+\]\.(block|downsample)(?![a-z_])(.*)", keypath)
        if inherited and not _written(self.raw, keypath) \
                and _written(self.raw, f"model.{inherited[1]}{inherited[2]}"):
            keypath = f"model.{inherited[1]}{inherited[2]}"
        if stage is not None and not keypath.startswith(f"model.stages[{stage}]"):
            message = f"{message} (for model.stages[{stage}])"
        # Name the file that set the deepest recorded prefix of this key path.
        origin, probe = self.file, keypath
        while probe:
            if probe in self.prov:
                origin = self.prov[probe]
                break
            cut = max(probe.rfind("."), probe.rfind("["))
            probe = probe[:cut] if cut > 0 else ""
        if origin != self.file and self.file is not None:
            message = f"{message} (in the base of {self.file.name})"
        raise ConfigError(origin, keypath, message)

    def at_stage(self, stage: int) -> Callable[[str, str], NoReturn]:
        """``where`` for what is resolved for model.stages[stage] (also keys set at model level)."""
        return partial(self.where, stage=stage)

    def keys(self, d, allowed, path: str) -> None:
        if not isinstance(d, dict):
            self.where(path, f"must be a mapping, got {type(d).__name__}")
        for k in d:
            if k not in allowed:
                self.where(f"{path}.{k}" if path else str(k), f"unknown key; valid keys: {sorted(allowed)}")

    def typed(self, d: dict, key: str, path: str, kinds, default=inspect.Parameter.empty, check=None, rule=""):
        """``d[key]`` checked by ``value_problem``; ``default`` where it is missing (if it may be)."""
        if key not in d:
            if default is inspect.Parameter.empty:
                self.where(path, f"missing required key {key!r}")
            return default
        v = d[key]
        problem = value_problem(v, kinds, check, rule)
        if problem:
            self.where(f"{path}.{key}" if path else key, problem)
        return v


_PATH_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _written(raw: dict, keypath: str) -> bool:
    """Whether the merged YAML holds this key path (``model.stages[0].block.mixer``)."""
    node = raw
    for name, index in _PATH_TOKEN.findall(keypath):
        if name and isinstance(node, dict) and name in node:
            node = node[name]
        elif index and isinstance(node, list) and int(index) < len(node):
            node = node[int(index)]
        else:
            return False
    return True


def _validate(raw: dict, name: str, file: Optional[Path], prov: Dict[str, Path]) -> ModelConfig:
    """The ModelConfig of a merged YAML, or the ConfigError for the first problem found in it."""
    report = _Reporter(raw, file, prov)
    ref, pre = _check_top_level(raw, report)
    m = raw["model"]
    report.keys(m, MODEL_KEYS, "model")
    in_chans = report.typed(m, "in_chans", "model", *MODEL_OVERRIDES["in_chans"])
    num_classes = report.typed(m, "num_classes", "model", *MODEL_OVERRIDES["num_classes"])
    _check_pretrained(pre, in_chans, report)
    img_size = _img_size(m, report)
    drop_rate = report.typed(m, "drop_rate", "model", *MODEL_OVERRIDES["drop_rate"])
    dpr = report.typed(m, "drop_path_rate", "model", *MODEL_OVERRIDES["drop_path_rate"])

    stem = validate_spec("stem", m.get("stem"), "model.stem", {"in_chans": in_chans}, where=report.where)
    if stem is None:
        report.where("model.stem", "missing required key 'stem'")
    stages = _stages(m, stem, img_size, report)
    dim = stages[-1].dim
    norm = validate_spec("norm", m.get("norm"), "model.norm", {"dim": dim}, where=report.where)
    head = _head(m.get("head") or {}, dim, report)
    return ModelConfig(
        name=name, file=file, in_chans=in_chans, num_classes=num_classes, img_size=img_size,
        drop_rate=float(drop_rate), drop_path_rate=float(dpr), stem=stem, stages=stages, norm=norm, head=head,
        reference=ref, pretrained=pre, description=str(raw.get("description", "")), raw=raw)


def _check_top_level(raw: dict, report: _Reporter) -> Tuple[dict, dict]:
    """The top-level keys, ``reference`` and ``pretrained``'s keys: returns (reference, pretrained)."""
    report.keys(raw, TOP_KEYS, "")
    if "model" not in raw:
        report.where("", "missing required key 'model'")
    ref = raw.get("reference") or {}
    report.keys(ref, REFERENCE_KEYS, "reference")
    if "published" in ref:
        report.keys(ref["published"], PUBLISHED_KEYS, "reference.published")
    report.typed(ref, "params", "reference", (int, type(None)), None, lambda v: v is None or v > 0,
                 "must be a positive count")
    report.typed(ref, "gmacs", "reference", (int, float, type(None)), None, lambda v: v is None or v > 0,
                 "must be positive")
    pre = raw.get("pretrained") or {}
    report.keys(pre, PRETRAINED_KEYS, "pretrained")
    return ref, pre


def _check_pretrained(pre: dict, in_chans: int, report: _Reporter) -> None:
    """The preprocessing keys timm's data config reads from the pretrained_cfg."""
    mean, std = pre.get("mean", "imagenet"), pre.get("std")
    if isinstance(mean, str):
        if mean not in NAMED_STATS:
            report.where("pretrained.mean", f"expected one of {sorted(NAMED_STATS)} or a list of {in_chans} "
                                            f"numbers, got {mean!r}")
        if std is not None:
            report.where("pretrained.std", f"comes with the named mean {mean!r}; give both as lists to set them")
    else:
        for key, v in (("mean", mean), ("std", std)):
            if not (isinstance(v, list) and len(v) == in_chans and all(
                    isinstance(e, (int, float)) and not isinstance(e, bool) for e in v)):
                report.where(f"pretrained.{key}", f"expected a list of {in_chans} numbers (one per input channel), "
                                                  f"got {v!r}")
        if min(std) <= 0:
            report.where("pretrained.std", f"must be positive, got {std!r}")
    report.typed(pre, "crop_pct", "pretrained", (int, float), None, lambda v: 0 < v <= 1, "must be in (0, 1]")
    report.typed(pre, "crop_mode", "pretrained", str, None, lambda v: v in ("center", "squash", "border"),
                 "must be one of 'center', 'squash', 'border'")
    report.typed(pre, "interpolation", "pretrained", str, None,
                 lambda v: v in ("bicubic", "bilinear", "nearest", "random"), "must be one of 'bicubic', "
                                                                            "'bilinear', 'nearest', 'random'")


def _img_size(m: dict, report: _Reporter) -> Tuple[int, int]:
    """model.img_size as (height, width): an int or a pair, at least MIN_INPUT."""
    img = report.typed(m, "img_size", "model", (int, list), 224)
    if isinstance(img, list) and (len(img) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                          for v in img)):
        report.where("model.img_size", f"expected an int or [height, width], got {img!r}")
    img_size = _as_pair(img)
    if min(img_size) < MIN_INPUT:
        report.where("model.img_size", f"must be at least {MIN_INPUT}, got {img!r}")
    return img_size


@dataclass(frozen=True)
class _Map:
    """The feature map so far: its nominal stride, and its size at img_size and at MIN_INPUT."""
    reduction: int
    size: Tuple[int, int]
    smallest: Tuple[int, int]


def _after(kind: str, spec: dict, path: str, before: _Map, img_size: Tuple[int, int], where) -> _Map:
    """The map after a (validated) stem or downsampler, which must leave at least 1x1."""
    stride, size = resize(kind, spec, before.size)
    smallest = resize(kind, spec, before.smallest)[1]
    _check_map(size, smallest, img_size, path, where)
    return _Map(before.reduction * stride, size, smallest)


def _check_map(size, smallest, img_size, path: str, where) -> None:
    """A stem or downsampler must leave a map of at least 1x1, at img_size and at MIN_INPUT."""
    for at, hw in ((f"img_size {img_size[0]}x{img_size[1]}", size),
                   (f"the smallest input, {MIN_INPUT}x{MIN_INPUT}", smallest)):
        if min(hw) < 1:
            where(path, f"leaves a {hw[0]}x{hw[1]} map at {at}: too many downsamplings for the "
                        f"input sizes a model must take")


def resize(kind: str, spec: dict, size: Tuple[int, int]) -> Tuple[int, Tuple[int, int]]:
    """A (validated) stem or downsampler spec's stride (its class's ``downscale``, or
    ``downscale_of(params)`` where a parameter sets it) and the (height, width) it makes of an
    input of ``size``, from its class's ``out_length``: modules round odd sizes differently (ceil
    for padded stride-2 convolutions, floor for CSWin's stem and LITv2's merging)."""
    cls = registry.lookup(kind, spec["type"])
    params = {k: v for k, v in with_defaults(kind, spec).items() if k != "type"}
    stride = cls.downscale_of(params) if hasattr(cls, "downscale_of") else cls.downscale
    return stride, (cls.out_length(size[0], params), cls.out_length(size[1], params))


def _stages(m: dict, stem: dict, img_size: Tuple[int, int], report: _Reporter) -> List[StageConfig]:
    """model.stages, each sized from the map the stem and the stages before it leave."""
    stages_raw = m.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        report.where("model.stages", f"must be a non-empty list of stages, got {stages_raw!r}")
    start = _Map(1, img_size, (MIN_INPUT, MIN_INPUT))  # every model runs at MIN_INPUT px
    fmap = _after("stem", stem, "model.stem", start, img_size, report.where)
    stages: List[StageConfig] = []
    for s, st in enumerate(stages_raw):
        prev_dim = stages[-1].dim if stages else None
        stage, fmap = _stage(s, st, m, stem, prev_dim, fmap, img_size, report)
        stages.append(stage)
    return stages


def _stage(s: int, st, m: dict, stem: dict, prev_dim: Optional[int], fmap: _Map, img_size: Tuple[int, int],
           report: _Reporter) -> Tuple[StageConfig, _Map]:
    """model.stages[s]: its depth and width, downsampler, context and blocks; and the map it leaves."""
    sp = f"model.stages[{s}]"
    where_at = report.at_stage(s)
    report.keys(st, STAGE_KEYS, sp)
    depth = report.typed(st, "depth", sp, int, check=lambda v: v >= 1, rule="must be a positive integer")
    dim = report.typed(st, "dim", sp, int, check=lambda v: v >= 1, rule="must be a positive integer")
    ds, ds_path = _stage_downsample(s, sp, st, m, prev_dim, dim, where_at)
    if ds is not None:
        fmap = _after("downsample", ds, ds_path, fmap, img_size, where_at)
    else:
        if s > 0 and prev_dim != dim:
            report.where(f"{sp}.dim", f"changes the width from {prev_dim} to {dim} without a downsample")
        if s == 0 and stem.get("width") not in (None, dim):  # a stem narrower than stage 0 (MaxViT)
            report.where("model.stem.width", f"the stem's width {stem['width']} differs from the first stage's "
                                             f"dim {dim}, and that stage has no downsample to change it")
    # The stage's context (GC-ViT's global queries, FasterViT's carrier tokens) is checked
    # first: the blocks that read it say so through registry.read_context.
    ctx = {"dim": dim, "input_size": fmap.size, "stage": s, "img_size": img_size}
    context = validate_spec("context", st.get("context"), f"{sp}.context", ctx, where=where_at)
    ctx["context"] = context and with_defaults("context", context)
    units, paths = _stage_units(m, st, sp, depth, ctx, where_at)
    if context is not None and not ctx.get("context_read"):
        where_at(f"{sp}.context", f"no block of the stage reads a {context['type']!r} context")
    _check_stand_in(ds, ds_path, units, paths, depth, where_at)
    return StageConfig(depth, dim, units, ds, context, fmap.reduction, fmap.size), fmap


def _stage_downsample(s: int, sp: str, st: dict, m: dict, prev_dim: Optional[int], dim: int,
                      where) -> Tuple[Optional[dict], str]:
    """The stage's validated downsampler (its own, merged over model.downsample, which stages after
    the first inherit), or None; and the key path it is written at."""
    ds_spec = st["downsample"] if "downsample" in st else (m.get("downsample") if s > 0 else None)
    ds_path = f"{sp}.downsample" if "downsample" in st else "model.downsample"
    if isinstance(ds_spec, dict) and isinstance(st.get("downsample"), dict) \
            and isinstance(m.get("downsample"), dict) and "type" not in st["downsample"]:
        ds_spec = inherit.merge(m["downsample"], st["downsample"])  # null drops a key
    if ds_spec is None:
        return None, ds_path
    return validate_spec("downsample", ds_spec, ds_path, {"in_dim": prev_dim, "out_dim": dim}, where=where), ds_path


def _stage_units(m: dict, st: dict, sp: str, depth: int, ctx: dict, where) -> Tuple[List[List[dict]], List[str]]:
    """The stage's resolved block specs, ``units[i]`` for repetition i; and the key paths of the unit's specs."""
    unit_raw, unit_path = _stage_blocks(m.get("block"), st.get("block"), sp)
    if unit_raw is None:
        where(f"{sp}.block", "missing: give the stage (or the model) a block spec")
    if not unit_raw:
        where(unit_path, "is an empty list: give at least one block spec")
    paths = [f"{unit_path}[{u}]" if len(unit_raw) > 1 else unit_path for u in range(len(unit_raw))]
    for path, spec in zip(paths, unit_raw):
        if spec is None:
            where(path, "must be a block spec (a mapping with 'type'), got null")
    units = [[validate_spec("block", spec, path, ctx, depth, i, where) for path, spec in zip(paths, unit_raw)]
             for i in range(depth)]
    return units, paths


def _stage_blocks(default, own, sp) -> Tuple[Optional[List[dict]], str]:
    """The stage's repeating unit of block specs: its own block merged over the model's default."""
    def as_list(b):
        return None if b is None else (list(b) if isinstance(b, list) else [b])

    d, o = as_list(default), as_list(own)
    if o is None:
        return d, "model.block"
    if d is None or len(d) != len(o):
        return o, f"{sp}.block"
    merged = []
    for db, ob in zip(d, o):
        if isinstance(db, dict) and isinstance(ob, dict):
            merged.append(inherit.merge(db, ob))
        else:
            merged.append(ob)
    return merged, f"{sp}.block"


def _check_stand_in(ds: Optional[dict], ds_path: str, units: List[List[dict]], paths: List[str], depth: int,
                    where) -> None:
    """A downsampler that is the first unit's first block at stride 2 (MaxViT's MBConv) must be
    that block's type, must not be the stage's only block, and must match its parameters."""
    stands_for = ds and getattr(registry.lookup("downsample", ds["type"]), "replaces_first_block", None)
    if not stands_for:
        return
    first = units[0][0]
    if first["type"] != stands_for:
        where(ds_path, f"downsample {ds['type']!r} stands in for the stage's first block, which must "
                       f"be a {stands_for!r} block, not {first['type']!r}")
    if depth == 1 and len(units[0]) == 1:
        where(ds_path, f"downsample {ds['type']!r} replaces the stage's only block")
    ds_full, first_full = with_defaults("downsample", ds), with_defaults("block", first)
    for key in sorted(set(ds_full) & set(first_full) - {"type"}):
        if ds_full[key] != first_full[key]:
            where(f"{ds_path}.{key}", f"is {ds_full[key]!r} but the {stands_for!r} block it stands in "
                                      f"for has {first_full[key]!r} ({paths[0]}.{key}): they must match")


def _head(head: dict, dim: int, report: _Reporter) -> dict:
    """model.head, resolved: its pooling, norm (on ``dim`` channels) and pre-logits layer."""
    report.keys(head, HEAD_KEYS, "model.head")
    pool = head.get("pool", "avg")
    head_norm = validate_spec("norm", head.get("norm"), "model.head.norm", {"dim": dim}, where=report.where)
    problem = pool_problem(pool, head_norm is not None or bool(head.get("hidden_size")))
    if problem:
        report.where("model.head.pool", problem)
    if head_norm is not None and registry.lookup("norm", head_norm["type"]).layout != NCHW:
        report.where("model.head.norm.type", f"the head's norm acts on the pooled (B, C, 1, 1) map: give a "
                                             f"channels-first norm (layernorm2d, batchnorm2d), not "
                                             f"{head_norm['type']!r}")
    hidden = report.typed(head, "hidden_size", "model.head", (int, type(None)), None, lambda v: v is None or v >= 1,
                          "must be a positive integer or null")
    act = report.typed(head, "hidden_act", "model.head", str, "tanh")
    if "hidden_act" in head and hidden is None:
        report.where("model.head.hidden_act", "acts only on the pre-logits layer: give model.head.hidden_size too")
    try:
        get_act_layer(act)
    except KeyError:
        report.where("model.head.hidden_act", f"unknown activation {act!r} (a name timm's get_act_layer knows, "
                                              f"e.g. tanh)")
    return {"pool": pool, "norm": head_norm, "hidden_size": hidden, "hidden_act": act}


# ----------------------------------------------------------------------------------------------
# Rules that create_model's and other keyword arguments share with the config


def pool_problem(pool, head_has_norm_or_hidden: bool) -> Optional[str]:
    """What is wrong with a head pooling (``model.head.pool`` or timm's ``global_pool``), or None."""
    if pool not in POOLS:
        return f"expected one of {POOLS}, got {pool!r}"
    if pool == "catavgmax" and head_has_norm_or_hidden:
        return ("catavgmax doubles the pooled width, which a head with a norm or hidden layer does not "
                "take: use avg, max or avgmax")
    return None


def check_positive_int(name: str, value) -> None:
    """ValueError unless ``value`` is an int (not a bool) of at least 1: for keyword arguments."""
    if value_problem(value, int, lambda v: v >= 1):
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def value_problem(v, kinds, check=None, rule: str = "") -> Optional[str]:
    """What is wrong with ``v`` (not of ``kinds``, a bool where bool is not one of them, or failing
    ``check``), or None."""
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in _tuple(kinds)):
        return f"expected {'/'.join(t.__name__ for t in _tuple(kinds))}, got {v!r}"
    if check is not None and not check(v):
        return f"{rule}, got {v!r}"
    return None


def _tuple(kinds):
    return kinds if isinstance(kinds, tuple) else (kinds,)
