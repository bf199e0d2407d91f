"""Query tiles against their key regions: the fast path of the reference ``na2d`` for sliding
windows (NAT, DiNAT, strided NA) and clipped partitions.

The general path gathers every query's own keys, copying the keys and values ``kernel area``
times; that copy was ~90% of a NAT forward on a CPU (7.8 s of a batch of 8 for NAT-Tiny, where
Swin-Tiny, same GMACs, takes 0.4 s). Here the queries of each dilation group are cut into
``T x T`` tiles, as the fused kernel cuts them (kernels/triton_na.py). Along an axis a query's
window start does not decrease with its position, so the keys of a whole tile lie in one
rectangle of ``R = T - stride + k`` keys per axis (or fewer): one gather of those regions, one
batched matmul per tile, and a mask keeps each query to its own window. The mask and the bias
indices are the general path's per-axis tables (``neighborhood.AxisWindow``) rearranged by tile,
so the windows are the same by construction; tests/test_na2d.py checks outputs and gradients
against the general path.

The tile computes ``R_h R_w`` logits per query where the window has ``k_h k_w`` (about 3.4x for
kernel 7), so ``FlopCounterMode`` on real tensors counts more than the op's own FLOPs; the meta
device keeps the general path, whose count is the op's.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class AxisTiles(NamedTuple):
    """One axis cut into ``tiles`` tiles of ``T`` queries, each facing a region of ``R`` keys."""

    query_pos: Tensor  # (tiles, T) long: the query in each tile slot (padding repeats the last)
    key_pos: Tensor  # (tiles, R) long: the key in each region slot (clamped into the axis)
    in_window: Tensor  # (tiles, T, R) bool: region slot r is in the window of tile slot u
    bias_index: Tensor  # (tiles, T, R) long: rpb index of that pair (0 where not in the window)
    inverse: Tensor  # (length,) long: where each position sits in the flattened (tiles, T)


def tile_size(kernel: int, stride: int) -> int:
    """Queries per tile along an axis: a whole number of stride tiles, about a kernel's width
    (NAT-Tiny's forward on a 2-core CPU took 0.90-0.96 s a batch of 8 with tiles of 4 to 8 and
    1.38 s with tiles of 3)."""
    return stride * max(1, round(kernel / stride))


def axis_tiles(window, length: int, kernel: int, stride: int, dilation: int,
               offset: Optional[int]) -> AxisTiles:
    """Tiles of an axis from its ``neighborhood.AxisWindow`` tables (positions ``p = i*d + g``:
    group ``g``, index ``i`` in the group; tiles never straddle groups)."""
    device = window.key_index.device
    groups = dilation
    n_max = -(-length // groups)  # the longest group
    tile = tile_size(kernel, stride)
    if tile >= n_max:  # one tile holds the whole group: its region is the group
        tile = region = n_max
    else:
        # start(last) - start(first) <= tile - stride for NATTEN's rule (tiles are aligned to
        # stride tiles); an offset grid's tile may reach into one more cell.
        region = min(tile - stride + kernel + (kernel if offset else 0), n_max)
    tiles = -(-n_max // tile)
    g = torch.arange(groups, device=device)[:, None, None]
    i = torch.arange(tiles * tile, device=device).reshape(1, tiles, tile)
    n = (length - g + groups - 1) // groups  # members of each group
    query_pos = torch.minimum(i, n - 1) * groups + g  # (groups, tiles, T)

    valid = window.valid[query_pos]  # (groups, tiles, T, k)
    coord = window.key_index[query_pos] // groups  # key positions in group coordinates
    big = torch.iinfo(coord.dtype).max
    first = torch.where(valid, coord, big).amin(dim=(2, 3), keepdim=True)  # region start
    slot = torch.where(valid, coord - first, region)  # invalid slots go to a dropped column
    in_window = torch.zeros(*slot.shape[:3], region + 1, dtype=torch.bool, device=device)
    in_window.scatter_(-1, slot, valid)
    bias_index = torch.zeros(*slot.shape[:3], region + 1, dtype=torch.long, device=device)
    bias_index.scatter_(-1, slot, torch.where(valid, window.bias_index[query_pos], 0))

    key_coord = first[..., 0] + torch.arange(region, device=device)  # (groups, tiles, R)
    key_pos = torch.minimum(key_coord, n - 1) * groups + g
    pos = torch.arange(length, device=device)
    inverse = (pos % groups) * (tiles * tile) + pos // groups
    flat = groups * tiles
    return AxisTiles(query_pos.reshape(flat, tile), key_pos.reshape(flat, region),
                     in_window[..., :region].reshape(flat, tile, region),
                     bias_index[..., :region].reshape(flat, tile, region), inverse)


def _to_tiles(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """(B, H, W, heads, D) at tile tables (th, a), (tw, c) -> (B, th, tw, heads, a*c, D).

    index_select rather than ``x[:, index]`` here and below: its backward is an index_add,
    3.5x faster on a CPU than indexing's accumulating index_put (measured with these shapes)."""
    b, heads, dim = x.shape[0], x.shape[3], x.shape[4]
    (th, a), (tw, c) = rows.shape, cols.shape
    x = x.index_select(1, rows.flatten()).index_select(2, cols.flatten())
    x = x.reshape(b, th, a, tw, c, heads, dim).permute(0, 1, 3, 5, 2, 4, 6)
    return x.reshape(b, th, tw, heads, a * c, dim)


def tiled_na2d(query: Tensor, key: Tensor, value: Tensor, rows: AxisTiles, cols: AxisTiles, *,
               rpb: Optional[Tensor], additional_keys: Optional[Tensor],
               additional_values: Optional[Tensor], scale: float) -> Tensor:
    """``na2d`` by tiles (global extra tokens only); arguments as the reference's, checked."""
    b, _, _, heads, dim = query.shape
    (th, a), (tw, c) = rows.query_pos.shape, cols.query_pos.shape
    region = rows.key_pos.shape[1] * cols.key_pos.shape[1]
    q = _to_tiles(query * scale, rows.query_pos, cols.query_pos)  # scaled q: see na2d
    k, v = (_to_tiles(t, rows.key_pos, cols.key_pos) for t in (key, value))
    acc = torch.promote_types(query.dtype, torch.float32)
    logits = torch.matmul(q, k.transpose(-1, -2)).to(acc)  # (B, th, tw, heads, a*c, region)

    # (th, a, R_h) x (tw, c, R_w) -> (th, tw, 1 or heads, a*c, region)
    inside = rows.in_window[:, None, :, None, :, None] & cols.in_window[None, :, None, :, None, :]
    inside = inside.reshape(th, tw, 1, a * c, region)
    if rpb is None:
        logits = logits.masked_fill(~inside, float("-inf"))
    else:
        index = (rows.bias_index[:, None, :, None, :, None] * rpb.shape[2]
                 + cols.bias_index[None, :, None, :, None, :])  # (th, tw, a, c, R_h, R_w)
        bias = rpb.flatten(1).index_select(1, index.flatten())
        bias = bias.reshape(heads, th, tw, a * c, region).permute(1, 2, 0, 3, 4).to(acc)
        logits = logits + bias.masked_fill(~inside, float("-inf"))

    if additional_keys is not None:  # global tokens (B, N, heads, D)
        extra = torch.einsum("bijhqd,bnhd->bijhqn", q, additional_keys)
        logits = torch.cat([logits, extra.to(acc)], dim=-1)
    probs = logits.softmax(dim=-1).to(value.dtype)
    out = torch.matmul(probs[..., :region], v)
    if additional_values is not None:
        out = out + torch.einsum("bijhqn,bnhd->bijhqd", probs[..., region:], additional_values)
    out = out.reshape(b, th, tw, heads, a, c, dim).permute(0, 1, 4, 2, 5, 3, 6)
    out = out.reshape(b, th * a, tw * c, heads, dim)
    return out.index_select(1, rows.inverse).index_select(2, cols.inverse)
