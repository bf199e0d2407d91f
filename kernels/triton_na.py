"""Fused generalized neighborhood attention in Triton: forward, backward, autograd and custom op.

Same contract as the reference ``kernels/neighborhood.py`` (read its docstring): per-axis kernel
size, stride, dilation and window offset, a relative positional bias read from its table, extra
key/value tokens, global or per window (FasterViT's carrier tokens). Nothing of size (tokens x window) is ever written: the forward is an
online softmax (flash-attention style) that stores the output and the log-sum-exp of each query;
the backward recomputes the probabilities from them.

Tiling. A program owns a 2-D patch of ``TH x TW`` queries inside one dilation group (so, in group
coordinates, a contiguous rectangle). Along each axis the window start is a non-decreasing
function of the query position for every rule, so the keys of the whole patch are the rectangle
from the first query's window start to the last query's window end. The program walks that key
rectangle flattened, ``BLOCK_N`` keys at a time, and masks each (query, key) pair with the exact
per-query window test, so border handling, strides and clipped partitions all come from the same
two formulas as the reference (``_window_start`` below mirrors ``_sliding_window_start`` and
``_partition_window_start``).

Backward (flash-attention-2 style):
* dQ over query patches: the forward's kernel (``_na_query_kernel``) in its backward mode, so
  the walk over keys and extra tokens is written once; it first stores each query's
  ``delta = rowsum(dO * O)`` (fp32) for the kernels after it, and accumulates the bias-table
  gradient with atomics into a few copies of the table (spread over programs to limit contention),
  summed afterwards;
* a dK/dV kernel over key patches: the queries that can see a key patch form again a rectangle,
  found by testing candidate queries within ``2k - 2`` of the patch (any query that sees key ``r``
  is that close to it: its window holds its stride leader, which is within ``s - 1 < k`` of it);
* a kernel for the extra tokens' dK/dV, a program per window and block of its tokens, looping
  over the window's queries (all queries for global tokens: they are one window of the map).

Extra tokens in the forward and dQ walks: the patch visits each window its queries fall in (one
for global tokens) and masks the queries of other windows.

Logits are in the log2 domain (``exp2``); the stored log-sum-exp is too.

Layout. q, k and v are read through one set of strides (``triton_common.io_layout``): views
unbound from one qkv projection go in as they are, with no copy. Everything the kernels write, and
the output gradient they read, is contiguous.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import triton
import triton.language as tl

# Generic pieces shared with the other Triton kernels, re-exported here (the names tests use).
from .triton_common import (LOG2E, SUPPORTED_DTYPES, _config,
                            _dense_base, _dense_rows, _dot, _load_rows, _online_softmax, _precision,
                            _program, _row_delta, _softmax_grad, _store_rows, compiler_options, dense_like,
                            interpreter_active, io_layout, launch_config, on_device,
                            triton_supports)

__all__ = ["na2d_triton", "triton_supports", "interpreter_active", "launch_config",
           "SUPPORTED_DTYPES"]


# ---------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _window_start(i, n, K: tl.constexpr, S: tl.constexpr, OFFSET: tl.constexpr,
                  PARTITION: tl.constexpr):
    """First key (group coordinates) of the window of query ``i`` (>= 0) in a group of ``n``."""
    if PARTITION:
        # floor((i - OFFSET) / K) with a non-negative numerator (OFFSET < K)
        start = ((i - OFFSET + K) // K - 1) * K + OFFSET
    else:
        leader = tl.minimum((i // S) * S + S // 2, n - 1)
        start = tl.minimum(tl.maximum(leader - K // 2, 0), n - K)
    return start


@triton.jit
def _key_span(t, T: tl.constexpr, n, K: tl.constexpr, S: tl.constexpr, OFFSET: tl.constexpr,
              PARTITION: tl.constexpr):
    """[lo, hi) on one axis: the keys seen by the queries of patch ``t`` (rows ``t*T .. t*T+T-1``
    of a group of ``n``); window starts are non-decreasing in the query position."""
    lo = _window_start(tl.minimum(t * T, n - 1), n, K, S, OFFSET, PARTITION)
    hi = _window_start(tl.minimum(t * T + T - 1, n - 1), n, K, S, OFFSET, PARTITION) + K
    return tl.maximum(lo, 0), tl.minimum(hi, n)


@triton.jit
def _window_id(i, K: tl.constexpr, OFFSET: tl.constexpr, FIRST: tl.constexpr,
               PER_WINDOW: tl.constexpr):
    """The non-overlapping window holding position ``i`` (numbered as ``axis_window_count`` does,
    ``FIRST = floor(-OFFSET / K)``), whose per-window extra tokens it sees; 0 for global ones."""
    if PER_WINDOW:
        wid = (i - OFFSET + K) // K - 1 - FIRST
    else:
        wid = i * 0
    return wid


@triton.jit
def _window_extent(w, n, K: tl.constexpr, OFFSET: tl.constexpr, FIRST: tl.constexpr,
                   PER_WINDOW: tl.constexpr):
    """[lo, hi) on one axis: the positions of window ``w`` (all ``n`` for global extra tokens)."""
    if PER_WINDOW:
        lo = (w + FIRST) * K + OFFSET
        hi = tl.minimum(lo + K, n)
        lo = tl.maximum(lo, 0)
    else:
        lo = w * 0
        hi = lo + n
    return lo, hi


@triton.jit
def _decode_patch(pid, tiles_h, tiles_w, H, W, DH: tl.constexpr, DW: tl.constexpr):
    """Program id -> (dilation group row, col, patch row, col, group height, width)."""
    tw = pid % tiles_w
    rest = pid // tiles_w
    th = rest % tiles_h
    rest = rest // tiles_h
    gh, gw = rest // DW, rest % DW
    return gh, gw, th, tw, (H - gh + DH - 1) // DH, (W - gw + DW - 1) // DW


@triton.jit
def _patch_tokens(th, tw, n_h, n_w, TH: tl.constexpr, TW: tl.constexpr):
    """The TH x TW tokens (group coordinates, clamped into the group) of patch (th, tw) and which
    of them exist."""
    offs = tl.arange(0, TH * TW)
    i = th * TH + offs // TW
    j = tw * TW + offs % TW
    ok = (i < n_h) & (j < n_w)
    return tl.minimum(i, n_h - 1), tl.minimum(j, n_w - 1), ok


@triton.jit
def _window_logits(q, k, qi, qj, kr, kc, sh, sw, pair_ok, RPB, head, qk_scale,
                   KH: tl.constexpr, KW: tl.constexpr, HAS_RPB: tl.constexpr,
                   PRECISION: tl.constexpr):
    """[M, N] logits (log2 domain) of queries (qi, qj) with windows starting at (sh, sw) against
    keys (kr, kc), plus the bias read from its (heads, 2KH-1, 2KW-1) table at key - query + k - 1,
    and the mask of the pairs that count: the key lies in the query's window, and ``pair_ok``."""
    rows = (kr[None, :] >= sh[:, None]) & (kr[None, :] < sh[:, None] + KH)
    cols = (kc[None, :] >= sw[:, None]) & (kc[None, :] < sw[:, None] + KW)
    mask = rows & cols & pair_ok
    s = _dot(q, tl.trans(k), PRECISION) * qk_scale
    if HAS_RPB:
        bh = kr[None, :] - qi[:, None] + KH - 1
        bw = kc[None, :] - qj[:, None] + KW - 1
        ptr = RPB + head * (2 * KH - 1) * (2 * KW - 1) + bh * (2 * KW - 1) + bw
        s += tl.load(ptr, mask=mask, other=0.0).to(tl.float32) * 1.4426950408889634
    return s, mask


@triton.jit
def _load_extra(AK, AV, base, idx, N_EXTRA, s_en, offs_d, d_ok):
    """Extra tokens ``idx`` (< N_EXTRA) of one window: keys, values, and which exist."""
    ok = idx < N_EXTRA
    return (_load_rows(AK + base, idx * s_en, ok, offs_d, d_ok),
            _load_rows(AV + base, idx * s_en, ok, offs_d, d_ok), ok)


# ---------------------------------------------------------------------------------------------
# Over query patches: the forward, and the backward's dQ (with the bias-table gradient and
# delta = rowsum(dO * O)). Both walk the same keys, so they are one kernel with two modes.


@triton.jit
def _na_query_kernel(
    Q, K, V, RPB, AK, AV, O, LSE, DO, DELTA, DQ, DRPB,
    s_b, s_y, s_x, s_h,  # strides of q, k and v (head_dim stride 1); o, do and dq are contiguous
    s_eb, s_ey, s_ex, s_en, s_eh,  # strides of the extra tokens (window row/col 0 if global)
    H, W, NUM_HEADS, N_EXTRA, tiles_h, tiles_w, qk_scale, sm_scale, rpb_copies,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr, OH: tl.constexpr, OW: tl.constexpr,
    PART_H: tl.constexpr, PART_W: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_RPB: tl.constexpr, RPB_GRAD: tl.constexpr, HAS_EXTRA: tl.constexpr,
    PER_WINDOW: tl.constexpr, FIRST_H: tl.constexpr, FIRST_W: tl.constexpr,
    PRECISION: tl.constexpr, BACKWARD: tl.constexpr,
):
    """BACKWARD false: the forward, an online softmax that writes O and the log-sum-exp (DO, DELTA,
    DQ and DRPB unused). True: dQ from the forward's log-sum-exp, after storing each query's
    delta for the dK/dV kernels; with RPB_GRAD, the bias-table gradient is added with atomics
    into copy ``pid % rpb_copies`` of the table. Only the chosen mode is compiled."""
    patch, bh_id, b, head = _program(tiles_h * tiles_w * DH * DW, NUM_HEADS)
    gh, gw, th, tw, n_h, n_w = _decode_patch(patch, tiles_h, tiles_w, H, W, DH, DW)
    qi, qj, q_ok = _patch_tokens(th, tw, n_h, n_w, TH, TW)
    sh = _window_start(qi, n_h, KH, SH, OH, PART_H)
    sw = _window_start(qj, n_w, KW, SW, OW, PART_W)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    base = b * s_b + head * s_h
    qy, qx = qi * DH + gh, qj * DW + gw
    q = _load_rows(Q + base, qy * s_y + qx * s_x, q_ok, offs_d, d_ok)
    o_at = _dense_base(b, head, H, W, NUM_HEADS, HEAD_DIM)
    o_rows = _dense_rows(qy, qx, W, NUM_HEADS, HEAD_DIM)
    row_at = bh_id * H * W  # of LSE and DELTA, (B, heads, H, W)
    row = qy * W + qx
    if BACKWARD:
        delta, do = _row_delta(O + o_at, DO + o_at, o_rows, q_ok, offs_d, d_ok)
        lse = tl.load(LSE + row_at + row, mask=q_ok, other=0.0)
        tl.store(DELTA + row_at + row, delta, mask=q_ok)  # for the dK/dV kernels, launched after this one
        drpb_base = DRPB + (patch % rpb_copies) * NUM_HEADS * (2 * KH - 1) * (2 * KW - 1)
        dq = tl.zeros([TH * TW, BLOCK_D], tl.float32)
    else:
        m_i = tl.full([TH * TW], float("-inf"), tl.float32)
        l_i = tl.zeros([TH * TW], tl.float32)
        acc = tl.zeros([TH * TW, BLOCK_D], tl.float32)

    lo_h, hi_h = _key_span(th, TH, n_h, KH, SH, OH, PART_H)
    lo_w, hi_w = _key_span(tw, TW, n_w, KW, SW, OW, PART_W)
    rect_w = tl.maximum(hi_w - lo_w, 1)
    n_keys = (hi_h - lo_h) * rect_w
    for start in range(0, n_keys, BLOCK_N):
        idx = start + offs_n
        k_ok = idx < n_keys
        kr = lo_h + idx // rect_w
        kc = lo_w + idx % rect_w
        k_off = (kr * DH + gh) * s_y + (kc * DW + gw) * s_x
        k = _load_rows(K + base, k_off, k_ok, offs_d, d_ok)
        v = _load_rows(V + base, k_off, k_ok, offs_d, d_ok)
        s, mask = _window_logits(q, k, qi, qj, kr, kc, sh, sw, q_ok[:, None] & k_ok[None, :],
                                 RPB, head, qk_scale, KH, KW, HAS_RPB, PRECISION)
        if BACKWARD:
            p, ds = _softmax_grad(s, mask, lse, delta, do, v, PRECISION)
            dq += _dot(ds.to(k.dtype), k, PRECISION)
            if RPB_GRAD:
                bh = kr[None, :] - qi[:, None] + KH - 1
                bw = kc[None, :] - qj[:, None] + KW - 1
                ptr = drpb_base + head * (2 * KH - 1) * (2 * KW - 1) + bh * (2 * KW - 1) + bw
                tl.atomic_add(ptr, ds, mask=mask, sem="relaxed")  # no ordering needed: only summed
        else:
            m_i, l_i, acc = _online_softmax(m_i, l_i, acc, tl.where(mask, s, float("-inf")), v,
                                            PRECISION)

    if HAS_EXTRA:
        # The windows the patch meets (one "window" of global tokens), each seen by its queries.
        own_y = _window_id(qi, KH, OH, FIRST_H, PER_WINDOW)
        own_x = _window_id(qj, KW, OW, FIRST_W, PER_WINDOW)
        for wy in range(tl.min(own_y, 0), tl.max(own_y, 0) + 1):
            for wx in range(tl.min(own_x, 0), tl.max(own_x, 0) + 1):
                sees = q_ok & (own_y == wy) & (own_x == wx)
                e_base = b * s_eb + wy * s_ey + wx * s_ex + head * s_eh
                for start in range(0, N_EXTRA, BLOCK_N):
                    k, v, e_ok = _load_extra(AK, AV, e_base, start + offs_n, N_EXTRA, s_en,
                                             offs_d, d_ok)
                    s = _dot(q, tl.trans(k), PRECISION) * qk_scale
                    mask = sees[:, None] & e_ok[None, :]
                    if BACKWARD:
                        p, ds = _softmax_grad(s, mask, lse, delta, do, v, PRECISION)
                        dq += _dot(ds.to(k.dtype), k, PRECISION)
                    else:
                        m_i, l_i, acc = _online_softmax(m_i, l_i, acc,
                                                        tl.where(mask, s, float("-inf")), v,
                                                        PRECISION)

    if BACKWARD:
        _store_rows(DQ + o_at, o_rows, q_ok, offs_d, d_ok, dq * sm_scale)
    else:
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        _store_rows(O + o_at, o_rows, q_ok, offs_d, d_ok, acc / l_safe[:, None])
        tl.store(LSE + row_at + row, m_i + tl.log2(l_safe), mask=q_ok)


# ---------------------------------------------------------------------------------------------
# Backward: dK/dV over key patches


@triton.jit
def _query_range(r_first, r_last, n, K: tl.constexpr, S: tl.constexpr, OFFSET: tl.constexpr,
                 PARTITION: tl.constexpr, CAND: tl.constexpr):
    """[lo, hi) of the queries (group coordinates) whose window meets keys [r_first, r_last]."""
    cand = r_first - (2 * K - 2) + tl.arange(0, CAND)
    ok = (cand >= 0) & (cand < n) & (cand <= r_last + 2 * K - 2)
    start = _window_start(tl.minimum(tl.maximum(cand, 0), n - 1), n, K, S, OFFSET, PARTITION)
    sees = ok & (start <= r_last) & (start + K > r_first)
    lo = tl.min(tl.where(sees, cand, n), 0)
    hi = tl.max(tl.where(sees, cand + 1, 0), 0)
    return lo, tl.maximum(hi, lo)


@triton.jit
def _na_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, RPB, DK, DV,
    s_b, s_y, s_x, s_h,
    H, W, NUM_HEADS, tiles_h, tiles_w, qk_scale, sm_scale,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr, OH: tl.constexpr, OW: tl.constexpr,
    PART_H: tl.constexpr, PART_W: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BLOCK_M: tl.constexpr,
    CAND_H: tl.constexpr, CAND_W: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_RPB: tl.constexpr, PRECISION: tl.constexpr,
):
    # keys of this program: a TH x TW patch of one dilation group
    patch, bh_id, b, head = _program(tiles_h * tiles_w * DH * DW, NUM_HEADS)
    gh, gw, th, tw, n_h, n_w = _decode_patch(patch, tiles_h, tiles_w, H, W, DH, DW)
    kr, kc, k_ok = _patch_tokens(th, tw, n_h, n_w, TH, TW)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    base = b * s_b + head * s_h
    o_at = _dense_base(b, head, H, W, NUM_HEADS, HEAD_DIM)  # do, dk, dv
    row_at = bh_id * H * W  # lse, delta
    ky, kx = kr * DH + gh, kc * DW + gw
    k = _load_rows(K + base, ky * s_y + kx * s_x, k_ok, offs_d, d_ok)
    v = _load_rows(V + base, ky * s_y + kx * s_x, k_ok, offs_d, d_ok)

    lo_h, hi_h = _query_range(tl.minimum(th * TH, n_h - 1), tl.minimum(th * TH + TH - 1, n_h - 1),
                              n_h, KH, SH, OH, PART_H, CAND_H)
    lo_w, hi_w = _query_range(tl.minimum(tw * TW, n_w - 1), tl.minimum(tw * TW + TW - 1, n_w - 1),
                              n_w, KW, SW, OW, PART_W, CAND_W)
    rect_w = tl.maximum(hi_w - lo_w, 1)
    n_queries = (hi_h - lo_h) * (hi_w - lo_w)

    dk = tl.zeros([TH * TW, BLOCK_D], tl.float32)
    dv = tl.zeros([TH * TW, BLOCK_D], tl.float32)
    for start in range(0, n_queries, BLOCK_M):
        idx = start + offs_m
        q_ok = idx < n_queries
        qi = lo_h + idx // rect_w
        qj = lo_w + idx % rect_w
        sh = _window_start(qi, n_h, KH, SH, OH, PART_H)
        sw = _window_start(qj, n_w, KW, SW, OW, PART_W)
        qy, qx = qi * DH + gh, qj * DW + gw
        q = _load_rows(Q + base, qy * s_y + qx * s_x, q_ok, offs_d, d_ok)
        do = _load_rows(DO + o_at, _dense_rows(qy, qx, W, NUM_HEADS, HEAD_DIM), q_ok, offs_d, d_ok)
        row = qy * W + qx
        lse = tl.load(LSE + row_at + row, mask=q_ok, other=0.0)
        delta = tl.load(DELTA + row_at + row, mask=q_ok, other=0.0)
        s, mask = _window_logits(q, k, qi, qj, kr, kc, sh, sw, q_ok[:, None] & k_ok[None, :],
                                 RPB, head, qk_scale, KH, KW, HAS_RPB, PRECISION)
        p, ds = _softmax_grad(s, mask, lse, delta, do, v, PRECISION)
        dv += _dot(tl.trans(p.to(do.dtype)), do, PRECISION)
        dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION)

    k_rows = _dense_rows(ky, kx, W, NUM_HEADS, HEAD_DIM)
    _store_rows(DK + o_at, k_rows, k_ok, offs_d, d_ok, dk * sm_scale)
    _store_rows(DV + o_at, k_rows, k_ok, offs_d, d_ok, dv)


@triton.jit
def _na_bwd_extra_kernel(
    Q, DO, LSE, DELTA, AK, AV, DAK, DAV,
    s_b, s_y, s_x, s_h, s_eb, s_ey, s_ex, s_en, s_eh,
    H, W, NUM_HEADS, N_EXTRA, windows_h, windows_w, extra_blocks, qk_scale, sm_scale,
    KH: tl.constexpr, KW: tl.constexpr, OH: tl.constexpr, OW: tl.constexpr,
    PER_WINDOW: tl.constexpr, FIRST_H: tl.constexpr, FIRST_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dK/dV of a block of one window's extra tokens, looping over the queries of that window
    (every query for global tokens, one window of the whole map)."""
    local, bh_id, b, head = _program(windows_h * windows_w * extra_blocks, NUM_HEADS)
    window = local // extra_blocks
    wy = window // windows_w
    wx = window % windows_w
    lo_h, hi_h = _window_extent(wy, H, KH, OH, FIRST_H, PER_WINDOW)
    lo_w, hi_w = _window_extent(wx, W, KW, OW, FIRST_W, PER_WINDOW)
    rect_w = hi_w - lo_w
    n_queries = (hi_h - lo_h) * rect_w

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    e_base = b * s_eb + wy * s_ey + wx * s_ex + head * s_eh
    offs_n = (local % extra_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    k, v, e_ok = _load_extra(AK, AV, e_base, offs_n, N_EXTRA, s_en, offs_d, d_ok)
    base = b * s_b + head * s_h
    o_at = _dense_base(b, head, H, W, NUM_HEADS, HEAD_DIM)  # do
    row_at = bh_id * H * W  # lse, delta

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, n_queries, BLOCK_M):
        idx = start + offs_m
        q_ok = idx < n_queries
        y = lo_h + idx // rect_w
        x = lo_w + idx % rect_w
        q = _load_rows(Q + base, y * s_y + x * s_x, q_ok, offs_d, d_ok)
        do = _load_rows(DO + o_at, _dense_rows(y, x, W, NUM_HEADS, HEAD_DIM), q_ok, offs_d, d_ok)
        lse = tl.load(LSE + row_at + y * W + x, mask=q_ok, other=0.0)
        delta = tl.load(DELTA + row_at + y * W + x, mask=q_ok, other=0.0)
        s = _dot(q, tl.trans(k), PRECISION) * qk_scale
        p, ds = _softmax_grad(s, q_ok[:, None] & e_ok[None, :], lse, delta, do, v, PRECISION)
        dv += _dot(tl.trans(p.to(do.dtype)), do, PRECISION)
        dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION)

    _store_rows(DAK + e_base, offs_n * s_en, e_ok, offs_d, d_ok, dk * sm_scale)
    _store_rows(DAV + e_base, offs_n * s_en, e_ok, offs_d, d_ok, dv)


# ---------------------------------------------------------------------------------------------
# Host side: launch configuration


def _patch_shape(block: int, walk: int, lengths, kernel, stride, offset) -> Tuple[int, int]:
    """Pick a TH x TW = ``block`` patch for the least work: first the steps (programs times the
    ``walk``-wide steps each takes over its rectangle of partner tokens, padded to a whole step),
    then, among equals, the tokens walked (programs times rectangle area: fewer masked loads).
    Counting whole steps matters where windows are small on one axis: a 1 x 2 window over an
    11 x 3 map is one 16 x 4 patch, not eleven 1 x 64 patches of three tokens each."""
    best = None
    th = 1
    while th <= block:
        tw = block // th
        programs, area = 1, 1
        for n, t, k, s, o in zip(lengths, (th, tw), kernel, stride, offset):
            programs *= -(-n // t)
            if o is None:
                area *= min(t + k - 1, n)
            else:
                area *= min((-(-t // k) + 1) * k, n)
        work = (programs * -(-area // walk), programs * area)
        if best is None or work < best[0]:
            best = (work, th, tw)
        th *= 2
    return best[1], best[2]


class _Geometry:
    """Per-call constants shared by the launches."""

    def __init__(self, q: Tensor, kernel_size, stride, dilation, offset):
        _, self.H, self.W, self.heads, self.head_dim = q.shape
        self.kernel, self.stride, self.dilation = kernel_size, stride, dilation
        self.offset = tuple(None if o is None or o < 0 else o for o in offset)
        self.cfg = _config(q)
        # lengths of the largest dilation group on each axis
        self.group_len = (-(-self.H // dilation[0]), -(-self.W // dilation[1]))

    def patches(self, block: int, walk: int):
        th, tw = _patch_shape(block, walk, self.group_len, self.kernel, self.stride, self.offset)
        tiles = (-(-self.group_len[0] // th), -(-self.group_len[1] // tw))
        grid0 = self.dilation[0] * self.dilation[1] * tiles[0] * tiles[1]
        return th, tw, tiles, grid0

    def constexprs(self):
        (kh, kw), (sh, sw), (dh, dw), (oh, ow) = (self.kernel, self.stride, self.dilation,
                                                  self.offset)
        return dict(KH=kh, KW=kw, SH=sh, SW=sw, DH=dh, DW=dw, OH=oh or 0, OW=ow or 0,
                    PART_H=oh is not None, PART_W=ow is not None,
                    HEAD_DIM=self.head_dim, BLOCK_D=max(16, triton.next_power_of_2(self.head_dim)))


def _extra_layout(ak: Optional[Tensor], geo: "_Geometry"):
    """How the kernels address the extra tokens: strides (batch, window row, window col, token,
    head), token count, windows (rows, cols), constexprs. Global tokens (B, N, heads, D) are one
    window; per-window ones (B, nh, nw, N, heads, D) are numbered as ``axis_window_count`` does."""
    if ak is None:
        return (0,) * 5, 0, (1, 1), dict(PER_WINDOW=False, FIRST_H=0, FIRST_W=0)
    if ak.dim() == 4:
        strides = (ak.stride(0), 0, 0, ak.stride(1), ak.stride(2))
        return strides, ak.shape[1], (1, 1), dict(PER_WINDOW=False, FIRST_H=0, FIRST_W=0)
    first = [(-(o or 0)) // k for o, k in zip(geo.offset, geo.kernel)]
    return (tuple(ak.stride())[:5], ak.shape[3], tuple(ak.shape[1:3]),
            dict(PER_WINDOW=True, FIRST_H=first[0], FIRST_W=first[1]))


def _query_pass(geo: "_Geometry", q, k, v, rpb, ak, av, out, lse, scale, grad_out=None,
                delta=None, dq=None, rpb_grad: bool = False) -> Optional[Tensor]:
    """Launch ``_na_query_kernel`` over the query patches: the forward without ``grad_out``
    (writes ``out`` and ``lse``), else the dQ pass (writes ``delta`` and ``dq``). Returns the
    copies of the bias-table gradient it accumulated with ``rpb_grad``, else None."""
    th, tw, tiles, grid0 = geo.patches(geo.cfg["block_m"], geo.cfg["block_n"])
    e_strides, n_extra, _, e_cx = _extra_layout(ak, geo)
    drpb, copies = None, 1
    if rpb_grad:  # copies of the table spread the atomics of different programs over addresses
        copies = max(1, min(32, grid0))
        table = (2 * geo.kernel[0] - 1) * (2 * geo.kernel[1] - 1)
        drpb = torch.zeros(copies, geo.heads, table, device=q.device, dtype=torch.float32)
    # q stands for the absent tensors: never read (their constexpr flags are off)
    absent = [t if t is not None else q for t in (rpb, ak, av, grad_out, delta, dq, drpb)]
    _na_query_kernel[(grid0 * q.shape[0] * geo.heads,)](
        q, k, v, *absent[:3], out, lse, *absent[3:],
        q.stride(0), q.stride(1), q.stride(2), q.stride(3), *e_strides,
        geo.H, geo.W, geo.heads, n_extra, tiles[0], tiles[1], scale * LOG2E, scale, copies,
        **geo.constexprs(), **e_cx, TH=th, TW=tw, BLOCK_N=geo.cfg["block_n"],
        HAS_RPB=rpb is not None, RPB_GRAD=rpb_grad, HAS_EXTRA=ak is not None,
        PRECISION=_precision(q), BACKWARD=grad_out is not None, **compiler_options(geo.cfg),
    )
    return drpb


def _as_read(q, k, v, *others):
    """The layout the kernels read (one set of q/k/v strides, the rest contiguous). The ops
    enforce it themselves: torch.compile may hand a custom op other strides than eager did."""
    return (*io_layout(q, k, v), *(t if t is None else t.contiguous() for t in others))


def _forward(q, k, v, rpb, ak, av, kernel_size, stride, dilation, offset, scale):
    q, k, v, rpb, ak, av = _as_read(q, k, v, rpb, ak, av)
    geo = _Geometry(q, kernel_size, stride, dilation, offset)
    out = dense_like(q)
    lse = torch.empty(q.shape[0], geo.heads, geo.H, geo.W, device=q.device, dtype=torch.float32)
    _query_pass(geo, q, k, v, rpb, ak, av, out, lse, scale)
    return out, lse


def _backward(grad_out, q, k, v, out, lse, rpb, ak, av, kernel_size, stride, dilation, offset,
              scale, rpb_grad: bool):
    q, k, v, rpb, ak, av = _as_read(q, k, v, rpb, ak, av)
    geo = _Geometry(q, kernel_size, stride, dilation, offset)
    B = q.shape[0]
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    delta = torch.empty_like(lse)  # rowsum(dO * O), written by the dQ pass
    dq, dk, dv = dense_like(q), dense_like(k), dense_like(v)
    drpb = _query_pass(geo, q, k, v, rpb, ak, av, out, lse, scale, grad_out, delta, dq, rpb_grad)

    e_strides, n_extra, windows, e_cx = _extra_layout(ak, geo)
    dummy = q
    cx = geo.constexprs()
    common = compiler_options(geo.cfg)
    precision = _precision(q)
    strides = (q.stride(0), q.stride(1), q.stride(2), q.stride(3))
    th, tw, tiles, grid0 = geo.patches(geo.cfg["block_n"], geo.cfg["block_m"])
    cand = tuple(triton.next_power_of_2(t + 4 * kk) for t, kk in zip((th, tw), kernel_size))
    _na_bwd_dkdv_kernel[(grid0 * B * geo.heads,)](
        q, k, v, grad_out, lse, delta, rpb if rpb is not None else dummy, dk, dv,
        *strides, geo.H, geo.W, geo.heads, tiles[0], tiles[1], scale * LOG2E, scale,
        **cx, TH=th, TW=tw, BLOCK_M=geo.cfg["block_m"], CAND_H=cand[0], CAND_W=cand[1],
        HAS_RPB=rpb is not None, PRECISION=precision, **common,
    )

    dak = dav = None
    if ak is not None:
        dak, dav = torch.empty_like(ak), torch.empty_like(av)
        block_n = geo.cfg["block_n"]
        blocks = triton.cdiv(n_extra, block_n)
        _na_bwd_extra_kernel[(windows[0] * windows[1] * blocks * B * geo.heads,)](
            q, grad_out, lse, delta, ak, av, dak, dav, *strides, *e_strides,
            geo.H, geo.W, geo.heads, n_extra, windows[0], windows[1], blocks, scale * LOG2E, scale,
            KH=cx["KH"], KW=cx["KW"], OH=cx["OH"], OW=cx["OW"], **e_cx,
            BLOCK_M=geo.cfg["block_m"], BLOCK_N=block_n, HEAD_DIM=cx["HEAD_DIM"],
            BLOCK_D=cx["BLOCK_D"], PRECISION=precision, **common,
        )
    drpb_out = None
    if rpb_grad:
        drpb_out = drpb.sum(0).reshape(geo.heads, 2 * kernel_size[0] - 1,
                                       2 * kernel_size[1] - 1).to(rpb.dtype)
    return dq, dk, dv, drpb_out, dak, dav


# ---------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile) and autograd


def _empty_like_none(t: Optional[Tensor], ref: Tensor) -> Tensor:
    return t if t is not None else ref.new_empty(0)


@torch.library.custom_op("zoo::na2d_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def _na2d_fwd_op(q: Tensor, k: Tensor, v: Tensor, rpb: Optional[Tensor],
                 additional_keys: Optional[Tensor], additional_values: Optional[Tensor],
                 kernel_size: List[int], stride: List[int], dilation: List[int],
                 window_offset: List[int], scale: float) -> Tuple[Tensor, Tensor]:
    with on_device(q):
        return _forward(q, k, v, rpb, additional_keys, additional_values, tuple(kernel_size),
                        tuple(stride), tuple(dilation), tuple(window_offset), scale)


@_na2d_fwd_op.register_fake
def _(q, k, v, rpb, additional_keys, additional_values, kernel_size, stride, dilation,
      window_offset, scale):
    B, H, W, heads, _ = q.shape
    return dense_like(q), q.new_empty(B, heads, H, W, dtype=torch.float32)


@torch.library.custom_op("zoo::na2d_bwd", mutates_args=(), device_types=("cuda", "cpu"))
def _na2d_bwd_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 rpb: Optional[Tensor], additional_keys: Optional[Tensor],
                 additional_values: Optional[Tensor], kernel_size: List[int], stride: List[int],
                 dilation: List[int], window_offset: List[int], scale: float, rpb_grad: bool
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    with on_device(q):
        grads = _backward(grad_out, q, k, v, out, lse, rpb, additional_keys, additional_values,
                          tuple(kernel_size), tuple(stride), tuple(dilation), tuple(window_offset),
                          scale, rpb_grad)
    # custom ops return tensors only: an absent gradient travels as an empty tensor
    return tuple(_empty_like_none(g, q) for g in grads)


@_na2d_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, rpb, additional_keys, additional_values, kernel_size, stride,
      dilation, window_offset, scale, rpb_grad):
    drpb = dense_like(rpb) if rpb_grad else q.new_empty(0)
    if additional_keys is None:
        dak = dav = q.new_empty(0)
    else:
        dak, dav = dense_like(additional_keys), dense_like(additional_values)
    return dense_like(q), dense_like(k), dense_like(v), drpb, dak, dav


def _setup_context(ctx, inputs, output):
    q, k, v, rpb, ak, av, kernel_size, stride, dilation, window_offset, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, rpb, ak, av)
    ctx.args = (kernel_size, stride, dilation, window_offset, scale)
    ctx.rpb_grad = rpb is not None and ctx.needs_input_grad[3]


def _backward_rule(ctx, grad_out, grad_lse):
    q, k, v, out, lse, rpb, ak, av = ctx.saved_tensors
    kernel_size, stride, dilation, window_offset, scale = ctx.args
    dq, dk, dv, drpb, dak, dav = _na2d_bwd_op(grad_out, q, k, v, out, lse, rpb, ak, av,
                                             kernel_size, stride, dilation, window_offset,
                                             scale, ctx.rpb_grad)
    return (dq, dk, dv, drpb if ctx.rpb_grad else None, dak if ak is not None else None,
            dav if av is not None else None, None, None, None, None, None)


_na2d_fwd_op.register_autograd(_backward_rule, setup_context=_setup_context)


def na2d_triton(query: Tensor, key: Tensor, value: Tensor, kernel_size: Sequence[int],
                stride: Sequence[int], dilation: Sequence[int],
                window_offset: Sequence[Optional[int]], rpb: Optional[Tensor] = None,
                additional_keys: Optional[Tensor] = None,
                additional_values: Optional[Tensor] = None,
                scale: Optional[float] = None) -> Tensor:
    """The Triton path of ``zoo.kernels.na2d``; arguments already validated, per-axis pairs."""
    if scale is None:
        scale = query.shape[-1] ** -0.5
    tensors = _as_read(query, key, value, rpb, additional_keys, additional_values)  # saved as read
    out, _ = _na2d_fwd_op(*tensors, list(kernel_size), list(stride), list(dilation),
                          [-1 if o is None else o for o in window_offset], float(scale))
    return out
