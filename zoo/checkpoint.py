"""Reading checkpoints from disk with errors that name the file and what is wrong with it."""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Callable, Dict, Optional

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


def misfit(sd: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], ignore: Callable[[str], bool] = lambda k: False,
           fits: Optional[Callable[[str], bool]] = None) -> str:
    """What keeps state dict ``sd`` from loading where ``expected`` (a state dict of the model) would:
    missing and unexpected keys and tensors of another shape, a few of each by name ("" if it fits).
    ``ignore`` leaves keys out (a head that may differ), ``fits`` relaxes the shape rule for some."""
    fits = fits or (lambda k: tuple(sd[k].shape) == tuple(expected[k].shape))
    missing = sorted(k for k in expected if k not in sd and not ignore(k))
    unexpected = sorted(k for k in sd if k not in expected and not ignore(k))
    wrong = sorted(k for k in sd if k in expected and not ignore(k) and not fits(k))
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[:4]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:4]})")
    if wrong:
        parts.append(f"{len(wrong)} of another shape (e.g. " + ", ".join(
            f"{k}: {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:4]) + ")")
    return "; ".join(parts)
