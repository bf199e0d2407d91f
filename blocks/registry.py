"""Name -> class registries that YAML `type:` keys resolve through.

Each kind of trunk module has its own namespace, so a downsampler and a mixer may share a name.
The parameters a YAML spec may set are read from the class's ``__init__`` signature: its type
annotations drive validation, and the names in ``INJECTED`` are supplied by the builder (never by
YAML). A class may add a ``check(cls, params, ctx)`` classmethod for rules that span several
parameters (dim divisible by heads, a context the block needs); it raises ``SpecError``.

``register`` checks the contract the builder relies on, so that a user's class fails where it is
registered rather than inside a model: a ``layout`` class attribute ("nhwc" or "nchw", the token
layout it reads and writes), the injected ``__init__`` parameters, for blocks a
``forward(x, ctx)`` (ctx: the stage's context state, or None), and for stems and downsamplers
their sizes: ``downscale`` (the nominal stride that feature_info reports; ``downscale_of(params)``
where a parameter sets it) and ``out_length(n, params)``, the exact length of an axis of ``n``
after the module (convolutions, padding and cropping round differently; blocks.layers has the
common rules). The config computes each stage's map size and timm's ``pool_size`` from these.
"""
from __future__ import annotations

import inspect
from typing import Annotated, Callable, Dict, Optional, Tuple, Union

from timm.layers import register_notrace_module

KINDS = ("stem", "downsample", "block", "mixer", "norm", "context", "pos")

# Parameters every class of a kind receives from the builder, not from the config file.
INJECTED = {
    "stem": {"in_chans", "out_dim"},
    "downsample": {"in_dim", "out_dim", "drop_path"},  # drop_path: only if replaces_first_block
    "block": {"dim", "drop_path"},
    "mixer": {"dim"},
    "norm": {"dim"},
    "context": {"dim"},
    "pos": {"dim"},
}

_REGISTRY: Dict[str, Dict[str, type]] = {kind: {} for kind in KINDS}

# Annotation helpers for block signatures.
Pair = Union[int, Tuple[int, int]]  # one int for both axes, or (height, width)


class Range:
    """Marker for a number confined to an interval; the config checks it before anything is built."""

    def __init__(self, low: Optional[float] = None, high: Optional[float] = None, *, open_low: bool = False,
                 open_high: bool = False):
        self.low, self.high, self.open_low, self.open_high = low, high, open_low, open_high

    def __contains__(self, v) -> bool:
        if self.low is not None and (v <= self.low if self.open_low else v < self.low):
            return False
        return self.high is None or (v < self.high if self.open_high else v <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {self.low}"
        return f"in {'(' if self.open_low else '['}{self.low}, {self.high}{')' if self.open_high else ']'}"


Prob = Annotated[float, Range(0, 1, open_high=True)]  # dropout rates, momentum
Positive = Annotated[float, Range(0, open_low=True)]  # norm eps, width ratios, layer-scale init
PositiveInt = Annotated[int, Range(1)]  # widths, counts


class Spec:
    """Marker for a parameter that holds a nested ``{type: ..., ...}`` spec of another kind."""

    def __init__(self, kind: str):
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        self.kind = kind

    def __repr__(self):
        return f"Spec({self.kind!r})"


def spec_of(kind: str):
    """Annotation for a nested spec: ``mixer: spec_of("mixer")``."""
    return Annotated[Optional[dict], Spec(kind)]


class SpecError(ValueError):
    """A rule about a spec's values; ``key`` names the offending parameter (or None)."""

    def __init__(self, key: Optional[str], message: str):
        super().__init__(message)
        self.key = key
        self.message = message


def read_context(ctx: dict, context_type: str, key: str, required: bool = True) -> Optional[dict]:
    """For a ``check``: this block or mixer reads the stage's context as a ``context_type``.

    Raises ``SpecError(key, ...)`` when the stage's context is of another type (the block would
    misread it) or, if ``required``, missing. A required read counts as the context's use: the
    config refuses a stage context that no block reads.
    """
    spec = ctx.get("context")
    if spec is not None and spec["type"] != context_type:
        raise SpecError(key, f"reads the stage's context as {context_type!r}, but the stage's context is "
                             f"{spec['type']!r}")
    if required:
        if spec is None:
            raise SpecError(key, f"needs the stage's {context_type!r} context: give the stage "
                                 f"`context: {{type: {context_type}, ...}}`")
        ctx["context_read"] = True
    return spec


def register(kind: str, name: str) -> Callable[[type], type]:
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}; kinds are {KINDS}")

    def deco(cls: type) -> type:
        _check_contract(kind, name, cls)
        table = _REGISTRY[kind]
        if name in table and table[name] is not cls:
            raise ValueError(f"{kind} {name!r} registered twice ({table[name].__qualname__}, {cls.__qualname__})")
        table[name] = cls
        cls.registered_name = name
        if kind in ("stem", "norm"):  # leaves for timm's FX feature extraction: a stem pads per input
            register_notrace_module(cls)  # size in Python, a subclass of BatchNorm checks x.dim()
        return cls

    return deco


def _check_contract(kind: str, name: str, cls: type) -> None:
    problems = []
    if getattr(cls, "layout", None) not in ("nhwc", "nchw"):
        problems.append("a class attribute `layout` (blocks.layers.NHWC or NCHW)")
    injected = set(INJECTED[kind])
    if kind == "downsample" and not getattr(cls, "replaces_first_block", None):
        injected.discard("drop_path")  # only a downsampler standing in for a block gets one
    missing = sorted(injected - set(inspect.signature(cls.__init__).parameters))
    if missing:
        problems.append(f"__init__ parameters {missing} (the builder passes them)")
    if kind == "block" and len(inspect.signature(cls.forward).parameters) < 3:
        problems.append("forward(self, x, ctx) (ctx: the stage's context state, or None)")
    if kind in ("stem", "downsample"):
        if not hasattr(cls, "downscale") and not hasattr(cls, "downscale_of"):
            problems.append("a class attribute `downscale` (its stride) or `downscale_of(params)`")
        if not callable(getattr(cls, "out_length", None)):
            problems.append("`out_length(n, params)`, an axis's length after it (e.g. blocks.layers.conv_length)")
    if problems:
        raise TypeError(f"{kind} {name!r} ({cls.__qualname__}) cannot be registered: it needs " + "; ".join(problems))


def lookup(kind: str, name: str) -> type:
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        raise KeyError(f"unknown {kind} type {name!r}; known: {sorted(_REGISTRY[kind])}") from None


def names(kind: str):
    return sorted(_REGISTRY[kind])


def build(kind: str, spec: Optional[dict], **injected):
    """Instantiate a (validated, per-block resolved) spec. ``None`` builds nothing."""
    if spec is None:
        return None
    params = dict(spec)
    cls = lookup(kind, params.pop("type"))
    return cls(**params, **injected)
