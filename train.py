#!/usr/bin/env python
"""Train a zoo (or timm) model from a recipe.

    python train.py configs/train/demo.yaml
    python train.py configs/train/nat_tiny.yaml --set data.root=/data/imagenet --set train.batch_size=512
    torchrun --nproc_per_node 8 train.py configs/train/swin_tiny.yaml --set data.root=/data/imagenet
    python train.py configs/train/demo.yaml --resume            # continue runs/<recipe>/last
    python train.py configs/train/demo.yaml --resume runs/mine  # continue that run, in that directory
"""
import argparse
import os
import sys

from zoo.evaluation import format_validation
from zoo.training import train
from zoo.errors import CheckpointError, ConfigError, DataError, TrainingStopped
from zoo.recipe import load_recipe


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe YAML (configs/train/*.yaml) or a shipped recipe name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe key (value read as YAML); repeatable")
    p.add_argument("--output", help="run directory (default: the run --resume names, else output.dir or "
                                    "runs/<recipe name>); a new run refuses a directory holding checkpoints")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint: a run directory or checkpoint folder "
                        "(no value: the run directory's last checkpoint)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun
    try:
        recipe = load_recipe(a.recipe, a.overrides)
    except ConfigError as e:
        if rank == 0:  # every process reads the same recipe: one says what is wrong with it
            print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        summary = train(recipe, out_dir=a.output, resume=a.resume, progress=False if a.no_progress else None)
    except (ConfigError, CheckpointError, DataError, TrainingStopped, FileNotFoundError) as e:
        print(f"error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr)
        return 1
    if not summary["main"]:  # under torchrun, rank 0 reports
        return 0
    if summary.get("best_checkpoint"):
        val = summary["best_val"]
        print(f"best checkpoint: {summary['best_checkpoint']}" + (f"  ({format_validation(val)})" if val else ""))
    print(f"run directory: {summary['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
