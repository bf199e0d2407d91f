"""Tests of the plain-PyTorch generalized neighborhood attention (zoo.kernels.na2d).

Three independent witnesses:
* NATTEN's own ``na2d`` (flex backend, runs on CPU, forward only) for its window semantics,
* a dense HW x HW masked attention whose mask and bias are built here from the definitions, by
  plain Python loops, without the op's helpers (forward and gradients),
* Swin's cyclic-roll + window-partition + attention-mask implementation, rewritten here.
"""

import random
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from zoo.kernels import na2d


# ---------------------------------------------------------------------------------------------
# Window definitions, written from the rules, one axis at a time (lists of key positions).


def natten_axis_keys(length, kernel, stride, dilation):
    """NATTEN: a stride tile shares the window of its leader query (the tile's middle, capped at
    the group's end); the window is the run of `kernel` consecutive group tokens closest to being
    centred on the leader (kernel // 2 keys before it)."""
    keys = []
    for p in range(length):
        group, i = p % dilation, p // dilation
        members = list(range(group, length, dilation))
        n = len(members)
        leader = min((i // stride) * stride + stride // 2, n - 1)
        starts = range(0, n - kernel + 1)
        start = min(starts, key=lambda a: abs(a - (leader - kernel // 2)))
        keys.append(members[start:start + kernel])
    return keys


def partition_axis_keys(length, kernel, offset, dilation):
    """Partition: the cells [offset + m*kernel, offset + (m+1)*kernel) of each dilation group,
    clipped at the borders."""
    keys = []
    for p in range(length):
        group, i = p % dilation, p // dilation
        members = list(range(group, length, dilation))
        cell = (i - offset) // kernel
        keys.append([m for j, m in enumerate(members) if (j - offset) // kernel == cell])
    return keys


def dense_mask_and_bias_index(row_keys, col_keys, dilation, kernel):
    """(HW, HW) allowed-mask and the rpb indices of every (query, key) pair (group coordinates)."""
    height, width = len(row_keys), len(col_keys)
    allowed = torch.zeros(height * width, height * width, dtype=torch.bool)
    idx_h = torch.zeros(height * width, height * width, dtype=torch.long)
    idx_w = torch.zeros(height * width, height * width, dtype=torch.long)
    for qy in range(height):
        for qx in range(width):
            q = qy * width + qx
            for ky in row_keys[qy]:
                for kx in col_keys[qx]:
                    k = ky * width + kx
                    allowed[q, k] = True
                    idx_h[q, k] = ky // dilation[0] - qy // dilation[0] + kernel[0] - 1
                    idx_w[q, k] = kx // dilation[1] - qx // dilation[1] + kernel[1] - 1
    return allowed, idx_h, idx_w


def dense_attention(q, k, v, allowed, bias=None, extra_k=None, extra_v=None, scale=None):
    """Full attention over all HW keys with a boolean mask; O((HW)^2), for checking only."""
    b, height, width, heads, dim = q.shape
    scale = dim ** -0.5 if scale is None else scale
    qf, kf, vf = (t.reshape(b, height * width, heads, dim) for t in (q, k, v))
    logits = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    if bias is not None:
        logits = logits + bias
    logits = logits.masked_fill(~allowed, float("-inf"))
    if extra_k is not None:
        logits = torch.cat([logits, torch.einsum("bqhd,bnhd->bhqn", qf, extra_k) * scale], -1)
        vf = torch.cat([vf, extra_v], dim=1)
    out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), vf)
    return out.reshape(b, height, width, heads, dim)


def pair(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def dense_na2d(q, k, v, kernel_size, stride=1, dilation=1, window_offset=None, rpb=None,
               extra_k=None, extra_v=None):
    kernel, stride, dilation = pair(kernel_size), pair(stride), pair(dilation)
    offset = pair(window_offset)
    axes = []
    for ax, length in enumerate(q.shape[1:3]):
        if offset[ax] is None:
            axes.append(natten_axis_keys(length, kernel[ax], stride[ax], dilation[ax]))
        else:
            axes.append(partition_axis_keys(length, kernel[ax], offset[ax], dilation[ax]))
    allowed, idx_h, idx_w = dense_mask_and_bias_index(axes[0], axes[1], dilation, kernel)
    bias = None if rpb is None else rpb[:, idx_h, idx_w]
    return dense_attention(q, k, v, allowed, bias, extra_k, extra_v)


def randn(*shape, dtype=torch.float64, grad=False, gen=None):
    return torch.randn(*shape, dtype=dtype, generator=gen).requires_grad_(grad)


# ---------------------------------------------------------------------------------------------
# 1. NATTEN's na2d (flex backend; forward only, flex has no CPU backward).


def random_natten_case(seed):
    rng = random.Random(seed)
    kernel, stride, dilation, shape = [], [], [], []
    for max_len in (20, 24):
        if rng.random() < 0.5:  # dilated: a small kernel leaves room for dilation
            k = rng.choice([3, 5, 7]) if rng.random() < 0.85 else rng.choice([2, 4, 6])
            d = rng.randint(2, max_len // k)
        else:
            k = rng.choice([3, 5, 7, 9, 11, 13]) if rng.random() < 0.85 else rng.choice([4, 8])
            d = 1
        length = rng.randint(k * d, max_len)
        s = rng.choice([1, 1, rng.randint(1, k), k])
        kernel.append(k), stride.append(s), dilation.append(d), shape.append(length)
    batch, heads, dim = rng.randint(1, 2), rng.randint(1, 3), rng.choice([8, 16])
    return (batch, *shape, heads, dim), tuple(kernel), tuple(stride), tuple(dilation)


@pytest.fixture(scope="module")
def natten_na2d():
    natten = pytest.importorskip("natten")

    def run(q, k, v, **kw):
        with warnings.catch_warnings():  # flex warns that it runs uncompiled on CPU
            warnings.simplefilter("ignore")
            return natten.na2d(q, k, v, backend="flex-fna", torch_compile=False, **kw)

    return run


@pytest.mark.parametrize("seed", range(60))
def test_matches_natten_random(natten_na2d, seed):
    shape, kernel, stride, dilation = random_natten_case(seed)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (randn(*shape, dtype=torch.float32, gen=gen) for _ in range(3))
    ours = na2d(q, k, v, kernel, stride, dilation)
    ref = natten_na2d(q, k, v, kernel_size=kernel, stride=stride, dilation=dilation)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel,stride,dilation,shape", [
    ((4, 6), (1, 1), (1, 1), (9, 13)),   # even sliding windows
    ((4, 4), (4, 4), (1, 1), (16, 12)),  # blocked (Swin/MaxViT window)
    ((4, 4), (4, 4), (1, 1), (10, 14)),  # blocked, lengths not multiples: last window inward
    ((3, 4), (3, 4), (4, 3), (12, 12)),  # blocked + dilated = MaxViT grid attention
    ((7, 7), (7, 7), (2, 2), (15, 17)),
])
def test_matches_natten_structured(natten_na2d, kernel, stride, dilation, shape):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (randn(2, *shape, 2, 8, dtype=torch.float32, gen=gen) for _ in range(3))
    ours = na2d(q, k, v, kernel, stride, dilation)
    ref = natten_na2d(q, k, v, kernel_size=kernel, stride=stride, dilation=dilation)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_matches_natten_additional_kv(natten_na2d):
    gen = torch.Generator().manual_seed(2)
    q, k, v = (randn(2, 11, 13, 2, 8, dtype=torch.float32, gen=gen) for _ in range(3))
    ek, ev = (randn(2, 5, 2, 8, dtype=torch.float32, gen=gen) for _ in range(2))
    args = dict(kernel_size=(5, 3), stride=(2, 3), dilation=(2, 3))
    ours = na2d(q, k, v, **args, additional_keys=ek, additional_values=ev)
    ref = natten_na2d(q, k, v, **args, additional_keys=ek, additional_values=ev)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# 2. Dense masked attention: bias, blocked, grid, offsets, stripes, extra tokens; gradients.

DENSE_CASES = {
    "sliding": dict(shape=(9, 11), kernel_size=(5, 3)),
    "sliding_even": dict(shape=(9, 10), kernel_size=(4, 2)),
    "dilated": dict(shape=(10, 12), kernel_size=3, dilation=(2, 3)),
    "strided_dilated": dict(shape=(13, 11), kernel_size=(5, 3), stride=(2, 3), dilation=(2, 1)),
    "blocked": dict(shape=(8, 12), kernel_size=4, stride=4),
    "blocked_ragged": dict(shape=(10, 9), kernel_size=4, stride=4),
    "grid": dict(shape=(8, 9), kernel_size=(4, 3), stride=(4, 3), dilation=(2, 3)),
    "shifted": dict(shape=(10, 9), kernel_size=(4, 3), stride=(4, 3), window_offset=(2, 1)),
    "shifted_zero_ragged": dict(shape=(10, 7), kernel_size=4, stride=4, window_offset=0),
    "shifted_dilated": dict(shape=(12, 10), kernel_size=3, stride=3, dilation=2, window_offset=1),
    "shifted_one_axis": dict(shape=(9, 8), kernel_size=(3, 4), stride=(3, 4),
                             window_offset=(None, 2)),
    "stripe_rows": dict(shape=(6, 10), kernel_size=(1, 10), stride=(1, 10)),
    "stripe_cols": dict(shape=(7, 10), kernel_size=(7, 2), stride=(7, 2)),
    "extra_sliding": dict(shape=(8, 9), kernel_size=3, extra=4),
    "extra_shifted": dict(shape=(8, 8), kernel_size=4, stride=4, window_offset=2, extra=3),
}


@pytest.mark.parametrize("name", DENSE_CASES)
@pytest.mark.parametrize("with_rpb", [False, True])
def test_matches_dense_forward_and_grad(name, with_rpb):
    case = dict(DENSE_CASES[name])
    (height, width), extra = case.pop("shape"), case.pop("extra", 0)
    kernel = pair(case["kernel_size"])
    gen = torch.Generator().manual_seed(3)
    batch, heads, dim = 2, 3, 8
    q, k, v = (randn(batch, height, width, heads, dim, grad=True, gen=gen) for _ in range(3))
    inputs = [q, k, v]
    kw = {}
    if with_rpb:
        kw["rpb"] = randn(heads, 2 * kernel[0] - 1, 2 * kernel[1] - 1, grad=True, gen=gen)
        inputs.append(kw["rpb"])
    if extra:
        ek, ev = (randn(batch, extra, heads, dim, grad=True, gen=gen) for _ in range(2))
        inputs += [ek, ev]
    ours = na2d(q, k, v, **case, **kw, **(
        dict(additional_keys=ek, additional_values=ev) if extra else {}))
    ref = dense_na2d(q, k, v, **case, **kw, **(dict(extra_k=ek, extra_v=ev) if extra else {}))
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)
    grad_out = torch.randn_like(ours)
    grads = torch.autograd.grad(ours, inputs, grad_out)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


# Per-window extra tokens (FasterViT's carrier tokens): window (m, n) of a non-overlapping window
# grid owns N extra tokens that only its queries see. The witness numbers the windows by the
# distinct key sets of the axis (sorted by their first key), independently of the op's formula.

PER_WINDOW_CASES = {
    "blocked": dict(shape=(8, 12), kernel_size=4, stride=4),
    "blocked_ragged": dict(shape=(10, 9), kernel_size=4, stride=4),
    "blocked_rect": dict(shape=(6, 10), kernel_size=(3, 5), stride=(3, 5)),
    "shifted": dict(shape=(10, 9), kernel_size=(4, 3), stride=(4, 3), window_offset=(2, 1)),
    "shifted_one_axis": dict(shape=(9, 8), kernel_size=(3, 4), stride=(3, 4),
                             window_offset=(None, 2)),
    "whole_map": dict(shape=(4, 6), kernel_size=(4, 6), stride=(4, 6)),
}


def axis_window_numbers(keys):
    """Per position, the rank of its window's key set among the axis's distinct windows."""
    distinct = sorted(set(tuple(k) for k in keys))
    return [distinct.index(tuple(k)) for k in keys], len(distinct)


def window_count(length, kernel, offset):
    keys = (natten_axis_keys(length, kernel, kernel, 1) if offset is None
            else partition_axis_keys(length, kernel, offset, 1))
    return axis_window_numbers(keys)[1]


def dense_na2d_per_window(q, k, v, kernel_size, stride, window_offset=None, rpb=None,
                          extra_k=None, extra_v=None):
    kernel, offset = pair(kernel_size), pair(window_offset)
    b, height, width, heads, dim = q.shape
    axes, numbers = [], []
    for ax, length in enumerate((height, width)):
        keys = (natten_axis_keys(length, kernel[ax], kernel[ax], 1) if offset[ax] is None
                else partition_axis_keys(length, kernel[ax], offset[ax], 1))
        axes.append(keys)
        numbers.append(axis_window_numbers(keys))
    (rows, nh), (cols, nw) = numbers
    n_extra = extra_k.shape[3]
    allowed, idx_h, idx_w = dense_mask_and_bias_index(axes[0], axes[1], (1, 1), kernel)
    bias = None if rpb is None else rpb[:, idx_h, idx_w]
    # All windows' extra tokens side by side as keys; a query may only see its own window's.
    seen = torch.zeros(height * width, nh * nw * n_extra, dtype=torch.bool)
    for qy in range(height):
        for qx in range(width):
            w = rows[qy] * nw + cols[qx]
            seen[qy * width + qx, w * n_extra:(w + 1) * n_extra] = True
    qf, kf, vf = (t.reshape(b, height * width, heads, dim) for t in (q, k, v))
    ekf, evf = (t.reshape(b, nh * nw * n_extra, heads, dim) for t in (extra_k, extra_v))
    logits = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * dim ** -0.5
    if bias is not None:
        logits = logits + bias
    logits = logits.masked_fill(~allowed, float("-inf"))
    extra = torch.einsum("bqhd,bnhd->bhqn", qf, ekf) * dim ** -0.5
    logits = torch.cat([logits, extra.masked_fill(~seen, float("-inf"))], -1)
    out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), torch.cat([vf, evf], 1))
    return out.reshape(b, height, width, heads, dim)


@pytest.mark.parametrize("name", PER_WINDOW_CASES)
@pytest.mark.parametrize("with_rpb", [False, True])
def test_per_window_extra_tokens_match_dense(name, with_rpb):
    case = dict(PER_WINDOW_CASES[name])
    height, width = case.pop("shape")
    kernel = pair(case["kernel_size"])
    gen = torch.Generator().manual_seed(9)
    batch, heads, dim, n_extra = 2, 3, 8, 4
    q, k, v = (randn(batch, height, width, heads, dim, grad=True, gen=gen) for _ in range(3))
    inputs, kw = [q, k, v], {}
    if with_rpb:
        kw["rpb"] = randn(heads, 2 * kernel[0] - 1, 2 * kernel[1] - 1, grad=True, gen=gen)
        inputs.append(kw["rpb"])
    nh, nw = (window_count(length, kernel[ax], pair(case.get("window_offset"))[ax])
              for ax, length in enumerate((height, width)))
    ek, ev = (randn(batch, nh, nw, n_extra, heads, dim, grad=True, gen=gen) for _ in range(2))
    inputs += [ek, ev]
    ours = na2d(q, k, v, **case, **kw, additional_keys=ek, additional_values=ev)
    ref = dense_na2d_per_window(q, k, v, **case, **kw, extra_k=ek, extra_v=ev)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)
    grad_out = torch.randn_like(ours)
    for got, want in zip(torch.autograd.grad(ours, inputs, grad_out),
                         torch.autograd.grad(ref, inputs, grad_out)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_per_window_extra_tokens_flops_on_meta():
    batch, height, width, heads, dim, n_extra = 2, 14, 21, 3, 16, 4
    q = torch.empty(batch, height, width, heads, dim, device="meta")
    e = torch.empty(batch, 2, 3, n_extra, heads, dim, device="meta")
    with FlopCounterMode(display=False) as counter:
        out = na2d(q, q, q, 7, 7, additional_keys=e, additional_values=e)
    assert out.shape == q.shape
    assert counter.get_total_flops() == 2 * 2 * batch * height * width * heads * (49 + n_extra) * dim


def test_offset_zero_equals_blocked():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (randn(1, 12, 8, 2, 8, gen=gen) for _ in range(3))
    rpb = randn(2, 5, 7, gen=gen)
    blocked = na2d(q, k, v, (3, 4), (3, 4), rpb=rpb)
    torch.testing.assert_close(na2d(q, k, v, (3, 4), (3, 4), window_offset=0, rpb=rpb), blocked)


def test_scale_argument():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (randn(1, 7, 8, 2, 8, gen=gen) for _ in range(3))
    torch.testing.assert_close(na2d(q, k, v, 3, scale=0.5), na2d(q * (0.5 * 8 ** 0.5), k, v, 3))


# ---------------------------------------------------------------------------------------------
# 3. Swin: cyclic roll, window partition, attention mask (-100) and relative bias, as Swin does.


def swin_attention(q, k, v, window, shift, table):
    """Swin's shifted-window attention on (B, H, W, heads, D) q/k/v; table ((2w-1)^2, heads)."""
    b, height, width, heads, dim = q.shape
    n = window * window
    if shift:
        q, k, v = (torch.roll(t, (-shift, -shift), dims=(1, 2)) for t in (q, k, v))

    def partition(t):
        t = t.reshape(b, height // window, window, width // window, window, heads, dim)
        return t.permute(0, 1, 3, 5, 2, 4, 6).reshape(-1, heads, n, dim)

    attn = partition(q) @ partition(k).transpose(-2, -1) * dim ** -0.5
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window),
                                        indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1  # query - key
    index = rel[..., 0] * (2 * window - 1) + rel[..., 1]
    attn = attn + table[index.reshape(-1)].reshape(n, n, heads).permute(2, 0, 1)
    if shift:
        img_mask = torch.zeros(height, width)
        slices = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
        region = 0
        for hs in slices:
            for ws in slices:
                img_mask[hs, ws] = region
                region += 1
        windows = img_mask.reshape(height // window, window, width // window, window)
        windows = windows.permute(0, 2, 1, 3).reshape(-1, n)
        mask = (windows[:, None, :] - windows[:, :, None]) != 0
        mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(mask, -100.0)
        attn = (attn.reshape(b, -1, heads, n, n) + mask[None, :, None]).reshape(-1, heads, n, n)
    out = attn.softmax(-1) @ partition(v)
    out = out.reshape(b, height // window, width // window, heads, window, window, dim)
    out = out.permute(0, 1, 4, 2, 5, 3, 6).reshape(b, height, width, heads, dim)
    if shift:
        out = torch.roll(out, (shift, shift), dims=(1, 2))
    return out


def swin_table_to_rpb(table, window):
    """Swin indexes its bias by query - key; NATTEN's rpb by key - query: flip both offsets."""
    return table.reshape(2 * window - 1, 2 * window - 1, -1).permute(2, 0, 1).flip(1, 2)


@pytest.mark.parametrize("window,shift,shape", [(7, 3, (14, 21)), (4, 2, (8, 12)),
                                                (4, 1, (12, 8)), (4, 0, (8, 8))])
def test_matches_swin_shifted_windows(window, shift, shape):
    gen = torch.Generator().manual_seed(6)
    q, k, v = (randn(2, *shape, 3, 8, grad=True, gen=gen) for _ in range(3))
    table = randn((2 * window - 1) ** 2, 3, grad=True, gen=gen)
    ref = swin_attention(q, k, v, window, shift, table)
    ours = na2d(q, k, v, window, window, window_offset=shift,
                rpb=swin_table_to_rpb(table, window))
    # Swin's -100 mask leaves exp(-100) ~ 4e-44 of weight on masked keys: invisible here.
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)
    grad_out = torch.randn_like(ours)
    for got, want in zip(torch.autograd.grad(ours, (q, k, v, table), grad_out),
                         torch.autograd.grad(ref, (q, k, v, table), grad_out)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# 4. Dtypes, FLOPs on the meta device, bad arguments.


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision(dtype, tol):
    gen = torch.Generator().manual_seed(7)
    q, k, v = (randn(1, 9, 10, 2, 16, dtype=torch.float32, gen=gen) for _ in range(3))
    rpb = randn(2, 5, 5, dtype=torch.float32, gen=gen)
    ek = randn(1, 3, 2, 16, dtype=torch.float32, gen=gen)
    args = dict(kernel_size=3, dilation=(2, 1), additional_keys=ek, additional_values=ek)
    ref = na2d(q, k, v, rpb=rpb, **args)
    half = [t.to(dtype).requires_grad_() for t in (q, k, v, rpb, ek)]
    out = na2d(*half[:3], rpb=half[3], **{**args, "additional_keys": half[4],
                                          "additional_values": half[4]})
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    out.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == dtype for t in half)


@pytest.mark.parametrize("kw,extra", [
    (dict(kernel_size=(7, 3), dilation=(2, 1)), 0),
    (dict(kernel_size=7, stride=7, window_offset=3), 0),
    (dict(kernel_size=(7, 5), stride=(2, 5)), 5),
])
def test_flops_on_meta(kw, extra):
    batch, height, width, heads, dim = 2, 14, 21, 3, 16
    q = torch.empty(batch, height, width, heads, dim, device="meta")
    kh, kw_ = pair(kw["kernel_size"])
    rpb = torch.empty(heads, 2 * kh - 1, 2 * kw_ - 1, device="meta")
    extras = {}
    if extra:
        e = torch.empty(batch, extra, heads, dim, device="meta")
        extras = dict(additional_keys=e, additional_values=e)
    with FlopCounterMode(display=False) as counter:
        out = na2d(q, q, q, **kw, rpb=rpb, **extras)
    assert out.shape == q.shape and out.device.type == "meta"
    per_matmul = 2 * batch * height * width * heads * (kh * kw_ + extra) * dim
    assert counter.get_total_flops() == 2 * per_matmul


def test_autocast_with_fp32_rpb():
    gen = torch.Generator().manual_seed(8)
    q, k, v = (randn(1, 9, 10, 2, 16, dtype=torch.float32, gen=gen) for _ in range(3))
    rpb = randn(2, 5, 5, dtype=torch.float32, grad=True, gen=gen)
    ref = na2d(q, k, v, 3, rpb=rpb)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = na2d(*(t.bfloat16() for t in (q, k, v)), 3, rpb=rpb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert rpb.grad is not None and rpb.grad.dtype == torch.float32


def _qkv(shape=(1, 8, 8, 2, 4)):
    return [torch.zeros(shape) for _ in range(3)]


@pytest.mark.parametrize("call,match", [
    (lambda: na2d(*_qkv(), 9), "kernel_size \\* dilation"),
    (lambda: na2d(*_qkv(), 3, dilation=(3, 1)), "kernel_size \\* dilation"),
    (lambda: na2d(*_qkv(), 0), ">= 1"),
    (lambda: na2d(*_qkv(), 3, stride=4), "stride must not exceed"),
    (lambda: na2d(*_qkv(), 3, stride=0), ">= 1"),
    (lambda: na2d(*_qkv(), 4, stride=2, window_offset=1), "stride == kernel_size"),
    (lambda: na2d(*_qkv(), 4, stride=4, window_offset=4), "window_offset must be in"),
    (lambda: na2d(*_qkv(), (3, 3, 3)), "pair of ints"),
    (lambda: na2d(*_qkv(), 3.0), "pair of ints"),
    (lambda: na2d(*_qkv((1, 64, 2, 4)), 3), "5-D"),
    (lambda: na2d(*_qkv()[:2], torch.zeros(1, 8, 9, 2, 4), 3), "value must have the shape"),
    (lambda: na2d(*_qkv()[:1], torch.zeros(1, 8, 8, 1, 4), *_qkv()[2:], 3),
     "key must have the shape"),
    (lambda: na2d(*_qkv(), 3, rpb=torch.zeros(2, 3, 3)), "rpb must have shape"),
    (lambda: na2d(*_qkv(), 3, rpb=torch.zeros(3, 5, 5)), "rpb must have shape"),
    (lambda: na2d(*_qkv(), 3, additional_keys=torch.zeros(1, 3, 2, 4)), "together"),
    (lambda: na2d(*_qkv(), 3, additional_keys=torch.zeros(1, 3, 2, 5),
                  additional_values=torch.zeros(1, 3, 2, 5)), "additional_keys must have shape"),
    (lambda: na2d(*_qkv(), 3, additional_keys=torch.zeros(1, 3, 2, 4),
                  additional_values=torch.zeros(1, 2, 2, 4)), "additional_values must have"),
    (lambda: na2d(*_qkv()[:2], torch.zeros(1, 8, 8, 2, 4, dtype=torch.float64), 3), "dtype"),
    (lambda: na2d(*(t.long() for t in _qkv()), 3), "floating point"),
    (lambda: na2d(*_qkv(), 4, stride=2, additional_keys=torch.zeros(1, 2, 2, 3, 2, 4),
                  additional_values=torch.zeros(1, 2, 2, 3, 2, 4)), "non-overlapping windows"),
    (lambda: na2d(*_qkv(), 2, stride=2, dilation=2, additional_keys=torch.zeros(1, 2, 2, 3, 2, 4),
                  additional_values=torch.zeros(1, 2, 2, 3, 2, 4)), "non-overlapping windows"),
    (lambda: na2d(*_qkv(), 4, stride=4, additional_keys=torch.zeros(1, 2, 3, 3, 2, 4),
                  additional_values=torch.zeros(1, 2, 3, 3, 2, 4)), "one entry per window"),
    (lambda: na2d(*_qkv(), 4, stride=4, additional_keys=torch.zeros(1, 2, 2, 3, 2, 4),
                  additional_values=torch.zeros(1, 2, 2, 2, 2, 4)), "additional_values must have"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# Whole windows take the reshape path of kernels/blocked.py; it must equal the general gather path.
BLOCKED_CASES = [
    dict(hw=(14, 21), kernel_size=7, stride=7, window_offset=(0, 0)),            # Swin / GC-ViT
    dict(hw=(14, 21), kernel_size=7, stride=7, window_offset=(3, 3)),            # shifted
    dict(hw=(12, 8), kernel_size=(4, 2), stride=(4, 2), window_offset=(0, 1)),   # offset on one axis
    dict(hw=(12, 18), kernel_size=(3, 3), stride=(3, 3), dilation=(4, 6)),       # MaxViT grid
    dict(hw=(12, 10), kernel_size=(12, 2), stride=(12, 2)),                      # CSWin stripes
    dict(hw=(8, 6), kernel_size=2, stride=2, extra=4),                           # global extras
    dict(hw=(8, 6), kernel_size=2, stride=2, per_window=3),                      # FasterViT carriers
]


@pytest.mark.parametrize("case", BLOCKED_CASES, ids=[str(i) for i in range(len(BLOCKED_CASES))])
def test_blocked_path_equals_general_path(case, monkeypatch):
    import zoo.kernels.neighborhood as nb

    case = dict(case)
    (h, w), heads, d = case.pop("hw"), 2, 8
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, h, w, heads, d, dtype=torch.float64, generator=gen, requires_grad=True)
               for _ in range(3))
    ks = case["kernel_size"] if isinstance(case["kernel_size"], tuple) else (case["kernel_size"],) * 2
    rpb = torch.randn(heads, 2 * ks[0] - 1, 2 * ks[1] - 1, dtype=torch.float64, generator=gen,
                      requires_grad=True)
    extras = {}
    if "extra" in case:
        n = case.pop("extra")
        extras = {f"additional_{t}": torch.randn(2, n, heads, d, dtype=torch.float64, generator=gen)
                  for t in ("keys", "values")}
    if "per_window" in case:
        n = case.pop("per_window")
        extras = {f"additional_{t}": torch.randn(2, h // ks[0], w // ks[1], n, heads, d, dtype=torch.float64,
                                                 generator=gen) for t in ("keys", "values")}
    inputs = [q, k, v, rpb]

    def run():
        out = nb.na2d(q, k, v, rpb=rpb, **case, **extras)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype)
                                     .reshape(out.shape)).sum(), inputs)
        return out, grads

    fast, fast_grads = run()
    calls = []
    real_plan = nb.axis_plan
    monkeypatch.setattr(nb, "axis_plan", lambda *a: calls.append(real_plan(*a)) or None)
    monkeypatch.setattr(nb, "use_tiles", lambda *a: False)
    general, general_grads = run()
    assert calls and all(calls), "the case should qualify for the blocked path"
    torch.testing.assert_close(fast, general, atol=1e-10, rtol=0)
    for a, b in zip(fast_grads, general_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("stride, extra", [(1, False), (4, False), (1, True), (4, True)])
def test_fp16_products_above_its_range_do_not_overflow(stride, extra):
    """The scale goes into the queries before q.k, as in timm and the authors' code: unscaled,
    these fp16 products (16 x 70 x 70 = 78400) pass 65504, become inf, and the softmax NaN.
    stride 4 = kernel takes the whole-window path; ``extra`` adds global extra keys."""
    torch.manual_seed(0)
    q = torch.full((1, 8, 8, 2, 16), 70.0)
    v = torch.randn(1, 8, 8, 2, 16)
    kw = dict(additional_keys=q[:, 0, :3], additional_values=v[:, 0, :3]) if extra else {}
    want = na2d(q, q, v, 4, stride, **kw)
    got = na2d(q.half(), q.half(), v.half(), 4, stride, **{k: t.half() for k, t in kw.items()})
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)


def _random_tiled_case(rng):
    """Per-axis arguments of any rule, on small maps, with and without bias and global tokens."""
    case = {"kernel_size": [], "stride": [], "dilation": [], "window_offset": [], "hw": []}
    for _ in range(2):
        length = rng.randint(1, 17)
        dilation = rng.choice([d for d in (1, 1, 2, 3) if d <= length])
        kernel = rng.randint(1, max(1, min(7, length // dilation)))
        offset = rng.choice([None, None, rng.randrange(kernel)])
        stride = kernel if offset is not None else rng.randint(1, kernel)
        for name, val in zip(case, (kernel, stride, dilation, offset, length)):
            case[name].append(val)
    case = {k: tuple(v) for k, v in case.items()}
    return case, rng.random() < 0.7, rng.choice([0, 0, 3])


@pytest.mark.parametrize("seed", range(60))
def test_tiled_path_equals_gather_path(seed, monkeypatch):
    """Sliding windows, strides, dilations and clipped offset grids go by query tiles against
    key regions (kernels/tiled.py); outputs and gradients (q, k, v, bias table, global tokens)
    must equal those of the gather of each query's own keys, in float64."""
    import zoo.kernels.neighborhood as nb

    rng = random.Random(seed)
    case, with_rpb, n_extra = _random_tiled_case(rng)
    (h, w), heads, d = case.pop("hw"), 2, 4
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=gen, requires_grad=True)
    q, k, v = (make(2, h, w, heads, d) for _ in range(3))
    kh, kw = case["kernel_size"]
    inputs, extra = [q, k, v], {}
    if with_rpb:
        extra["rpb"] = make(heads, 2 * kh - 1, 2 * kw - 1)
    if n_extra:
        extra.update(additional_keys=make(2, n_extra, heads, d), additional_values=make(2, n_extra, heads, d))
    inputs += list(extra.values())
    monkeypatch.setattr(nb, "axis_plan", lambda *a: None)  # not the whole-window reshape

    def run():
        out = nb.na2d(q, k, v, **case, **extra)
        weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        return out, torch.autograd.grad((out * weight).sum(), inputs)

    calls = []
    real_tiles = nb.axis_tiles
    monkeypatch.setattr(nb, "axis_tiles", lambda *a: calls.append(1) or real_tiles(*a))
    tiled, tiled_grads = run()
    assert calls, "the case should take the tiled path"
    monkeypatch.setattr(nb, "use_tiles", lambda *a: False)
    gathered, gathered_grads = run()
    torch.testing.assert_close(tiled, gathered, atol=1e-10, rtol=0, msg=lambda m: f"{case}: {m}")
    for name, a, b in zip(["q", "k", "v"] + list(extra), tiled_grads, gathered_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=lambda m: f"{case} grad {name}: {m}")
