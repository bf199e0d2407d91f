"""Sweep the Triton kernels' launch configuration on the issue's target cases.

The kernels take block_m, block_n, num_warps and num_stages from kernels/triton_common.py
``_config``; ``launch_config(...)`` overrides them. For each case below and each config of the
grid (the default, what ``_config`` picks, first), time the forward and forward+backward with the
Triton backend forced (harness.measure: fwd_ms, fwd_bwd_ms and the memory fields), record a
config that fails to compile or to launch with its error, and write the JSON after every record
(harness.Results). At the end, per case: the best config for the forward and for the backward
(fwd_bwd_ms - fwd_ms) beside the default's figures.

Cases (head dim 32, bias tables where the family has them):
  na_56      neighborhood attention, kernel 7, 56x56, batch 8, heads 2 (NAT-Mini stage 1, 224 px)
  na_56_nobias  the same without a bias table (the cost of the bias and its gradient's atomics)
  na_128     the same at 128x128, batch 1, heads 4 (stage 2 at 1024 px)
  swin_56    blocked 7x7 windows (Swin's unshifted blocks), 56x56, batch 8, heads 3
  routed_s3  routed attention at BiFormer-T's stage 3 (bench_routed.stage_case("tiny", 2, 224):
             14x14 map, 7x7 grid of 2x2 regions, top-16), batch 8, heads 8

Usage (GPU):  python benchmarks/tune_triton.py [--cases na_56 ...] [--grid block_m=32,64
              num_stages=2,3] [--rep 100] [--out PATH]   (default grid: block_m, block_n in
              32/64/128, num_warps 4/8, num_stages 1/2/3: 54 configs, each compiled afresh)
Check on CPU: TRITON_INTERPRET=1 python benchmarks/tune_triton.py --device cpu --tiny [--grid
              ...]  (small shapes through the interpreter, a 2x2 grid of 16/32 blocks unless
              --grid says otherwise; each config's output and gradients are compared with the
              reference backend, so a config that computes wrong results is caught).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_na  # noqa: E402
import harness  # noqa: E402
import bench_routed  # noqa: E402

from zoo.kernels import backend, na2d, routed_attention  # noqa: E402
from zoo.kernels.triton_common import _config, launch_config  # noqa: E402

GRID = dict(block_m=(32, 64, 128), block_n=(32, 64, 128), num_warps=(4, 8), num_stages=(1, 2, 3))
TINY_GRID = dict(block_m=(16, 32), block_n=(16, 32), num_warps=(4,), num_stages=(1,))


def na_case(pattern, n, batch, heads, rpb=True):
    def make(tiny, device, dtype):
        m, b, h, dim = (14, 1, 2, 16) if tiny else (n, batch, heads, 32)
        case = dict(bench_na.stage_case(pattern, 0, m), rpb=rpb)
        inputs, extra = bench_na.make_inputs(b, m, h, dim, case, device, dtype)
        kw = bench_na.na_kwargs(case)
        info = dict(map=m, batch=b, heads=h, head_dim=dim, case=case)
        return (lambda q, k, v, **ex: na2d(q, k, v, **kw, **ex)), inputs, extra, info
    return make


def routed_case(variant, stage, img, batch):
    def make(tiny, device, dtype):
        # tiny: at 1024 px bench_routed's shrunk stage has 3x3 regions of 3x3 tokens (at 224,
        # regions of one token)
        case = bench_routed.stage_case(variant, stage, 1024 if tiny else img, tiny)
        b = 1 if tiny else batch
        inputs, index = bench_routed.make_inputs(b, case, device, dtype)
        info = dict(batch=b, **case)
        return (lambda q, k, v: routed_attention(q, k, v, index, case["region"])), inputs, {}, info
    return make


CASES = {
    "na_56": na_case("sliding", 56, 8, 2),
    # the same without a bias table: what the bias read and its gradient's atomics cost
    "na_56_nobias": na_case("sliding", 56, 8, 2, rpb=False),
    "na_128": na_case("sliding", 128, 1, 4),
    "swin_56": na_case("blocked", 56, 8, 3),
    "routed_s3": routed_case("tiny", 2, 224, 8),
}


def configs(grid, default):
    """The default first, then the grid's other configs."""
    keys = list(grid)
    rest = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    return [default] + [c for c in rest if c != default]


def outputs_and_grads(fn, inputs, extra, grad):
    leaves = [t.detach().requires_grad_() for t in inputs]
    ex = {k: t.detach().requires_grad_() for k, t in extra.items()}
    out = fn(*leaves, **ex)
    return [out, *torch.autograd.grad(out, leaves + list(ex.values()), grad)]


def run(args, add):
    device, dtype = args.device, getattr(torch, args.dtype)
    grid = dict(TINY_GRID if args.tiny else GRID)
    for item in args.grid:
        key, _, values = item.partition("=")
        if key not in GRID:
            raise SystemExit(f"--grid {item}: keys are {', '.join(GRID)}")
        grid[key] = tuple(int(v) for v in values.split(","))
    for name in args.cases:
        fn, inputs, extra, info = CASES[name](args.tiny, device, dtype)
        head_dim = max(inputs[0].shape[-1], inputs[2].shape[-1])
        default = {k: _config(inputs[0], head_dim)[k] for k in GRID}
        want = None
        if args.tiny:  # the reference's output and gradients, to catch a config's wrong results
            grad = torch.randn_like(inputs[0])
            with backend("reference"):
                want = outputs_and_grads(fn, inputs, extra, grad)
        for cfg in configs(grid, default):
            rec = dict(case_name=name, config=cfg, default=cfg == default, dtype=args.dtype,
                       method="triton", **info)

            def forced(*a, **kw):
                with backend("triton"), launch_config(**cfg):
                    return fn(*a, **kw)
            with harness.errors_recorded(rec):  # a config that does not compile is a result too
                if want is not None:
                    got = outputs_and_grads(forced, inputs, extra, grad)
                    rec["max_err_vs_reference"] = max(
                        (g.float() - w.float()).abs().max().item() for g, w in zip(got, want))
                rec.update(harness.measure(forced, inputs, extra, device, args.rep))
            add(rec)


def short(cfg):
    return "m{block_m} n{block_n} w{num_warps} s{num_stages}".format(**cfg)


def summary(records, tolerance):
    """Per case: the best config for the forward and for the backward (fwd_bwd - fwd) among those
    that ran and agreed with the reference (where checked), beside the default's figures."""
    lines = []
    for name in dict.fromkeys(r["case_name"] for r in records):
        rows = [r for r in records if r["case_name"] == name]
        failed = [r for r in rows if "error" in r]
        wrong = [r for r in rows if r.get("max_err_vs_reference", 0) > tolerance]
        ok = [r for r in rows if r not in failed and r not in wrong
              and r.get("fwd_bwd_ms") is not None]
        default = next((r for r in ok if r["default"]), None)
        lines.append(f"{name}: {len(rows)} configs, {len(failed)} failed, {len(wrong)} wrong")
        lines += [f"  failed {short(r['config'])}: {r['error'][:90]}" for r in failed[:3]]
        lines += [f"  wrong  {short(r['config'])}: max error {r['max_err_vs_reference']:.2g}"
                  for r in wrong[:3]]
        for what, ms in (("forward", lambda r: r["fwd_ms"]),
                         ("backward", lambda r: r["fwd_bwd_ms"] - r["fwd_ms"])):
            if not ok:
                continue
            best = min(ok, key=ms)
            line = f"  best {what:8s} {ms(best):9.4g} ms ({short(best['config'])})"
            if default is not None:
                line += (f"   default {ms(default):9.4g} ms ({short(default['config'])}): "
                         f"x{ms(default) / ms(best):.2f} the best")
            lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    p = harness.bench_parser(__doc__, shapes=False)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--grid", nargs="*", default=[], metavar="KEY=V1,V2",
                   help="replace the grid's values of a key (block_m, block_n, num_warps, "
                        "num_stages)")
    args, results = harness.start(p, argv, "tune")
    run(args, results.add)
    results.finish()
    print(summary(results.records, harness.TOLERANCE[args.dtype]))
    return harness.exit_status(results.records, args)


if __name__ == "__main__":
    sys.exit(main())
