"""What the benchmarks share: the measurement (time and memory of a forward and a forward+backward),
the options, the results file written after every record, the plot and the exit status of a
``--tiny`` check. Used by bench_na.py, bench_routed.py and tune_triton.py; the fields each record
gets are described in bench_na.py's docstring.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# ---------------------------------------------------------------------------------------------
# Measurement


def mib(*tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2 ** 20


def measure(fn, inputs, extra, device, repeats, forward_only=False) -> dict:
    """fwd_ms, fwd_bwd_ms, peak_mib, fwd_peak_mib and qkvo_mib of ``fn(*inputs, **extra)`` (see
    bench_na.py's docstring); on a CPU one run of each and no memory (None)."""
    leaves = [t.detach().requires_grad_(not forward_only) for t in inputs]
    ex = {k: t.detach().requires_grad_(not forward_only) for k, t in extra.items()}
    grad = torch.randn_like(inputs[0])

    def fwd():
        with torch.no_grad():
            return fn(*leaves, **ex)

    def fwd_bwd():
        out = fn(*leaves, **ex)
        out.backward(grad)
        for t in leaves + list(ex.values()):
            t.grad = None

    if device != "cuda":  # one run each, for the --tiny check (flex has no CPU backward)
        t0 = time.perf_counter()
        out = fwd()
        t1 = time.perf_counter()
        if not forward_only:
            fwd_bwd()
        return dict(fwd_ms=(t1 - t0) * 1e3,
                    fwd_bwd_ms=None if forward_only else (time.perf_counter() - t1) * 1e3,
                    peak_mib=None, fwd_peak_mib=None, qkvo_mib=mib(*inputs[:3], out))
    from triton.testing import do_bench
    fwd_bwd()  # compile / autotune outside the timing
    rec = dict(fwd_ms=do_bench(fwd, rep=repeats), fwd_bwd_ms=do_bench(fwd_bwd, rep=repeats))
    # a training-mode forward (what the backward needs is kept), counted with its inputs
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(*leaves, **ex)
    torch.cuda.synchronize()
    rec["fwd_peak_mib"] = ((torch.cuda.max_memory_allocated() - base) / 2 ** 20
                           + mib(*leaves, *ex.values()))
    rec["qkvo_mib"] = mib(*leaves[:3], out)
    del out
    # forward + backward above what was there before (inputs not counted)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    rec["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return rec


@contextlib.contextmanager
def errors_recorded(rec: dict):
    """Run the block; a failure (out of memory, a config that does not compile or launch, a
    baseline that cannot take the case) becomes ``rec["error"]`` and the sweep goes on: one
    failing method is a result too."""
    try:
        yield
    except torch.OutOfMemoryError:
        rec["error"] = "out of memory"
        torch.cuda.empty_cache()
    except Exception as e:
        rec["error"] = f"{type(e).__name__}: {e}"[:300]


def nominal_map(img: int, stage: int) -> int:
    """The side of a stage's feature map at full size (``--maps`` and targets.py select by it,
    also in --tiny runs, whose maps are shrunk)."""
    return img // 2 ** (stage + 2)


def plot(records, path, title=""):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    ok = [r for r in records if "fwd_bwd_ms" in r and r.get("fwd_bwd_ms")]
    groups = sorted({(r["img"], r["family"]) for r in ok})
    if not groups:
        return
    names = sorted({r["method"] for r in ok})
    color = {name: f"C{i}" for i, name in enumerate(names)}  # one colour per method throughout
    width = 0.8 / len(names)
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 2.6 * len(groups)), squeeze=False)
    for ax, (img, family) in zip(axes[:, 0], groups):
        rows = [r for r in ok if r["img"] == img and r["family"] == family]
        for i, name in enumerate(names):
            pts = sorted((r["stage"], r["fwd_bwd_ms"]) for r in rows if r["method"] == name)
            if pts:
                ax.bar([s + (i - (len(names) - 1) / 2) * width for s, _ in pts],
                       [t for _, t in pts], width=width, color=color[name])
        ax.set_yscale("log")
        ax.set_ylim(bottom=min(r["fwd_bwd_ms"] for r in rows) / 2)  # the smallest bar shows
        ax.set_title(f"{family} @ {img}px: forward+backward (ms){title}")
        ax.set_xticks(range(4), [f"stage {s + 1}" for s in range(4)])
    from matplotlib.patches import Patch
    axes[0, 0].legend([Patch(color=color[n]) for n in names], names, fontsize=7, ncol=len(names))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Options and output


def bench_parser(doc: str, shapes: bool = True) -> argparse.ArgumentParser:
    """The options the benchmarks take; ``shapes``: the image sizes, stage maps and batch the
    stage sweeps of bench_na/bench_routed walk. Each adds what it sweeps and its methods."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 (the targets' dtype); float32 for --device cpu")
    if shapes:
        p.add_argument("--img", type=int, nargs="+", default=[224, 1024])
        p.add_argument("--maps", type=int, nargs="+", default=None,
                       help="only the stages whose map (img / 2**(stage+2)) is one of these")
        p.add_argument("--batch", type=int, default=0, help="0: 8 at 224 px, 1 at 1024 px")
    p.add_argument("--rep", type=int, default=100, help="ms of timing per measurement")
    p.add_argument("--tiny", action="store_true",
                   help="small maps, one run each, outputs checked against the reference")
    p.add_argument("--out", default=None, help="the JSON file (default: benchmarks/results/)")
    return p


# max |output - reference| above which a --tiny record is a mismatch, per dtype
TOLERANCE = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}
# what is printed of each record as it comes (where not None)
SHOWN = ("img", "family", "stage", "map", "region", "topk", "case_name", "config", "method",
         "fwd_ms", "fwd_bwd_ms", "peak_mib", "fwd_peak_mib", "qkvo_mib", "max_err_vs_reference",
         "error")


class Results:
    """The records of one run as JSON ``{"meta": ..., "records": [...]}`` at ``path``, rewritten
    (through a temporary file and a rename, so it is always whole) after every record: a run
    killed at its time limit keeps what it measured. ``meta["complete"]`` is false until
    ``finish``."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta, self.records = path, dict(meta, complete=False), []
        path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    def add(self, rec: dict):
        self.records.append(rec)
        print(json.dumps({k: rec[k] for k in SHOWN if rec.get(k) is not None}), flush=True)
        self.write()

    def write(self):
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(dict(meta=self.meta, records=self.records), indent=1))
        os.replace(tmp, self.path)

    def finish(self):
        self.meta["complete"] = True
        self.write()
        print(f"wrote {self.path} ({len(self.records)} records)")


def device_tag(device: str) -> str:
    return torch.cuda.get_device_name().replace(" ", "_") if device == "cuda" else "cpu_tiny"


def start(p, argv, prefix: str):
    """Parse the options; open ``--out`` or ``benchmarks/results/<prefix>_<device>.json``."""
    args = p.parse_args(argv)
    if args.device == "cpu" and not args.tiny:
        p.error("CPU runs are for checking the construction: add --tiny")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    tag = device_tag(args.device)
    out = Path(args.out) if args.out else RESULTS / f"{prefix}_{tag}.json"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:  # a CPU check of the baselines alone
        triton_version = None
    meta = dict(torch=torch.__version__, triton=triton_version, device=tag, dtype=args.dtype,
                argv=sys.argv[1:] if argv is None else list(argv))
    return args, Results(out, meta)


def run_and_write(p, argv, run, prefix: str) -> int:
    """Parse, ``run(args, results.add)`` (each record written as it comes), then the plot; with
    ``--tiny``, fail if any method erred or disagreed with the reference."""
    args, results = start(p, argv, prefix)
    run(args, results.add)
    results.finish()
    plot(results.records, results.path.with_suffix(".png"))
    return exit_status(results.records, args)


def exit_status(records, args) -> int:
    """Count the records that erred or disagreed with the reference; with ``--tiny``, 1 if any."""
    errors = [r for r in records if "error" in r]
    bad = [r for r in records if r.get("max_err_vs_reference", 0) > TOLERANCE[args.dtype]]
    print(f"{len(records)} records, {len(errors)} errors, {len(bad)} mismatches"
          + (f" (tolerance {TOLERANCE[args.dtype]:g})" if args.tiny else ""), file=sys.stderr)
    return 1 if args.tiny and (errors or bad) else 0
