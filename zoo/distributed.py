"""Data-parallel setup from torchrun's environment: NCCL on GPUs, gloo on CPU; rank 0 writes."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from zoo.errors import ConfigError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str = "auto", local_rank: int = 0, source=("--device", "")) -> torch.device:
    """``auto``: CUDA if torch sees it, else the CPU. ``source`` (file, key path) names where the
    device was asked for, in the ConfigError when it asks for CUDA and torch sees none."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(*source, f"is {name!r} but torch sees no CUDA device")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(*source, f"is {name!r}, not a device torch knows (auto, cpu, cuda, cuda:N, ...)") from None


def setup(device: str = "auto", source=("--device", ""), timeout_min: Optional[float] = None) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else a single process.
    ``timeout_min``: how long a collective waits for the other processes (None: torch's default)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local, source)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        # NCCL for CUDA tensors and gloo beside it for the CPU ones (the per-update loss and stop
        # flags, evaluation's counts, RNG states)
        dist.init_process_group(backend="cuda:nccl,cpu:gloo" if dev.type == "cuda" else "gloo",
                                timeout=None if timeout_min is None else timedelta(minutes=timeout_min))
    return Dist(rank, world, local, dev)


def peer_failure(e: BaseException, d: Dist) -> bool:
    """Whether ``e`` says that another process died or stopped answering (a collective's error:
    gloo raises a plain RuntimeError naming itself, NCCL a DistError)."""
    if not d.enabled or not isinstance(e, RuntimeError):
        return False
    return isinstance(e, getattr(dist, "DistError", ())) or any(w in str(e) for w in ("gloo", "NCCL"))


def cleanup(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def broadcast_object(obj, d: Dist):
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
