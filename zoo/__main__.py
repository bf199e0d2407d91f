"""``python -m zoo list``: every registered model, measured beside its reference figures.

``python -m zoo list --markdown`` prints the same table as Markdown (the README's model table).
``python -m zoo forward`` runs one forward pass of every model on a random 224x224 image.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import zoo
from zoo.config import MIN_INPUT


def _rows(names):
    from zoo.config import load_config
    from zoo.measure import measure
    from zoo.registration import REGISTERED
    for name in names:
        cfg = load_config(REGISTERED[name], name=name)
        params, gmacs = measure(name)
        ref, pub = cfg.reference, cfg.reference.get("published", {})
        yield dict(name=name, params=params, ref_params=ref.get("params"), gmacs=gmacs,
                   ref_gmacs=ref.get("gmacs"), pub_params=pub.get("params"), pub_gmacs=pub.get("gmacs"),
                   top1=pub.get("top1"), note=pub.get("note"), source=ref.get("source", ""))


def _fmt(v, spec=""):
    return "-" if v is None else format(v, spec)


def cmd_list(args) -> int:
    """Rows are printed as each model is measured (about 2 s a model on a CPU), so the plain
    table's column widths are fixed in advance: the longest name, and room for a billion
    parameters."""
    names = _matching(args.filter)
    header = ["model", "params", "code params", "GMACs", "code GMACs", "published params / GMACs / top-1"]
    widths = [max(map(len, names + [header[0]])), 13, 13, 7, 10, 0]

    def line(cells):
        if args.markdown:
            return "| " + " | ".join(cells) + " |"
        return "  ".join(x.ljust(w) for x, w in zip(cells, widths))

    print(line(header))
    if args.markdown:
        print("|" + "---|" * len(header))
    for r in _rows(names):
        ok = r["params"] == r["ref_params"] and (r["ref_gmacs"] is None or
                                                  abs(r["gmacs"] - r["ref_gmacs"]) <= 0.03 * r["ref_gmacs"])
        print(line([r["name"], f"{r['params']:,}", _fmt(r["ref_params"], ","), f"{r['gmacs']:.2f}",
                    _fmt(r["ref_gmacs"], ".2f"),
                    f"{_fmt(r['pub_params'])} / {_fmt(r['pub_gmacs'])} / {_fmt(r['top1'])}"
                    + (f" ({r['note']})" if r["note"] else "") + ("" if ok else "  (MISMATCH)")]),
              flush=True)
    return 0


def cmd_forward(args) -> int:
    torch.manual_seed(0)
    x = torch.randn(1, 3, args.size, args.size)
    for name in _matching(args.filter):
        model = zoo.create_model(name).eval()
        t = time.perf_counter()
        with torch.no_grad():
            y = model(x)
        print(f"{name:24s} logits {tuple(y.shape)}  top class {int(y.argmax())}  "
              f"{time.perf_counter() - t:6.2f} s on {x.shape[2]}x{x.shape[3]}", flush=True)
    return 0


def _matching(pattern: str) -> list:
    names = [n for n in zoo.list_models() if pattern in n]
    if not names:
        raise SystemExit(f"python -m zoo: no model name contains {pattern!r} (python -m zoo list shows them)")
    return names


def _image_size(text: str) -> int:
    size = int(text)
    if size < MIN_INPUT:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_INPUT} (the smallest input any zoo model takes)")
    return size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m zoo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pl = sub.add_parser("list", help="every registered model with params and GMACs beside the published figures")
    pl.add_argument("--markdown", action="store_true")
    pl.add_argument("--filter", default="", help="only names containing this")
    pl.set_defaults(fn=cmd_list)
    pf = sub.add_parser("forward", help="one forward pass of every model on a random image")
    pf.add_argument("--size", type=_image_size, default=224)
    pf.add_argument("--filter", default="")
    pf.set_defaults(fn=cmd_forward)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except BrokenPipeError:
        # The reader left (``python -m zoo list | head``): stop quietly. What stdout still
        # buffers goes to /dev/null, or flushing it at exit would fail again (Python's advice).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0


if __name__ == "__main__":
    sys.exit(main())
