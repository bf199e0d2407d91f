"""Speed and memory of generalized neighborhood attention, per family stage shape.

For every family's attention at each stage (feature maps img/4 ... img/32) at 224 and 1024 px,
time the forward and forward+backward and record the peak memory of:
  triton        zoo.kernels.na2d forced to the fused Triton kernel
  reference     zoo.kernels.na2d forced to the plain-PyTorch reference
  flex          torch.compile'd flex_attention with the equivalent block mask (and the bias as a
                score_mod, extra tokens appended to the keys)
  natten        NATTEN's flex-fna backend, compiled (neighborhood cases only: no partition
                offsets or per-window extra tokens, and NATTEN takes no bias table, so it
                runs without one)
  sdpa_dense    scaled_dot_product_attention over all tokens (no mask: the dense cost)
  sdpa_windows  scaled_dot_product_attention over partitioned windows (blocked cases; the map
                padded to a multiple of the window, without bias; FasterViT's carrier tokens
                concatenated to their window's keys, as its authors do)

Every record also holds (CUDA; times from triton.testing.do_bench, memory from the caching
allocator's counters, in MiB):
  fwd_ms        forward under torch.no_grad
  fwd_bwd_ms    forward + backward (inputs and bias tables requiring grad)
  peak_mib      peak allocated during forward + backward, above what was allocated before it
                (the inputs are not counted)
  fwd_peak_mib  peak of a training-mode forward (inputs requiring grad, so what the backward
                needs is kept) counted WITH its inputs: max_memory_allocated during the forward
                minus memory_allocated before it, plus the bytes of q, k, v and the extra tensors
                (bias table, extra keys/values)
  qkvo_mib      bytes of q + k + v + the output (on every device: it is a size)
The issue's memory target compares the two last ones: fwd_peak_mib within 10% of qkvo_mib at
128x128 maps (benchmarks/targets.py checks it).

Usage (GPU):  python benchmarks/bench_na.py [--img 224 1024] [--maps 56 128] [--families nat ...]
              [--methods triton sdpa_dense ...] [--dtype bfloat16] [--out PATH]
Results:      benchmarks/results/na_<gpu>.json (or --out), rewritten after every record, so a run
              killed at a time limit keeps what it measured (meta.complete is false until the
              end); the plot (.png beside it, needs matplotlib) is made at the end.
              benchmarks/targets.py reads one or more of these files and checks the targets.
Check on CPU: python benchmarks/bench_na.py --device cpu --tiny  (tiny maps, one run of each
              method that runs on the CPU, float32, outputs compared with the reference: this
              validates the masks, score_mods and window partitions the GPU run times; with
              TRITON_INTERPRET=1 the Triton kernel runs too, through the interpreter).
Never part of the test run; timings are never assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from zoo.kernels import backend, na2d
from zoo.kernels.neighborhood import axis_window, axis_window_count, axis_window_ids

RESULTS = Path(__file__).resolve().parent / "results"

# heads per stage and head dim of each family's smallest variant; the attention pattern rule.
FAMILIES = {
    "nat": dict(heads=(2, 4, 8, 16), head_dim=32, pattern="sliding"),
    "dinat": dict(heads=(2, 4, 8, 16), head_dim=32, pattern="dilated"),
    "swin": dict(heads=(3, 6, 12, 24), head_dim=32, pattern="shifted"),
    "maxvit_block": dict(heads=(2, 4, 8, 16), head_dim=32, pattern="blocked"),
    "maxvit_grid": dict(heads=(2, 4, 8, 16), head_dim=32, pattern="grid"),
    "cswin": dict(heads=(2, 4, 8, 16), head_dim=32, pattern="stripe"),
    "fastervit": dict(heads=(2, 4, 8, 16), head_dim=32, pattern="carrier"),
}
KERNEL = 7
CSWIN_STRIPES = (1, 2, 7, 7)


def stage_case(pattern: str, stage: int, n: int) -> dict:
    """na2d keyword arguments of one stage whose (square) map is n x n."""
    k = min(KERNEL, n)
    if pattern == "sliding":
        return dict(kernel_size=k, rpb=True)
    if pattern == "dilated":  # DiNAT: the largest dilation the map allows (8, 4, 2, 1 at 224)
        return dict(kernel_size=k, dilation=max(1, n // k), rpb=True)
    if pattern == "shifted":  # Swin: shift half a window where the map is longer than it
        return dict(kernel_size=k, stride=k, window_offset=k // 2 if n > k else 0, rpb=True)
    if pattern == "blocked":
        return dict(kernel_size=k, stride=k, rpb=True)
    if pattern == "grid":
        return dict(kernel_size=k, stride=k, dilation=max(1, n // k), rpb=True)
    if pattern == "stripe":  # CSWin's horizontal half (the vertical half is its transpose)
        sw = min(CSWIN_STRIPES[stage], n)
        return dict(kernel_size=(sw, n), stride=(sw, n), rpb=False, heads_factor=0.5)
    if pattern == "carrier":  # FasterViT's HAT: windows with bias, plus each window's 2 x 2
        return dict(kernel_size=k, stride=k, rpb=True, extra=4, per_window=True)  # carriers
    raise ValueError(pattern)


def pair(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


# ---------------------------------------------------------------------------------------------
# Inputs and methods


def make_inputs(batch, n, heads, head_dim, case, device, dtype):
    kh, kw = pair(case["kernel_size"])
    q, k, v = (torch.randn(batch, n, n, heads, head_dim, device=device, dtype=dtype)
               for _ in range(3))
    extra = {}
    if case.get("rpb"):
        extra["rpb"] = torch.randn(heads, 2 * kh - 1, 2 * kw - 1, device=device) * 0.1
    if case.get("extra"):  # global (B, N, heads, D) or per window (B, nh, nw, N, heads, D)
        windows = ()
        if case.get("per_window"):
            windows = (axis_window_count(n, kh, kh), axis_window_count(n, kw, kw))
        ek, ev = (torch.randn(batch, *windows, case["extra"], heads, head_dim, device=device,
                              dtype=dtype) for _ in range(2))
        extra.update(additional_keys=ek, additional_values=ev)
    return [q, k, v], extra


def flat_extra(t):
    """Extra tokens as one key sequence (B, N_total, heads, D): per-window ones window by window."""
    return t.flatten(1, 3) if t.dim() == 6 else t


def na_kwargs(case):
    return {key: case[key] for key in ("kernel_size", "stride", "dilation", "window_offset")
            if key in case}


def method_na(name):
    def build(qkv, extra, case):
        kw = na_kwargs(case)

        def run(q, k, v, **ex):
            with backend(name):
                return na2d(q, k, v, **kw, **ex)
        return run
    return build


def flex_mask_and_bias(height, width, case, device):
    """mask_mod and score_mod reproducing na2d on a flattened (H*W [+ extra]) key sequence,
    built from the reference's own per-axis tables (which slot of which query holds which key);
    per-window extra tokens (``case["per_window"]``, ``case["extra"]`` per window) are seen by the
    queries of their window only."""
    kernel, stride, dilation = (pair(case.get(k, d)) for k, d in
                                (("kernel_size", 1), ("stride", 1), ("dilation", 1)))
    offset = pair(case.get("window_offset"))
    tables = [axis_window(length, kk, s, d, o, device) for length, kk, s, d, o in
              zip((height, width), kernel, stride, dilation, offset)]
    # allowed[p, key] per axis, and the bias index of each allowed pair
    allowed, bias_idx = [], []
    for t, length in zip(tables, (height, width)):
        a = torch.zeros(length, length, dtype=torch.bool, device=device)
        b = torch.zeros(length, length, dtype=torch.long, device=device)
        rows = torch.arange(length, device=device)[:, None].expand_as(t.key_index)
        a[rows[t.valid], t.key_index[t.valid]] = True
        b[rows[t.valid], t.key_index[t.valid]] = t.bias_index[t.valid]
        allowed.append(a), bias_idx.append(b)
    hw = height * width
    if case.get("per_window"):
        (ids_h, _), (ids_w, windows_w) = (
            axis_window_ids(length, kk, s, d, o, device) for length, kk, s, d, o in
            zip((height, width), kernel, stride, dilation, offset))
        per_window = case["extra"]

    def mask_mod(b, h, q_idx, kv_idx):
        kv = torch.clamp(kv_idx, max=hw - 1)
        inside = allowed[0][q_idx // width, kv // width] & allowed[1][q_idx % width, kv % width]
        extra = kv_idx >= hw  # (kv is clamped to the last map token there: inside means nothing)
        if case.get("per_window"):
            own = ids_h[q_idx // width] * windows_w + ids_w[q_idx % width]
            extra = extra & ((kv_idx - hw) // per_window == own)
        return extra | (inside & ~(kv_idx >= hw))

    def score_mod_for(rpb):
        def score_mod(score, b, h, q_idx, kv_idx):
            kv = torch.clamp(kv_idx, max=hw - 1)
            bias = rpb[h, bias_idx[0][q_idx // width, kv // width],
                       bias_idx[1][q_idx % width, kv % width]]
            return torch.where(kv_idx >= hw, score, score + bias)
        return score_mod
    return mask_mod, score_mod_for


def method_flex(compiled):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    attend = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention

    def build(qkv, extra, case):
        b, height, width, heads, dim = qkv[0].shape
        n_extra = flat_extra(extra["additional_keys"]).shape[1] if "additional_keys" in extra else 0
        device = qkv[0].device
        mask_mod, score_mod_for = flex_mask_and_bias(height, width, case, device)
        kv_len = height * width + n_extra
        block_mask = create_block_mask(mask_mod, None, None, height * width, kv_len,
                                       device=str(device), _compile=compiled)

        def run(q, k, v, rpb=None, additional_keys=None, additional_values=None):
            flat = lambda t: t.reshape(b, -1, heads, dim).transpose(1, 2)
            q_, k_, v_ = flat(q), flat(k), flat(v)
            if additional_keys is not None:
                k_ = torch.cat([k_, flat_extra(additional_keys).transpose(1, 2)], dim=2)
                v_ = torch.cat([v_, flat_extra(additional_values).transpose(1, 2)], dim=2)
            out = attend(q_, k_, v_, score_mod=None if rpb is None else score_mod_for(rpb),
                         block_mask=block_mask)
            return out.transpose(1, 2).reshape(b, height, width, heads, dim)
        return run
    return build


def method_natten(compiled):
    import natten

    def build(qkv, extra, case):
        if case.get("window_offset") not in (None, 0, (0, 0)):
            return None  # partition offsets are not NATTEN windows
        if min(pair(case["kernel_size"])) < 2:
            return None  # NATTEN wants kernels of at least 2
        if case.get("per_window"):
            return None  # NATTEN's extra tokens are global
        kw = na_kwargs(case)
        kw.pop("window_offset", None)

        def run(q, k, v, rpb=None, **ex):  # NATTEN takes no bias table
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return natten.na2d(q, k, v, **kw, **ex, backend="flex-fna",
                                   torch_compile=compiled)
        return run
    return build


def build_sdpa_dense(qkv, extra, case):
    def run(q, k, v, rpb=None, additional_keys=None, additional_values=None):
        b, height, width, heads, dim = q.shape
        flat = lambda t: t.reshape(b, -1, heads, dim).transpose(1, 2)
        k_, v_ = flat(k), flat(v)
        if additional_keys is not None:
            k_ = torch.cat([k_, flat_extra(additional_keys).transpose(1, 2)], dim=2)
            v_ = torch.cat([v_, flat_extra(additional_values).transpose(1, 2)], dim=2)
        out = F.scaled_dot_product_attention(flat(q), k_, v_)
        return out.transpose(1, 2).reshape(b, height, width, heads, dim)
    return run


def build_sdpa_windows(qkv, extra, case):
    """Blocked cases: pad to whole windows, fold windows (and dilation groups) into the batch.
    The cost of window attention; the same windows as na2d only where the map is a multiple of
    the window and there is no shift (``run.exact``): a shifted case would add Swin's roll and
    mask, a padded one attends to the padding where na2d shifts the last window inward."""
    kernel, stride, dilation = (pair(case.get(k, d)) for k, d in
                                (("kernel_size", 1), ("stride", 1), ("dilation", 1)))
    per_window = case.get("per_window")
    if kernel != stride or ("additional_keys" in extra and not per_window):
        return None
    (kh, kw), (dh, dw) = kernel, dilation  # per-window tokens come with dilation 1

    def run(q, k, v, rpb=None, additional_keys=None, additional_values=None):
        b, height, width, heads, dim = q.shape
        ph, pw = -height % (kh * dh), -width % (kw * dw)

        def fold(t):
            t = F.pad(t, (0, 0, 0, 0, 0, pw, 0, ph))
            gh, gw = (height + ph) // (kh * dh), (width + pw) // (kw * dw)
            # (b, gh, kh, dh, gw, kw, dw, heads, dim): window slots kh x kw, groups dh x dw
            t = t.reshape(b, gh, kh, dh, gw, kw, dw, heads, dim)
            t = t.permute(0, 1, 3, 4, 6, 7, 2, 5, 8)
            return t.reshape(-1, heads, kh * kw, dim)

        k_, v_ = fold(k), fold(v)
        if additional_keys is not None:  # (B, nh, nw, N, heads, D), windows in fold's order
            k_, v_ = (torch.cat([t, e.flatten(0, 2).transpose(1, 2)], dim=2) for t, e in
                      ((k_, additional_keys), (v_, additional_values)))
        out = F.scaled_dot_product_attention(fold(q), k_, v_)
        gh, gw = (height + ph) // (kh * dh), (width + pw) // (kw * dw)
        out = out.reshape(b, gh, dh, gw, dw, heads, kh, kw, dim)
        out = out.permute(0, 1, 6, 2, 3, 7, 4, 5, 8).reshape(b, height + ph, width + pw, heads,
                                                             dim)
        return out[:, :height, :width]

    height, width = qkv[0].shape[1:3]
    run.exact = (case.get("window_offset") in (None, 0, (0, 0))
                 and height % (kh * dh) == 0 and width % (kw * dw) == 0)
    return run


def allow_recompiles():
    """torch.compile'd flex_attention (ours and NATTEN's) recompiles for every shape
    (dynamic=False), and dynamo falls back to eager after ``recompile_limit`` (8) compiles of one
    function: eager flex_attention materialises the whole score matrix, and that would be timed
    as "flex" from the ninth shape on. Lift the limit."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "accumulated_recompile_limit"):
        try:
            setattr(cfg, name, max(getattr(cfg, name), 4096))
        except AttributeError:  # older torch: cache_size_limit
            pass


def methods(device):
    cuda = device == "cuda"
    if cuda:
        allow_recompiles()
    out = {"reference": method_na("reference"), "flex": method_flex(compiled=cuda),
           "natten": method_natten(compiled=cuda), "sdpa_dense": build_sdpa_dense,
           "sdpa_windows": build_sdpa_windows}
    from zoo.kernels import triton_na
    if cuda or triton_na.interpreter_active():
        out = {"triton": method_na("triton"), **out}
    return out


# ---------------------------------------------------------------------------------------------
# Measurement


def mib(*tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2 ** 20


def measure(fn, inputs, extra, device, repeats, forward_only=False) -> dict:
    """fwd_ms, fwd_bwd_ms, peak_mib, fwd_peak_mib and qkvo_mib of ``fn(*inputs, **extra)`` (see
    the module docstring); on a CPU one run of each and no memory (None)."""
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


def nominal_map(img: int, stage: int) -> int:
    """The side of a stage's feature map at full size (``--maps`` and targets.py select by it,
    also in --tiny runs, whose maps are shrunk)."""
    return img // 2 ** (stage + 2)


def run(args, add):
    device, dtype = args.device, getattr(torch, args.dtype)
    all_methods = {k: v for k, v in methods(device).items() if k in args.methods}
    for img in args.img:
        batch = args.batch or (8 if img <= 256 else 1)
        for family in args.families:
            spec = FAMILIES[family]
            for stage, heads in enumerate(spec["heads"]):
                n = nominal_map(img, stage)
                if args.maps and n not in args.maps:
                    continue
                case = stage_case(spec["pattern"], stage, n)
                heads = max(1, int(heads * case.pop("heads_factor", 1)))
                dim = spec["head_dim"]
                if args.tiny:  # CPU check: small maps, few heads
                    n, heads, dim, batch = max(min(n // 4, 16), 7), min(heads, 2), 16, 1
                    case = stage_case(spec["pattern"], stage, n)
                    case.pop("heads_factor", None)
                inputs, extra = make_inputs(batch, n, heads, dim, case, device, dtype)
                ref = None
                for name, build in all_methods.items():
                    rec = dict(img=img, family=family, stage=stage, map=n, batch=batch,
                               heads=heads, head_dim=dim, dtype=args.dtype, method=name,
                               case={k: v for k, v in case.items()})
                    ex = {k: v for k, v in extra.items()
                          if not (name in ("natten", "sdpa_dense", "sdpa_windows")
                                  and k == "rpb")}
                    rec["rpb"] = "rpb" in ex
                    try:
                        fn = build(inputs, ex, case)
                        if fn is None:
                            continue
                        if args.tiny:  # validate the construction against the reference
                            out = fn(*inputs, **ex)
                            if ref is None or name == "reference":
                                with backend("reference"):
                                    ref = na2d(*inputs, **na_kwargs(case), **ex)
                                    ref_norpb = na2d(*inputs, **na_kwargs(case), **{
                                        k: v for k, v in extra.items() if k != "rpb"})
                            want = ref if rec["rpb"] or "rpb" not in extra else ref_norpb
                            if name != "sdpa_dense" and getattr(fn, "exact", True):
                                rec["max_err_vs_reference"] = (out - want).abs().max().item()
                        rec.update(measure(fn, inputs, ex, device, args.rep,
                                           forward_only=device == "cpu"
                                           and name in ("flex", "natten")))
                    except torch.OutOfMemoryError:
                        rec["error"] = "out of memory"
                        torch.cuda.empty_cache()
                    except Exception as e:  # keep going: one failing baseline is a result too
                        rec["error"] = f"{type(e).__name__}: {e}"[:300]
                    add(rec)


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
# Options and output, shared by bench_routed.py and tune_triton.py


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
    records = results.records
    errors = [r for r in records if "error" in r]
    bad = [r for r in records if r.get("max_err_vs_reference", 0) > TOLERANCE[args.dtype]]
    print(f"{len(records)} records, {len(errors)} errors, {len(bad)} mismatches"
          + (f" (tolerance {TOLERANCE[args.dtype]:g})" if args.tiny else ""), file=sys.stderr)
    return 1 if args.tiny and (errors or bad) else 0


def main(argv=None):
    p = bench_parser(__doc__)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--methods", nargs="+", default=["triton", "reference", "flex", "natten",
                                                   "sdpa_dense", "sdpa_windows"])
    return run_and_write(p, argv, run, "na")


if __name__ == "__main__":
    sys.exit(main())
