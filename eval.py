#!/usr/bin/env python
"""Evaluate a model on an ImageFolder split, or benchmark models side by side.

    python eval.py zoo_nat_demo --checkpoint runs/demo/best --data data/digits
    python eval.py resnet50.a1_in1k --data /data/imagenet            # any timm model, to compare
    python eval.py --bench zoo_nat_tiny zoo_swin_tiny swin_tiny_patch4_window7_224 \\
        --batch-size 64 --img-size 224 --dtype bf16 --out benchmarks/results/throughput.json
"""
import argparse
import json
import sys

from zoo.errors import CheckpointError, ConfigError


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="a zoo_ name / model YAML, or a timm name (several with --bench)")
    p.add_argument("--checkpoint", help="a training checkpoint folder or run directory (zoo), or a weights file")
    p.add_argument("--data", help="ImageFolder root")
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--amp", "--dtype", dest="dtype", choices=["bf16", "fp16"], default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ema", action="store_true", default=None, help="use the EMA weights of the checkpoint")
    p.add_argument("--raw", dest="ema", action="store_false", help="use the raw (non-EMA) weights")
    p.add_argument("--bench", action="store_true", help="throughput and peak memory of each model")
    p.add_argument("--iters", type=positive_int, default=10)
    p.add_argument("--out", help="--bench: JSON file to write (a PNG plot is written beside it)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, merged output)")
    a = p.parse_args(argv)
    try:
        if a.bench:
            from zoo.bench import bench
            bench(a.models, a.batch_size, a.img_size or 224, a.dtype, a.device, iters=a.iters, out=a.out)
            return 0
        if len(a.models) != 1 or not a.data:
            p.error("evaluation takes one model and --data (use --bench for several)")
        from zoo.evaluation import evaluate_folder
        m = evaluate_folder(a.models[0], a.data, a.split, a.checkpoint, a.batch_size, a.workers, a.dtype,
                            a.device, a.ema, a.img_size, progress=not a.no_progress)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps({"model": a.models[0], "split": a.split, **m}))
    else:
        print(f"{a.models[0]} on {a.data}/{a.split} ({m['count']} images): top-1 {m['top1']:.2f}%  "
              f"top-5 {m['top5']:.2f}%  loss {m['loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
