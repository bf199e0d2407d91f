"""Speed and memory of routed (region-to-region) attention at BiFormer's stage shapes.

For BiFormer's attention at each stage (feature maps img/4 ... img/32, padded to a multiple of
the 7x7 region grid as the model does; the last stage is global attention, one region holding the
whole map) at 224 and 1024 px, time the forward and forward+backward and record the peak memory of:
  triton          zoo.kernels.routed_attention forced to the fused Triton kernel
  reference       zoo.kernels.routed_attention forced to the plain-PyTorch reference (gather the
                  top-k regions' keys and values, then einsum / softmax / einsum)
  sdpa_gathered   the same gather, then scaled_dot_product_attention with every query region as a
                  batch item over its topk * rh * rw gathered keys (the gather is timed too: it is
                  part of the cost the fused kernel avoids)
The routing index is random (distinct regions per query region), the same for every method.

Each record holds fwd_ms, fwd_bwd_ms, peak_mib, fwd_peak_mib and qkvo_mib as bench_na.py
defines them (its module docstring).

Usage (GPU):  python benchmarks/bench_routed.py [--img 224 1024] [--maps 56 128] [--variants tiny
              base] [--dtype bfloat16] [--out PATH]
Results:      benchmarks/results/routed_<gpu>.json (or --out), rewritten after every record; the
              plot (.png beside it, needs matplotlib) at the end. benchmarks/targets.py checks the
              targets on it.
Check on CPU: python benchmarks/bench_routed.py --device cpu --tiny  (small maps, one run of each
              method that runs on the CPU, float32, outputs compared with the reference; with
              TRITON_INTERPRET=1 set the Triton kernel runs too, through the interpreter).
Never part of the test run; timings are never assertions.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the shared timing, memory, plot and incremental output code
from harness import (bench_parser, errors_recorded, measure, nominal_map,  # noqa: E402
                     run_and_write)

from zoo.kernels import backend, routed_attention  # noqa: E402
from zoo.kernels.routed import _to_regions, _from_regions  # noqa: E402

# heads per stage, head dim per stage, top-k per stage (None: the global last stage), n_win
VARIANTS = {
    "tiny": dict(heads=(2, 4, 8, 8), head_dim=(32, 32, 32, 64), topk=(1, 4, 16, None), n_win=7),
    "small": dict(heads=(2, 4, 8, 8), head_dim=(32, 32, 32, 64), topk=(1, 4, 16, None), n_win=7),
    "base": dict(heads=(3, 6, 12, 8), head_dim=(32, 32, 32, 96), topk=(1, 4, 16, None), n_win=7),
}


def stage_case(variant: str, stage: int, img: int, tiny: bool) -> dict:
    """Map side, region side, top-k, heads and head dim of one stage."""
    spec = VARIANTS[variant]
    n = img // 2 ** (stage + 2)
    heads, dim, topk, n_win = (spec["heads"][stage], spec["head_dim"][stage],
                               spec["topk"][stage], spec["n_win"])
    if tiny:  # CPU check: a 3x3 region grid of at most 3x3 tokens, few heads, head dim 16
        n_win, heads, dim = 3, min(heads, 2), 16
        n = min(math.ceil(n / 16), 3) * n_win
        topk = None if topk is None else min(topk, n_win * n_win)
    if topk is None:  # the global stage: one region of the whole (unpadded) map
        return dict(map=n, region=n, grid=1, topk=1, heads=heads, head_dim=dim)
    padded = math.ceil(n / n_win) * n_win  # BiFormer pads bottom/right to the region grid
    return dict(map=padded, region=padded // n_win, grid=n_win, topk=min(topk, n_win ** 2),
                heads=heads, head_dim=dim)


def make_inputs(batch, case, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, heads, dim, grid = case["map"], case["heads"], case["head_dim"], case["grid"]
    q, k, v = (torch.randn(batch, n, n, heads, dim, generator=gen).to(device, dtype)
               for _ in range(3))
    regions = grid * grid
    index = torch.rand(batch, regions, regions, generator=gen).topk(case["topk"], -1).indices
    return [q, k, v], index.to(device)


def method_routed(name):
    def build(index, case):
        def run(q, k, v):
            with backend(name):
                return routed_attention(q, k, v, index, case["region"])
        return run
    return build


def build_sdpa_gathered(index, case):
    """Gather the routed regions' keys and values (as the reference does), then SDPA with the
    query regions folded into the batch."""
    r = case["region"]

    def run(q, k, v):
        b, height, width, heads, dim = q.shape
        qr, kr, vr = (_to_regions(t, r, r) for t in (q, k, v))  # (B, R, T, heads, D)
        batch = torch.arange(b, device=q.device)[:, None, None]
        k_sel = kr[batch, index].flatten(2, 3)  # (B, R, topk * T, heads, D)
        v_sel = vr[batch, index].flatten(2, 3)
        fold = lambda t: t.flatten(0, 1).transpose(1, 2)  # (B * R, heads, tokens, D)
        out = F.scaled_dot_product_attention(fold(qr), fold(k_sel), fold(v_sel))
        out = out.transpose(1, 2).reshape(qr.shape[:4] + (v.shape[-1],))
        return _from_regions(out, height, width, r, r)
    return run


def methods(device):
    out = {"reference": method_routed("reference"), "sdpa_gathered": build_sdpa_gathered}
    from zoo.kernels import triton_routed
    if device == "cuda" or triton_routed.interpreter_active():
        out = {"triton": method_routed("triton"), **out}
    return out


def run(args, add):
    device, dtype = args.device, getattr(torch, args.dtype)
    all_methods = {k: v for k, v in methods(device).items() if k in args.methods}
    for img in args.img:
        batch = 1 if args.tiny else (args.batch or (8 if img <= 256 else 1))
        for variant in args.variants:
            for stage in range(4):
                if args.maps and nominal_map(img, stage) not in args.maps:
                    continue
                case = stage_case(variant, stage, img, args.tiny)
                inputs, index = make_inputs(batch, case, device, dtype)
                ref = None
                for name, build in all_methods.items():
                    # ``family`` and ``stage`` are the keys bench_na's plot groups by
                    rec = dict(img=img, family=f"biformer_{variant}", stage=stage, batch=batch,
                               dtype=args.dtype, method=name, **case)
                    with errors_recorded(rec):  # one failing method is a result too
                        fn = build(index, case)
                        if args.tiny:  # validate the construction against the reference
                            out = fn(*inputs)
                            if ref is None:
                                with backend("reference"):
                                    ref = routed_attention(*inputs, index, case["region"])
                            rec["max_err_vs_reference"] = (out.float() - ref.float()).abs().max().item()
                        rec.update(measure(fn, inputs, {}, device, args.rep))
                    add(rec)


def main(argv=None):
    p = bench_parser(__doc__)
    p.add_argument("--variants", nargs="+", default=["tiny", "base"], choices=list(VARIANTS))
    p.add_argument("--methods", nargs="+", default=["triton", "reference", "sdpa_gathered"])
    return run_and_write(p, argv, run, "routed")


if __name__ == "__main__":
    sys.exit(main())
