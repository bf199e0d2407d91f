"""Check the performance targets of issue #5 on the results of bench_na.py and bench_routed.py.

    python benchmarks/targets.py RESULT.json [RESULT.json ...] [--out targets.md] [--plots DIR]

Reads any number of result files (na_*.json, routed_*.json; several runs may be merged, e.g. one
at --img 224 and one at --img 1024, or one without the compiled baselines and one with only
them), groups their records by the device and dtype their meta names (a later file's record
replaces an earlier one of the same case and method), writes one combined plot per kind
(neighborhood / routed) and device if matplotlib is installed, and prints (with --out also writes
as Markdown) one table per target, one row per case and baseline:

  1. Neighborhood attention, kernel 7, maps 56x56 and 128x128, head dim 32 (family nat; dinat
     shown and counted apart): triton forward+backward at least 2x faster than flex and than
     natten, and faster than sdpa_dense. (natten runs without the bias table, which it does not
     take; triton and flex run with it.)
  2. Blocked windows with bias (swin, maxvit_block, maxvit_grid): triton forward+backward not
     slower than sdpa_windows (which runs without bias, roll or mask: a lower bound); the forward
     ratio is shown too.
  3. Routed attention (biformer_*): triton forward+backward at least 2x faster than
     sdpa_gathered and than reference (the last stage is global attention; it is marked).
  4. Peak memory at 128x128 maps: triton fwd_peak_mib within 10% of qkvo_mib (ratio <= 1.10;
     definitions in bench_na.py's docstring).

A speed ratio is baseline ms / triton ms (above 1: triton faster). A row whose triton or baseline
record is absent, failed or lacks the figure is "missing", never PASS. Results from the CPU
interpreter check (device cpu_tiny) get no verdict: their timings say nothing about the targets.
Maps are matched by their full-size side img / 2**(stage+2), so the shrunk maps of a --tiny run
still walk every table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, nominal_map, plot  # noqa: E402

CPU = "cpu_tiny"


def load(paths):
    """Sections {(device, dtype): {"records": {key: record}, "metas": [...], "replaced": n}}."""
    sections = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        meta = data["meta"]
        sec = sections.setdefault((meta["device"], meta["dtype"]),
                                  dict(records={}, metas=[], replaced=0))
        sec["metas"].append(dict(meta, file=str(path), n=len(data["records"])))
        for r in data["records"]:
            key = (r["img"], r["family"], r["stage"], r["batch"], r["method"])
            sec["replaced"] += key in sec["records"]
            sec["records"][key] = r
    return sections


def figure(rec, key):
    """rec[key], or None where the record is absent, failed or lacks it."""
    if rec is None or "error" in rec:
        return None
    return rec.get(key)


def why_missing(name, rec, key):
    if rec is None:
        return f"no {name} record"
    if "error" in rec:
        return f"{name}: {rec['error'][:80]}"
    return f"{name}: no {key}"


def verdict(value, ok, device):
    if value is None:
        return "missing"
    if device == CPU:
        return "no verdict (CPU)"
    return "PASS" if ok(value) else "FAIL"


def cases(records):
    """{(img, family, stage, batch): {method: record}}"""
    out = {}
    for (img, family, stage, batch, method), r in records.items():
        out.setdefault((img, family, stage, batch), {})[method] = r
    return dict(sorted(out.items()))


def label(key, methods):
    img, family, stage, batch = key
    any_rec = next(iter(methods.values()))
    n = any_rec["map"]
    extra = ""
    if any_rec.get("grid") == 1:
        extra = ", global"
    elif "topk" in any_rec:
        extra = f", region {any_rec['region']}, top-{any_rec['topk']}"
    return (f"{family} {img}px s{stage + 1} {n}x{n} b{batch} h{any_rec['heads']} "
            f"d{any_rec['head_dim']}{extra}")


def ratio(num, den):
    return None if num is None or den is None or den == 0 else num / den


def speed_rows(groups, device, baselines, note=None):
    """One row per case and (baseline, factor, strict): baseline fwd_bwd / triton fwd_bwd."""
    rows = []
    for key, methods in groups:
        tri = methods.get("triton")
        for base, factor, strict in baselines:
            b = methods.get(base)
            t_ms, b_ms = figure(tri, "fwd_bwd_ms"), figure(b, "fwd_bwd_ms")
            r = ratio(b_ms, t_ms)
            ok = (lambda x, f=factor: x > f) if strict else (lambda x, f=factor: x >= f)
            notes = []
            if t_ms is None:
                notes.append(why_missing("triton", tri, "fwd_bwd_ms"))
            if b_ms is None:
                notes.append(why_missing(base, b, "fwd_bwd_ms"))
            if note:
                notes.append(note(methods, base))
            rows.append(dict(case=label(key, methods), family=key[1], baseline=base,
                             triton=t_ms, other=b_ms, ratio=r,
                             need=(">" if strict else ">=") + f" {factor:g}",
                             result=verdict(r, ok, device), notes="; ".join(n for n in notes if n)))
    return rows


def memory_rows(groups, device, limit=1.10):
    rows = []
    for key, methods in groups:
        tri = methods.get("triton")
        peak, qkvo = figure(tri, "fwd_peak_mib"), figure(tri, "qkvo_mib")
        r = ratio(peak, qkvo)
        notes = [] if peak is not None else [why_missing("triton", tri, "fwd_peak_mib (CUDA only)")]
        if figure(tri, "peak_mib") is not None:
            notes.append(f"fwd+bwd peak above inputs {tri['peak_mib']:.4g} MiB")
        rows.append(dict(case=label(key, methods), family=key[1], baseline="q+k+v+out",
                         triton=peak, other=qkvo, ratio=r, need=f"<= {limit:g}",
                         result=verdict(r, lambda x: x <= limit, device), notes="; ".join(notes)))
    return rows


def fwd_note(methods, base):
    t, b = figure(methods.get("triton"), "fwd_ms"), figure(methods.get(base), "fwd_ms")
    r = ratio(b, t)
    return None if r is None else f"forward: {t:.4g} vs {b:.4g} ms, ratio {r:.3g}"


def targets(records, device):
    """[(title, columns (triton, other), rows, counted families)] for one section."""
    tiny = device == CPU
    groups = list(cases(records).items())

    def rec0(methods):
        return next(iter(methods.values()))

    def nominal(key):
        return nominal_map(key[0], key[2])

    na = [(k, m) for k, m in groups
          if k[1] in ("nat", "dinat") and nominal(k) in (56, 128)
          and rec0(m)["case"].get("kernel_size") == 7 and (tiny or rec0(m)["head_dim"] == 32)]
    blocked = [(k, m) for k, m in groups if k[1] in ("swin", "maxvit_block", "maxvit_grid")]
    routed = [(k, m) for k, m in groups if k[1].startswith("biformer_")]
    mem = [(k, m) for k, m in groups if nominal(k) == 128]
    return [
        ("1. Neighborhood attention (kernel 7, 56x56 and 128x128, head dim 32): triton fwd+bwd "
         ">= 2x flex and natten, faster than sdpa_dense (ratio = baseline ms / triton ms)",
         ("triton ms", "baseline ms"),
         speed_rows(na, device, (("flex", 2, False), ("natten", 2, False),
                                 ("sdpa_dense", 1, True))), ("nat", "dinat")),
        ("2. Blocked windows with bias: triton fwd+bwd not slower than sdpa_windows "
         "(ratio = sdpa_windows ms / triton ms)", ("triton ms", "sdpa_windows ms"),
         speed_rows(blocked, device, (("sdpa_windows", 1, False),), note=fwd_note), None),
        ("3. Routed attention: triton fwd+bwd >= 2x sdpa_gathered and reference "
         "(ratio = baseline ms / triton ms)", ("triton ms", "baseline ms"),
         speed_rows(routed, device, (("sdpa_gathered", 2, False), ("reference", 2, False))),
         None),
        ("4. Peak memory at 128x128 maps: triton training-mode forward peak (inputs included) "
         "within 10% of q+k+v+output (ratio = fwd_peak_mib / qkvo_mib)",
         ("fwd_peak MiB", "qkvo MiB"), memory_rows(mem, device), None),
    ]


def fmt(x):
    return "-" if x is None else f"{x:.4g}"


def table(title, columns, rows, split):
    lines = [f"### {title}", ""]
    if not rows:
        return lines + ["(no relevant records)", ""]
    lines += [f"| case | vs | {columns[0]} | {columns[1]} | ratio | need | result | notes |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['baseline']} | {fmt(r['triton'])} | {fmt(r['other'])} "
                     f"| {fmt(r['ratio'])} | {r['need']} | {r['result']} | {r['notes']} |")
    lines.append("")
    for name, part in ([(f, [r for r in rows if r["family"] == f]) for f in split] if split
                       else [("all", rows)]):
        if part:
            counts = {v: sum(r["result"] == v for r in part) for v in ("PASS", "FAIL", "missing")}
            other = len(part) - sum(counts.values())
            lines.append(f"- {name}: {counts['PASS']} PASS, {counts['FAIL']} FAIL, "
                         f"{counts['missing']} missing" + (f", {other} without verdict"
                                                           if other else ""))
    return lines + [""]


def report(sections):
    lines = ["# Issue #5 targets", ""]
    for (device, dtype), sec in sections.items():
        lines += [f"## Device {device}, dtype {dtype}", ""]
        for m in sec["metas"]:
            state = "complete" if m.get("complete", True) else "INCOMPLETE (killed before the end)"
            lines.append(f"- {m['file']}: {m['n']} records, {state}; torch {m.get('torch')}, "
                         f"triton {m.get('triton', '?')}, argv {' '.join(m.get('argv', []))}")
        if sec["replaced"]:
            lines.append(f"- {sec['replaced']} records replaced by a later file's")
        lines.append("")
        if device == CPU:
            lines += ["**These numbers come from Triton's CPU interpreter on tiny maps: its "
                      "timings say nothing about the targets. No verdicts are given; the tables "
                      "only exercise the code.**", ""]
        for title, columns, rows, split in targets(sec["records"], device):
            lines += table(title, columns, rows, split)
    return "\n".join(lines)


def plots(sections, folder: Path):
    for (device, dtype), sec in sections.items():
        records = list(sec["records"].values())
        for kind, part in (("na", [r for r in records if not r["family"].startswith("biformer")]),
                           ("routed", [r for r in records if r["family"].startswith("biformer")])):
            if part:
                path = folder / f"{kind}_{device}_{dtype}_combined.png"
                plot(part, path, title=f", {device} {dtype}")
                if path.exists():
                    print(f"plot: {path}", file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", help="na_*.json / routed_*.json from the benchmarks")
    p.add_argument("--out", default=None, help="also write the report here (Markdown)")
    p.add_argument("--plots", default=None,
                   help="folder of the combined plots (default: --out's folder, else "
                        "benchmarks/results)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    sections = load(args.results)
    text = report(sections)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    if not args.no_plots:
        folder = Path(args.plots) if args.plots else (Path(args.out).parent if args.out
                                                       else RESULTS)
        folder.mkdir(parents=True, exist_ok=True)
        plots(sections, folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
