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

import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (bench_parser, errors_recorded, measure, nominal_map,  # noqa: E402
                     run_and_write)

from zoo.kernels import backend, na2d  # noqa: E402
from zoo.kernels.neighborhood import axis_window, axis_window_count, axis_window_ids  # noqa: E402

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
    def build(qkv, extra, case):
        import natten  # here: where it is not installed, its records say so and the rest runs

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
                    with errors_recorded(rec):  # one failing method is a result too
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
                    add(rec)


def main(argv=None):
    p = bench_parser(__doc__)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--methods", nargs="+", default=["triton", "reference", "flex", "natten",
                                                   "sdpa_dense", "sdpa_windows"])
    return run_and_write(p, argv, run, "na")


if __name__ == "__main__":
    sys.exit(main())
