"""The fused Triton generalized neighborhood attention against the reference (zoo.kernels.na2d).

Three runs of the same comparisons:
* On the CPU, through Triton's interpreter, at small shapes: ``test_interpreter_suite`` launches
  this file again with ``TRITON_INTERPRET=1`` (tests/triton_harness.py says why). To see them one by
  one: ``TRITON_INTERPRET=1 python -m pytest tests/test_triton_na.py -m "not gpu"``.
* On a GPU (``@pytest.mark.gpu``, skipped without CUDA), at full model shapes.
* Dispatch, custom-op and torch.compile checks that need neither.
"""

import random
import subprocess
import sys
import zlib

import pytest
import torch

from triton_harness import (compiled_for_sm90, dtype_in_turn, gpu, interpreter_suite,
                            needs_interpreter, not_interpreted, peak_memory)
from zoo.kernels import BACKENDS, backend, na2d, na2d_reference, selected_backend
from zoo.kernels.neighborhood import axis_window_count
from zoo.kernels.triton_common import tf32_matmuls

triton = pytest.importorskip("triton")
triton_na = pytest.importorskip("zoo.kernels.triton_na")

# max |triton - reference| <= TOL * max(1, max |reference|); the reference runs in fp32 on the
# same (rounded) inputs, so half-precision tolerances cover the kernel's own roundings only.
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def pair(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def assert_close(got, want, tol, what):
    err = (got.float() - want.float()).abs().max().item()
    bound = tol * max(1.0, want.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def compare(case, device="cpu", tf32=False):
    """Run one case through both backends; compare the output and every gradient."""
    case = dict(case)
    (batch, height, width, heads, dim), dtype = case.pop("shape"), case.pop("dtype")
    extra, with_rpb, seed = case.pop("extra", 0), case.pop("rpb", True), case.pop("seed", 0)
    per_window = case.pop("per_window", False)
    launch, layout = case.pop("launch", {}), case.pop("layout", "dense")
    kh, kw_ = pair(case["kernel_size"])
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, dt=dtype, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(device=device, dtype=dt)

    inputs = [rand(batch, height, width, heads, dim) for _ in range(3)]
    kw = dict(case)
    if with_rpb:  # the table stays fp32, as under autocast
        inputs.append(rand(heads, 2 * kh - 1, 2 * kw_ - 1, dt=torch.float32))
    if extra:  # global (B, N, heads, D) or per window (B, nh, nw, N, heads, D)
        windows = ()
        if per_window:
            windows = tuple(axis_window_count(n, k, s, d, o) for n, k, s, d, o in zip(
                (height, width), (kh, kw_), pair(case.get("stride", 1)),
                pair(case.get("dilation", 1)), pair(case.get("window_offset"))))
        inputs += [rand(batch, *windows, extra, heads, dim) for _ in range(2)]
    grad_out = rand(batch, height, width, heads, dim)

    def run(tensors, name, **cfg):
        tensors = [t.detach().clone().requires_grad_() for t in tensors]
        args = dict(kw)
        rest = tensors[3:]
        if with_rpb:
            args["rpb"], rest = rest[0], rest[1:]
        if extra:
            args["additional_keys"], args["additional_values"] = rest
        with backend(name), triton_na.launch_config(**cfg):
            out = na2d(*strided(tensors[:3], layout), **args)
        grads = torch.autograd.grad(out, tensors, grad_out.to(out.dtype))
        return out, grads

    out, grads = run(inputs, "triton", **launch)
    assert out.dtype == dtype and all(g.dtype == t.dtype for g, t in zip(grads, inputs))
    ref, ref_grads = run([t.float() for t in inputs], "reference")
    tol = 2e-3 if (tf32 and dtype == torch.float32) else TOL[dtype]
    assert_close(out, ref, tol, "output")
    names = ["query", "key", "value"] + ["rpb"] * with_rpb + ["extra keys", "extra values"][:2 * (extra > 0)]
    for name, got, want in zip(names, grads, ref_grads):
        assert_close(got, want, tol, f"grad of {name}")


def strided(qkv, layout):
    """q, k, v (same values) in the memory layout a model hands over: ``dense``; ``qkv``: views
    unbound from one (B, H, W, 3, heads, D) projection (the kernels read them in place); ``kv``:
    k and v unbound from one tensor, q dense (strides differ: copied); ``heads_first``: q viewed
    from a (B, heads, H, W, D) tensor."""
    if layout == "qkv":
        return torch.stack(qkv, 3).unbind(3)
    if layout == "kv":
        return (qkv[0], *torch.stack(qkv[1:], 3).unbind(3))
    if layout == "heads_first":
        return (qkv[0].permute(0, 3, 1, 2, 4).contiguous().permute(0, 2, 3, 1, 4), *qkv[1:])
    assert layout == "dense", layout
    return qkv


# ---------------------------------------------------------------------------------------------
# Small cases for the interpreter: the named patterns, then seeded random ones over every knob.

SMALL = (1, 9, 11, 2, 16)
NAMED = {
    "sliding": dict(kernel_size=3),
    "sliding_rect_even": dict(kernel_size=(4, 5)),
    "strided": dict(kernel_size=(5, 3), stride=(2, 3)),
    "dilated": dict(kernel_size=3, dilation=(2, 3)),
    "strided_dilated": dict(kernel_size=(3, 5), stride=(2, 4), dilation=(3, 2)),
    "blocked_ragged": dict(kernel_size=4, stride=4),  # 9x11: last window shifted inward
    "grid": dict(kernel_size=(3, 2), stride=(3, 2), dilation=(3, 5)),  # MaxViT grid
    "shifted": dict(kernel_size=(4, 3), stride=(4, 3), window_offset=(2, 1)),  # Swin
    "shifted_dilated": dict(kernel_size=2, stride=2, dilation=(2, 3), window_offset=(1, 1)),
    "shifted_one_axis": dict(kernel_size=(3, 4), stride=(3, 4), window_offset=(None, 2)),
    "stripe_rows": dict(kernel_size=(1, 11), stride=(1, 11)),  # CSWin, kernel 1 on an axis
    "stripe_cols": dict(kernel_size=(9, 2), stride=(9, 2)),
    "kernel_1_sliding": dict(kernel_size=(1, 5)),
    "extra_sliding": dict(kernel_size=3, extra=4),  # FasterViT carrier tokens
    "extra_shifted_many": dict(kernel_size=3, stride=3, window_offset=1, extra=21),
    # per-window extras (FasterViT: window queries see their window's carrier tokens, carrier
    # queries their window's tokens); ragged last tiles, clipped shifted cells, many tokens
    "per_window_ragged": dict(kernel_size=(3, 4), stride=(3, 4), extra=4, per_window=True),
    "per_window_shifted": dict(kernel_size=(4, 3), stride=(4, 3), window_offset=(2, 1), extra=3,
                               per_window=True),
    "per_window_one_axis_shifted": dict(kernel_size=(3, 2), stride=(3, 2),
                                        window_offset=(None, 1), extra=2, per_window=True),
    "per_window_many": dict(kernel_size=2, stride=2, extra=25, per_window=True,
                            shape=(2, 8, 6, 2, 16)),
    "no_rpb": dict(kernel_size=(3, 5), dilation=(2, 1), rpb=False),
    "head_dim_24": dict(kernel_size=3, shape=(1, 7, 8, 1, 24)),
    "head_dim_48_batch_2": dict(kernel_size=(3, 5), shape=(2, 6, 7, 2, 48), extra=2),
    "scale": dict(kernel_size=3, scale=0.3),
    # q, k, v as models pass them: views of one qkv projection, or mixed layouts
    "qkv_views_dilated": dict(kernel_size=3, dilation=(2, 1), layout="qkv", extra=3),
    "qkv_views_per_window": dict(kernel_size=(3, 4), stride=(3, 4), window_offset=(1, 2),
                                 extra=2, per_window=True, layout="qkv"),
    "kv_views_shifted": dict(kernel_size=3, stride=3, window_offset=1, layout="kv"),
    "heads_first_query": dict(kernel_size=(3, 5), layout="heads_first"),
}
NAMED_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_case(seed, per_window=False):
    """A seeded random case over every knob; ``per_window``: non-overlapping windows (no
    dilation) with per-window extra tokens."""
    rng = random.Random(seed)
    height, width = rng.randint(4, 13), rng.randint(4, 13)
    kernel, stride, dilation, offset = [], [], [], []
    modes = ["blocked", "partition", "stripe"] if per_window else [
        "sliding", "sliding", "strided", "blocked", "partition", "stripe"]
    for length in (height, width):
        mode = rng.choice(modes)
        d = rng.choice([1, 1, 1, 2, 3]) if length >= 6 and not per_window else 1
        n = length // d  # the shortest group holds at least this many tokens
        k = rng.randint(1, min(n, 7))
        s, o = 1, None
        if mode == "strided":
            s = rng.randint(1, k)
        elif mode == "blocked":
            s = k
        elif mode == "partition":
            s, o = k, rng.randrange(k)
        elif mode == "stripe":
            k = rng.choice([1, n])
            s = k
            if rng.random() < 0.5:
                o = 0
        kernel.append(k), stride.append(s), dilation.append(d), offset.append(o)
    dtype = rng.choices([torch.float32, torch.float16, torch.bfloat16], [3, 1, 1])[0]
    case = dict(shape=(1, height, width, rng.randint(1, 2), rng.choice([16, 16, 16, 32])),
                dtype=dtype, kernel_size=tuple(kernel), stride=tuple(stride),
                dilation=tuple(dilation), rpb=rng.random() < 0.7,
                extra=rng.choice([0, 0, 0, 1, 3, 17]), seed=seed,
                launch=dict(block_m=rng.choice([16, 32, 64, 64]), block_n=rng.choice([16, 32, 64, 64])))
    if any(o is not None for o in offset):
        case["window_offset"] = tuple(offset)
    if per_window:
        case.update(extra=rng.choice([1, 3, 4, 17]), per_window=True)
    case["layout"] = rng.choice(["dense", "dense", "qkv", "kv"])
    return case


@needs_interpreter
@pytest.mark.parametrize("name,dtype", dtype_in_turn(NAMED, NAMED_DTYPES))
def test_named_cases(name, dtype):
    case = dict(NAMED[name])
    case.setdefault("shape", SMALL)
    # small blocks: several patches per map, so patch borders are crossed (fp32 with the
    # smallest, which cost the interpreter most)
    block = 16 if dtype == torch.float32 else 32
    compare(dict(case, dtype=dtype, seed=zlib.crc32(name.encode()) % 1000,
                 launch=dict(block_m=block, block_n=16)))


@needs_interpreter
def test_qkv_views_reach_the_kernel_uncopied(monkeypatch):
    """Views unbound from one qkv tensor share strides: the kernels read them in place."""
    seen = []
    forward = triton_na._forward
    monkeypatch.setattr(triton_na, "_forward", lambda q, k, v, *a: seen.append(
        (q.data_ptr(), k.stride())) or forward(q, k, v, *a))
    qkv = torch.randn(1, 6, 7, 3, 2, 16)
    q, k, v = qkv.unbind(3)
    with backend("triton"):
        na2d(q, k, v, 3)
        na2d(q.contiguous(), k, v, 3)  # mixed strides: all three go in contiguous
    assert seen == [(q.data_ptr(), k.stride()), (seen[1][0], q.contiguous().stride())]


@needs_interpreter
def test_the_op_itself_lays_out_its_inputs():
    """torch.compile may hand the custom op other strides than the eager wrapper chose."""
    q, k, v = (torch.randn(1, 6, 7, 2, 16) for _ in range(3))
    k_other = k.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    args = (None, None, None, [3, 3], [1, 1], [1, 1], [-1, -1], 0.25)
    assert torch.equal(torch.ops.zoo.na2d_fwd(q, k, v, *args)[0], torch.ops.zoo.na2d_fwd(q, k_other, v, *args)[0])


def huge_batch_views(H, W, heads, dims, seed=0):
    """q, k, v (B=3) unbound from one fp16 qkv-like tensor whose batch items lie 2**30 + 64
    elements apart, so item 2 starts past 2**31: int32 offsets would wrap there. Only what the
    views cover is written; the rest of the 6 GiB is reserved, never touched."""
    step = 2**30 + 64
    store = torch.empty(3 * step, dtype=torch.float16)
    row = sum(dims) * heads
    gen = torch.Generator().manual_seed(seed)
    for b in range(3):
        store[b * step: b * step + H * W * row] = torch.randn(H * W * row, generator=gen).half()
    views, at = [], 0
    for d in dims:
        views.append(store.as_strided((3, H, W, heads, d), (step, W * row, row, d, 1), at))
        at += heads * d
    return [t.requires_grad_() for t in views]


def test_tf32_setting_is_read_through_either_api():
    """Once a program uses torch's fp32_precision API, reading the legacy allow_tf32 raises: the
    kernels' precision choice must read the new one (in a fresh process: global settings)."""
    code = ("import torch\nfrom zoo.kernels.triton_common import tf32_matmuls\nseen = []\n"
            "torch.backends.fp32_precision = 'tf32'; seen.append(tf32_matmuls())\n"
            "torch.backends.fp32_precision = 'ieee'; seen.append(tf32_matmuls())\n"
            "torch.set_float32_matmul_precision('high'); seen.append(tf32_matmuls())\n"
            "print(seen)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "[True, False, True]", out.stdout + out.stderr[-2000:]


@needs_interpreter
def test_batch_offsets_past_2_31_elements():
    q, k, v = huge_batch_views(5, 6, 2, (16, 16, 16))
    rpb = torch.randn(2, 5, 5, requires_grad=True)
    outs = []
    for name in ("triton", "reference"):
        with backend(name):
            out = na2d(q, k, v, 3, rpb=rpb)
        outs.append((out, torch.autograd.grad(out, (q, k, v, rpb), torch.ones_like(out))))
    (out, grads), (ref, ref_grads) = outs
    assert_close(out, ref, TOL[torch.float16], "output")
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_close(g[2], r[2], TOL[torch.float16], f"d{name} of batch item 2")


@needs_interpreter
@pytest.mark.parametrize("seed", range(100))
def test_random_cases(seed):
    compare(random_case(seed))


@needs_interpreter
@pytest.mark.parametrize("seed", range(100, 130))
def test_random_per_window_cases(seed):
    compare(random_case(seed, per_window=True))


# ---------------------------------------------------------------------------------------------
# The interpreter run, launched from the ordinary test process.


test_interpreter_suite = interpreter_suite(__file__, min_passed=len(NAMED) + 130, shards=4)


# ---------------------------------------------------------------------------------------------
# Full model shapes on a GPU.

FULL = (2, 56, 56, 2, 32)
GPU_CASES = {
    "nat_k7": dict(kernel_size=7),
    "dinat_k7_d8": dict(kernel_size=7, dilation=8),
    "dinat_k7_d4_ragged": dict(kernel_size=7, dilation=4, shape=(2, 28, 30, 4, 32)),
    "swin_w7": dict(kernel_size=7, stride=7),
    "swin_w7_shift3": dict(kernel_size=7, stride=7, window_offset=3),
    "maxvit_block": dict(kernel_size=7, stride=7, rpb=True),
    "maxvit_grid": dict(kernel_size=7, stride=7, dilation=8),
    "cswin_stripe_h": dict(kernel_size=(7, 56), stride=(7, 56), rpb=False),
    "cswin_stripe_w": dict(kernel_size=(56, 7), stride=(56, 7), rpb=False),
    "global_extras": dict(kernel_size=7, stride=7, extra=16, shape=(2, 28, 28, 4, 32)),
    "fastervit_window_carriers": dict(kernel_size=7, stride=7, extra=4, per_window=True,
                                      shape=(2, 28, 28, 4, 32)),
    "fastervit_carrier_queries": dict(kernel_size=2, stride=2, extra=49, per_window=True,
                                      shape=(2, 8, 8, 4, 32), rpb=False),
    "strided_gna": dict(kernel_size=(7, 9), stride=(2, 3), dilation=(2, 1)),
    "nat_k7_dim64": dict(kernel_size=7, shape=(1, 28, 28, 4, 64)),
    "nat_k7_dim128": dict(kernel_size=7, shape=(1, 14, 14, 8, 128)),
    "nat_k13_dim96": dict(kernel_size=13, shape=(1, 28, 28, 2, 96)),
}


@pytest.mark.parametrize("dtype", NAMED_DTYPES, ids=str)
@pytest.mark.parametrize("name", GPU_CASES)
@gpu
def test_gpu_full_shapes(name, dtype):
    case = dict(GPU_CASES[name])
    case.setdefault("shape", FULL)
    compare(dict(case, dtype=dtype, seed=1), device="cuda", tf32=tf32_matmuls())


@pytest.mark.parametrize("seed", range(100))
@gpu
def test_gpu_random_cases(seed):
    case = random_case(seed)
    case.pop("launch")  # the GPU's own launch configuration
    compare(case, device="cuda")


@gpu
def test_gpu_qkv_past_2_31_elements():
    """A bf16 qkv projection of 2.2e9 elements (4.4 GB; batch 3600 of 56x56 maps, 2 heads of 32):
    the last batch item's output equals the reference run on that item alone."""
    qkv = torch.randn(3600, 56, 56, 3, 2, 32, device="cuda", dtype=torch.bfloat16)
    assert qkv.numel() > 2**31
    with torch.no_grad():
        out = na2d(*qkv.unbind(3), 7)
        with backend("reference"):
            ref = na2d(*qkv[-1:].unbind(3), 7)
    assert_close(out[-1:], ref, TOL[torch.bfloat16], "last batch item")


@gpu
def test_gpu_auto_dispatch_compile_and_memory():
    q, k, v = (torch.randn(2, 56, 56, 2, 32, device="cuda", dtype=torch.float16,
                           requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 13, 13, device="cuda", requires_grad=True)
    fn = torch.compile(lambda q, k, v, r: na2d(q, k, v, 7, rpb=r), fullgraph=True)

    out, triton_peak = peak_memory(lambda: fn(q, k, v, rpb))  # auto: CUDA -> triton
    with backend("reference"):
        ref, ref_peak = peak_memory(lambda: na2d(q, k, v, 7, rpb=rpb))
    # the reference holds tokens x 49 gathered keys, values and probabilities; triton nothing
    assert triton_peak < ref_peak / 4, (triton_peak, ref_peak)
    assert_close(out, ref, TOL[torch.float16], "compiled output")


# ---------------------------------------------------------------------------------------------
# Dispatch, custom op and torch.compile (no interpreter, no GPU needed).


def _small(device="cpu", dtype=torch.float32, dim=16):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, 9, 11, 2, dim, generator=gen).to(device=device, dtype=dtype)
            for _ in range(3)]


def test_backend_selection(monkeypatch):
    monkeypatch.delenv("ZOO_ATTENTION_BACKEND", raising=False)
    assert selected_backend() == "auto"
    monkeypatch.setenv("ZOO_ATTENTION_BACKEND", "reference")
    assert selected_backend() == "reference"
    with backend("triton"):
        assert selected_backend() == "triton"
        with backend("auto"):
            assert selected_backend() == "auto"
        assert selected_backend() == "triton"
    assert selected_backend() == "reference"
    monkeypatch.setenv("ZOO_ATTENTION_BACKEND", "cuda")
    with pytest.raises(ValueError, match="ZOO_ATTENTION_BACKEND must be one of"):
        na2d(*_small(), 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        with backend("fast"):
            pass


@not_interpreted  # the interpreter accepts CPU tensors
def test_forced_triton_on_cpu_raises():
    with backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        na2d(*_small(), 3)


def test_forced_triton_unsupported_cases_raise():
    with backend("triton"):
        with pytest.raises(RuntimeError, match="head_dim 8"):
            na2d(*_small(dim=8), 3)
        with pytest.raises(RuntimeError, match="float64"):
            na2d(*_small(dtype=torch.float64), 3)


def test_per_window_extra_tokens_are_checked_for_every_backend():
    """The window count of per-window extra tokens is validated before any backend is chosen."""
    q, k, v = (t[:, :4, :6] for t in _small())
    extra = torch.randn(q.shape[0], 2, 3, 3, q.shape[3], q.shape[4])  # 2 x 2 windows, not 2 x 3
    for name in BACKENDS:
        with backend(name), pytest.raises(ValueError, match=r"one entry per window.*\(2, 2\)"):
            na2d(q, k, v, (2, 3), (2, 3), additional_keys=extra, additional_values=extra)
    with pytest.raises(ValueError, match="non-overlapping windows"):
        na2d(q, k, v, 2, 1, additional_keys=extra, additional_values=extra)


def test_triton_supports_rules():
    meta = lambda dim, dtype=torch.float16: torch.empty(1, 4, 4, 1, dim, device="meta",
                                                        dtype=dtype)
    assert "head_dim 8" in triton_na.triton_supports(meta(8))
    assert "head_dim 256" in triton_na.triton_supports(meta(256))
    assert "meta" in triton_na.triton_supports(meta(32))  # a device the kernel cannot run on


def test_patches_are_chosen_by_whole_steps():
    """A program's cost is its steps over partner tokens, each a whole block: a 1 x 2 window over
    an 11 x 3 map takes one 16 x 4 patch (3 steps of 16 keys), not eleven 1 x 64 patches of three
    keys each; a 7 x 7 neighborhood over 56 x 56 takes square 8 x 8 patches (fewest keys)."""
    assert triton_na._patch_shape(64, 16, (11, 3), (1, 2), (1, 2), (None, None)) == (16, 4)
    assert triton_na._patch_shape(64, 64, (56, 56), (7, 7), (1, 1), (None, None)) == (8, 8)


def test_auto_on_cpu_is_the_reference():
    q, k, v = _small()
    rpb = torch.randn(2, 5, 5)
    with backend("auto"):
        out = na2d(q, k, v, 3, rpb=rpb)
    torch.testing.assert_close(out, na2d_reference(q, k, v, 3, rpb=rpb), atol=0, rtol=0)


def test_meta_keeps_reference_flops_and_custom_op_fake_shapes():
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.empty(2, 14, 21, 3, 16, device="meta")
    rpb = torch.empty(3, 13, 13, device="meta")
    extra = torch.empty(2, 5, 3, 16, device="meta")
    with FlopCounterMode(display=False) as counter:
        out = na2d(q, q, q, 7, rpb=rpb, additional_keys=extra, additional_values=extra)
    assert out.shape == q.shape and counter.get_total_flops() == 4 * 2 * 14 * 21 * 3 * 54 * 16

    with backend("triton"):  # forced on meta: the custom op's fake implementation
        assert na2d(q, q, q, 7, rpb=rpb).shape == q.shape
    out, lse = torch.ops.zoo.na2d_fwd(q, q, q, rpb, extra, extra, [7, 7], [1, 1], [1, 1],
                                      [-1, -1], 0.25)
    assert out.shape == q.shape and lse.shape == (2, 3, 14, 21) and lse.dtype == torch.float32
    grads = torch.ops.zoo.na2d_bwd(q, q, q, q, out, lse, rpb, extra, extra, [7, 7], [1, 1],
                                   [1, 1], [-1, -1], 0.25, True)
    assert [g.shape for g in grads] == [q.shape] * 3 + [rpb.shape, extra.shape, extra.shape]


def test_compile_fullgraph_reference():
    q, k, v = (t.requires_grad_() for t in _small())
    rpb = torch.randn(2, 9, 5, requires_grad=True)

    def fn(q, k, v, rpb):
        return na2d(q, k, v, (5, 3), dilation=(1, 2), rpb=rpb)

    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, rpb)
    torch.testing.assert_close(out, fn(q, k, v, rpb), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert rpb.grad is not None


@needs_interpreter
def test_compile_fullgraph_triton_custom_op():
    q, k, v = (t.requires_grad_() for t in _small())
    rpb = torch.randn(2, 5, 5, requires_grad=True)
    torch._dynamo.reset()
    with backend("triton"):
        fn = torch.compile(lambda q, k, v, r: na2d(q, k, v, 3, rpb=r), fullgraph=True,
                           backend="aot_eager")
        out = fn(q, k, v, rpb)
        eager = na2d(q, k, v, 3, rpb=rpb)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert q.grad is not None and rpb.grad is not None


@needs_interpreter
def test_custom_op_opcheck():
    q, k, v = (t.requires_grad_() for t in _small())
    rpb = torch.randn(2, 5, 5, requires_grad=True)
    extra = torch.randn(1, 3, 2, 16, requires_grad=True)
    torch.library.opcheck(torch.ops.zoo.na2d_fwd.default,
                          (q, k, v, rpb, extra, extra, [3, 3], [1, 1], [1, 1], [-1, -1], 0.25))
    # q, k, v viewed from one tensor (read in place): the fake's strides still match the kernel's
    qkv = torch.stack([q.detach(), k.detach(), v.detach()], 3).requires_grad_()
    torch.library.opcheck(torch.ops.zoo.na2d_fwd.default,
                          (*qkv.unbind(3), rpb, extra, extra, [3, 3], [1, 1], [1, 1], [-1, -1],
                           0.25))


# ---------------------------------------------------------------------------------------------
# The interpreter is lenient: compile the real kernels for an H100 (sm_90) without a GPU.


# (dtype, head dim, what the case holds): bf16 at the configs' head dim with every feature of the
# local windows, fp32 (ieee) at a wide non-power-of-two head dim with dilated sliding windows and
# global extra tokens, fp16 views of one qkv tensor at head dim 48 (FasterViT's 40-49 range).
SM90_CASES = {
    "bf16_d32_partition_rpb_window_extras": (torch.bfloat16, 32, dict(
        kernel_size=(7, 5), stride=(7, 5), window_offset=(3, 0), rpb=True, extra="window")),
    "fp32_d96_dilated_global_extras": (torch.float32, 96, dict(
        kernel_size=5, dilation=2, rpb=True, extra="global")),
    "fp16_d48_qkv_strided": (torch.float16, 48, dict(kernel_size=(7, 9), stride=(2, 3), qkv=True)),
}


@pytest.mark.slow
@not_interpreted
@pytest.mark.parametrize("name", SM90_CASES)
def test_kernels_compile_for_sm90(name):
    """Every kernel the op launches, forward and backward, compiles for an H100 through the
    op's own host code (tests/triton_harness.py, compiled_for_sm90)."""
    dtype, dim, case = SM90_CASES[name]
    case = dict(case)
    B, H, W, heads = 2, 14, 15, 2
    if case.pop("qkv", False):
        q, k, v = torch.randn(B, H, W, 3, heads, dim, dtype=dtype).unbind(3)
    else:
        q, k, v = (torch.randn(B, H, W, heads, dim, dtype=dtype) for _ in range(3))
    kernel, stride = pair(case["kernel_size"]), pair(case.get("stride", 1))
    dilation, offset = pair(case.get("dilation", 1)), pair(case.get("window_offset"))
    rpb = torch.randn(heads, 2 * kernel[0] - 1, 2 * kernel[1] - 1) if case.get("rpb") else None
    ak = av = None
    if case.get("extra") == "global":
        ak, av = (torch.randn(B, 4, heads, dim, dtype=dtype) for _ in range(2))
    elif case.get("extra") == "window":
        windows = [axis_window_count(n, kk, s, d, o) for n, kk, s, d, o in
                   zip((H, W), kernel, stride, dilation, offset)]
        ak, av = (torch.randn(B, *windows, 3, heads, dim, dtype=dtype) for _ in range(2))
    with compiled_for_sm90() as compiled:
        out, lse = triton_na._forward(q, k, v, rpb, ak, av, kernel, stride, dilation, offset, 0.2)
        triton_na._backward(torch.randn_like(out), q, k, v, out, lse, rpb, ak, av, kernel, stride,
                            dilation, offset, 0.2, rpb_grad=rpb is not None)
    names = [n for n, _ in compiled]
    expected = ["_na_query_kernel", "_na_query_kernel", "_na_bwd_dkdv_kernel"]
    assert names == expected + ["_na_bwd_extra_kernel"] * (ak is not None), names
    assert all(kernel.asm["cubin"] for _, kernel in compiled)

