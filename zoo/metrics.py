"""Metrics as JSON lines, and a PNG of the loss and accuracy curves (matplotlib, optional)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import List, Optional

from zoo.snapshot import atomic_write_bytes


class MetricLog:
    def __init__(self, path: Optional[Path]):
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def drop_after(self, update: int) -> None:
        """Forget the records of updates after ``update`` (a run resumed from an older checkpoint)."""
        if self.path is None or not self.path.is_file():
            return
        keep = [r for r in read_jsonl(self.path) if r.get("update", 0) <= update]
        atomic_write_bytes(self.path, "".join(json.dumps(r, default=float) + "\n" for r in keep).encode())

    def write(self, **record) -> None:
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()


def read_jsonl(path) -> List[dict]:
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # a line cut by a crash
    return out


def plot_curves(jsonl, png) -> Optional[Path]:
    """Training loss per logged update and validation loss/accuracy per epoch; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: skipping the training-curve plot "
                      "(pip install 'zoo[plot]')", stacklevel=2)
        return None
    rows = read_jsonl(jsonl)
    train = [r for r in rows if r.get("kind") == "train"]
    val = [r for r in rows if r.get("kind") == "val"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot([r["epoch_float"] for r in train], [r["loss"] for r in train], lw=1, label="train loss")
    if val:
        ax_loss.plot([r["epoch"] + 1 for r in val], [r["loss"] for r in val], "o-", label="val loss")
        ax_acc.plot([r["epoch"] + 1 for r in val], [r["top1"] for r in val], "o-", label="val top-1")
        ax_acc.plot([r["epoch"] + 1 for r in val], [r["top5"] for r in val], "s--", label="val top-5")
        if any("ema_top1" in r for r in val):
            ax_acc.plot([r["epoch"] + 1 for r in val if "ema_top1" in r],
                        [r["ema_top1"] for r in val if "ema_top1" in r], "^-", label="val top-1 (EMA)")
    for ax, label in ((ax_loss, "loss"), (ax_acc, "accuracy (%)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
