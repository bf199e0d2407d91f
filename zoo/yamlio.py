"""The YAML that model configs, recipes and ``--set`` values are read as.

PyYAML follows YAML 1.1, where ``1e-5`` (no dot) is a string and a repeated key silently replaces
the first. In a config both are mistakes waiting to happen: ``layer_scale: 1e-5`` would be refused
as "not a float", and a second ``block:`` under a stage would drop the first without a word. This
loader reads exponent floats as YAML 1.2 does and refuses a mapping that repeats a key.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from zoo.errors import ConfigError

__all__ = ["load", "read_mapping"]

# libyaml's parser where PyYAML was built with it: `import zoo` parses every shipped config to
# register it with timm, and the pure-Python parser was most of that start-up time.
_Base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class Loader(_Base):
    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` may be overridden, by design
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: the base constructor says so
                    break
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} is written twice in one mapping (lines "
                        f"{first.start_mark.line + 1} and {key_node.start_mark.line + 1}); the second "
                        f"would silently replace the first", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


# YAML 1.2's floats on top of 1.1's: an exponent without a dot (1e-5, 2E+3) is a float.
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load(text: str) -> Any:
    """Parse YAML text (raises ``yaml.YAMLError`` with the line of a problem)."""
    return yaml.load(text, Loader=Loader)


def read_mapping(path: Path, what: str) -> dict:
    """A YAML file that must hold a mapping; raises ``ConfigError`` naming the file otherwise."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(path, "", f"cannot read {what}: {e.strerror or e}") from None
    try:
        data = load(text)
    except yaml.YAMLError as e:
        raise ConfigError(path, "", f"not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(path, "", f"a {what} must be a mapping at top level, got {type(data).__name__}")
    return data
