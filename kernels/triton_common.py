"""Pieces shared by the fused Triton attention kernels (kernels/triton_na.py,
kernels/triton_routed.py): supported dtypes and head dims, the device test, the launch
configuration and its test override, the matmul precision, the layout rule of the tensors the
kernels take and make (``io_layout``), and the device helpers: ``_dot``, ``_online_softmax`` (a
flash-attention forward step), ``_softmax_grad`` (its backward), row-tile loads and stores, and
the row offsets of the dense tensors the kernels write."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl

__all__ = ["SUPPORTED_DTYPES", "MIN_HEAD_DIM", "MAX_HEAD_DIM", "LOG2E", "interpreter_active",
           "triton_supports", "device_unsupported", "launch_config"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128
LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """tl.dot with fp32 accumulation. PRECISION "upcast" multiplies in fp32: Triton's CPU
    interpreter gets bf16 dots wrong (3.9), and bf16 products are exact in fp32 anyway."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _online_softmax(m_i, l_i, acc, s, v, PRECISION: tl.constexpr):
    """One flash-attention step over logits ``s`` (log2 domain, -inf where masked) and values
    ``v``: running max, running sum and the unnormalised output."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _softmax_grad(s, mask, lse, delta, do, v, PRECISION: tl.constexpr):
    """Probabilities from the stored log-sum-exp, and the logits' gradient p * (dO.v - delta)."""
    p = tl.where(mask, tl.exp2(s - lse[:, None]), 0.0)
    ds = p * (_dot(do, tl.trans(v), PRECISION) - delta[:, None])
    return p, ds


@triton.jit
def _load_rows(ptr, rows, ok, offs_d, d_ok):
    """A [rows, BLOCK_D] tile: row ``r`` starts at ``ptr + rows[r]``, columns ``offs_d`` (unit
    stride); zeros where a row is not ``ok`` or a column not ``d_ok``."""
    return tl.load(ptr + rows[:, None] + offs_d[None, :], mask=ok[:, None] & d_ok[None, :],
                   other=0.0)


@triton.jit
def _store_rows(ptr, rows, ok, offs_d, d_ok, value):
    """``_load_rows`` backwards: store ``value`` cast to the tensor's dtype."""
    tl.store(ptr + rows[:, None] + offs_d[None, :], value.to(ptr.dtype.element_ty),
             mask=ok[:, None] & d_ok[None, :])


@triton.jit
def _program(per_head, NUM_HEADS):
    """A program's place in the kernels' one-dimensional grid (CUDA limits a second axis to 65535
    blocks, which batch x heads may pass): its index among the ``per_head`` programs of its
    (batch, head), then ``b * NUM_HEADS + head``, the batch item, the head. The first two of
    those indices are int64, so the offsets built from them address tensors of 2**31 elements or
    more (a qkv projection of 1024 px images at batch 64); offsets within one batch item stay
    int32."""
    pid = tl.program_id(0)
    bh = pid // per_head
    return pid % per_head, bh.to(tl.int64), (bh // NUM_HEADS).to(tl.int64), bh % NUM_HEADS


@triton.jit
def _dense_base(b, head, H, W, NUM_HEADS, DIM: tl.constexpr):
    """Offset of element (b, 0, 0, head, 0) of a contiguous (B, H, W, heads, DIM) tensor (int64
    with ``b`` from ``_program``): the outputs and gradients the kernels write, and the output
    gradient they read. Rows from there: ``_dense_rows``."""
    return b * H * W * NUM_HEADS * DIM + head * DIM


@triton.jit
def _dense_rows(y, x, W, NUM_HEADS, DIM: tl.constexpr):
    """Offsets of rows (y, x) from ``_dense_base``: within one batch item."""
    return (y * W + x) * (NUM_HEADS * DIM)


@triton.jit
def _row_delta(O, DO, rows, ok, offs_d, d_ok):
    """rowsum(dO * O) in fp32 (flash-attention's ``delta``) and the dO tile."""
    do = _load_rows(DO, rows, ok, offs_d, d_ok)
    o = _load_rows(O, rows, ok, offs_d, d_ok)
    return tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), do


def io_layout(*tensors: Tensor):
    """The inputs as the kernels read them: unchanged when they share one set of strides with a
    unit last stride (q, k and v unbound from one qkv projection are such views), else made
    contiguous. The kernels take that one set of input strides; what they write is contiguous."""
    first = tensors[0].stride()
    if first[-1] == 1 and all(t.stride() == first for t in tensors[1:]):
        return tensors
    return tuple(t.contiguous() for t in tensors)


def dense_like(t: Tensor) -> Tensor:
    """What the kernels write for a tensor shaped like ``t``: contiguous, whatever t's strides
    (the custom ops' fake implementations say the same)."""
    return t.new_empty(t.shape)


def on_device(t: Tensor):
    """Launch on ``t``'s GPU: Triton launches on the current CUDA device, which need not be the
    one the tensors are on (a model on cuda:1)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def interpreter_active() -> bool:
    """True when the kernels were built by Triton's CPU interpreter (``TRITON_INTERPRET=1`` was
    set before triton and these modules were imported)."""
    return type(_dot).__name__ == "InterpretedFunction"


def device_unsupported(t: Tensor) -> Optional[str]:
    """None if the kernels can run on ``t``'s device, else why not."""
    if t.device.type != "cuda" and not (t.device.type == "cpu" and interpreter_active()):
        return (f"tensors on {t.device.type}: the Triton kernel needs CUDA tensors (or CPU "
                "tensors with TRITON_INTERPRET=1 set before triton was imported)")
    return None


def head_dim_unsupported(dim: int, what: str = "head_dim") -> Optional[str]:
    if not MIN_HEAD_DIM <= dim <= MAX_HEAD_DIM:
        return f"{what} {dim} (supported: {MIN_HEAD_DIM} to {MAX_HEAD_DIM})"
    return None


def triton_supports(query: Tensor, rpb: Optional[Tensor] = None) -> Optional[str]:
    """None if the na2d Triton path handles these tensors, else the reason it does not."""
    if query.dtype not in SUPPORTED_DTYPES:
        return f"dtype {query.dtype} (supported: float32, float16, bfloat16)"
    if rpb is not None and rpb.dtype not in SUPPORTED_DTYPES:
        return f"rpb dtype {rpb.dtype}"
    return head_dim_unsupported(query.shape[-1]) or device_unsupported(query)


# Tests set this (via ``launch_config``) to walk several block shapes through small maps.
_CONFIG_OVERRIDE: dict = {}


@contextlib.contextmanager
def launch_config(**cfg):
    """Override the launch configuration (block_m, block_n, num_warps, num_stages) inside a
    ``with`` block; block sizes are powers of two >= 16 (tl.dot's minimum)."""
    old = dict(_CONFIG_OVERRIDE)
    _CONFIG_OVERRIDE.update(cfg)
    try:
        yield
    finally:
        _CONFIG_OVERRIDE.clear()
        _CONFIG_OVERRIDE.update(old)


def compiles_for_gpu(t: Tensor) -> bool:
    """Whether launches for ``t`` compile for a GPU (CUDA tensors) rather than run in the CPU
    interpreter: the GPU's launch configuration and matmul precision rules apply. The tests that
    compile the kernels for an H100 on a machine without one (tests/triton_harness.py) set it."""
    return t.device.type == "cuda"


def _config(q: Tensor, head_dim: Optional[int] = None):
    """Block sizes and warps. On a GPU, chosen so that ptxas reports (almost) no register spills
    for sm_90 at head dims 32, 64 and 128 (benchmarks/sm90_registers.py and its results file;
    compiled, not timed: no GPU has run them yet); fp32 tiles hold twice the bytes, so smaller
    blocks."""
    head_dim = q.shape[-1] if head_dim is None else head_dim
    if not compiles_for_gpu(q):  # the interpreter: few big blocks cost less Python per element
        cfg = dict(block_m=64, block_n=64, num_warps=1, num_stages=1)
    elif q.dtype == torch.float32:
        block = 32 if head_dim <= 64 else 16
        cfg = dict(block_m=block, block_n=block, num_warps=8, num_stages=2)
    else:
        cfg = dict(block_m=64, block_n=64 if head_dim <= 64 else 32, num_warps=8, num_stages=2)
    return {**cfg, **_CONFIG_OVERRIDE}


def compiler_options(cfg: dict) -> dict:
    """A launch configuration's compiler options: warps, pipeline stages, and FMA contraction
    pinned on, as the kernels were checked with (Triton 3.9 warns that 3.10 turns its default
    off; a kernel's numerics should not change with the Triton version under it)."""
    return dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=True)


def tf32_matmuls() -> bool:
    """Whether torch lets fp32 matmuls use TF32. Read through the ``fp32_precision`` API where
    torch has it: once a program sets that API, reading the legacy ``allow_tf32`` raises."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision == "tf32"
    return matmul.allow_tf32


def _precision(q: Tensor) -> str:
    if not compiles_for_gpu(q):
        return "upcast" if q.dtype == torch.bfloat16 else "ieee"
    return "tf32" if q.dtype == torch.float32 and tf32_matmuls() else "ieee"
