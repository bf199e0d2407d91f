"""Fused routed (region-to-region) attention in Triton: forward, backward, autograd, custom op.

Same contract as the reference ``kernels/routed.py`` (read its docstring): regions of
``rh x rw`` tokens on a row-major grid, every query region attends over the tokens of its
``topk`` routed key regions, gather-then-attend semantics (a region listed twice counts twice).
No gathered copy of the keys or values is ever made: the kernels read each key/value row straight
from the ``(B, H, W, heads, D)`` tensors at the address the region index gives, with the formulas
of ``routed._to_regions`` (``_region_token`` below).

Forward: one program per (block of up to ``BLOCK_M`` queries of one query region, batch x head).
The keys of a query region are the ``topk * T`` tokens (``T = rh * rw``) of its routed regions,
walked flattened ``BLOCK_N`` at a time (key ``n`` is token ``n % T`` of routed region
``n // T``), so small regions still fill whole key tiles. Online softmax (log2 domain, fp32
statistics); the output and the log-sum-exp of each query are stored.

Backward (flash-attention-2 style):
* dQ: over query blocks, the forward's kernel (``_routed_query_kernel``) in its backward mode,
  so the walk over the routed keys is written once; it first stores each query's
  ``delta = rowsum(dO * O)`` (fp32) for the dK/dV kernel.
* dK/dV: over blocks of ``BLOCK_N`` keys of one key region, with a **reverse index** rather than
  atomics. The routing is inverted in PyTorch (a stable ``argsort`` of the ``B * R * topk``
  indices plus a ``bincount``: a CSR list, per key region, of the query regions that route to
  it, a region listed twice appearing twice). A key program then walks the queries of its
  list flattened (query ``m`` is token ``m % T`` of listed query region ``m // T``), ``BLOCK_M``
  at a time, and accumulates dK and dV in registers, writing each once.
  Why not atomics: the dQ pass could add ``dS^T Q`` and ``P^T dO`` of every key tile into fp32
  buffers with ``tl.atomic_add``, saving the index inversion, but (a) the gradients would be
  non-deterministic (float additions in arrival order), (b) it needs two fp32 (B, H, W, heads, D)
  scratch buffers and a cast, and (c) routing is skewed in practice (many query regions pick
  the same salient key regions), which serialises atomics on exactly those addresses. The
  inversion costs one small sort of ``B * R * topk`` integers. The price is load imbalance: a
  key program's loop is as long as its region's in-degree (at most ``R * topk`` listed regions).
q and k are read through one set of strides, v through its own (``triton_common.io_layout``):
views unbound from one qkv projection go in with no copy. What the kernels write, and the output
gradient they read, is contiguous.
Out-of-range region indices (the reference raises) are masked out on this path: such slots
contribute no keys, and no memory outside the tensors is read.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import triton
import triton.language as tl

from .triton_common import (LOG2E, SUPPORTED_DTYPES, _config, _dense_base, _dense_rows, _dot,
                            _load_rows, _program, on_device,
                            _online_softmax, _precision, _row_delta, _softmax_grad, _store_rows,
                            compiler_options, dense_like, device_unsupported, head_dim_unsupported,
                            interpreter_active, io_layout, launch_config)

__all__ = ["routed_attention_triton", "triton_supports", "interpreter_active", "launch_config",
           "reverse_index"]


# ---------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _region_token(region, t, GW, RH: tl.constexpr, RW: tl.constexpr):
    """(row, col) on the map of token ``t`` (row-major inside) of region ``region`` (row-major on
    a grid ``GW`` regions wide): ``routed._to_regions`` read backwards."""
    return (region // GW) * RH + t // RW, (region % GW) * RW + t % RW


# ---------------------------------------------------------------------------------------------
# Over query blocks: the forward, and the backward's dQ (with delta = rowsum(dO * O)). Both walk
# the same routed keys, so they are one kernel with two modes.


@triton.jit
def _routed_query_kernel(
    Q, K, V, IDX, O, LSE, DO, DELTA, DQ,
    s_b, s_y, s_x, s_h,  # strides of q and k (head_dim stride 1)
    sv_b, sv_y, sv_x, sv_h,  # strides of v; o, do and dq are contiguous
    H, W, NUM_HEADS, R, GW, TOPK, q_blocks, qk_scale, sm_scale,
    RH: tl.constexpr, RW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr, BACKWARD: tl.constexpr,
):
    """BACKWARD false: the forward, an online softmax that writes O and the log-sum-exp (DO, DELTA
    and DQ unused). True: dQ from the forward's log-sum-exp, after storing each query's delta
    for the dK/dV kernel. Only the chosen mode is compiled."""
    T: tl.constexpr = RH * RW
    local, bh_id, b, head = _program(R * q_blocks, NUM_HEADS)
    r = local // q_blocks

    offs_m = (local % q_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < V_DIM
    q_ok = offs_m < T
    qy, qx = _region_token(r, tl.minimum(offs_m, T - 1), GW, RH, RW)
    q = _load_rows(Q + (b * s_b + head * s_h), qy * s_y + qx * s_x, q_ok, offs_d, d_ok)
    o_at = _dense_base(b, head, H, W, NUM_HEADS, V_DIM)  # o, do
    o_rows = _dense_rows(qy, qx, W, NUM_HEADS, V_DIM)
    row_at = bh_id * H * W  # of LSE and DELTA, (B, heads, H, W)
    row = qy * W + qx
    if BACKWARD:
        delta, do = _row_delta(O + o_at, DO + o_at, o_rows, q_ok, offs_dv, dv_ok)
        lse = tl.load(LSE + row_at + row, mask=q_ok, other=0.0)
        tl.store(DELTA + row_at + row, delta, mask=q_ok)  # for the dK/dV kernel, launched after this one
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    idx_row = IDX + (b * R + r) * TOPK
    kv_b = b * s_b + head * s_h
    v_b = b * sv_b + head * sv_h
    n_keys = TOPK * T
    for start in range(0, n_keys, BLOCK_N):
        n = start + offs_n
        k_ok = n < n_keys
        region = tl.load(idx_row + n // T, mask=k_ok, other=0)
        k_ok = k_ok & (region >= 0) & (region < R)
        ky, kx = _region_token(tl.where(k_ok, region, 0), n % T, GW, RH, RW)
        k = _load_rows(K + kv_b, ky * s_y + kx * s_x, k_ok, offs_d, d_ok)
        v = _load_rows(V + v_b, ky * sv_y + kx * sv_x, k_ok, offs_dv, dv_ok)
        s = _dot(q, tl.trans(k), PRECISION) * qk_scale
        if BACKWARD:
            p, ds = _softmax_grad(s, k_ok[None, :] & q_ok[:, None], lse, delta, do, v, PRECISION)
            dq += _dot(ds.to(k.dtype), k, PRECISION)
        else:
            s = tl.where(k_ok[None, :], s, float("-inf"))
            m_i, l_i, acc = _online_softmax(m_i, l_i, acc, s, v, PRECISION)

    if BACKWARD:
        _store_rows(DQ + _dense_base(b, head, H, W, NUM_HEADS, HEAD_DIM),
                    _dense_rows(qy, qx, W, NUM_HEADS, HEAD_DIM), q_ok, offs_d, d_ok, dq * sm_scale)
    else:
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        _store_rows(O + o_at, o_rows, q_ok, offs_dv, dv_ok, acc / l_safe[:, None])
        tl.store(LSE + row_at + row, m_i + tl.log2(l_safe), mask=q_ok)


# ---------------------------------------------------------------------------------------------
# Backward: dK/dV over key blocks, through the reverse index


@triton.jit
def _routed_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, OFFSETS, SOURCES, DK, DV,
    s_b, s_y, s_x, s_h, sv_b, sv_y, sv_x, sv_h,
    H, W, NUM_HEADS, R, GW, k_blocks, qk_scale, sm_scale,
    RH: tl.constexpr, RW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    T: tl.constexpr = RH * RW
    local, bh_id, b, head = _program(R * k_blocks, NUM_HEADS)
    c = local // k_blocks  # the key region of this program

    offs_n = (local % k_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < V_DIM
    k_ok = offs_n < T
    ky, kx = _region_token(c, tl.minimum(offs_n, T - 1), GW, RH, RW)
    k = _load_rows(K + (b * s_b + head * s_h), ky * s_y + kx * s_x, k_ok, offs_d, d_ok)
    v = _load_rows(V + (b * sv_b + head * sv_h), ky * sv_y + kx * sv_x, k_ok, offs_dv, dv_ok)
    dk_at = _dense_base(b, head, H, W, NUM_HEADS, HEAD_DIM)  # dk
    dv_at = _dense_base(b, head, H, W, NUM_HEADS, V_DIM)  # do, dv
    row_at = bh_id * H * W  # lse, delta

    # the query regions routed to key region c: SOURCES[lo:hi] (buckets of R + 1 per batch item,
    # the last one collecting out-of-range indices)
    bucket = b * (R + 1) + c
    lo = tl.load(OFFSETS + bucket)
    hi = tl.load(OFFSETS + bucket + 1)
    n_queries = (hi - lo) * T
    q_b = b * s_b + head * s_h

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start in range(0, n_queries, BLOCK_M):
        m = start + offs_m
        q_ok = m < n_queries
        region = tl.load(SOURCES + lo + m // T, mask=q_ok, other=0)
        qy, qx = _region_token(region, m % T, GW, RH, RW)
        q = _load_rows(Q + q_b, qy * s_y + qx * s_x, q_ok, offs_d, d_ok)
        do = _load_rows(DO + dv_at, _dense_rows(qy, qx, W, NUM_HEADS, V_DIM), q_ok, offs_dv, dv_ok)
        row = qy * W + qx
        lse = tl.load(LSE + row_at + row, mask=q_ok, other=0.0)
        delta = tl.load(DELTA + row_at + row, mask=q_ok, other=0.0)
        s = _dot(q, tl.trans(k), PRECISION) * qk_scale
        p, ds = _softmax_grad(s, q_ok[:, None] & k_ok[None, :], lse, delta, do, v, PRECISION)
        dv += _dot(tl.trans(p.to(do.dtype)), do, PRECISION)
        dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION)

    _store_rows(DK + dk_at, _dense_rows(ky, kx, W, NUM_HEADS, HEAD_DIM), k_ok, offs_d, d_ok,
                dk * sm_scale)
    _store_rows(DV + dv_at, _dense_rows(ky, kx, W, NUM_HEADS, V_DIM), k_ok, offs_dv, dv_ok, dv)


# ---------------------------------------------------------------------------------------------
# Host side


def triton_supports(query: Tensor, value: Tensor) -> Optional[str]:
    """None if the routed Triton path handles these tensors, else the reason it does not."""
    if query.dtype not in SUPPORTED_DTYPES:
        return f"dtype {query.dtype} (supported: float32, float16, bfloat16)"
    return (head_dim_unsupported(query.shape[-1]) or
            head_dim_unsupported(value.shape[-1], "value_dim") or device_unsupported(query))


def reverse_index(region_index: Tensor) -> Tuple[Tensor, Tensor]:
    """Invert the routing: ``(offsets, sources)``, int32. For batch item ``b`` and key region
    ``c``, ``sources[offsets[g]:offsets[g + 1]]`` with ``g = b * (R + 1) + c`` are the query
    regions (local numbers) that list ``c``, once per listing, in increasing order; bucket
    ``c = R`` collects out-of-range indices (never read)."""
    B, R, topk = region_index.shape
    idx = region_index.long()
    idx = torch.where((idx >= 0) & (idx < R), idx, R)
    bucket = (idx + torch.arange(B, device=idx.device)[:, None, None] * (R + 1)).flatten()
    order = torch.argsort(bucket, stable=True)
    sources = ((order // topk) % R).to(torch.int32)
    # not bincount: on CUDA it reads the largest index back to the host (a sync per backward)
    counts = torch.zeros(B * (R + 1), dtype=torch.long, device=idx.device).scatter_add_(
        0, bucket, torch.ones_like(bucket))
    offsets = torch.zeros(B * (R + 1) + 1, dtype=torch.int64, device=idx.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets.to(torch.int32), sources


class _Launch:
    """Per-call constants shared by the launches."""

    def __init__(self, q: Tensor, v: Tensor, region_index: Tensor, region_size):
        self.B, self.H, self.W, self.heads, self.head_dim = q.shape
        self.v_dim = v.shape[-1]
        self.rh, self.rw = region_size
        self.T = self.rh * self.rw
        self.R, self.topk = region_index.shape[1], region_index.shape[2]
        self.gw = self.W // self.rw
        self.cfg = _config(q, max(self.head_dim, self.v_dim))
        self.precision = _precision(q)
        # a block never spans two regions on the side a program owns: at most a region's tokens
        self.block_own = lambda block: min(block, max(16, triton.next_power_of_2(self.T)))

    def strides(self, q: Tensor, v: Tensor):
        return (q.stride(0), q.stride(1), q.stride(2), q.stride(3),
                v.stride(0), v.stride(1), v.stride(2), v.stride(3))

    def constexprs(self):
        return dict(RH=self.rh, RW=self.rw, HEAD_DIM=self.head_dim,
                    BLOCK_D=max(16, triton.next_power_of_2(self.head_dim)), V_DIM=self.v_dim,
                    BLOCK_DV=max(16, triton.next_power_of_2(self.v_dim)),
                    PRECISION=self.precision, **compiler_options(self.cfg))


def _query_pass(L: _Launch, q, k, v, region_index, out, lse, scale, grad_out=None, delta=None,
                dq=None) -> None:
    """Launch ``_routed_query_kernel`` over the query blocks: the forward without ``grad_out``
    (writes ``out`` and ``lse``), else the dQ pass (writes ``delta`` and ``dq``)."""
    block_m = L.block_own(L.cfg["block_m"])
    q_blocks = triton.cdiv(L.T, block_m)
    # q stands for the absent tensors: never read (BACKWARD is off)
    absent = [t if t is not None else q for t in (grad_out, delta, dq)]
    _routed_query_kernel[(L.R * q_blocks * L.B * L.heads,)](
        q, k, v, region_index, out, lse, *absent, *L.strides(q, v),
        L.H, L.W, L.heads, L.R, L.gw, L.topk, q_blocks, scale * LOG2E, scale,
        BLOCK_M=block_m, BLOCK_N=L.cfg["block_n"], BACKWARD=grad_out is not None,
        **L.constexprs(),
    )


def _as_read(q, k, v, region_index):
    """The layout the kernels read: q and k share strides, v has its own, int32 indices. The ops
    enforce it themselves: torch.compile may hand a custom op other strides than eager did."""
    q, k = io_layout(q, k)
    v, = io_layout(v)
    return q, k, v, region_index.to(torch.int32).contiguous()


def _forward(q, k, v, region_index, region_size, scale):
    q, k, v, region_index = _as_read(q, k, v, region_index)
    L = _Launch(q, v, region_index, region_size)
    out = q.new_empty(*q.shape[:4], L.v_dim)  # contiguous
    lse = torch.empty(L.B, L.heads, L.H, L.W, device=q.device, dtype=torch.float32)
    _query_pass(L, q, k, v, region_index, out, lse, scale)
    return out, lse


def _backward(grad_out, q, k, v, out, lse, region_index, region_size, scale):
    q, k, v, region_index = _as_read(q, k, v, region_index)
    L = _Launch(q, v, region_index, region_size)
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    delta = torch.empty_like(lse)  # rowsum(dO * O), written by the dQ pass
    dq, dk, dv = dense_like(q), dense_like(k), dense_like(v)
    _query_pass(L, q, k, v, region_index, out, lse, scale, grad_out, delta, dq)

    offsets, sources = reverse_index(region_index)
    block_n = L.block_own(L.cfg["block_n"])
    k_blocks = triton.cdiv(L.T, block_n)
    _routed_bwd_dkdv_kernel[(L.R * k_blocks * L.B * L.heads,)](
        q, k, v, grad_out, lse, delta, offsets, sources, dk, dv, *L.strides(q, v),
        L.H, L.W, L.heads, L.R, L.gw, k_blocks, scale * LOG2E, scale,
        BLOCK_M=L.cfg["block_m"], BLOCK_N=block_n, **L.constexprs(),
    )
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile) and autograd


@torch.library.custom_op("zoo::routed_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def _routed_fwd_op(q: Tensor, k: Tensor, v: Tensor, region_index: Tensor,
                   region_size: List[int], scale: float) -> Tuple[Tensor, Tensor]:
    with on_device(q):
        return _forward(q, k, v, region_index, tuple(region_size), scale)


@_routed_fwd_op.register_fake
def _(q, k, v, region_index, region_size, scale):
    B, H, W, heads, _ = q.shape
    return (q.new_empty(B, H, W, heads, v.shape[-1]),
            q.new_empty(B, heads, H, W, dtype=torch.float32))


@torch.library.custom_op("zoo::routed_bwd", mutates_args=(), device_types=("cuda", "cpu"))
def _routed_bwd_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   region_index: Tensor, region_size: List[int], scale: float
                   ) -> Tuple[Tensor, Tensor, Tensor]:
    with on_device(q):
        return _backward(grad_out, q, k, v, out, lse, region_index, tuple(region_size), scale)


@_routed_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, region_index, region_size, scale):
    return dense_like(q), dense_like(k), dense_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, region_index, region_size, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, region_index)
    ctx.args = (region_size, scale)


def _backward_rule(ctx, grad_out, grad_lse):
    q, k, v, out, lse, region_index = ctx.saved_tensors
    dq, dk, dv = _routed_bwd_op(grad_out, q, k, v, out, lse, region_index, *ctx.args)
    return dq, dk, dv, None, None, None


_routed_fwd_op.register_autograd(_backward_rule, setup_context=_setup_context)


def routed_attention_triton(query: Tensor, key: Tensor, value: Tensor, region_index: Tensor,
                            region_size: Sequence[int], scale: Optional[float] = None) -> Tensor:
    """The Triton path of ``zoo.kernels.routed_attention``; arguments already validated,
    ``region_size`` a pair."""
    if scale is None:
        scale = query.shape[-1] ** -0.5
    out, _ = _routed_fwd_op(*_as_read(query, key, value, region_index), list(region_size), float(scale))
    return out
