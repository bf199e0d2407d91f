"""The training and evaluation loops behind train.py and eval.py, built from timm's parts
(create_transform, Mixup, create_optimizer_v2, create_scheduler_v2, ModelEmaV3, dispatch_clip_grad).
"""
from __future__ import annotations

import contextlib
import math
import os
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
from zoo.errors import CheckpointError, ConfigError, DataError, TrainingStopped
from zoo.metrics import MetricLog, plot_curves
from zoo.recipe import Recipe


# The best validation so far: its metric, epoch, and the update of its checkpoint (``best`` link).
_NO_BEST = {"metric": None, "epoch": None, "update": None}


class NonFiniteLossError(TrainingStopped):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}


# ---------------------------------------------------------------------------------------------- models


def is_zoo(name: str) -> bool:
    return name.startswith("zoo_") or name.endswith((".yaml", ".yml"))


def resolve_name(name: str) -> str:
    """The name ``build_model`` takes for a model YAML, a timm name or a zoo name (also without its
    ``zoo_`` prefix, where timm has no model of that name); ValueError naming the choices if none."""
    import timm
    if name.endswith((".yaml", ".yml")) or timm.is_model(name):
        return name
    if timm.is_model("zoo_" + name):
        return "zoo_" + name
    raise ValueError(f"unknown model {name!r}: a zoo name (python -m zoo list), a model YAML or a timm name")


def build_model(name: str, **kwargs) -> nn.Module:
    """A zoo model (see ``resolve_name``) or any timm model."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    name = resolve_name(name)
    if is_zoo(name):
        from zoo.registration import create_model
        return create_model(name, **kwargs)
    import timm
    return timm.create_model(name, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)


def autocast(device: torch.device, amp: Optional[str]):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


# ---------------------------------------------------------------------------------------------- evaluation


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


# ---------------------------------------------------------------------------------------------- training


def _criterion(recipe: Recipe, mixup_on: bool):
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if mixup_on:
        return SoftTargetCrossEntropy()  # Mixup makes the smoothed soft targets
    if recipe.augment.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=recipe.augment.label_smoothing)
    return nn.CrossEntropyLoss()


def _seed_all(seed: int) -> None:
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def format_validation(rec: dict) -> str:
    """A validation record (``epoch`` counted from 0) as the training log prints it."""
    ema = f", EMA top-1 {rec['ema_top1']:.2f}%" if "ema_top1" in rec else ""
    return (f"epoch {rec['epoch'] + 1}: val loss {rec['loss']:.4f}, top-1 {rec['top1']:.2f}%, "
            f"top-5 {rec['top5']:.2f}%{ema}")


def train(recipe: Recipe, out_dir=None, resume=None, progress: Optional[bool] = None) -> dict:
    """Run a recipe. Returns a summary (final/best metrics, run directory, paths)."""
    from timm.data import Mixup
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, dispatch_clip_grad

    R = recipe
    rt, tr, aug, opt_cfg, sch = R.runtime, R.train, R.augment, R.optimizer, R.schedule
    run_dir = _run_dir(R, out_dir, resume)
    if snapshot.has_checkpoints(run_dir) and not (resume and _snapshot_of(resume, run_dir)):
        raise ConfigError("--output", str(run_dir), "holds the checkpoints of an earlier run, which this run "
                                                    "would prune: pass --resume to continue that run, or another "
                                                    "--output")
    dist = zdist.setup(rt.device, source=(R.file, "runtime.device"))
    device = dist.device
    # SIGTERM (a cluster's preemption notice) asks for a checkpoint at the end of the current
    # update; Ctrl-C stops at once and keeps the last checkpoint.
    terminate = []
    restore = _on_sigterm(lambda: terminate.append(True))
    try:
        if rt.threads:
            torch.set_num_threads(rt.threads)
        elif dist.enabled and device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.world_size))
        if rt.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        show = dist.is_main and (tr.progress if progress is None else progress)
        shares = dist.world_size * tr.accum_steps
        if tr.batch_size % shares:
            raise ConfigError(R.file, "train.batch_size", f"{tr.batch_size} does not split into {dist.world_size} "
                                                          f"processes x {tr.accum_steps} accum_steps")
        micro = tr.batch_size // shares
        if (aug.mixup or aug.cutmix) and micro % 2:
            raise ConfigError(R.file, "train.batch_size", f"mixup/cutmix pair the samples of a micro-batch: "
                                                          f"batch_size / (processes x accum_steps) = {micro} "
                                                          f"must be even")

        # ---- data
        if not R.data.root:
            raise FileNotFoundError("data.root is not set: give an ImageFolder root with train/ and val/ "
                                    "(--set data.root=PATH)")
        train_raw = zdata.image_folder(R.data.root, R.data.train_split)
        val_raw = None
        if R.data.val_split:
            if not (Path(R.data.root) / R.data.val_split).is_dir():
                raise DataError(f"{Path(R.data.root) / R.data.val_split} does not exist: set data.val_split to the "
                                f"validation folder, or to null to train without validation")
            val_raw = zdata.image_folder(R.data.root, R.data.val_split)
        classes = zdata.check_classes(R.data.root, R.data.train_split, train_raw, R.data.val_split, val_raw)
        num_classes = R.model.num_classes or len(classes)
        if num_classes < len(classes):
            raise ConfigError(R.file, "model.num_classes", f"is {num_classes} but {R.data.root} has "
                                                           f"{len(classes)} classes")

        # ---- model (same seed on every rank; DDP also broadcasts rank 0's weights)
        _seed_all(tr.seed)
        overrides = {"num_classes": num_classes, "drop_path_rate": R.model.drop_path_rate,
                     "drop_rate": R.model.drop_rate}
        model_name = R.model_path()
        model = build_model(model_name, **overrides)
        if R.model.pretrained_file:
            load_initial_weights(model, R.model.pretrained_file)
        model_yaml = None
        if hasattr(model, "cfg") and getattr(model.cfg, "raw", None):
            model_yaml = snapshot.model_yaml(model.cfg.raw, {k: v for k, v in overrides.items()})
        architecture = model.pretrained_cfg.get("architecture", model_name) if hasattr(model, "pretrained_cfg") \
            else model_name
        dcfg = zdata.data_config(model, R.data.img_size, R.data.crop_pct, R.data.interpolation, R.data.mean,
                                 R.data.std)
        train_interp = R.data.train_interpolation
        train_set = zdata.SeededDataset(train_raw, tr.seed)
        train_raw.transform = zdata.train_transform(dcfg, aug, train_interp)
        val_set = None
        if val_raw is not None:
            val_raw.transform = zdata.eval_transform(dcfg)
            val_set = zdata.SeededDataset(val_raw, tr.seed)

        if tr.batch_size > len(train_set):
            raise ConfigError(R.file, "train.batch_size", f"{tr.batch_size} is larger than the training set "
                                                          f"({len(train_set)} images)")
        sampler = zdata.UpdateSampler(len(train_set), tr.batch_size, dist.world_size, dist.rank, tr.accum_steps,
                                      tr.seed)
        pin = R.data.pin_memory and device.type == "cuda"
        train_loader = zdata.loader(train_set, sampler, R.data.workers, pin)
        val_loader = None
        if val_set is not None:
            val_loader = zdata.loader(val_set, zdata.ShardSampler(len(val_set), max(micro, 1) * 2, dist.world_size,
                                                                  dist.rank), R.data.workers, pin)

        model.to(device)
        if rt.channels_last:
            model.to(memory_format=torch.channels_last)
        if rt.grad_checkpointing:
            model.set_grad_checkpointing(True)

        # ---- optimisation
        lr = R.lr()
        opt_kwargs = {}
        if opt_cfg.betas is not None:
            opt_kwargs["betas"] = tuple(opt_cfg.betas)
        if opt_cfg.eps is not None:
            opt_kwargs["eps"] = opt_cfg.eps
        optimizer = create_optimizer_v2(model, opt=opt_cfg.name, lr=lr, weight_decay=opt_cfg.weight_decay,
                                        momentum=opt_cfg.momentum, layer_decay=opt_cfg.layer_decay, **opt_kwargs)
        upe = sampler.updates_per_epoch
        warmup_epochs = sch.warmup_epochs if sch.warmup_steps is None else sch.warmup_steps / upe
        scheduler, total_epochs = create_scheduler_v2(
            optimizer, sched=sch.name, num_epochs=tr.epochs, warmup_epochs=warmup_epochs, warmup_lr=sch.warmup_lr,
            min_lr=sch.min_lr, cooldown_epochs=sch.cooldown_epochs, step_on_epochs=sch.step_on == "epoch",
            decay_epochs=sch.decay_epochs or 0, decay_milestones=sch.decay_milestones or (),
            decay_rate=sch.power if sch.name == "poly" and sch.power is not None else sch.decay_rate,  # timm's poly power
            updates_per_epoch=upe)
        scaler = torch.amp.GradScaler(device.type) if rt.amp == "fp16" else None
        ema = ModelEmaV3(model, decay=R.ema.decay, use_warmup=R.ema.warmup) if R.ema.enabled else None

        mixup_on = aug.mixup > 0 or aug.cutmix > 0
        mixup = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob,
                      switch_prob=aug.mixup_switch_prob, mode=aug.mixup_mode,
                      label_smoothing=aug.label_smoothing, num_classes=num_classes) if mixup_on else None
        criterion = _criterion(R, mixup_on)

        # ---- resume
        start_epoch, start_update, num_updates = 0, 0, 0
        best = dict(_NO_BEST)
        if resume:
            snap = snapshot.resolve(run_dir if resume is True or resume == "auto" else resume)
            meta = snapshot.read_meta(snap)
            if meta.get("architecture") != architecture:
                raise CheckpointError(f"{snap}: checkpoint is of {meta.get('architecture')!r}, the recipe trains "
                                      f"{architecture!r}")
            differ = zdata.class_difference(classes, str(Path(R.data.root) / R.data.train_split),
                                            meta.get("classes") or classes, "the checkpoint")
            if differ:
                raise CheckpointError(f"{snap}: the checkpoint was trained on other classes ({differ})")
            state = snapshot.read_train_state(snap)
            changed = _recipe_changes(state.get("recipe"), R.to_dict(), snap)
            snapshot.load_into(model, snapshot.read_weights(snap), snap / snapshot.WEIGHTS)
            if ema is not None:
                if snapshot.EMA_WEIGHTS in meta.get("files", ()) or (snap / snapshot.EMA_WEIGHTS).is_file():
                    # read_weights names the file if it is missing or truncated
                    snapshot.load_into(ema.module, snapshot.read_weights(snap, ema=True), snap / snapshot.EMA_WEIGHTS)
                else:  # EMA switched on at resume: it starts from the resumed weights
                    ema = ModelEmaV3(model, decay=R.ema.decay, use_warmup=R.ema.warmup)
            # The schedule is not restored but rebuilt from this recipe (timm's schedules are functions
            # of the update count): a longer run or a new lr takes effect, and an unchanged recipe
            # gives the same lrs.
            _load_optimizer(optimizer, state["optimizer"], snap / snapshot.STATE)
            try:
                if scaler is not None and state.get("scaler"):
                    scaler.load_state_dict(state["scaler"])
            except (KeyError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"{snap / snapshot.STATE}: gradient scaler state does not fit this "
                                      f"recipe: {e}") from None
            start_epoch, start_update = state["epoch"], state["update_in_epoch"]
            num_updates = state["num_updates"]
            best = {**best, **state.get("best", {})}
            rng = state["rng"][dist.rank] if dist.rank < len(state["rng"]) else state["rng"][0]
            snapshot.set_rng_state(rng)
            best_tag = snapshot.best_up_to(run_dir, snap, best["update"])
            if best_tag is None:  # not in this run directory (pruned, or another run's): the next
                best = dict(_NO_BEST)  # validation names a new one
            if dist.is_main:
                where = f"after update {start_update}/{upe} of epoch {start_epoch + 1}" if start_update else \
                    f"at the end of epoch {start_epoch}"
                print(f"resumed from {snap} {where} ({num_updates} updates done)", file=sys.stderr)
                if changed:
                    print("with recipe changes: " + "; ".join(changed), file=sys.stderr)
                newer = snapshot.continue_from(run_dir, snap, best_tag)
                if newer:
                    print(f"{run_dir}: checkpoints after the resumed one ({', '.join(newer)}) are from a "
                          f"continuation this run replaces: 'last' and 'best' no longer point to them; each is "
                          f"kept until this run has passed its update", file=sys.stderr)
        else:
            # per-rank stream for drop path etc. (rank 0 keeps the plain seed: 1 process == rank 0)
            _seed_all(tr.seed + dist.rank)

        train_model = ddp = model
        if dist.enabled:
            unused = _unused_parameters(model, dcfg["input_size"], device)
            if unused and dist.is_main:
                print(f"{len(unused)} parameters take no part at {dcfg['input_size'][1]}x{dcfg['input_size'][2]} "
                      f"px (e.g. {unused[0]}): DDP looks for unused parameters at every update", file=sys.stderr)
            train_model = ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=bool(unused))
        if rt.compile:
            train_model = torch.compile(train_model)

        log = MetricLog(run_dir / "metrics.jsonl" if dist.is_main else None)
        # On resume, what was logged after the checkpoint is trained again; a fresh run drops what
        # a run killed before its first checkpoint logged.
        log.drop_after(num_updates)
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            import yaml
            (run_dir / "recipe.yaml").write_text(yaml.safe_dump(R.to_dict(), sort_keys=False))
        max_steps = tr.max_steps
        last_val: Dict[str, float] = {}
        stopped = terminated = False

        def save(epoch, update_in_epoch, metrics, is_best=False):
            states = [snapshot.rng_state()]
            if dist.enabled:
                gathered = [None] * dist.world_size
                torch.distributed.all_gather_object(gathered, states[0])
                states = gathered
            if not dist.is_main:
                return
            meta = {"architecture": architecture, "model": R.sections["model"]["name"], "recipe": R.name,
                    "num_classes": num_classes, "classes": classes, "epoch": epoch,
                    "update_in_epoch": update_in_epoch, "num_updates": num_updates, "metrics": metrics,
                    "best": best, "data_config": {k: (list(v) if isinstance(v, tuple) else v)
                                                  for k, v in dcfg.items()},
                    "best_weights": snapshot.EMA_WEIGHTS if (ema is not None and R.ema.select_best)
                    else snapshot.WEIGHTS,
                    "versions": {"torch": torch.__version__, "timm": _timm_version()}}
            train_state = {"optimizer": optimizer.state_dict(), "recipe": R.to_dict(),
                           "scaler": scaler.state_dict() if scaler is not None else None, "epoch": epoch,
                           "update_in_epoch": update_in_epoch, "num_updates": num_updates, "rng": states,
                           "best": best}
            tag = snapshot.tag(num_updates)
            snapshot.save(run_dir, tag, model_state=unwrap(model).state_dict(), meta=meta,
                          model_yaml_text=model_yaml,
                          ema_state=ema.module.state_dict() if ema is not None else None,
                          train_state=train_state, link=("last", "best") if is_best else ("last",),
                          keep_last=R.output.keep_last)

        amp = rt.amp
        done = max_steps is not None and num_updates >= max_steps  # resumed where the last run stopped
        if done and dist.is_main:
            print(f"train.max_steps={max_steps} was reached (update {num_updates}): nothing to train",
                  file=sys.stderr)
        for epoch in range(start_epoch, start_epoch if done else total_epochs):
            first = start_update if epoch == start_epoch else 0
            sampler.set_epoch(epoch, first)
            scheduler.step(epoch)
            scheduler.step_update(num_updates)
            train_model.train()
            bar = None
            if show:
                from tqdm import tqdm
                bar = tqdm(total=upe, initial=first, desc=f"epoch {epoch + 1}/{total_epochs}", dynamic_ncols=True,
                           file=sys.stderr)
            t0, seen, loss_acc = time.perf_counter(), 0, 0.0
            micro_i = 0
            update_in_epoch = first
            for images, target in train_loader:
                images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
                if rt.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                if mixup is not None:
                    images, target = mixup(images, target)
                last_micro = micro_i == tr.accum_steps - 1
                sync = contextlib.nullcontext()
                if dist.enabled and not last_micro:
                    sync = ddp.no_sync()
                with sync:
                    with autocast(device, amp):
                        out = train_model(images)
                        loss = criterion(out, target)
                    scaled = loss / tr.accum_steps
                    if scaler is not None:
                        scaler.scale(scaled).backward()
                    else:
                        scaled.backward()
                loss_acc += loss.detach().float().item() / tr.accum_steps
                micro_i += 1
                seen += images.shape[0]
                if not last_micro:
                    continue
                micro_i = 0
                # every rank must agree before anyone steps; the logged loss is the mean over ranks
                flag = torch.tensor([0.0 if math.isfinite(loss_acc) else 1.0, loss_acc, float(bool(terminate))])
                flag = zdist.all_reduce_sum(flag, dist).tolist()
                loss_acc = flag[1] / dist.world_size
                if flag[0] > 0:
                    if bar is not None:
                        bar.close()
                    raise NonFiniteLossError(
                        f"loss is {loss_acc} at epoch {epoch + 1}, update {num_updates + 1}: stopping. "
                        f"Last good checkpoint: {_last_good(run_dir)} (lower optimizer.lr, set optimizer.clip_grad, "
                        f"or try runtime.amp=bf16 instead of fp16)")
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if opt_cfg.clip_grad is not None:
                    dispatch_clip_grad(model.parameters(), opt_cfg.clip_grad, mode=opt_cfg.clip_mode)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                num_updates += 1
                update_in_epoch += 1
                if ema is not None:
                    ema.update(model, step=num_updates)
                scheduler.step_update(num_updates)
                cur_lr = optimizer.param_groups[0]["lr"]
                ips = seen * dist.world_size / max(time.perf_counter() - t0, 1e-9)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_acc:.4f}", lr=f"{cur_lr:.2e}", img_s=f"{ips:.0f}")
                if num_updates % tr.log_every == 0 or update_in_epoch == upe:
                    log.write(kind="train", epoch=epoch, update=num_updates,
                              epoch_float=epoch + update_in_epoch / upe, loss=loss_acc, lr=cur_lr,
                              images_per_s=ips)
                    if dist.is_main and bar is None:  # without a progress bar, a line per log entry
                        print(f"epoch {epoch + 1}/{total_epochs} update {update_in_epoch}/{upe}: loss "
                              f"{loss_acc:.4f}  lr {cur_lr:.2e}  {ips:.0f} img/s", file=sys.stderr)
                loss_acc = 0.0
                if flag[2] > 0:  # SIGTERM on some rank: checkpoint this update, then stop
                    stopped = terminated = True
                    break
                if max_steps is not None and num_updates >= max_steps:
                    stopped = True
                    break
                if tr.save_every_steps and num_updates % tr.save_every_steps == 0 and update_in_epoch < upe:
                    save(epoch, update_in_epoch, last_val)
            if bar is not None:
                bar.close()
            if stopped and update_in_epoch < upe:
                save(epoch, update_in_epoch, last_val)
                break
            # ---- end of epoch
            is_best = False
            evaluate_now = val_loader is not None and ((epoch + 1) % tr.eval_every == 0 or epoch + 1 == total_epochs
                                                       or stopped)
            if evaluate_now:
                m = evaluate(model, val_loader, device, amp, dist)
                rec = {"kind": "val", "epoch": epoch, "update": num_updates, **m}
                key = m["top1"]
                if ema is not None:
                    me = evaluate(ema.module, val_loader, device, amp, dist)
                    rec.update({f"ema_{k}": v for k, v in me.items()})
                    if R.ema.select_best:
                        key = me["top1"]
                log.write(**rec)
                last_val = {k: v for k, v in rec.items() if k != "kind"}
                is_best = best["metric"] is None or key > best["metric"]
                if dist.is_main:
                    print(format_validation(rec), file=sys.stderr)
            elif val_loader is None:
                key, is_best = None, True  # without validation the newest is the best we know
            if is_best:
                best = {"metric": key, "epoch": epoch, "update": num_updates}
            save(epoch + 1, 0, last_val, is_best=is_best)
            if stopped:
                break

        plot = None
        if dist.is_main and R.output.plot:
            plot = plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
        zdist.barrier(dist)
        if terminated:
            raise TrainingStopped(f"stopped by SIGTERM after update {num_updates}, which is saved: "
                                  f"{_last_good(run_dir)} (continue with --resume)")
        best_dir = (run_dir / "best").resolve() if (run_dir / "best").exists() else None
        return {"run_dir": str(run_dir), "main": dist.is_main, "num_updates": num_updates, "last": last_val,
                "best": best,
                "plot": str(plot) if plot else None,
                "best_checkpoint": str(best_dir) if best_dir else None,
                # what was measured when the best checkpoint was saved (empty without validation)
                "best_val": snapshot.read_meta(best_dir).get("metrics", {}) if best_dir else {}}
    except FileNotFoundError:
        raise  # data that is not there: said before anything ran
    except (KeyboardInterrupt, OSError) as e:  # Ctrl-C, a full disk: what survives is the last checkpoint
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
        raise TrainingStopped(f"{what}. Last good checkpoint: {_last_good(run_dir)} (continue with --resume)") from e
    finally:
        restore()
        zdist.cleanup(dist)


def _unused_parameters(model: nn.Module, input_size, device: torch.device) -> list:
    """The trainable parameters that take no part in the output at this input size (FasterViT's
    carrier tokens on a map of one window): DDP must be told, or it waits for their gradients.
    Found by one backward pass at batch 1 in eval mode, under a forked RNG (resume stays exact)."""
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model(torch.zeros(1, *input_size, device=device)).float().sum().backward()
        return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def _on_sigterm(callback):
    """Call ``callback`` on SIGTERM (main thread only); returns what puts the old handler back."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = signal.signal(signal.SIGTERM, lambda signum, frame: callback())
    return lambda: signal.signal(signal.SIGTERM, old)


def _last_good(run_dir: Path) -> str:
    p = run_dir / "last"
    return str(p.resolve()) if p.exists() else "none (no checkpoint was written yet)"


def _snapshot_of(resume, run_dir: Path) -> bool:
    """Whether ``--resume`` continues a checkpoint of ``run_dir`` (rather than another run's)."""
    return resume in (True, "auto") or snapshot.in_run(snapshot.resolve(resume), run_dir)


def _run_dir(R: Recipe, out_dir, resume) -> Path:
    """--output, else the run that --resume names, else output.dir or runs/<recipe name>."""
    if out_dir:
        return Path(out_dir)
    if resume not in (None, True, "auto"):
        snap = snapshot.resolve(resume)
        if snap.parent.name == "checkpoints":  # <run>/checkpoints/<tag>
            return snap.parent.parent
    return Path(R.output.dir or Path("runs") / R.name)


# Recipe keys a resumed run must keep: they fix which samples each update sees.
_ORDER = "fixes the order of the samples"
_FIXED_ON_RESUME = {"train.batch_size": _ORDER, "train.accum_steps": _ORDER, "train.seed": _ORDER,
                    "optimizer.name": "the saved optimizer state is the other optimizer's"}


def _load_optimizer(optimizer: torch.optim.Optimizer, saved: dict, path: Path) -> None:
    """A checkpoint's optimizer state (moments, step counts) under this recipe's hyperparameters:
    torch's ``load_state_dict`` brings back the saved ones (weight decay, betas, eps, lr scales),
    which would silently undo a recipe change the resume reports. The lr is the scheduler's."""
    fresh = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
             for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(saved)
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: the optimizer state does not fit this recipe's optimizer (its "
                              f"parameter groups come from optimizer.weight_decay and layer_decay): {e}") from None
    for group, hyper in zip(optimizer.param_groups, fresh):
        group.update(hyper)


def _recipe_changes(old: Optional[dict], new: dict, snap: Path) -> list:
    """``section.key: old -> new`` for what the resumed recipe changes; CheckpointError if it changes
    a key that fixes the data order. Checkpoints written before recipes were stored: nothing to compare."""
    if not old:
        return []
    changed = []
    for sec, keys in new.items():
        if not isinstance(keys, dict):
            continue
        for k, v in keys.items():
            before = (old.get(sec) or {}).get(k, v)
            if before != v:
                if f"{sec}.{k}" in _FIXED_ON_RESUME:
                    raise CheckpointError(f"{snap}: the recipe changes {sec}.{k} ({before!r} -> {v!r}): "
                                          f"{_FIXED_ON_RESUME[f'{sec}.{k}']}; a resumed run keeps it (start a new "
                                          f"run from these weights with model.pretrained_file)")
                changed.append(f"{sec}.{k}: {before!r} -> {v!r}")
    return changed


def _classifiers(model: Optional[nn.Module]) -> tuple:
    """The classifier module names of a model's pretrained_cfg (zoo models: ``head.fc``)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head.fc"
    return tuple(names) if isinstance(names, (list, tuple)) else (names,)


def load_initial_weights(model: nn.Module, path) -> None:
    """model.pretrained_file: weights to start from, converted from the authors' layout for zoo
    models. Every key of the body must fit; a classifier of another size is left as initialised."""
    from zoo.checkpoint import read_state_dict
    sd = read_state_dict(path)
    if hasattr(model, "cfg"):
        from zoo.convert import convert_checkpoint
        sd = convert_checkpoint(sd, model)  # names the keys that do not fit
    heads = _classifiers(model)
    own = model.state_dict()
    for k in [k for k in sd if k.startswith(heads)]:
        if k not in own or sd[k].shape != own[k].shape:
            del sd[k]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(heads)]
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not fit the model ({len(missing)} missing, e.g. {missing[:3]}; "
                              f"{len(unexpected)} unexpected, e.g. {unexpected[:3]})")


def _timm_version() -> str:
    import timm
    return timm.__version__


# ---------------------------------------------------------------------------------------------- eval.py


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
        head = _classifiers(probe)[0]
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
