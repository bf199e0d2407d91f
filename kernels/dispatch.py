"""The fronts of the attention ops: validate, then pick a backend. ``na2d`` (generalized
neighborhood attention) and ``routed_attention`` (BiFormer's region-to-region attention) follow
the same rules:

* ``auto`` (default): the fused Triton kernel for CUDA tensors it supports (see
  ``triton_na.triton_supports`` and ``triton_routed.triton_supports``), the plain-PyTorch
  reference everywhere else: CPU, the meta device (so ``FlopCounterMode`` on meta keeps counting
  the reference's matmuls), float64, head dims (and routed value dims) outside 16..128.
* ``reference`` / ``triton``: forced, by the environment variable ``ZOO_ATTENTION_BACKEND`` or,
  taking precedence, by the context manager ``zoo.kernels.backend("triton")``. Forcing triton
  on tensors it cannot take raises; CPU tensors are accepted only when Triton's interpreter is
  on (``TRITON_INTERPRET=1`` set before triton and zoo.kernels were imported). On the meta device
  a forced triton call runs the custom op's fake implementation (shapes only, no FLOPs counted).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Sequence, Union

from torch import Tensor

from . import neighborhood, routed
from .neighborhood import IntPair

__all__ = ["na2d", "routed_attention", "backend", "selected_backend", "BACKENDS", "ENV_VAR"]

BACKENDS = ("auto", "reference", "triton")
ENV_VAR = "ZOO_ATTENTION_BACKEND"
_forced: list = []  # stack of names set by ``backend(...)``; a plain list so dynamo can read it

try:  # triton is a Linux-only dependency; without it everything runs the reference
    from . import triton_na
except ImportError as error:  # pragma: no cover - depends on the platform
    triton_na = triton_routed = None
    _TRITON_IMPORT_ERROR = str(error)
else:
    from . import triton_routed


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force the attention backend inside a ``with`` block (nests; beats the env variable)."""
    _forced.append(_check_name(name, "backend"))
    try:
        yield
    finally:
        _forced.pop()


def selected_backend() -> str:
    """The backend asked for now: the innermost ``backend(...)``, else the env variable, else auto."""
    if _forced:
        return _forced[-1]
    return _check_name(os.environ.get(ENV_VAR, "auto") or "auto", ENV_VAR)


def _triton_unsupported(query: Tensor, rpb: Optional[Tensor]) -> Optional[str]:
    if triton_na is None:
        return f"triton is not importable ({_TRITON_IMPORT_ERROR})"
    if query.device.type == "meta":
        return None  # the custom op's fake implementation gives the shapes
    return triton_na.triton_supports(query, rpb)


def _use_triton(query: Tensor, unsupported) -> bool:
    """The backend decision: ``unsupported()`` gives None or why the Triton path cannot run."""
    name = selected_backend()
    if name == "auto":
        return query.device.type == "cuda" and unsupported() is None
    if name == "triton":
        reason = unsupported()
        if reason is not None:
            raise RuntimeError(f"{ENV_VAR}/backend forces 'triton' but it cannot run: {reason}")
        return True
    return False


def na2d(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    kernel_size: IntPair,
    stride: IntPair = 1,
    dilation: IntPair = 1,
    *,
    window_offset: Optional[IntPair] = None,
    rpb: Optional[Tensor] = None,
    additional_keys: Optional[Tensor] = None,
    additional_values: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> Tensor:
    """Generalized 2-D neighborhood attention; arguments and semantics of
    ``kernels.neighborhood.na2d`` (the reference, which defines the op)."""
    args = neighborhood.check_args(query, key, value, kernel_size, stride, dilation, window_offset,
                                   rpb, additional_keys, additional_values)
    use_triton = _use_triton(query, lambda: _triton_unsupported(query, rpb))

    kw = dict(rpb=rpb, additional_keys=additional_keys, additional_values=additional_values,
              scale=scale)
    if use_triton:
        return triton_na.na2d_triton(query, key, value, *args, **kw)
    return neighborhood.na2d_checked(query, key, value, *args, **kw)


def _routed_triton_unsupported(query: Tensor, value: Tensor) -> Optional[str]:
    if triton_routed is None:
        return f"triton is not importable ({_TRITON_IMPORT_ERROR})"
    if query.device.type == "meta":
        return None  # the custom op's fake implementation gives the shapes
    return triton_routed.triton_supports(query, value)


def routed_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    region_index: Tensor,
    region_size: Union[int, Sequence[int]],
    scale: Optional[float] = None,
) -> Tensor:
    """Routed (region-to-region) attention; arguments and semantics of
    ``kernels.routed.routed_attention`` (the reference, which defines the op)."""
    regions = routed.check_args(query, key, value, region_index, region_size)
    if _use_triton(query, lambda: _routed_triton_unsupported(query, value)):
        return triton_routed.routed_attention_triton(query, key, value, region_index, regions,
                                                     scale=scale)
    return routed.routed_attention_checked(query, key, value, region_index, regions, scale)
