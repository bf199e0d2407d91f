"""Reading checkpoints from disk with errors that name the file and what is wrong with it."""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Dict

import torch

from zoo.errors import CheckpointError

WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


def read_state_dict(path) -> Dict[str, torch.Tensor]:
    """Load a state dict from .safetensors or a torch file (.pth/.pt/.bin), unwrapped to tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            sd = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {e}") from None
        except Exception as e:  # pickle errors, refused globals
            raise CheckpointError(f"{path}: cannot be loaded safely as a state dict: {e}") from None
        sd = unwrap(obj, path)
    return sd


def unwrap(obj, source="checkpoint") -> Dict[str, torch.Tensor]:
    """Find the tensor dict inside common training wrappers ({'model': ...}, 'module.' prefixes)."""
    for _ in range(3):
        if isinstance(obj, dict) and not _is_tensor_dict(obj):
            inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not _is_tensor_dict(obj):
        raise CheckpointError(f"{source}: no state dict of tensors found (top-level type "
                              f"{type(obj).__name__}{', keys ' + str(list(obj)[:8]) if isinstance(obj, dict) else ''})")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _is_tensor_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(k, str) for k in d) and \
        sum(isinstance(v, torch.Tensor) for v in d.values()) >= max(1, len(d) // 2)
