"""One front for generalized neighborhood attention: validate, then pick a backend.

* ``auto`` (default): the fused Triton kernel for CUDA tensors it supports (see
  ``triton_na.triton_supports``), the plain-PyTorch reference everywhere else: CPU, the meta
  device (so ``FlopCounterMode`` on meta keeps counting the reference's matmuls), float64, head
  dims outside 16..128.
* ``reference`` / ``triton``: forced, by the environment variable ``ZOO_ATTENTION_BACKEND`` or,
  taking precedence, by the context manager ``zoo.kernels.backend("triton")``. Forcing triton
  on tensors it cannot take raises; CPU tensors are accepted only when Triton's interpreter is
  on (``TRITON_INTERPRET=1`` set before triton and zoo.kernels were imported). On the meta device
  a forced triton call runs the custom op's fake implementation (shapes only, no FLOPs counted).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

from torch import Tensor

from . import neighborhood
from .neighborhood import IntPair, _check_tensors, _pair, check_axis_args

__all__ = ["na2d", "backend", "selected_backend", "BACKENDS", "ENV_VAR"]

BACKENDS = ("auto", "reference", "triton")
ENV_VAR = "ZOO_ATTENTION_BACKEND"
_forced: list = []  # stack of names set by ``backend(...)``; a plain list so dynamo can read it

try:  # triton is a Linux-only dependency; without it everything runs the reference
    from . import triton_na
except ImportError as error:  # pragma: no cover - depends on the platform
    triton_na = None
    _TRITON_IMPORT_ERROR = str(error)


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


def _triton_unsupported(query: Tensor, rpb: Optional[Tensor],
                        additional_keys: Optional[Tensor] = None) -> Optional[str]:
    if triton_na is None:
        return f"triton is not importable ({_TRITON_IMPORT_ERROR})"
    if additional_keys is not None and additional_keys.dim() == 6:
        return "per-window extra tokens (B, nh, nw, N, heads, D) run on the reference only"
    if query.device.type == "meta":
        return None  # the custom op's fake implementation gives the shapes
    return triton_na.triton_supports(query, rpb)


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
    kernel = _pair(kernel_size, "kernel_size")
    strides = _pair(stride, "stride")
    dilations = _pair(dilation, "dilation")
    offset = _pair(window_offset, "window_offset", allow_none=True)
    _check_tensors(query, key, value, rpb, additional_keys, additional_values, kernel)
    for axis, length, k, s, d, o in zip(("height", "width"), query.shape[1:3], kernel, strides,
                                        dilations, offset):
        check_axis_args(length, k, s, d, o, axis)

    name = selected_backend()
    if name == "auto":
        use_triton = query.device.type == "cuda" and _triton_unsupported(query, rpb, additional_keys) is None
    elif name == "triton":
        reason = _triton_unsupported(query, rpb, additional_keys)
        if reason is not None:
            raise RuntimeError(f"{ENV_VAR}/backend forces 'triton' but it cannot run: {reason}")
        use_triton = True
    else:
        use_triton = False

    kw = dict(rpb=rpb, additional_keys=additional_keys, additional_values=additional_values,
              scale=scale)
    if use_triton:
        return triton_na.na2d_triton(query, key, value, kernel, strides, dilations, offset, **kw)
    return neighborhood.na2d(query, key, value, kernel, strides, dilations,
                             window_offset=window_offset, **kw)
