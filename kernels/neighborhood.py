"""Generalized neighborhood attention over a 2-D token grid, in plain PyTorch.

One op covers sliding-window neighborhood attention (NAT), dilated NA (DiNAT), strided NA,
blocked window attention (Swin, MaxViT block), blocked dilated attention (MaxViT grid),
Swin's shifted windows (a partition with an offset grid), rectangular windows (CSWin stripes)
and extra key/value tokens, either global (seen by every query) or per window (FasterViT's
carrier tokens: each non-overlapping window also sees its own few extra tokens).

Everything is decided per axis. For an axis of length ``L`` the helpers below build three
``(L, k)`` tables: which key each query sees in each of its ``k`` slots, whether that slot holds a
real key, and which entry of the relative-bias table the slot reads. The 2-D neighborhood is the
outer product of the two axes' tables. The fused Triton kernel is meant to compute the same
tables on the fly from the same formulas (``_sliding_window_start`` and
``_partition_window_start``), so this file is the definition it is tested against. Its gather of
each query's keys is that definition; whole windows (kernels/blocked.py) and query tiles
(kernels/tiled.py) compute the same attention faster and are tested against it.

Coordinates. With dilation ``d``, token ``p`` belongs to dilation group ``g = p % d`` and sits at
``i = p // d`` inside it; a group holds ``n_g = ceil((L - g) / d)`` tokens. Windows, strides,
offsets and relative positions are all counted in these group coordinates, and a query only ever
sees keys of its own group.

Two window rules:

* ``window_offset=None`` (NATTEN's generalized NA). Queries are tiled in groups of ``stride``; a
  tile shares one window, centred on its leader (the tile's middle query, the right one of the
  two middles for an even stride, capped at the last token). The window holds ``k // 2`` keys
  before the centre and ``k - 1 - k // 2`` after it and is shifted inward at the borders, so it
  always holds exactly ``k`` keys. ``stride == k`` on a multiple of ``k`` gives blocked windows.
* ``window_offset=o`` (partition). ``stride`` must equal ``k``; the windows are the cells
  ``[o + m*k, o + (m+1)*k)`` of a grid shifted by ``o``, clipped at the borders: a border cell
  holds fewer keys and nothing is shifted. This is Swin's shifted window without the cyclic roll.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .blocked import axis_plan, blocked_na2d
from .tiled import axis_tiles, tiled_na2d

__all__ = ["na2d", "AxisWindow", "axis_window", "axis_window_ids", "axis_window_count",
           "check_axis_args"]

IntPair = Union[int, Sequence[int]]


class AxisWindow(NamedTuple):
    """Per-axis neighborhood tables, each of shape ``(length, kernel_size)``."""

    key_index: Tensor  # long: position of the key in slot j of query p (always in range)
    valid: Tensor  # bool: False where a clipped partition window has no key in slot j
    bias_index: Tensor  # long: (key - query) + k - 1 in group coordinates, in [0, 2k-2]


def _sliding_window_start(i: Tensor, n: Tensor, kernel_size: int, stride: int) -> Tensor:
    # NATTEN's rule: the whole stride tile uses the window of its leader, then the window is
    # pushed inside [0, n) so it keeps all k keys.
    leader = torch.minimum((i // stride) * stride + stride // 2, n - 1)
    start = (leader - kernel_size // 2).clamp(min=0)
    return torch.minimum(start, n - kernel_size)


def _partition_window_start(i: Tensor, kernel_size: int, offset: int) -> Tensor:
    # Start of the grid cell holding i; it is negative for the clipped first cell when offset > 0.
    return torch.div(i - offset, kernel_size, rounding_mode="floor") * kernel_size + offset


def axis_window(
    length: int,
    kernel_size: int,
    stride: int = 1,
    dilation: int = 1,
    offset: Optional[int] = None,
    device: Union[torch.device, str, None] = None,
) -> AxisWindow:
    """Tables of one axis: see the module docstring for the rules (``offset=None``: NATTEN's)."""
    check_axis_args(length, kernel_size, stride, dilation, offset)
    pos = torch.arange(length, device=device)
    group = pos % dilation
    i = pos // dilation
    n = (length - group + dilation - 1) // dilation  # tokens in each query's dilation group
    if offset is None:
        start = _sliding_window_start(i, n, kernel_size, stride)
    else:
        start = _partition_window_start(i, kernel_size, offset)
    key = start[:, None] + torch.arange(kernel_size, device=device)  # group coordinates
    n = n[:, None]
    valid = (key >= 0) & (key < n)
    # Clipped slots point at some real token so the gather stays in range; they are masked.
    key_index = torch.minimum(key.clamp(min=0), n - 1) * dilation + group[:, None]
    bias_index = key - i[:, None] + kernel_size - 1
    return AxisWindow(key_index, valid, bias_index)


def axis_window_count(length: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                      offset: Optional[int] = None, axis: str = "") -> int:
    """How many non-overlapping windows an axis holds (per-window extra tokens need one entry
    each); raises unless the windows do not overlap: ``stride == kernel_size`` and no dilation.
    With ``offset=None`` window ``m`` is the stride tile ``[m*k, (m+1)*k)`` (a ragged last tile
    keeps its own id although NATTEN shifts its keys inward); with an offset the windows are the
    cells of the offset grid, counted from the (possibly clipped) cell holding position 0."""
    check_axis_args(length, kernel_size, stride, dilation, offset, axis)
    if stride != kernel_size or dilation != 1:
        where = f" along {axis}" if axis else ""
        raise ValueError(
            "per-window additional keys/values need non-overlapping windows (stride == "
            f"kernel_size, dilation 1){where}; got kernel_size={kernel_size}, stride={stride}, "
            f"dilation={dilation}"
        )
    o = 0 if offset is None else offset
    return (length - 1 - o) // kernel_size - (-o) // kernel_size + 1


def axis_window_ids(
    length: int,
    kernel_size: int,
    stride: int = 1,
    dilation: int = 1,
    offset: Optional[int] = None,
    device: Union[torch.device, str, None] = None,
) -> Tuple[Tensor, int]:
    """Which non-overlapping window each position of an axis belongs to (numbered as in
    ``axis_window_count``), and how many there are."""
    count = axis_window_count(length, kernel_size, stride, dilation, offset)
    o = 0 if offset is None else offset
    ids = torch.div(torch.arange(length, device=device) - o, kernel_size,
                    rounding_mode="floor") - (-o) // kernel_size
    return ids, count


def check_axis_args(
    length: int, kernel_size: int, stride: int, dilation: int, offset: Optional[int], axis: str = ""
) -> None:
    """Raise ValueError unless the per-axis arguments describe a window the op can build."""
    where = f" along {axis}" if axis else ""
    if kernel_size < 1 or stride < 1 or dilation < 1:
        raise ValueError(
            f"kernel_size, stride and dilation must be >= 1{where}, got "
            f"kernel_size={kernel_size}, stride={stride}, dilation={dilation}"
        )
    if kernel_size * dilation > length:
        raise ValueError(
            f"kernel_size * dilation must not exceed the input length{where}: "
            f"{kernel_size} * {dilation} > {length}"
        )
    if stride > kernel_size:
        raise ValueError(f"stride must not exceed kernel_size{where}: {stride} > {kernel_size}")
    if offset is not None:
        if stride != kernel_size:
            raise ValueError(
                f"window_offset needs non-overlapping windows, stride == kernel_size{where}; "
                f"got stride={stride}, kernel_size={kernel_size}"
            )
        if not 0 <= offset < kernel_size:
            raise ValueError(f"window_offset must be in [0, kernel_size){where}, got {offset}")


def traced_int(x):
    """A size as the Python int it holds: ``torch.jit.trace`` hands shapes over as 0-d tensors."""
    if isinstance(x, Tensor) and x.dim() == 0 and not x.is_floating_point() and x.dtype != torch.bool:
        return int(x)
    return x


def _pair(value, name: str, allow_none: bool = False) -> Tuple:
    """An int (or None) for both axes, or one per axis (height, width)."""
    value = [traced_int(v) for v in value] if isinstance(value, (tuple, list)) else traced_int(value)

    def ok(x):
        return (x is None and allow_none) or (isinstance(x, int) and not isinstance(x, bool))

    if ok(value):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(ok(x) for x in value):
        return tuple(value)
    raise ValueError(f"{name} must be an int or a pair of ints (height, width), got {value!r}")


def _check_tensors(query, key, value, rpb, additional_keys, additional_values, kernel_size):
    if query.dim() != 5:
        raise ValueError(
            f"query must be 5-D (batch, height, width, heads, head_dim), got shape "
            f"{tuple(query.shape)}"
        )
    for name, t in (("key", key), ("value", value)):
        if t.shape != query.shape:
            raise ValueError(
                f"{name} must have the shape of query {tuple(query.shape)}, got {tuple(t.shape)}"
            )
    if not query.is_floating_point():
        raise ValueError(f"query, key and value must be floating point, got {query.dtype}")
    for name, t in (("key", key), ("value", value), ("additional_keys", additional_keys),
                    ("additional_values", additional_values)):
        if t is not None and (t.dtype != query.dtype or t.device != query.device):
            raise ValueError(
                f"{name} must match query's dtype and device ({query.dtype}, {query.device}), "
                f"got ({t.dtype}, {t.device})"
            )
    # The bias table may keep its own dtype: under autocast it stays an fp32 parameter while
    # q/k/v are half; it is added to the fp32 logits anyway.
    if rpb is not None and rpb.device != query.device:
        raise ValueError(f"rpb must be on query's device {query.device}, got {rpb.device}")
    batch, _, _, heads, head_dim = query.shape
    if rpb is not None:
        want = (heads, 2 * kernel_size[0] - 1, 2 * kernel_size[1] - 1)
        if tuple(rpb.shape) != want:
            raise ValueError(f"rpb must have shape {want} (heads, 2*kh-1, 2*kw-1), got "
                             f"{tuple(rpb.shape)}")
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values must be given together")
    if additional_keys is not None:
        ak, av = additional_keys, additional_values
        if ak.dim() not in (4, 6) or ak.shape[0] != batch or ak.shape[-2:] != (heads, head_dim):
            raise ValueError(
                f"additional_keys must have shape (batch={batch}, N, heads={heads}, "
                f"head_dim={head_dim}) for global tokens or (batch={batch}, windows_h, "
                f"windows_w, N, heads={heads}, head_dim={head_dim}) for per-window tokens, got "
                f"{tuple(ak.shape)}"
            )
        if av.shape != ak.shape:
            raise ValueError(
                f"additional_values must have the shape of additional_keys {tuple(ak.shape)}, "
                f"got {tuple(av.shape)}"
            )


def _gather_windows(x: Tensor, rows: AxisWindow, cols: AxisWindow) -> Tensor:
    """(B, H, W, heads, D) -> (B, H, W, kh*kw, heads, D): each query's keys, one axis at a time."""
    b, h, w, heads, d = x.shape
    x = x[:, rows.key_index]  # (B, H, kh, W, heads, D)
    x = x[:, :, :, cols.key_index]  # (B, H, kh, W, kw, heads, D)
    x = x.permute(0, 1, 3, 2, 4, 5, 6)  # (B, H, W, kh, kw, heads, D)
    return x.flatten(3, 4)  # not reshape(..., -1, ...): that is ambiguous for an empty batch


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
    """Generalized 2-D neighborhood attention, reference implementation.

    Args:
        query, key, value: ``(B, H, W, heads, head_dim)``, NATTEN's layout.
        kernel_size, stride, dilation: int or (height, width). ``1 <= stride <= kernel_size``,
            ``kernel_size * dilation <= length`` on each axis.
        window_offset: None for NATTEN's windows (shifted inward at the borders); an int or
            (height, width) pair in ``[0, kernel_size)`` for a partition grid offset by it and
            clipped at the borders (Swin's shifted windows); needs ``stride == kernel_size``. A
            pair may hold None for an axis that keeps NATTEN's rule.
        rpb: optional ``(heads, 2*kh-1, 2*kw-1)`` relative positional bias table, read at
            ``(key - query) + k - 1`` per axis in dilation-group coordinates.
        additional_keys, additional_values: optional extra tokens a query attends to besides its
            window, in the same softmax, without bias. ``(B, N, heads, head_dim)``: global
            tokens, seen by every query. ``(B, nh, nw, N, heads, head_dim)``: per-window tokens
            for non-overlapping windows (``stride == kernel_size``, dilation 1; with or without
            ``window_offset``): a query in window ``(m, n)`` sees ``additional_keys[:, m, n]``,
            where ``nh``/``nw`` must equal the number of windows along each axis (stride tiles,
            or cells of the offset grid; see ``axis_window_ids``).
        scale: logit scale, ``head_dim ** -0.5`` by default.

    Returns:
        ``(B, H, W, heads, head_dim)`` in the dtype of ``query``.
    """
    args = check_args(query, key, value, kernel_size, stride, dilation, window_offset, rpb,
                      additional_keys, additional_values)
    return na2d_checked(query, key, value, *args, rpb=rpb, additional_keys=additional_keys,
                        additional_values=additional_values, scale=scale)


def check_args(query, key, value, kernel_size, stride, dilation, window_offset, rpb,
               additional_keys, additional_values):
    """Validate ``na2d``'s arguments once (every backend shares this); returns the per-axis
    ``(kernel_size, stride, dilation, window_offset)`` pairs."""
    kernel_size = _pair(kernel_size, "kernel_size")
    stride = _pair(stride, "stride")
    dilation = _pair(dilation, "dilation")
    offset = _pair(window_offset, "window_offset", allow_none=True)
    _check_tensors(query, key, value, rpb, additional_keys, additional_values, kernel_size)
    for axis, length, k, s, d, o in zip(("height", "width"), query.shape[1:3], kernel_size,
                                        stride, dilation, offset):
        check_axis_args(length, k, s, d, o, axis)
    if additional_keys is not None and additional_keys.dim() == 6:
        counts = tuple(axis_window_count(length, k, s, d, o, axis) for axis, length, k, s, d, o
                       in zip(("height", "width"), query.shape[1:3], kernel_size, stride,
                              dilation, offset))
        if tuple(additional_keys.shape[1:3]) != counts:
            raise ValueError(
                f"per-window additional_keys must have one entry per window, (windows_h, "
                f"windows_w) = {counts}, got {tuple(additional_keys.shape[1:3])}"
            )
    return kernel_size, stride, dilation, offset


def use_tiles(query: Tensor, per_window: bool) -> bool:
    """Whether the windows go by query tiles (kernels/tiled.py) rather than by the gather of each
    query's keys: everywhere but the meta device, which keeps the gather so that
    ``FlopCounterMode`` counts the op's own matmuls, and per-window extra tokens."""
    return not per_window and query.device.type != "meta"


def na2d_checked(query: Tensor, key: Tensor, value: Tensor, kernel_size: Tuple, stride: Tuple,
                 dilation: Tuple, offset: Tuple, *, rpb: Optional[Tensor],
                 additional_keys: Optional[Tensor], additional_values: Optional[Tensor],
                 scale: Optional[float]) -> Tensor:
    """The reference on arguments ``check_args`` has already validated and paired."""
    b, height, width, heads, head_dim = query.shape
    if scale is None:
        scale = head_dim ** -0.5

    # Whole windows on both axes (Swin, MaxViT, GC-ViT, CSWin, FasterViT, HiLo after their
    # padding) are a reshape of the map: no per-query gather (kernels/blocked.py).
    plans = [axis_plan(length, k, s, d, o) for length, k, s, d, o
             in zip((height, width), kernel_size, stride, dilation, offset)]
    per_window = additional_keys is not None and additional_keys.dim() == 6
    if all(plans) and (not per_window or (
            all(p.roll == 0 and p.dilation == 1 for p in plans)
            and tuple(additional_keys.shape[1:3]) == tuple(p.windows for p in plans))):
        return blocked_na2d(query, key, value, *plans, rpb=rpb, additional_keys=additional_keys,
                            additional_values=additional_values, scale=scale)

    rows = axis_window(height, kernel_size[0], stride[0], dilation[0], offset[0], query.device)
    cols = axis_window(width, kernel_size[1], stride[1], dilation[1], offset[1], query.device)
    if use_tiles(query, per_window):
        tiles = [axis_tiles(window, length, k, s, d, o) for window, length, k, s, d, o
                 in zip((rows, cols), (height, width), kernel_size, stride, dilation, offset)]
        return tiled_na2d(query, key, value, *tiles, rpb=rpb, additional_keys=additional_keys,
                          additional_values=additional_values, scale=scale)
    # The definition the fast paths are tested against: every query's own keys, gathered.
    num_keys = kernel_size[0] * kernel_size[1]
    keys = _gather_windows(key, rows, cols)
    values = _gather_windows(value, rows, cols)
    # Softmax statistics in at least fp32 whatever the input dtype (fp16 logits overflow, and
    # bf16 loses the small differences softmax amplifies); matmuls stay in the input dtype, with
    # the scale folded into the queries first (as timm and the authors do: an fp16 product of
    # unscaled q and k overflows sooner).
    acc = torch.promote_types(query.dtype, torch.float32)
    query = query * scale
    logits = torch.einsum("bxyhd,bxykhd->bxyhk", query, keys).to(acc)

    if rpb is not None:
        bias = rpb[:, rows.bias_index[:, None, :, None], cols.bias_index[None, :, None, :]]
        logits = logits + bias.reshape(heads, height, width, num_keys).permute(1, 2, 0, 3).to(acc)
    if any(o is not None for o in offset):  # only clipped partition windows have empty slots
        valid = rows.valid[:, None, :, None] & cols.valid[None, :, None, :]
        logits = logits.masked_fill(~valid.reshape(height, width, 1, num_keys), float("-inf"))

    extra_k, extra_v = additional_keys, additional_values
    if extra_k is not None and extra_k.dim() == 6:
        # Per-window tokens: give every query the tokens of its window, (B, H, W, N, heads, D).
        ids = [axis_window_ids(length, k, s, d, o, query.device)[0] for length, k, s, d, o
               in zip((height, width), kernel_size, stride, dilation, offset)]
        extra_k, extra_v = (t[:, ids[0]][:, :, ids[1]] for t in (extra_k, extra_v))
        extra = torch.einsum("bxyhd,bxynhd->bxyhn", query, extra_k)
    elif extra_k is not None:
        extra = torch.einsum("bxyhd,bnhd->bxyhn", query, extra_k)
    if extra_k is not None:
        logits = torch.cat([logits, extra.to(acc)], dim=-1)

    probs = logits.softmax(dim=-1).to(value.dtype)
    out = torch.einsum("bxyhk,bxykhd->bxyhd", probs[..., :num_keys], values)
    if extra_v is not None and extra_v.dim() == 6:
        out = out + torch.einsum("bxyhn,bxynhd->bxyhd", probs[..., num_keys:], extra_v)
    elif extra_v is not None:
        out = out + torch.einsum("bxyhn,bnhd->bxyhd", probs[..., num_keys:], extra_v)
    return out
