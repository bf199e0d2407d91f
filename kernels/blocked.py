"""Blocked windows as a reshape: the fast path of the reference ``na2d``.

When every axis is partitioned into whole windows (``stride == kernel_size`` and the length a
multiple of ``kernel_size * dilation``, or an offset grid over a multiple of the kernel without
dilation), the windows are a view of the map, so attention is one batched matmul per window
instead of a gather of every query's keys (which copies the keys ``kernel area`` times and was
~80% of a Swin or GC-ViT forward on a CPU). Offset grids follow Swin's own trick: roll the map
by the offset, attend within the rolled windows, and mask the pairs that come from different
cells of the clipped grid (only the last window of an axis holds two). The result, the FLOPs
and the gradients equal the general path's; tests/test_na2d.py checks both against a dense
masked attention.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class AxisPlan(NamedTuple):
    windows: int  # whole windows along the axis
    kernel: int
    dilation: int
    roll: int  # the grid offset (0 without one)


def axis_plan(length: int, kernel: int, stride: int, dilation: int, offset: Optional[int]) -> Optional[AxisPlan]:
    """How an axis partitions into whole windows, or None if it does not."""
    if stride != kernel:
        return None
    if not offset:
        if length % (kernel * dilation):
            return None
        return AxisPlan(length // (kernel * dilation), kernel, dilation, 0)
    if dilation != 1 or length % kernel:
        return None
    return AxisPlan(length // kernel, kernel, 1, offset)


def _to_windows(x: Tensor, ph: AxisPlan, pw: AxisPlan) -> Tensor:
    """(B, H, W, heads, D) -> (B, nh, dh, nw, dw, heads, kh*kw, D).

    Position p = (window * k + slot) * d + group on each axis: a dilation group g holds every
    d-th token, and its windows are k consecutive group members.
    """
    b, height, width, heads, dim = x.shape
    if ph.roll or pw.roll:
        x = torch.roll(x, shifts=(-ph.roll, -pw.roll), dims=(1, 2))
    x = x.reshape(b, ph.windows, ph.kernel, ph.dilation, pw.windows, pw.kernel, pw.dilation, heads, dim)
    x = x.permute(0, 1, 3, 4, 6, 7, 2, 5, 8)
    return x.reshape(b, ph.windows, ph.dilation, pw.windows, pw.dilation, heads, ph.kernel * pw.kernel, dim)


def _from_windows(y: Tensor, ph: AxisPlan, pw: AxisPlan) -> Tensor:
    b, _, _, _, _, heads, _, dim = y.shape
    y = y.reshape(b, ph.windows, ph.dilation, pw.windows, pw.dilation, heads, ph.kernel, pw.kernel, dim)
    y = y.permute(0, 1, 6, 2, 3, 7, 4, 5, 8)
    y = y.reshape(b, ph.windows * ph.kernel * ph.dilation, pw.windows * pw.kernel * pw.dilation, heads, dim)
    if ph.roll or pw.roll:
        y = torch.roll(y, shifts=(ph.roll, pw.roll), dims=(1, 2))
    return y


def _same_cell(plan: AxisPlan, length: int, device) -> Optional[Tensor]:
    """(windows, k, k): whether two slots of a rolled window come from the same grid cell."""
    if not plan.roll:
        return None
    r = torch.arange(length, device=device)
    # Rolled slot r holds original position (r + roll) % length; those that wrapped around belong
    # to the first, clipped cell [0, roll), the others to cell r // k.
    cell = torch.where(r < length - plan.roll, r // plan.kernel, -1).reshape(plan.windows, plan.kernel)
    return cell[:, :, None] == cell[:, None, :]


def blocked_na2d(query: Tensor, key: Tensor, value: Tensor, ph: AxisPlan, pw: AxisPlan, *,
                 rpb: Optional[Tensor], additional_keys: Optional[Tensor],
                 additional_values: Optional[Tensor], scale: float) -> Tensor:
    """``na2d`` for whole windows (see ``axis_plan``); arguments as the reference's, checked."""
    height, width = query.shape[1:3]
    kh, kw = ph.kernel, pw.kernel
    num_keys = kh * kw
    q, k, v = (_to_windows(t, ph, pw) for t in (query * scale, key, value))  # scaled q: see na2d
    acc = torch.promote_types(query.dtype, torch.float32)
    logits = torch.matmul(q, k.transpose(-1, -2)).to(acc)  # (..., heads, K, K)

    if rpb is not None:
        th, tw = torch.arange(kh, device=query.device), torch.arange(kw, device=query.device)
        rel_h = th[None, :] - th[:, None] + kh - 1  # [query slot, key slot]: key - query + k - 1
        rel_w = tw[None, :] - tw[:, None] + kw - 1
        bias = rpb[:, rel_h[:, None, :, None], rel_w[None, :, None, :]]  # (heads, kh, kw, kh, kw)
        logits = logits + bias.reshape(-1, num_keys, num_keys).to(acc)
    same_h, same_w = _same_cell(ph, height, query.device), _same_cell(pw, width, query.device)
    if same_h is not None or same_w is not None:
        ones = lambda p: torch.ones(p.windows, p.kernel, p.kernel, dtype=torch.bool, device=query.device)
        same_h = ones(ph) if same_h is None else same_h
        same_w = ones(pw) if same_w is None else same_w
        same = same_h[:, None, :, None, :, None] & same_w[None, :, None, :, None, :]
        same = same.reshape(ph.windows, 1, pw.windows, 1, 1, num_keys, num_keys)
        logits = logits.masked_fill(~same, float("-inf"))

    extra_k, extra_v = additional_keys, additional_values
    if extra_k is not None:
        if extra_k.dim() == 6:  # per-window tokens (B, nh, nw, N, heads, D); here dilation is 1
            extra = torch.einsum("bipjqhkd,bijnhd->bipjqhkn", q, extra_k)
        else:
            extra = torch.einsum("bipjqhkd,bnhd->bipjqhkn", q, extra_k)
        logits = torch.cat([logits, extra.to(acc)], dim=-1)

    probs = logits.softmax(dim=-1).to(value.dtype)
    out = torch.matmul(probs[..., :num_keys], v)
    if extra_v is not None and extra_v.dim() == 6:
        out = out + torch.einsum("bipjqhkn,bijnhd->bipjqhkd", probs[..., num_keys:], extra_v)
    elif extra_v is not None:
        out = out + torch.einsum("bipjqhkn,bnhd->bipjqhkd", probs[..., num_keys:], extra_v)
    return _from_windows(out, ph, pw)
