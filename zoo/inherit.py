"""YAML files that inherit: a model config or a training recipe may say ``base: <name or path>``
and then only what differs from that base.

One loader serves both kinds. The base is looked for beside the file (``<name>.yaml``, or a path
relative to it), then among the shipped files of its kind; bases chain, and a cycle is an error
naming it. Mappings merge key by key, lists of mappings of the same length item by item, anything
else is replaced; a mapping whose ``type`` changes is replaced whole (a mixer of another family
keeps none of the old one's keys). The loader records, for every key path, the file that set it,
so a validation error names the file to edit.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

from zoo.errors import ConfigError
from zoo.yamlio import read_mapping

Provenance = Dict[str, Optional[Path]]  # key path -> the file that set it (None: a dict's own keys)


def _find_base(name: Any, referrer: Path, shipped: Dict[str, Path], kind: str) -> Path:
    """The file ``base: name`` in ``referrer`` means (never ``referrer`` itself, so my_dir/nat_tiny.yaml
    may say ``base: nat_tiny`` to extend the shipped one)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(referrer, "base", f"must be a {kind} name or path, got {name!r}")
    candidates = []
    if name.endswith((".yaml", ".yml")):
        candidates.append((referrer.parent / name).resolve())
    else:
        candidates.append(referrer.parent / f"{name}.yaml")
        if name in shipped:
            candidates.append(shipped[name])
    for c in candidates:
        if c.is_file() and c.resolve() != referrer.resolve():
            return c
    raise ConfigError(referrer, "base", f"base {kind} {name!r} does not exist (looked for "
                                        f"{', '.join(str(c) for c in candidates)})")


def merge(base: Any, over: Any, path: str = "", prov: Optional[Provenance] = None, file: Optional[Path] = None,
          null_deletes: bool = True) -> Any:
    """``over`` merged into ``base`` (see the module docstring), the key paths it sets recorded in
    ``prov`` as set by ``file``. A null in ``over`` removes the key (``null_deletes``, model configs:
    the default returns) or sets it to null (recipes, where null is a value: no clipping, no AMP)."""
    prov = {} if prov is None else prov
    if isinstance(base, dict) and isinstance(over, dict):
        if "type" in over and "type" in base and over["type"] != base["type"]:
            base = {}
        out = dict(base)
        for k, v in over.items():
            sub = f"{path}.{k}" if path else str(k)
            if v is None and null_deletes:
                out.pop(k, None)
                prov[sub] = file
            elif k in out:
                out[k] = merge(out[k], v, sub, prov, file, null_deletes)
            else:
                out[k] = _record(copy.deepcopy(v), sub, prov, file)
        return out
    if isinstance(base, list) and isinstance(over, list) and len(base) == len(over) \
            and all(isinstance(e, dict) for e in base + over):
        return [merge(b, o, f"{path}[{i}]", prov, file, null_deletes) for i, (b, o) in enumerate(zip(base, over))]
    return _record(copy.deepcopy(over), path, prov, file)


def _record(value: Any, path: str, prov: Provenance, file: Optional[Path]) -> Any:
    prov[path] = file
    if isinstance(value, dict):
        for k, v in value.items():
            _record(v, f"{path}.{k}" if path else str(k), prov, file)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _record(v, f"{path}[{i}]", prov, file)
    return value


@dataclass(frozen=True)
class Kind:
    """Files that inherit: their name in messages, the shipped ones by name, how a null merges (see
    ``merge``) and the key paths a base keeps to itself (``description``, ``reference.params``:
    they describe the base, not what extends it)."""

    name: str
    shipped: Callable[[], Dict[str, Path]]
    null_deletes: bool
    not_inherited: Tuple[str, ...] = ()
    prefix: str = ""  # a shipped file's name may carry it (zoo_swin_tiny: configs/models/swin_tiny.yaml)

    def read(self, source: Union[str, Path, dict]) -> Tuple[dict, Provenance, Optional[Path], str]:
        """A dict (whose base is found as from a file in the working directory), a file, or a shipped
        file's name: its content merged over its chain of bases, the provenance of every key path,
        the file (None for a dict) and the name (the file's stem, ``custom`` for a dict)."""
        prov: Provenance = {}
        if isinstance(source, dict):
            pseudo = Path.cwd() / "<dict>"
            raw = self._with_base(copy.deepcopy(source), pseudo, (), prov)
            prov.update({k: None for k, v in prov.items() if v == pseudo})
            return raw, prov, None, "custom"
        p = Path(source)
        if not p.suffix and not p.exists():
            shipped = self.shipped()
            found = shipped.get(str(source).removeprefix(self.prefix))
            if found is None:
                raise ConfigError(source, "", f"no such {self.name}; shipped: {sorted(shipped)}")
            p = found
        if not p.is_file():
            raise ConfigError(p, "", f"{self.name} file does not exist")
        file = p.resolve()
        return self._load(file, (), prov), prov, file, p.stem

    def _load(self, path: Path, chain: Tuple[Path, ...], prov: Provenance) -> dict:
        path = path.resolve()
        if path in chain:
            raise ConfigError(chain[-1], "base", "base cycle: " + " -> ".join(p.name for p in chain + (path,)))
        return self._with_base(read_mapping(path, self.name), path, chain, prov)

    def _with_base(self, data: dict, path: Path, chain: Tuple[Path, ...], prov: Provenance) -> dict:
        base_name = data.get("base")
        if base_name is None:
            return _record(copy.deepcopy(data), "", prov, path)
        base = self._load(_find_base(base_name, path, self.shipped(), self.name), chain + (path,), prov)
        base.pop("base", None)
        for keypath in self.not_inherited:
            *parents, last = keypath.split(".")
            holder = base
            for p in parents:
                holder = holder.get(p) if isinstance(holder, dict) else None
            if isinstance(holder, dict):
                holder.pop(last, None)
        merged = merge(base, {k: v for k, v in data.items() if k != "base"}, "", prov, path, self.null_deletes)
        merged["base"] = base_name
        return merged
