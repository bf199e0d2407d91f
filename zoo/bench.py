"""Inference throughput and peak memory of zoo and timm models side by side, as JSON and a plot.

A timing is a measurement, never a test assertion. Peak memory is CUDA's max_memory_allocated;
on a CPU it is not measured (null).
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import List, Optional

import torch

from zoo.config import check_positive_int
from zoo.models import AMP_DTYPES, build_model, is_zoo, resolve_name
from zoo.distributed import pick_device


def bench_one(name: str, batch_size: int, img_size: int, dtype: Optional[str], device: torch.device,
              warmup: int = 3, iters: int = 10) -> dict:
    model = build_model(name).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(batch_size, getattr(model, "in_chans", 3), img_size, img_size, device=device)
    ctx = torch.autocast(device.type, dtype=AMP_DTYPES[dtype]) if dtype else torch.autocast(device.type,
                                                                                            enabled=False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad(), ctx:
        for _ in range(warmup):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    del model
    return {"model": name, "source": "zoo" if is_zoo(name) else "timm", "params": params,
            "batch_size": batch_size, "img_size": img_size, "dtype": dtype or "fp32", "device": str(device),
            "images_per_s": batch_size * iters / dt, "ms_per_batch": 1000 * dt / iters, "peak_memory_mb": peak}


def bench(models: List[str], batch_size: int = 32, img_size: int = 224, dtype: Optional[str] = None,
          device: str = "auto", warmup: int = 3, iters: int = 10, out: Optional[str] = None) -> List[dict]:
    """Each model measured in turn; a model that fails (out of memory, an error in its forward)
    gets an error row and the others are still measured and written."""
    models = [models] if isinstance(models, str) else list(models)
    if dtype not in AMP_DTYPES:
        raise ValueError(f"dtype must be one of {[k for k in AMP_DTYPES if k]} or None, got {dtype!r}")
    for key, v in (("batch_size", batch_size), ("img_size", img_size), ("iters", iters)):
        check_positive_int(key, v)
    names = [resolve_name(n) for n in models]  # every name checked before anything is measured
    if out is not None and Path(out).is_dir():
        raise ValueError(f"out: {out} is a directory; give the path of the JSON file to write")
    dev = pick_device(device)
    rows = []
    for name in names:
        try:
            rows.append(bench_one(name, batch_size, img_size, dtype, dev, warmup, iters))
        except torch.cuda.OutOfMemoryError:
            rows.append({"model": name, "error": "out of memory", "batch_size": batch_size, "img_size": img_size})
            torch.cuda.empty_cache()
        except (RuntimeError, ValueError) as e:
            rows.append({"model": name, "error": f"{type(e).__name__}: {e}", "batch_size": batch_size,
                         "img_size": img_size})
        print(json.dumps(rows[-1]))
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"device": str(dev), "torch": torch.__version__, "results": rows}, indent=2))
        plot(rows, out.with_suffix(".png"))
    return rows


def plot(rows: List[dict], png) -> Optional[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: skipping the benchmark plot", stacklevel=2)
        return None
    ok = [r for r in rows if "images_per_s" in r]
    if not ok:
        return None
    mem = any(r["peak_memory_mb"] is not None for r in ok)
    fig, axes = plt.subplots(1, 2 if mem else 1, figsize=(12 if mem else 7, 0.5 * len(ok) + 1.5), squeeze=False)
    names = [r["model"] for r in ok]
    colors = ["tab:blue" if r["source"] == "zoo" else "tab:gray" for r in ok]
    axes[0][0].barh(names, [r["images_per_s"] for r in ok], color=colors)
    axes[0][0].set_xlabel("images / s (blue: zoo, grey: timm)")
    if mem:
        axes[0][1].barh(names, [r["peak_memory_mb"] or 0 for r in ok], color=colors)
        axes[0][1].set_xlabel("peak memory (MiB)")
    r0 = ok[0]
    fig.suptitle(f"batch {r0['batch_size']}, {r0['img_size']}px, {r0['dtype']}, {r0['device']}")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)
