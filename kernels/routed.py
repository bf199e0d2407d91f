"""Routed (region-to-region) attention over a 2-D token grid, in plain PyTorch.

This is the token-level half of BiFormer's bi-level routing attention. The map is cut into a
``grid_h x grid_w`` grid of equal regions of ``region_size = (rh, rw)`` tokens; region ``r`` is the
cell in row ``r // grid_w`` and column ``r % grid_w`` (row-major), and a region's tokens are listed
row-major inside it. Every query region ``r`` comes with the indices of ``topk`` key regions,
``region_index[b, r, :]``, and each query token of region ``r`` attends, in one softmax, over all
``topk * rh * rw`` tokens of those regions:

    keys(b, r)   = concat_j  tokens of region region_index[b, r, j]       (same for value)
    out[b, p, h] = softmax_k(scale * <q[b, p, h], keys[k, h]>) @ values[:, h]   for p in region r

The semantics are *gather, then attend*: a region listed twice contributes its tokens twice to
the softmax. For distinct indices per query region (what top-k routing produces) this equals a
dense attention over the whole map with the mask ``allowed[p, t] = region(t) in region_index[b,
region(p)]``, which is how the tests state it. The order of the ``topk`` indices does not matter
(softmax is permutation invariant), up to the order of floating point sums. The routing is shared
by all heads. Indices must lie in [0, regions). This reference checks them (a ValueError naming
``region_index``; not on the meta device or while torch.compile traces, where values are unknown);
the Triton kernel does not read them back to check (that would cost a device sync per call) and
skips a slot whose index is outside.

Regions must tile the map exactly: callers pad first (BiFormer pads bottom/right to a multiple of
its grid, see blocks/biformer.py). The fused Triton kernel (kernels/triton_routed.py, chosen by
``zoo.kernels.routed_attention``'s dispatch, kernels/dispatch.py) reads the key/value rows of the
routed regions straight from the ``(B, H, W, heads, D)`` tensors, with the same formulas as
``_to_regions`` below, instead of materialising the ``topk``-times larger gathered copy.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .neighborhood import traced_int

__all__ = ["routed_attention"]


def _region_pair(region_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(region_size, (tuple, list)):
        region_size = [traced_int(s) for s in region_size]
    region_size = traced_int(region_size)
    if isinstance(region_size, int) and not isinstance(region_size, bool):
        region_size = (region_size, region_size)
    if (not isinstance(region_size, (tuple, list)) or len(region_size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in region_size)):
        raise ValueError(f"region_size must be a positive int or a pair of them (height, width), "
                         f"got {region_size!r}")
    return tuple(region_size)


def _to_regions(x: Tensor, rh: int, rw: int) -> Tensor:
    """(B, H, W, heads, D) -> (B, regions, rh*rw, heads, D), regions and tokens row-major."""
    b, height, width, heads, d = x.shape
    x = x.reshape(b, height // rh, rh, width // rw, rw, heads, d).permute(0, 1, 3, 2, 4, 5, 6)
    return x.reshape(b, (height // rh) * (width // rw), rh * rw, heads, d)


def _from_regions(x: Tensor, height: int, width: int, rh: int, rw: int) -> Tensor:
    """Inverse of ``_to_regions``."""
    b, _, _, heads, d = x.shape
    x = x.reshape(b, height // rh, width // rw, rh, rw, heads, d).permute(0, 1, 3, 2, 4, 5, 6)
    return x.reshape(b, height, width, heads, d)


def _check(query: Tensor, key: Tensor, value: Tensor, region_index: Tensor, rh: int, rw: int) -> None:
    if query.dim() != 5:
        raise ValueError(f"query must be 5-D (batch, height, width, heads, head_dim), got shape "
                         f"{tuple(query.shape)}")
    if key.shape != query.shape:
        raise ValueError(f"key must have the shape of query {tuple(query.shape)}, got {tuple(key.shape)}")
    if value.dim() != 5 or value.shape[:4] != query.shape[:4]:
        raise ValueError(f"value must be (batch, height, width, heads, value_dim) with the first four "
                         f"sizes of query {tuple(query.shape[:4])}, got {tuple(value.shape)}")
    if not query.is_floating_point():
        raise ValueError(f"query, key and value must be floating point, got {query.dtype}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype or t.device != query.device:
            raise ValueError(f"{name} must match query's dtype and device ({query.dtype}, {query.device}), "
                             f"got ({t.dtype}, {t.device})")
    b, height, width = query.shape[:3]
    if height % rh or width % rw:
        raise ValueError(f"regions of {rh}x{rw} must tile the {height}x{width} map exactly "
                         f"(pad the map first)")
    regions = (height // rh) * (width // rw)
    if region_index.dim() != 3 or region_index.shape[:2] != (b, regions):
        raise ValueError(f"region_index must be (batch={b}, regions={regions}, topk), got "
                         f"{tuple(region_index.shape)}")
    if region_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"region_index must hold int64 or int32 indices, got {region_index.dtype}")
    if not 1 <= region_index.shape[2] <= regions:
        raise ValueError(f"topk must be in [1, regions={regions}], got {region_index.shape[2]}")
    if region_index.device != query.device:
        raise ValueError(f"region_index must be on query's device {query.device}, got {region_index.device}")


def routed_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    region_index: Tensor,
    region_size: Union[int, Sequence[int]],
    scale: Optional[float] = None,
) -> Tensor:
    """Each query attends over the tokens of the key regions routed to its own region.

    Args:
        query, key: ``(B, H, W, heads, head_dim)``, the layout of ``na2d``.
        value: ``(B, H, W, heads, value_dim)``; ``value_dim`` may differ from ``head_dim``.
        region_index: ``(B, regions, topk)`` int64/int32, ``regions = (H // rh) * (W // rw)``;
            row ``r`` lists the key regions of query region ``r`` (row-major region numbering,
            values in ``[0, regions)``; distinct per row for the dense-mask reading).
        region_size: ``rh`` or ``(rh, rw)``; must divide ``H`` and ``W``.
        scale: logit scale, ``head_dim ** -0.5`` by default.

    Returns:
        ``(B, H, W, heads, value_dim)`` in the dtype of ``query``. Differentiable in query, key
        and value (not in ``region_index``).
    """
    rh, rw = check_args(query, key, value, region_index, region_size)
    return routed_attention_checked(query, key, value, region_index, (rh, rw), scale)


def check_args(query: Tensor, key: Tensor, value: Tensor, region_index: Tensor,
               region_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """Validate ``routed_attention``'s arguments once (every backend shares this); returns
    ``(rh, rw)``."""
    rh, rw = _region_pair(region_size)
    _check(query, key, value, region_index, rh, rw)
    return rh, rw


def routed_attention_checked(query: Tensor, key: Tensor, value: Tensor, region_index: Tensor,
                             region_size: Tuple[int, int], scale: Optional[float]) -> Tensor:
    """The reference on arguments ``check_args`` has already validated."""
    rh, rw = region_size
    b, height, width, heads, head_dim = query.shape
    if scale is None:
        scale = head_dim ** -0.5

    if region_index.device.type != "meta" and not torch.compiler.is_compiling() and region_index.numel():
        low, high = int(region_index.min()), int(region_index.max())
        regions = region_index.shape[1]
        if low < 0 or high >= regions:  # a negative index would silently wrap around in the gather
            raise ValueError(f"region_index must lie in [0, regions={regions}), got values in [{low}, {high}]")
    q = _to_regions(query * scale, rh, rw)  # (B, R, T, heads, D); scaled first, see na2d
    k = _to_regions(key, rh, rw)
    v = _to_regions(value, rh, rw)
    batch = torch.arange(b, device=query.device)[:, None, None]
    index = region_index.long()
    # (B, R, topk, T, heads, D) -> (B, R, topk*T, heads, D): the keys of each query region.
    k_sel = k[batch, index].flatten(2, 3)
    v_sel = v[batch, index].flatten(2, 3)

    # Softmax statistics in at least fp32 (as na2d); matmuls stay in the input dtype.
    acc = torch.promote_types(query.dtype, torch.float32)
    logits = torch.einsum("brqhd,brkhd->brhqk", q, k_sel).to(acc)
    probs = logits.softmax(dim=-1).to(value.dtype)
    out = torch.einsum("brhqk,brkhd->brqhd", probs, v_sel)
    return _from_regions(out, height, width, rh, rw)
