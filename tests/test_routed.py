"""Tests of the plain-PyTorch routed attention (zoo.kernels.routed_attention).

The witness is a dense (H*W) x (H*W) attention whose mask is built here by plain Python loops
from the definition: query token p may see key token t iff t's region is one of the regions
routed to p's region. Forward and gradients are compared on random cases.
"""
import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from zoo.kernels import routed_attention


def dense_mask(height, width, rh, rw, region_index):
    """(B, HW, HW) bool: allowed[b, p, t]; regions row-major on the (H/rh) x (W/rw) grid."""
    gw = width // rw
    b = region_index.shape[0]
    allowed = torch.zeros(b, height * width, height * width, dtype=torch.bool)
    for n in range(b):
        for py in range(height):
            for px in range(width):
                routed = set(region_index[n, (py // rh) * gw + px // rw].tolist())
                for ty in range(height):
                    for tx in range(width):
                        if (ty // rh) * gw + tx // rw in routed:
                            allowed[n, py * width + px, ty * width + tx] = True
    return allowed


def dense_attention(q, k, v, allowed, scale):
    b, h, w, heads, d = q.shape
    qf, kf, vf = (t.reshape(b, h * w, heads, -1).transpose(1, 2) for t in (q, k, v))
    logits = (qf @ kf.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    out = logits.softmax(-1) @ vf
    return out.transpose(1, 2).reshape(b, h, w, heads, -1)


def random_index(b, regions, topk, gen):
    return torch.stack([torch.stack([torch.randperm(regions, generator=gen)[:topk] for _ in range(regions)])
                        for _ in range(b)])


CASES = [
    # batch, grid_h, grid_w, rh, rw, heads, head_dim, value_dim, topk
    (1, 2, 2, 2, 2, 1, 4, 4, 1),
    (2, 3, 3, 2, 3, 2, 8, 8, 4),
    (1, 2, 4, 3, 2, 3, 5, 7, 3),
    (2, 4, 3, 1, 1, 2, 4, 4, 12),  # one-token regions, every region routed: dense attention
    (1, 1, 1, 4, 5, 2, 8, 8, 1),  # one region: global attention
]


@pytest.mark.parametrize("case", CASES)
def test_matches_dense_masked_attention(case):
    b, gh, gw, rh, rw, heads, d, dv, topk = case
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    h, w = gh * rh, gw * rw
    q = torch.randn(b, h, w, heads, d, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, h, w, heads, d, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, h, w, heads, dv, generator=gen, dtype=torch.float64, requires_grad=True)
    idx = random_index(b, gh * gw, topk, gen)
    scale = random.Random(0).uniform(0.2, 1.0)

    out = routed_attention(q, k, v, idx, (rh, rw), scale=scale)
    ref = dense_attention(q, k, v, dense_mask(h, w, rh, rw, idx), scale)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)

    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_default_scale_int_region_and_int32_index():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 6, 2, 8, generator=gen) for _ in range(3))
    idx = random_index(1, 6, 2, gen)
    out = routed_attention(q, k, v, idx.int(), 2)
    ref = dense_attention(q, k, v, dense_mask(4, 6, 2, 2, idx), 8 ** -0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_index_order_does_not_matter():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 6, 6, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    idx = random_index(2, 9, 4, gen)
    out = routed_attention(q, k, v, idx, 2)
    torch.testing.assert_close(routed_attention(q, k, v, idx.flip(-1), 2), out)


def test_half_precision_runs_and_keeps_dtype():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 4, 2, 8, generator=gen) for _ in range(3))
    idx = random_index(1, 4, 2, gen)
    ref = routed_attention(q, k, v, idx, 2)
    out = routed_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), idx, 2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)


def test_meta_device_counts_matmuls():
    b, h, w, heads, d, rh, topk = 1, 8, 8, 2, 16, 4, 2
    with torch.device("meta"):
        q = k = v = torch.empty(b, h, w, heads, d)
        idx = torch.zeros(b, 4, topk, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            out = routed_attention(q, k, v, idx, rh)
    assert out.shape == (b, h, w, heads, d) and out.device.type == "meta"
    # two matmuls of (HW queries) x (topk * rh*rw keys) x head_dim per head, 2 FLOPs per MAC
    assert counter.get_total_flops() == 2 * 2 * b * heads * h * w * topk * rh * rh * d


@pytest.mark.parametrize("bad, match", [
    (dict(region_size=3), "tile"),
    (dict(region_size=0), "region_size"),
    (dict(region_index=torch.zeros(1, 3, 1, dtype=torch.long)), "region_index"),
    (dict(region_index=torch.zeros(1, 4, 1)), "int64"),
    (dict(region_index=torch.zeros(1, 4, 5, dtype=torch.long)), "topk"),
    (dict(key=torch.zeros(1, 4, 4, 2, 3)), "key"),
    (dict(value=torch.zeros(1, 4, 4, 1, 4)), "value"),
    (dict(query=torch.zeros(4, 4, 2, 4)), "5-D"),
    (dict(region_index=torch.tensor([[[0, -1], [1, 2], [2, 0], [3, 2]]])),
     r"lie in \[0, regions=4\), got values in \[-1, 3\]"),
    (dict(region_index=torch.tensor([[[0, 4], [1, 2], [2, 0], [3, 2]]])), r"lie in \[0, regions=4\)"),
    (dict(query=torch.zeros(1, 4, 4, 2, 4, dtype=torch.long), key=torch.zeros(1, 4, 4, 2, 4, dtype=torch.long),
          value=torch.zeros(1, 4, 4, 2, 4, dtype=torch.long)), "floating point"),
])
def test_bad_arguments(bad, match):
    args = dict(query=torch.zeros(1, 4, 4, 2, 4), key=torch.zeros(1, 4, 4, 2, 4), value=torch.zeros(1, 4, 4, 2, 4),
                region_index=torch.zeros(1, 4, 2, dtype=torch.long), region_size=2)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        routed_attention(**args)


def test_fp16_products_above_its_range_do_not_overflow():
    """As na2d's: the scale goes into the queries first, so fp16 q.k of 78400 never exists."""
    torch.manual_seed(0)
    q = torch.full((1, 8, 8, 2, 16), 70.0)
    v = torch.randn(1, 8, 8, 2, 16)
    index = torch.tensor([[[0, 1], [1, 2], [2, 3], [3, 0]]])
    want = routed_attention(q, q, v, index, 4)
    got = routed_attention(q.half(), q.half(), v.half(), index, 4)
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)
