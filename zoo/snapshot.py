"""Training checkpoints ("snapshots"): one directory per save, written atomically.

A snapshot directory holds
  model.safetensors       the model weights (model_ema.safetensors beside it when EMA is on)
  model.yaml              the resolved model config, so the weights rebuild without the recipe
  meta.json               format tag, model, epoch, update, metrics, data config, class names
  train_state.pt          optimizer, scheduler, grad scaler, RNG states, loop position

Each file is written to a temporary name, fsynced and renamed; the whole directory is built as
``.tmp-*`` and renamed into place; only then are the ``last`` / ``best`` symlinks in the run
directory swapped (os.replace of a symlink is atomic). A crash at any point leaves the previous
``last`` pointing at a complete snapshot.
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import yaml

from zoo.checkpoint import misfit, read_state_dict
from zoo.errors import CheckpointError

FORMAT = "zoo-train-snapshot"
VERSION = 1
WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "model_ema.safetensors"
STATE = "train_state.pt"
META = "meta.json"
MODEL_YAML = "model.yaml"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide checkpoints from other users
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _safetensors_bytes(sd: Dict[str, torch.Tensor], metadata: Optional[dict] = None) -> bytes:
    from safetensors.torch import save
    return save({k: v.detach().to("cpu").contiguous() for k, v in sd.items()}, metadata=metadata)


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def model_yaml(cfg_raw: dict, overrides: dict) -> str:
    """The merged model config as a standalone YAML (no ``base``), with the run's overrides."""
    raw = json.loads(json.dumps(cfg_raw, default=list))
    raw.pop("base", None)
    for k, v in overrides.items():
        if v is not None:
            raw.setdefault("model", {})[k] = v
    return yaml.safe_dump(raw, sort_keys=False)


def save(run_dir: Path, tag: str, *, model_state: dict, meta: dict, model_yaml_text: Optional[str] = None,
         ema_state: Optional[dict] = None, train_state: Optional[dict] = None, link: tuple = ("last",),
         keep_last: int = 1) -> Path:
    """Write snapshot ``run_dir/checkpoints/<tag>`` and point the ``link`` symlinks at it."""
    run_dir = Path(run_dir)
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    final = ckpts / tag
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{tag}-", dir=str(ckpts)))
    os.chmod(tmp, 0o755)
    try:
        meta = {"format": FORMAT, "version": VERSION, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **meta,
                "files": [WEIGHTS] + ([EMA_WEIGHTS] if ema_state is not None else [])
                + ([STATE] if train_state is not None else [])}
        st_meta = {"format": FORMAT, "architecture": str(meta.get("architecture", ""))}
        atomic_write_bytes(tmp / WEIGHTS, _safetensors_bytes(model_state, st_meta))
        if ema_state is not None:
            atomic_write_bytes(tmp / EMA_WEIGHTS, _safetensors_bytes(ema_state, st_meta))
        if model_yaml_text is not None:
            atomic_write_bytes(tmp / MODEL_YAML, model_yaml_text.encode())
        if train_state is not None:
            atomic_write_bytes(tmp / STATE, _torch_bytes({"format": FORMAT, "version": VERSION, **train_state}))
        atomic_write_bytes(tmp / META, json.dumps(meta, indent=2, default=str).encode())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpts)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for name in link:
        _point(run_dir / name, Path("checkpoints") / tag)
    _prune(run_dir, keep_last, tag)
    return final


def _point(link: Path, target: Path) -> None:
    tmp = link.parent / f".{link.name}.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    _fsync_dir(link.parent)


def _prune(run_dir: Path, keep_last: int, current: str) -> None:
    """Remove snapshots that no link points to, keeping the ``keep_last`` newest and those after
    ``current`` (a continuation that a run resumed from an older snapshot has not passed yet)."""
    ckpts = run_dir / "checkpoints"
    pinned = set()
    for name in ("last", "best"):
        p = run_dir / name
        if p.is_symlink():
            pinned.add((run_dir / os.readlink(p)).resolve())
    snaps = sorted((p for p in ckpts.iterdir() if p.is_dir() and not p.name.startswith(".")),
                   key=lambda p: p.stat().st_mtime)
    keep = set(s.resolve() for s in snaps[-keep_last:] + [s for s in snaps if s.name > current]) | pinned
    for s in snaps:
        if s.resolve() not in keep:
            shutil.rmtree(s, ignore_errors=True)
    for s in ckpts.iterdir():  # leftovers of an interrupted save
        if s.name.startswith(".tmp-"):
            shutil.rmtree(s, ignore_errors=True)


def has_checkpoints(run_dir: Path) -> bool:
    """Whether a run directory holds snapshots (a new run there would prune them)."""
    ckpts = Path(run_dir) / "checkpoints"
    return ckpts.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in ckpts.iterdir())


def newest(run_dir: Path) -> Optional[Path]:
    """The run's complete snapshot with the most updates, or None."""
    ckpts = Path(run_dir) / "checkpoints"
    done = sorted(p for p in ckpts.glob("update-*") if (p / META).is_file()) if ckpts.is_dir() else []
    return done[-1].resolve() if done else None


def in_run(snap: Path, run_dir: Path) -> bool:
    """Whether snapshot ``snap`` is one of ``run_dir``'s (rather than another run's)."""
    return Path(snap).resolve().parent == (Path(run_dir) / "checkpoints").resolve()


def tag(num_updates: int) -> str:
    """The name of the snapshot written after ``num_updates`` updates (sorts by update)."""
    return f"update-{num_updates:08d}"


def best_up_to(run_dir: Path, snap: Path, update: Optional[int]) -> Optional[str]:
    """The run's best snapshot as of ``snap``: the one written after ``update`` updates (older
    checkpoints do not record it: where the ``best`` link points), if it is a complete snapshot
    of ``run_dir`` no newer than ``snap``; else None."""
    link = Path(run_dir) / "best"
    if update is not None:
        name = tag(update)
    elif link.exists() and in_run(link, run_dir):
        name = link.resolve().name
    else:
        return None
    return name if name <= Path(snap).name and (Path(run_dir) / "checkpoints" / name / META).is_file() else None


def continue_from(run_dir: Path, snap: Path, best_tag: Optional[str]) -> List[str]:
    """Make ``run_dir``'s links describe a run resumed from ``snap``, one of its snapshots: ``last``
    points at it, ``best`` at ``best_tag`` (see ``best_up_to``) or nowhere. Returns the snapshots
    newer than ``snap``: a continuation the resumed run replaces (``save`` keeps them until the
    run has passed them)."""
    run_dir, snap = Path(run_dir), Path(snap).resolve()
    if not in_run(snap, run_dir):
        return []
    _point(run_dir / "last", Path("checkpoints") / snap.name)
    if best_tag is not None:
        _point(run_dir / "best", Path("checkpoints") / best_tag)
    elif (run_dir / "best").is_symlink():
        (run_dir / "best").unlink()
    return sorted(p.name for p in snap.parent.glob("update-*") if p.name > snap.name)


def resolve(path) -> Path:
    """A snapshot directory from itself, a run directory (its ``last``), or a weights file's folder."""
    p = Path(path)
    if p.is_file():
        p = p.parent
    if not p.exists():
        raise CheckpointError(f"{p}: checkpoint does not exist")
    if (p / META).is_file() or (p / WEIGHTS).is_file():
        return p.resolve()
    if (p / "last").exists():
        return (p / "last").resolve()
    if (p / "last").is_symlink():  # dangling
        found = sorted(c.name for c in (p / "checkpoints").glob("update-*")) if (p / "checkpoints").is_dir() else []
        raise CheckpointError(f"{p}/last points to {os.readlink(p / 'last')}, which is missing; the checkpoints "
                              f"there: {found or 'none'} (pass one of them, {p}/checkpoints/<name>)")
    found = newest(p)
    if found is not None:
        return found  # a run killed between writing its first checkpoint and linking it
    raise CheckpointError(f"{p}: not a zoo checkpoint (no {META} or {WEIGHTS}; expected a run directory "
                          f"or one of its checkpoints/ folders)")


def read_meta(snap: Path) -> dict:
    f = Path(snap) / META
    if not f.is_file():
        raise CheckpointError(f"{f}: missing; {snap} is not a zoo training checkpoint")
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: unreadable or truncated metadata: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{f}: not a zoo training checkpoint (format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                              f"expected {FORMAT!r})")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{f}: written by a newer zoo (snapshot version {meta['version']} > {VERSION})")
    return meta


def read_weights(snap: Path, ema: bool = False) -> Dict[str, torch.Tensor]:
    return read_state_dict(Path(snap) / (EMA_WEIGHTS if ema else WEIGHTS))


def read_train_state(snap: Path) -> dict:
    f = Path(snap) / STATE
    if not f.is_file():
        raise CheckpointError(f"{f}: missing; this checkpoint has weights only and cannot resume training")
    try:
        state = torch.load(str(f), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle errors, refused globals
        raise CheckpointError(f"{f}: unreadable or truncated training state: {e}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{f}: not a zoo training state")
    return state


def load_into(model: torch.nn.Module, sd: Dict[str, torch.Tensor], source) -> None:
    """Strict load with an error that lists what does not fit."""
    problem = misfit(sd, model.state_dict())
    if problem:
        raise CheckpointError(f"{source}: weights do not fit this model: {problem}")
    model.load_state_dict(sd)
