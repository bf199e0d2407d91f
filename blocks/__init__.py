"""Trunk modules (stems, downsamplers, blocks, token mixers, norms), each registered by name.

Importing this package imports every module in it, so a new family is a new file here plus its
YAML configs: nothing else needs an edit. Imports run one way: blocks -> kernels, never -> zoo.
"""
import importlib
import pkgutil

from . import registry
from .registry import build, lookup, register

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "registry" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["registry", "register", "lookup", "build"]
