"""The fused Triton routed attention against the reference (zoo.kernels.routed_attention).

Same three runs as tests/test_triton_na.py (whose helpers this file reuses):
* On the CPU through Triton's interpreter, at small shapes: ``test_interpreter_suite`` relaunches
  this file with ``TRITON_INTERPRET=1`` (tests/triton_harness.py says why). One by one:
  ``TRITON_INTERPRET=1 python -m pytest tests/test_triton_routed.py -m "not gpu"``.
* On a GPU (``@pytest.mark.gpu``, skipped without CUDA), at BiFormer's shapes.
* Dispatch, reverse index, custom-op and torch.compile checks that need neither.

Repeated indices: the Triton path keeps the reference's gather-then-attend semantics (a region
listed twice counts twice, in the forward and in every gradient), and the random cases list
some regions twice to check it.
"""

import random

import pytest
import torch

from triton_harness import (compiled_for_sm90, dtype_in_turn, gpu, interpreter_suite,
                            needs_interpreter, not_interpreted, peak_memory)
from zoo.kernels import backend, routed_attention, routed_attention_reference
from zoo.kernels.triton_common import tf32_matmuls

triton_routed = pytest.importorskip("zoo.kernels.triton_routed")
from test_triton_na import TOL, assert_close, huge_batch_views, strided  # noqa: E402  (tests/ is on sys.path)


def random_index(batch, regions, topk, gen, repeats=0):
    """(batch, regions, topk) distinct regions per row, then ``repeats`` slots of each row
    overwritten with another slot's region (so those regions are listed twice)."""
    idx = torch.stack([torch.stack([torch.randperm(regions, generator=gen)[:topk]
                                    for _ in range(regions)]) for _ in range(batch)])
    for _ in range(min(repeats, topk - 1)):
        src, dst = torch.randperm(topk, generator=gen)[:2].tolist()
        idx[..., dst] = idx[..., src]
    return idx


def compare(case, device="cpu", tf32=False):
    """Run one case through both backends; compare the output and the q, k, v gradients."""
    case = dict(case)
    batch, grid, region, heads = case["batch"], case["grid"], case["region"], case["heads"]
    dim, v_dim, dtype = case["dim"], case.get("v_dim", case["dim"]), case["dtype"]
    gen = torch.Generator().manual_seed(case.get("seed", 0))
    height, width = grid[0] * region[0], grid[1] * region[1]
    regions = grid[0] * grid[1]

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    inputs = [rand(batch, height, width, heads, dim), rand(batch, height, width, heads, dim),
              rand(batch, height, width, heads, v_dim)]
    index = random_index(batch, regions, case["topk"], gen, case.get("repeats", 0))
    index = index.to(device=device, dtype=case.get("index_dtype", torch.int64))
    grad_out = rand(batch, height, width, heads, v_dim)
    scale = case.get("scale")

    def run(tensors, name, **cfg):
        tensors = [t.detach().clone().requires_grad_() for t in tensors]
        with backend(name), triton_routed.launch_config(**cfg):
            out = routed_attention(*strided(tensors, case.get("layout", "dense")), index, region,
                                   scale=scale)
        return out, torch.autograd.grad(out, tensors, grad_out.to(out.dtype))

    out, grads = run(inputs, "triton", **case.get("launch", {}))
    assert out.dtype == dtype and out.shape == (batch, height, width, heads, v_dim)
    assert all(g.dtype == t.dtype for g, t in zip(grads, inputs))
    ref, ref_grads = run([t.float() for t in inputs], "reference")
    tol = 2e-3 if (tf32 and dtype == torch.float32) else TOL[dtype]
    assert_close(out, ref, tol, "output")
    for name, got, want in zip(("query", "key", "value"), grads, ref_grads):
        assert_close(got, want, tol, f"grad of {name}")


# ---------------------------------------------------------------------------------------------
# Small cases for the interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMED = {
    # grid (regions high, wide), region (rh, rw)
    "square_regions": dict(grid=(3, 3), region=(2, 2), topk=4),
    "non_square_regions": dict(grid=(2, 3), region=(3, 2), topk=3),
    "one_token_regions_dense": dict(grid=(4, 3), region=(1, 1), topk=12),  # every region: dense
    "one_token_regions_top1": dict(grid=(3, 3), region=(1, 1), topk=1),
    "one_region_global": dict(grid=(1, 1), region=(5, 6), topk=1),  # BiFormer's last stage
    "top1": dict(grid=(2, 2), region=(3, 4), topk=1),
    "topk_all": dict(grid=(2, 2), region=(2, 3), topk=4),
    "repeated_index": dict(grid=(2, 3), region=(2, 2), topk=4, repeats=2),
    "region_larger_than_block": dict(grid=(2, 1), region=(5, 5), topk=2),  # 25 > 16 queries
    "value_dim_32": dict(grid=(2, 2), region=(2, 2), topk=2, v_dim=32),
    "head_dim_24_value_dim_40": dict(grid=(2, 2), region=(2, 3), topk=3, dim=24, v_dim=40),
    "batch_2_int32_index": dict(grid=(2, 2), region=(2, 2), topk=2, batch=2,
                                index_dtype=torch.int32),
    "default_scale": dict(grid=(2, 2), region=(2, 2), topk=3, scale=None),
    # q, k, v as BiFormer passes them (views of one qkv projection), and mixed layouts
    "qkv_views": dict(grid=(2, 3), region=(2, 2), topk=3, layout="qkv", batch=2),
    "kv_views": dict(grid=(2, 2), region=(3, 2), topk=2, layout="kv"),
    "heads_first_query": dict(grid=(2, 2), region=(2, 2), topk=2, layout="heads_first"),
}


def named_case(name, dtype):
    case = dict(batch=1, heads=2, dim=16, scale=0.3, dtype=dtype,
                seed=sum(map(ord, name)), launch=dict(block_m=16, block_n=16))
    case.update(NAMED[name])
    return case


def random_case(seed):
    rng = random.Random(seed)
    grid = (rng.randint(1, 4), rng.randint(1, 4))
    region = (rng.randint(1, 5), rng.randint(1, 5))
    while grid[0] * region[0] > 12 or grid[1] * region[1] > 12:  # small maps for the interpreter
        region = (max(1, region[0] - 1), max(1, region[1] - 1))
    regions = grid[0] * grid[1]
    topk = rng.choice([1, rng.randint(1, regions), regions])
    batch = rng.choice([1, 1, 2])
    case = dict(batch=batch, grid=grid, region=region, topk=topk,
                heads=rng.randint(1, 3 - batch),  # batch x heads <= 2: interpreter time
                dim=16, v_dim=rng.choice([16, 16, 16, 32]),
                dtype=rng.choices(DTYPES, [2, 1, 1])[0], scale=rng.choice([None, 0.25, 1.0]),
                repeats=rng.choice([0, 0, 0, 1, 2]) if topk > 1 else 0,
                index_dtype=rng.choice([torch.int64, torch.int32]), seed=seed,
                launch=dict(block_m=rng.choice([16, 32, 64]), block_n=rng.choice([16, 32, 64])))
    # views of one tensor need one shape; a query in another layout takes any value dim
    layout = rng.choice(["dense", "qkv", "kv", "heads_first"])
    case["layout"] = layout if case["v_dim"] == case["dim"] or layout == "heads_first" else "dense"
    return case


@needs_interpreter
@pytest.mark.parametrize("name,dtype", dtype_in_turn(NAMED, DTYPES))
def test_named_cases(name, dtype):
    compare(named_case(name, dtype))


N_RANDOM = 48


@needs_interpreter
@pytest.mark.parametrize("seed", range(N_RANDOM))
def test_random_cases(seed):
    compare(random_case(seed))


def test_random_cases_cover_the_knobs():
    """The seeded cases reach what the brief lists (runs anywhere: it only builds the cases)."""
    cases = [random_case(s) for s in range(N_RANDOM)]
    assert {c["dtype"] for c in cases} == set(DTYPES)
    assert any(c["region"][0] != c["region"][1] for c in cases)
    assert any(c["region"] == (1, 1) for c in cases)
    assert any(c["topk"] == 1 for c in cases) and any(
        c["topk"] == c["grid"][0] * c["grid"][1] > 1 for c in cases)
    assert any(c["repeats"] for c in cases) and any(c["v_dim"] != c["dim"] for c in cases)
    assert any(c["layout"] != "dense" and c["v_dim"] == c["dim"] for c in cases)


@needs_interpreter
def test_the_op_itself_lays_out_its_inputs():
    """torch.compile may hand the custom op other strides than the eager wrapper chose."""
    q, k, v = (torch.randn(1, 4, 6, 2, 16) for _ in range(3))
    k_other = k.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    index = torch.tensor([[[0, 1], [1, 2], [2, 0], [3, 5], [4, 1], [5, 4]]])
    out, _ = torch.ops.zoo.routed_fwd(q, k, v, index, [2, 2], 0.25)
    assert torch.equal(out, torch.ops.zoo.routed_fwd(q, k_other, v, index, [2, 2], 0.25)[0])


@needs_interpreter
def test_batch_offsets_past_2_31_elements():
    """Batch item 2 of q, k and v (value dim 32) starts past 2**31 elements (test_triton_na says how)."""
    q, k, v = huge_batch_views(4, 6, 2, (16, 16, 32))
    index = random_index(3, 6, 2, torch.Generator().manual_seed(1))
    outs = []
    for name in ("triton", "reference"):
        with backend(name):
            out = routed_attention(q, k, v, index, 2)
        outs.append((out, torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    (out, grads), (ref, ref_grads) = outs
    assert_close(out, ref, TOL[torch.float16], "output")
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_close(g[2], r[2], TOL[torch.float16], f"d{name} of batch item 2")


@needs_interpreter
def test_out_of_range_indices_are_ignored():
    """The reference raises on an index outside [0, regions); the Triton path must not read
    outside the tensors: such a slot contributes no keys (documented in triton_routed)."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 4, 6, 2, 16, generator=gen) for _ in range(3))
    index = random_index(1, 6, 3, gen)
    bad = torch.cat([index, torch.full((1, 6, 1), 6), torch.full((1, 6, 1), -1)], dim=-1)
    with backend("triton"):
        out = routed_attention(q, k, v, bad, 2)
    assert_close(out, routed_attention_reference(q, k, v, index, 2), 1e-4, "output")


@needs_interpreter
def test_biformer_mixers_through_triton():
    """The model's own calls (strided q/k/v views, padding to the region grid, BiFormer's
    dim ** -0.5 scale, the global last stage as one region): same outputs and input gradients."""
    from zoo.blocks.biformer import BiLevelRoutingAttention, GlobalLePEAttention

    torch.manual_seed(0)
    for mixer, x in ((BiLevelRoutingAttention(dim=32, heads=2, n_win=3, topk=2),
                      torch.randn(2, 7, 8, 32)),
                     (GlobalLePEAttention(dim=32, heads=2), torch.randn(1, 5, 6, 32))):
        results = []
        for name in ("triton", "reference"):
            leaf = x.clone().requires_grad_()
            with backend(name):
                out = mixer(leaf)
            (grad,) = torch.autograd.grad(out.square().sum(), leaf)
            results.append((out, grad))
        (out, grad), (ref, ref_grad) = results
        assert_close(out, ref, 1e-4, f"{type(mixer).__name__} output")
        assert_close(grad, ref_grad, 1e-4, f"{type(mixer).__name__} input gradient")


# ---------------------------------------------------------------------------------------------
# The interpreter run, launched from the ordinary test process.


test_interpreter_suite = interpreter_suite(__file__, min_passed=len(NAMED) + N_RANDOM, shards=2)


# ---------------------------------------------------------------------------------------------
# BiFormer's shapes on a GPU, batch 2: BiFormer-T at 224 px (a 7x7 grid of regions; heads
# 2/4/8 of head dim 32, top-k 1/4/16; the last stage is one region holding the whole 7x7 map, 8
# heads of 64), BiFormer-B's stage 3 and last stage (head dim 96), a detection-sized padded map
# with non-square regions, and large regions (32x32 tokens, as at high resolution).

GPU_CASES = {
    "tiny_stage1": dict(grid=(7, 7), region=(8, 8), heads=2, dim=32, topk=1),
    "tiny_stage2": dict(grid=(7, 7), region=(4, 4), heads=4, dim=32, topk=4),
    "tiny_stage3": dict(grid=(7, 7), region=(2, 2), heads=8, dim=32, topk=16),
    "tiny_stage4_global": dict(grid=(1, 1), region=(7, 7), heads=8, dim=64, topk=1),
    "base_stage3": dict(grid=(7, 7), region=(2, 2), heads=12, dim=32, topk=16),
    "base_stage4_global_d96": dict(grid=(1, 1), region=(7, 7), heads=8, dim=96, topk=1),
    "padded_det_map": dict(grid=(7, 7), region=(10, 15), heads=2, dim=32, topk=4),
    "large_regions_1024": dict(grid=(8, 8), region=(32, 32), heads=2, dim=32, topk=4),
    "value_dim_differs": dict(grid=(7, 7), region=(4, 4), heads=4, dim=32, v_dim=64, topk=4),
    "head_dim_128": dict(grid=(7, 7), region=(4, 4), heads=2, dim=128, topk=8),
    "repeated_index": dict(grid=(7, 7), region=(4, 4), heads=4, dim=32, topk=8, repeats=3),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", GPU_CASES)
@gpu
def test_gpu_biformer_shapes(name, dtype):
    case = dict(batch=2, dtype=dtype, seed=1, scale=None, **GPU_CASES[name])
    compare(case, device="cuda", tf32=tf32_matmuls())


@pytest.mark.parametrize("seed", range(N_RANDOM))
@gpu
def test_gpu_random_cases(seed):
    case = random_case(seed)
    case.pop("launch")  # the GPU's own launch configuration
    compare(case, device="cuda")


@gpu
def test_gpu_auto_dispatch_compile_and_memory():
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 56, 56, 4, 32, device="cuda", dtype=torch.float16, generator=gen,
                           requires_grad=True) for _ in range(3))
    index = torch.stack([torch.stack([torch.randperm(49, device="cuda")[:16] for _ in range(49)])
                         for _ in range(2)])
    fn = torch.compile(lambda q, k, v, i: routed_attention(q, k, v, i, 8), fullgraph=True)

    out, triton_peak = peak_memory(lambda: fn(q, k, v, index))  # auto: CUDA -> triton
    with backend("reference"):
        ref, ref_peak = peak_memory(lambda: routed_attention(q, k, v, index, 8))
    # the reference holds 16x gathered keys and values, and the probabilities; triton nothing
    assert triton_peak < ref_peak / 4, (triton_peak, ref_peak)
    assert_close(out, ref, TOL[torch.float16], "compiled output")


# ---------------------------------------------------------------------------------------------
# Dispatch, reverse index, custom op and torch.compile (no interpreter, no GPU needed).


def _small(device="cpu", dtype=torch.float32, dim=16, v_dim=None):
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 4, 6, 2, dim, generator=gen).to(device=device, dtype=dtype)
            for _ in range(2))
    v = torch.randn(1, 4, 6, 2, v_dim or dim, generator=gen).to(device=device, dtype=dtype)
    index = random_index(1, 6, 3, gen).to(device)
    return q, k, v, index


def test_reverse_index():
    index = torch.tensor([[[1, 0], [1, 1], [2, 1]],   # region 1 listed twice by query region 1
                          [[0, 2], [2, 0], [0, 7]]])  # 7: out of range (bucket R)
    offsets, sources = triton_routed.reverse_index(index)
    R = 3
    assert offsets.dtype == sources.dtype == torch.int32
    assert offsets.shape == (2 * (R + 1) + 1,) and sources.shape == (index.numel(),)
    lists = {(b, c): sources[offsets[b * (R + 1) + c]:offsets[b * (R + 1) + c + 1]].tolist()
             for b in range(2) for c in range(R + 1)}
    assert lists == {(0, 0): [0], (0, 1): [0, 1, 1, 2], (0, 2): [2], (0, 3): [],
                     (1, 0): [0, 1, 2], (1, 1): [], (1, 2): [0, 1], (1, 3): [2]}


def test_auto_on_cpu_is_the_reference():
    q, k, v, index = _small()
    with backend("auto"):
        out = routed_attention(q, k, v, index, 2, scale=0.4)
    torch.testing.assert_close(out, routed_attention_reference(q, k, v, index, 2, scale=0.4),
                               atol=0, rtol=0)


@not_interpreted  # the interpreter accepts CPU tensors
def test_forced_triton_on_cpu_raises():
    with backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        routed_attention(*_small(), 2)


def test_forced_triton_unsupported_cases_raise_and_auto_falls_back():
    with backend("triton"):
        with pytest.raises(RuntimeError, match="head_dim 8"):
            routed_attention(*_small(dim=8), 2)
        with pytest.raises(RuntimeError, match="value_dim 8"):
            routed_attention(*_small(v_dim=8), 2)
        with pytest.raises(RuntimeError, match="float64"):
            routed_attention(*_small(dtype=torch.float64), 2)
    with backend("triton"), pytest.raises(ValueError, match="tile"):  # validated before dispatch
        routed_attention(*_small(), 3)
    meta = lambda dim, v_dim: triton_routed.triton_supports(
        torch.empty(1, 4, 4, 1, dim, device="meta"), torch.empty(1, 4, 4, 1, v_dim, device="meta"))
    assert "value_dim 256" in meta(32, 256) and "head_dim 8" in meta(8, 32)
    assert "meta" in meta(32, 32)


def test_meta_keeps_reference_flops_and_custom_op_fake_shapes():
    from torch.utils.flop_counter import FlopCounterMode

    b, h, w, heads, d, dv, rh, topk = 2, 8, 12, 3, 16, 24, 4, 2
    q = torch.empty(b, h, w, heads, d, device="meta")
    v = torch.empty(b, h, w, heads, dv, device="meta")
    index = torch.zeros(b, 6, topk, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        out = routed_attention(q, q, v, index, rh)
    assert out.shape == (b, h, w, heads, dv)
    assert counter.get_total_flops() == 2 * b * heads * h * w * topk * rh * rh * (d + dv)

    with backend("triton"):  # forced on meta: the custom op's fake implementation
        assert routed_attention(q, q, v, index, rh).shape == (b, h, w, heads, dv)
    out, lse = torch.ops.zoo.routed_fwd(q, q, v, index.int(), [rh, rh], 0.25)
    assert out.shape == (b, h, w, heads, dv) and lse.shape == (b, heads, h, w)
    assert lse.dtype == torch.float32
    grads = torch.ops.zoo.routed_bwd(out, q, q, v, out, lse, index.int(), [rh, rh], 0.25)
    assert [g.shape for g in grads] == [q.shape, q.shape, v.shape]


def test_compile_fullgraph_reference():
    q, k, v, index = _small()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    fn = lambda q, k, v, i: routed_attention(q, k, v, i, (2, 2))
    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, index)
    torch.testing.assert_close(out, fn(q, k, v, index), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert v.grad is not None


@needs_interpreter
def test_compile_fullgraph_triton_custom_op():
    q, k, v, index = _small()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch._dynamo.reset()
    with backend("triton"):
        fn = torch.compile(lambda q, k, v, i: routed_attention(q, k, v, i, 2), fullgraph=True,
                           backend="aot_eager")
        out = fn(q, k, v, index)
        eager = routed_attention(q, k, v, index, 2)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None


@needs_interpreter
def test_custom_op_opcheck():
    q, k, v, index = _small(v_dim=32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.zoo.routed_fwd.default,
                          (q, k, v, index.int(), [2, 2], 0.25))
    # q, k, v viewed from one tensor (read in place): the fake's strides still match the kernel's
    qkv = torch.stack([q.detach(), k.detach(), q.detach()], 3).requires_grad_()
    torch.library.opcheck(torch.ops.zoo.routed_fwd.default,
                          (*qkv.unbind(3), index.int(), [2, 2], 0.25))


# ---------------------------------------------------------------------------------------------
# The interpreter is lenient: compile the real kernels for an H100 (sm_90) without a GPU.


@pytest.mark.slow
@not_interpreted
@pytest.mark.parametrize("dtype,head_dim,v_dim,tf32", [(torch.bfloat16, 32, 64, False),
                                                       (torch.float32, 128, 96, True)])
def test_kernels_compile_for_sm90(dtype, head_dim, v_dim, tf32, monkeypatch):
    """The forward and backward kernels compile for an H100 through the op's own host code
    (tests/triton_harness.py, compiled_for_sm90); fp32 with TF32 matmuls allowed."""
    from zoo.kernels import triton_common
    monkeypatch.setattr(triton_common, "tf32_matmuls", lambda: tf32)
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 8, 12, 2, head_dim, dtype=dtype) for _ in range(2))
    v = torch.randn(2, 8, 12, 2, v_dim, dtype=dtype)
    index = random_index(2, 6, 3, gen)
    with compiled_for_sm90() as compiled:
        out, lse = triton_routed._forward(q, k, v, index, (4, 4), 0.2)
        triton_routed._backward(torch.randn_like(out), q, k, v, out, lse, index, (4, 4), 0.2)
    assert [n for n, _ in compiled] == ["_routed_query_kernel"] * 2 + ["_routed_bwd_dkdv_kernel"]
    assert all(kernel.asm["cubin"] for _, kernel in compiled)
