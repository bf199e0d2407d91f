"""The evaluation loop (training's validation and eval.py), and eval.py's model loading: a zoo
model with its training checkpoint or weights file, or a timm model."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from zoo import data as zdata
from zoo import distributed as zdist
from zoo import snapshot
from zoo.errors import CheckpointError, DataError
from zoo.models import autocast, build_model, classifiers, is_zoo, resolve_name


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: Optional[str] = None,
             dist: Optional[zdist.Dist] = None, progress: bool = False, desc: str = "eval") -> Dict[str, float]:
    """Top-1, top-5 (top-k for fewer than 5 classes) and mean cross-entropy over the loader."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, top1, top5, count
    it = loader
    if progress:
        from tqdm import tqdm
        it = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
    for images, target in it:
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        sums[0] += F.cross_entropy(logits, target, reduction="sum").item()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(target[:, None])
        sums[1] += hit[:, 0].sum().item()
        sums[2] += hit.any(dim=1).sum().item()
        sums[3] += target.numel()
    if dist is not None:
        zdist.all_reduce_sum(sums, dist)
    model.train(was_training)
    n = max(sums[3].item(), 1.0)
    return {"loss": sums[0].item() / n, "top1": 100.0 * sums[1].item() / n, "top5": 100.0 * sums[2].item() / n,
            "count": int(sums[3].item())}


def format_validation(rec: dict) -> str:
    """A validation record (``epoch`` counted from 0) as the training log prints it."""
    ema = f", EMA top-1 {rec['ema_top1']:.2f}%" if "ema_top1" in rec else ""
    return (f"epoch {rec['epoch'] + 1}: val loss {rec['loss']:.4f}, top-1 {rec['top1']:.2f}%, "
            f"top-5 {rec['top5']:.2f}%{ema}")


def load_for_eval(model: str, checkpoint=None, ema: Optional[bool] = None):
    """(model, data config or None, meta or None) for a zoo name/YAML with an optional checkpoint
    directory, or a timm name (``checkpoint`` may then be a weights file)."""
    model = resolve_name(model)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.is_file() and (ckpt.parent / snapshot.META).is_file():
        # a weights file of a training checkpoint: read it with its checkpoint's metadata
        if ema is None:
            ema = ckpt.name == snapshot.EMA_WEIGHTS
        ckpt = ckpt.parent
    if ckpt is not None and ckpt.is_dir():
        snap = snapshot.resolve(ckpt)
        meta = snapshot.read_meta(snap)
        arch = meta.get("architecture")
        if arch and not model.endswith((".yaml", ".yml")) and arch != model:
            raise CheckpointError(f"{snap}: checkpoint is of {arch!r}, not {model!r}")
        yaml_file = snap / snapshot.MODEL_YAML
        source = str(yaml_file) if yaml_file.is_file() else model
        net = build_model(source, num_classes=meta.get("num_classes"))
        has_ema = (snap / snapshot.EMA_WEIGHTS).is_file()
        if ema and not has_ema:
            raise CheckpointError(f"{snap}: --ema asked for, but the checkpoint has no EMA weights")
        use_ema = (meta.get("best_weights") == snapshot.EMA_WEIGHTS and has_ema) if ema is None else ema
        name = snapshot.EMA_WEIGHTS if use_ema else snapshot.WEIGHTS
        snapshot.load_into(net, snapshot.read_weights(snap, ema=use_ema), snap / name)
        dc = meta.get("data_config")
        return net, ({k: tuple(v) if isinstance(v, list) else v for k, v in dc.items()} if dc else None), meta
    if checkpoint is not None:
        # a weights file: its classifier says how many classes the model has
        from zoo.checkpoint import read_state_dict
        sd = read_state_dict(checkpoint)
        probe = build_model(model, pretrained=False) if not is_zoo(model) else None
        head = classifiers(probe)[0]
        n = sd[f"{head}.weight"].shape[0] if f"{head}.weight" in sd else None
        net = build_model(model, pretrained=True, num_classes=n,
                          pretrained_cfg_overlay=dict(file=str(checkpoint), state_dict=sd, num_classes=n))
        return net, None, None
    if is_zoo(model):
        raise CheckpointError(f"{model}: zoo models have no weights to download; give --checkpoint (a training "
                              f"checkpoint, a run directory or a weights file)")
    return build_model(model, pretrained=True), None, None


def evaluate_folder(model_name: str, root, split: Optional[str] = "val", checkpoint=None, batch_size: int = 64,
                    workers: int = 2, amp: Optional[str] = None, device: str = "auto", ema: Optional[bool] = None,
                    img_size: Optional[int] = None, progress: bool = True) -> Dict[str, float]:
    dev = zdist.pick_device(device)
    model, dcfg, meta = load_for_eval(model_name, checkpoint, ema)
    if dcfg is None:
        dcfg = zdata.data_config(model, img_size)
    elif img_size:
        dcfg["input_size"] = (dcfg["input_size"][0], img_size, img_size)
    ds = zdata.image_folder(root, split, transform=zdata.eval_transform(dcfg))
    classes = zdata.class_names(ds)
    differ = zdata.class_difference(classes, "the folder", meta["classes"], "the checkpoint") \
        if meta and meta.get("classes") else ""
    if differ:
        raise DataError(f"the classes of {Path(root) / (split or '')} differ from those the checkpoint was "
                        f"trained on ({differ}); its outputs would be read as the wrong classes")
    if getattr(model, "num_classes", len(classes)) != len(classes):
        raise DataError(f"{root}/{split} has {len(classes)} classes, the model {model.num_classes} outputs")
    model.to(dev)
    dl = zdata.loader(zdata.SeededDataset(ds, 0), zdata.ShardSampler(len(ds), batch_size), workers,
                      dev.type == "cuda")
    t0 = time.perf_counter()
    out = evaluate(model, dl, dev, amp, progress=progress)
    out["seconds"] = time.perf_counter() - t0
    return out
