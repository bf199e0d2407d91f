"""Block specs: checking one ``{type: ..., ...}`` mapping against its registered class.

A spec's keys are the ``__init__`` parameters of the class its ``type`` names (blocks/registry.py),
less the ones the builder injects; their annotations give the types and ``Range`` bounds, a
``Spec`` marker a nested spec (a block's mixer), and the class's ``check`` the rules between keys.
``validate_spec`` also resolves per-block cycles (a list where one value is expected) for the
block it is asked about, and ``with_defaults`` fills in the parameters a spec leaves out.
"""
from __future__ import annotations

import inspect
import typing
from functools import lru_cache
from typing import Any, Dict, List, Optional, Tuple

from zoo.blocks import registry


class _Fail(Exception):
    def __init__(self, key: str, message: str):
        self.key, self.message = key, message


def _origin(ann):
    return typing.get_origin(ann)


def _spec_marker(ann) -> Optional[registry.Spec]:
    if _origin(ann) is typing.Annotated:
        for meta in ann.__metadata__:
            if isinstance(meta, registry.Spec):
                return meta
    return None


def _accepts_sequence(ann) -> bool:
    if ann is inspect.Parameter.empty:
        return True
    if _spec_marker(ann) is not None:
        return False
    origin = _origin(ann)
    if origin in (list, tuple, List, Tuple):
        return True
    if origin is typing.Union:
        return any(_accepts_sequence(a) for a in typing.get_args(ann))
    return ann in (list, tuple)


def _ranges(ann) -> List[registry.Range]:
    return [m for m in ann.__metadata__ if isinstance(m, registry.Range)] if _origin(ann) is typing.Annotated else []


def _matches(value, ann) -> bool:
    if ann is inspect.Parameter.empty or ann is Any:
        return True
    if _spec_marker(ann) is not None:
        return value is None or isinstance(value, dict)
    origin = _origin(ann)
    if origin is typing.Annotated:
        return _matches(value, ann.__origin__) and all(value in r for r in _ranges(ann))
    if origin is typing.Union:
        return any(_matches(value, a) for a in typing.get_args(ann))
    if origin is typing.Literal:
        return value in typing.get_args(ann)
    if origin in (tuple, Tuple):
        args = typing.get_args(ann)
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
    if origin in (list, List):
        (arg,) = typing.get_args(ann) or (Any,)
        return isinstance(value, (list, tuple)) and all(_matches(v, arg) for v in value)
    if ann is type(None):
        return value is None
    if ann is bool:
        return isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann in (dict, Dict):
        return isinstance(value, dict)
    if isinstance(ann, type):
        return isinstance(value, ann)
    return True


def _describe(ann) -> str:
    if _spec_marker(ann) is not None:
        return f"a {_spec_marker(ann).kind} spec (mapping with 'type') or null"
    origin = _origin(ann)
    if origin is typing.Annotated:
        return " ".join([_describe(ann.__origin__)] + [str(r) for r in _ranges(ann)])
    if origin is typing.Union:
        return " or ".join(_describe(a) for a in typing.get_args(ann))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(ann))
    if origin in (tuple, Tuple):
        args = typing.get_args(ann)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
    if origin in (list, List):
        return f"a list of {_describe((typing.get_args(ann) or (Any,))[0])}"
    if ann is type(None):
        return "null"
    return getattr(ann, "__name__", str(ann))


@lru_cache(maxsize=None)
def _signature(cls) -> Tuple[Dict[str, Any], Dict[str, Any], frozenset]:
    """(annotations, defaults, required) of a class's config parameters."""
    sig = inspect.signature(cls.__init__)
    hints = typing.get_type_hints(cls.__init__, include_extras=True)
    anns, defaults, required = {}, {}, set()
    for name, p in list(sig.parameters.items())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"{cls.__qualname__}: registered classes must not take *args/**kwargs")
        anns[name] = hints.get(name, inspect.Parameter.empty)
        if p.default is p.empty:
            required.add(name)
        else:
            defaults[name] = p.default
    return anns, defaults, frozenset(required)


def _pick(raw, ann, depth: int, index: int):
    """Resolve a per-block cycle: returns (value, suffix naming the cycle element or '')."""
    is_cycle = isinstance(raw, list) and (
        ann == registry.Pair or not _accepts_sequence(ann) or (raw and all(isinstance(e, list) for e in raw)))
    if not is_cycle:
        return raw, ""
    if not raw:
        raise _Fail("", "a per-block list must not be empty")
    if len(raw) > depth:
        raise _Fail("", f"per-block list of length {len(raw)} is longer than the stage depth {depth} "
                        f"(write one value per block, or a shorter pattern that repeats)")
    j = index % len(raw)
    return raw[j], f"[{j}]"


def validate_spec(kind: str, spec: Any, path: str, ctx: dict, depth: int = 1, index: int = 0,
                  where=None) -> Optional[dict]:
    """Check one spec for block ``index`` of a stage; return it with cycles resolved.

    ``where(path, message)`` raises the ConfigError (it knows which file set the key).
    """
    if spec is None:
        return None
    if not isinstance(spec, dict):
        where(path, f"must be a mapping with a 'type' key, got {type(spec).__name__} {spec!r}")
    if "type" not in spec:
        where(path, f"missing 'type' (a {kind} type; known: {registry.names(kind)})")
    if not isinstance(spec["type"], str):
        where(f"{path}.type", f"must be a string, got {spec['type']!r}")
    try:
        cls = registry.lookup(kind, spec["type"])
    except KeyError:
        where(f"{path}.type", f"unknown {kind} type {spec['type']!r}; known: {registry.names(kind)}")
    anns, defaults, required = _signature(cls)
    injected = registry.INJECTED[kind]
    allowed = [n for n in anns if n not in injected]
    resolved = {"type": spec["type"]}
    suffixes = {}
    for key, raw in spec.items():
        if key == "type":
            continue
        kpath = f"{path}.{key}"
        if key not in allowed:
            where(kpath, f"unknown key for {kind} {spec['type']!r}; valid keys: {sorted(allowed)}")
        ann = anns[key]
        try:
            value, suffix = _pick(raw, ann, depth, index)
        except _Fail as f:
            where(kpath, f.message)
        suffixes[key] = suffix
        if ann == registry.Pair and isinstance(value, dict):
            if set(value) != {"h", "w"}:
                where(kpath + suffix, f"a per-axis value is written {{h: ..., w: ...}}, got {value!r}")
            value = (value["h"], value["w"])
        marker = _spec_marker(ann)
        if marker is not None and isinstance(value, dict):
            value = validate_spec(marker.kind, value, kpath + suffix, ctx, depth, index, where)
        elif not _matches(value, ann):
            where(kpath + suffix, f"expected {_describe(ann)}, got {value!r}")
        resolved[key] = value
    missing = sorted(n for n in required if n not in injected and n not in resolved)
    if missing:
        where(path, f"missing required key(s) {missing} for {kind} {spec['type']!r}")
    check = getattr(cls, "check", None)
    if check is not None:
        params = {**defaults, **{k: v for k, v in resolved.items() if k != "type"}}
        try:
            check(params, ctx)
        except registry.SpecError as e:
            kp = f"{path}.{e.key}{suffixes.get(e.key, '')}" if e.key else path
            where(kp, e.message)
    return resolved


def with_defaults(kind: str, spec: dict) -> dict:
    """A resolved spec with the class's defaults filled in."""
    _, defaults, _ = _signature(registry.lookup(kind, spec["type"]))
    return {k: v for k, v in {**defaults, **spec}.items() if k not in registry.INJECTED[kind]}
