"""The training loop behind train.py, built from timm's parts (create_transform, Mixup,
create_optimizer_v2, create_scheduler_v2, ModelEmaV3, dispatch_clip_grad).

``train`` owns what must hold whatever happens (the run directory's checkpoints, the SIGTERM
handler, the process group); a ``_Run`` is one run: set up from the recipe, resumed from a
checkpoint or seeded, then trained epoch by epoch, each ending in validation and a checkpoint.
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
from torch import nn

from zoo import data as zdata
from zoo import distributed as zdist
from zoo import snapshot
from zoo.errors import CheckpointError, ConfigError, DataError, TrainingStopped
from zoo.evaluation import evaluate, format_validation
from zoo.metrics import MetricLog, plot_curves
from zoo.models import autocast, build_model, load_initial_weights, unwrap
from zoo.recipe import Recipe

# The best validation so far: its metric, epoch, and the update of its checkpoint (``best`` link).
_NO_BEST = {"metric": None, "epoch": None, "update": None}


class NonFiniteLossError(TrainingStopped):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


def train(recipe: Recipe, out_dir=None, resume=None, progress: Optional[bool] = None) -> dict:
    """Run a recipe. Returns a summary (final/best metrics, run directory, paths)."""
    run_dir = _run_dir(recipe, out_dir, resume)
    if snapshot.has_checkpoints(run_dir) and not (resume and _snapshot_of(resume, run_dir)):
        raise ConfigError("--output", str(run_dir), "holds the checkpoints of an earlier run, which this run "
                                                    "would prune: pass --resume to continue that run, or another "
                                                    "--output")
    dist = zdist.setup(recipe.runtime.device, source=(recipe.file, "runtime.device"),
                       timeout_min=recipe.runtime.dist_timeout)
    # SIGTERM (a cluster's preemption notice) asks for a checkpoint at the end of the current
    # update; Ctrl-C stops at once and keeps the last checkpoint.
    terminate = []
    restore = _on_sigterm(lambda: terminate.append(True))
    try:
        run = _Run(recipe, run_dir, dist, progress, terminate)
        if resume:
            run.resume(run_dir if resume is True or resume == "auto" else resume)
        else:
            # per-rank stream for drop path etc. (rank 0 keeps the plain seed: 1 process == rank 0)
            _seed_all(recipe.train.seed + dist.rank)
        return run.fit()
    except FileNotFoundError:
        raise  # data that is not there: said before anything ran
    except (KeyboardInterrupt, OSError) as e:  # Ctrl-C, a full disk: what survives is the last checkpoint
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
        raise TrainingStopped(f"{what}. Last good checkpoint: {_last_good(run_dir)} (continue with --resume)") from e
    except RuntimeError as e:  # under torchrun: said in one line, not as a traceback from deep in DDP
        if isinstance(e, TrainingStopped) or not zdist.peer_failure(e, dist):
            raise
        wait = f"{recipe.runtime.dist_timeout:g} min (runtime.dist_timeout)" if recipe.runtime.dist_timeout \
            else "torch's default timeout (runtime.dist_timeout)"
        raise TrainingStopped(f"another process died, or did not answer within {wait}: {e}. Last good "
                              f"checkpoint: {_last_good(run_dir)} (continue with --resume)") from e
    finally:
        restore()
        zdist.cleanup(dist)


class _Run:
    """One training run. The constructor builds everything from the recipe in a fixed order (the
    RNG draws of a resumed run must repeat those of the run it continues)."""

    def __init__(self, recipe: Recipe, run_dir: Path, dist: zdist.Dist, progress: Optional[bool], terminate: list):
        R = self.R = recipe
        self.run_dir, self.dist, self.device, self.terminate = run_dir, dist, dist.device, terminate
        rt, tr = R.runtime, R.train
        if rt.threads:
            torch.set_num_threads(rt.threads)
        elif dist.enabled and self.device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.world_size))
        if rt.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.show = dist.is_main and (tr.progress if progress is None else progress)
        shares = dist.world_size * tr.accum_steps
        if tr.batch_size % shares:
            raise ConfigError(R.file, "train.batch_size", f"{tr.batch_size} does not split into {dist.world_size} "
                                                          f"processes x {tr.accum_steps} accum_steps")
        self.micro = tr.batch_size // shares
        if (R.augment.mixup or R.augment.cutmix) and self.micro % 2:
            raise ConfigError(R.file, "train.batch_size", f"mixup/cutmix pair the samples of a micro-batch: "
                                                          f"batch_size / (processes x accum_steps) = {self.micro} "
                                                          f"must be even")
        _check_sync_batchnorm(R, dist)
        train_raw, val_raw = self._folders()
        self._model()
        self._loaders(train_raw, val_raw)
        self._optimisation()
        self.start_epoch = self.start_update = self.num_updates = 0
        self.best = dict(_NO_BEST)

    def _folders(self):
        """The training and validation image folders; sets the classes and the number of outputs."""
        D = self.R.data
        if not D.root:
            raise FileNotFoundError("data.root is not set: give an ImageFolder root with train/ and val/ "
                                    "(--set data.root=PATH)")
        train_raw = zdata.image_folder(D.root, D.train_split)
        val_raw = None
        if D.val_split:
            if not (Path(D.root) / D.val_split).is_dir():
                raise DataError(f"{Path(D.root) / D.val_split} does not exist: set data.val_split to the "
                                f"validation folder, or to null to train without validation")
            val_raw = zdata.image_folder(D.root, D.val_split)
        self.classes = zdata.check_classes(D.root, D.train_split, train_raw, D.val_split, val_raw)
        self.num_classes = self.R.model.num_classes or len(self.classes)
        if self.num_classes < len(self.classes):
            raise ConfigError(self.R.file, "model.num_classes", f"is {self.num_classes} but {D.root} has "
                                                                f"{len(self.classes)} classes")
        return train_raw, val_raw

    def _model(self):
        """The model (same seed on every rank; DDP also broadcasts rank 0's weights), its YAML and
        the architecture name checkpoints record."""
        M = self.R.model
        _seed_all(self.R.train.seed)
        overrides = {"num_classes": self.num_classes, "drop_path_rate": M.drop_path_rate, "drop_rate": M.drop_rate}
        name = self.R.model_path()
        model = self.model = build_model(name, **overrides)
        if M.pretrained_file:
            load_initial_weights(model, M.pretrained_file)
        self.model_yaml = None
        if hasattr(model, "cfg") and getattr(model.cfg, "raw", None):
            self.model_yaml = snapshot.model_yaml(model.cfg.raw, overrides)
        self.architecture = model.pretrained_cfg.get("architecture", name) if hasattr(model, "pretrained_cfg") \
            else name

    def _loaders(self, train_raw, val_raw):
        R, D, tr, dist = self.R, self.R.data, self.R.train, self.dist
        self.dcfg = zdata.data_config(self.model, D.img_size, D.crop_pct, D.interpolation, D.mean, D.std)
        train_set = zdata.SeededDataset(train_raw, tr.seed)
        train_raw.transform = zdata.train_transform(self.dcfg, R.augment, D.train_interpolation)
        val_set = None
        if val_raw is not None:
            val_raw.transform = zdata.eval_transform(self.dcfg)
            val_set = zdata.SeededDataset(val_raw, tr.seed)
        if tr.batch_size > len(train_set):
            raise ConfigError(R.file, "train.batch_size", f"{tr.batch_size} is larger than the training set "
                                                          f"({len(train_set)} images)")
        self.sampler = zdata.UpdateSampler(len(train_set), tr.batch_size, dist.world_size, dist.rank,
                                           tr.accum_steps, tr.seed)
        pin = D.pin_memory and self.device.type == "cuda"
        self.train_loader = zdata.loader(train_set, self.sampler, D.workers, pin)
        self.val_loader = None
        if val_set is not None:
            shards = zdata.ShardSampler(len(val_set), max(self.micro, 1) * 2, dist.world_size, dist.rank)
            self.val_loader = zdata.loader(val_set, shards, D.workers, pin)

    def _optimisation(self):
        """Optimizer, schedule, gradient scaler, EMA, Mixup and the loss."""
        from timm.data import Mixup
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        from timm.utils import ModelEmaV3

        R, model = self.R, self.model
        rt, aug, opt_cfg, sch = R.runtime, R.augment, R.optimizer, R.schedule
        model.to(self.device)
        model = self.model = _sync_batchnorm(model, R, self.dist)
        if rt.channels_last:
            model.to(memory_format=torch.channels_last)
        if rt.grad_checkpointing:
            model.set_grad_checkpointing(True)
        opt_kwargs = {}
        if opt_cfg.betas is not None:
            opt_kwargs["betas"] = tuple(opt_cfg.betas)
        if opt_cfg.eps is not None:
            opt_kwargs["eps"] = opt_cfg.eps
        self.optimizer = create_optimizer_v2(model, opt=opt_cfg.name, lr=R.lr(), weight_decay=opt_cfg.weight_decay,
                                             momentum=opt_cfg.momentum, layer_decay=opt_cfg.layer_decay,
                                             **opt_kwargs)
        upe = self.updates_per_epoch = self.sampler.updates_per_epoch
        warmup_epochs = sch.warmup_epochs if sch.warmup_steps is None else sch.warmup_steps / upe
        self.scheduler, self.total_epochs = create_scheduler_v2(
            self.optimizer, sched=sch.name, num_epochs=R.train.epochs, warmup_epochs=warmup_epochs,
            warmup_lr=sch.warmup_lr, min_lr=sch.min_lr, cooldown_epochs=sch.cooldown_epochs,
            step_on_epochs=sch.step_on == "epoch", decay_epochs=sch.decay_epochs or 0,
            decay_milestones=sch.decay_milestones or (),
            decay_rate=sch.power if sch.name == "poly" and sch.power is not None else sch.decay_rate,  # timm's poly power
            updates_per_epoch=upe)
        self.scaler = torch.amp.GradScaler(self.device.type) if rt.amp == "fp16" else None
        self.ema = ModelEmaV3(model, decay=R.ema.decay, use_warmup=R.ema.warmup) if R.ema.enabled else None
        mixup_on = aug.mixup > 0 or aug.cutmix > 0
        self.mixup = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob,
                           switch_prob=aug.mixup_switch_prob, mode=aug.mixup_mode,
                           label_smoothing=aug.label_smoothing, num_classes=self.num_classes) if mixup_on else None
        self.criterion = _criterion(R, mixup_on)

    def resume(self, source) -> None:
        """Weights, EMA, optimizer, scaler, counters, best and RNG state of a checkpoint (a
        checkpoint directory, a run directory or its ``last``); ``last``/``best`` re-pointed to it."""
        from timm.utils import ModelEmaV3

        R, dist, run_dir = self.R, self.dist, self.run_dir
        snap = snapshot.resolve(source)
        meta = snapshot.read_meta(snap)
        if meta.get("architecture") != self.architecture:
            raise CheckpointError(f"{snap}: checkpoint is of {meta.get('architecture')!r}, the recipe trains "
                                  f"{self.architecture!r}")
        differ = zdata.class_difference(self.classes, str(Path(R.data.root) / R.data.train_split),
                                        meta.get("classes") or self.classes, "the checkpoint")
        if differ:
            raise CheckpointError(f"{snap}: the checkpoint was trained on other classes ({differ})")
        state = snapshot.read_train_state(snap)
        changed = _recipe_changes(state.get("recipe"), R.to_dict(), snap)
        snapshot.load_into(self.model, snapshot.read_weights(snap), snap / snapshot.WEIGHTS)
        if self.ema is not None:
            if snapshot.EMA_WEIGHTS in meta.get("files", ()) or (snap / snapshot.EMA_WEIGHTS).is_file():
                # read_weights names the file if it is missing or truncated
                snapshot.load_into(self.ema.module, snapshot.read_weights(snap, ema=True),
                                   snap / snapshot.EMA_WEIGHTS)
                ranks = state.get("ema_buffers") or []
                if dist.rank < len(ranks) and ranks[dist.rank]:  # this rank's own statistics (see save)
                    _load_buffers(self.ema.module, ranks[dist.rank])
            else:  # EMA switched on at resume: it starts from the resumed weights
                self.ema = ModelEmaV3(self.model, decay=R.ema.decay, use_warmup=R.ema.warmup)
        # The schedule is not restored but rebuilt from this recipe (timm's schedules are functions
        # of the update count): a longer run or a new lr takes effect, and an unchanged recipe
        # gives the same lrs.
        _load_optimizer(self.optimizer, state["optimizer"], snap / snapshot.STATE)
        try:
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{snap / snapshot.STATE}: gradient scaler state does not fit this "
                                  f"recipe: {e}") from None
        self.start_epoch, self.start_update = state["epoch"], state["update_in_epoch"]
        self.num_updates = state["num_updates"]
        self.best = {**self.best, **state.get("best", {})}
        saved_ranks = len(state["rng"])
        if dist.rank < saved_ranks:
            snapshot.set_rng_state(state["rng"][dist.rank])
        else:  # saved by fewer processes: rank 0's stream would give this rank rank 0's drop-path
            _seed_all(R.train.seed + dist.rank)  # masks and mixup lambdas; its own, as in a fresh run
        best_tag = snapshot.best_up_to(run_dir, snap, self.best["update"])
        if best_tag is None:  # not in this run directory (pruned, or another run's): the next
            self.best = dict(_NO_BEST)  # validation names a new one
        if dist.is_main:
            where = f"after update {self.start_update}/{self.updates_per_epoch} of epoch {self.start_epoch + 1}" \
                if self.start_update else f"at the end of epoch {self.start_epoch}"
            print(f"resumed from {snap} {where} ({self.num_updates} updates done)", file=sys.stderr)
            if changed:
                print("with recipe changes: " + "; ".join(changed), file=sys.stderr)
            if saved_ranks != dist.world_size:
                print(f"the checkpoint holds the random state of {saved_ranks} process(es), this run has "
                      f"{dist.world_size}: drop path and mixup draw other numbers than the saved run would have "
                      f"(the data order is the same)", file=sys.stderr)
            newer = snapshot.continue_from(run_dir, snap, best_tag)
            if newer:
                # (or a run killed between writing its checkpoint and linking it as 'last')
                print(f"{run_dir}: checkpoints after the resumed one ({', '.join(newer)}) are from a "
                      f"continuation this run replaces: 'last' and 'best' no longer point to them; each is "
                      f"kept until this run has passed its update. To continue from the newest instead: "
                      f"--resume {run_dir / 'checkpoints' / newer[-1]}", file=sys.stderr)

    def _wrap(self) -> None:
        """DDP across processes (told of parameters unused at this size), then torch.compile."""
        model, dist = self.model, self.dist
        self.train_model = self.ddp = model
        if dist.enabled:
            size = self.dcfg["input_size"]
            unused = _unused_parameters(model, size, self.device)
            if unused and dist.is_main:
                print(f"{len(unused)} parameters take no part at {size[1]}x{size[2]} px (e.g. {unused[0]}): DDP "
                      f"looks for unused parameters at every update", file=sys.stderr)
            self.train_model = self.ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(unused))
        if self.R.runtime.compile:
            self.train_model = torch.compile(self.train_model)

    def save(self, epoch: int, update_in_epoch: int, metrics: dict, is_best: bool = False) -> None:
        """A checkpoint of this update (every rank's RNG state and EMA buffers; written by rank 0),
        linked as ``last`` and, if ``is_best``, as ``best``."""
        R, dist, ema = self.R, self.dist, self.ema
        # Under DDP each rank's EMA follows its own BatchNorm statistics until runtime.dist_bn meets
        # them at the epoch's end: an exact resume needs every rank's, not rank 0's alone.
        mine = (snapshot.rng_state(), _buffers(ema.module) if ema is not None and dist.enabled else None)
        gathered = [mine]
        if dist.enabled:
            gathered = [None] * dist.world_size
            torch.distributed.all_gather_object(gathered, mine)
        states, ema_buffers = [g[0] for g in gathered], [g[1] for g in gathered]
        if not dist.is_main:
            return
        meta = {"architecture": self.architecture, "model": R.sections["model"]["name"], "recipe": R.name,
                "num_classes": self.num_classes, "classes": self.classes, "epoch": epoch,
                "update_in_epoch": update_in_epoch, "num_updates": self.num_updates, "metrics": metrics,
                "best": self.best, "data_config": {k: (list(v) if isinstance(v, tuple) else v)
                                                   for k, v in self.dcfg.items()},
                "best_weights": snapshot.EMA_WEIGHTS if (ema is not None and R.ema.select_best)
                else snapshot.WEIGHTS,
                "versions": {"torch": torch.__version__, "timm": _timm_version()}}
        train_state = {"optimizer": self.optimizer.state_dict(), "recipe": R.to_dict(),
                       "scaler": self.scaler.state_dict() if self.scaler is not None else None, "epoch": epoch,
                       "update_in_epoch": update_in_epoch, "num_updates": self.num_updates, "rng": states,
                       "best": self.best}
        if any(b is not None for b in ema_buffers):
            train_state["ema_buffers"] = ema_buffers
        snapshot.save(self.run_dir, snapshot.tag(self.num_updates), model_state=unwrap(self.model).state_dict(),
                      meta=meta, model_yaml_text=self.model_yaml,
                      ema_state=ema.module.state_dict() if ema is not None else None,
                      train_state=train_state, link=("last", "best") if is_best else ("last",),
                      keep_last=R.output.keep_last)

    def fit(self) -> dict:
        """The epochs from where the run stands; the summary ``train`` returns."""
        R, dist, run_dir, tr = self.R, self.dist, self.run_dir, self.R.train
        self._wrap()
        self.log = MetricLog(run_dir / "metrics.jsonl" if dist.is_main else None)
        # On resume, what was logged after the checkpoint is trained again; a fresh run drops what
        # a run killed before its first checkpoint logged.
        self.log.drop_after(self.num_updates)
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            import yaml
            (run_dir / "recipe.yaml").write_text(yaml.safe_dump(R.to_dict(), sort_keys=False))
        self.last_val: Dict[str, float] = {}
        stop = None
        done = tr.max_steps is not None and self.num_updates >= tr.max_steps  # resumed where the last run stopped
        if done and dist.is_main:
            print(f"train.max_steps={tr.max_steps} was reached (update {self.num_updates}): nothing to train",
                  file=sys.stderr)
        for epoch in range(self.start_epoch, self.start_epoch if done else self.total_epochs):
            update_in_epoch, stop = self._train_epoch(epoch)
            if stop and update_in_epoch < self.updates_per_epoch:
                self.save(epoch, update_in_epoch, self.last_val)
                break
            self._share_batchnorm_stats()
            is_best = self._validate(epoch, final=stop is not None)
            self.save(epoch + 1, 0, self.last_val, is_best=is_best)
            if stop:
                break

        plot = None
        if dist.is_main and R.output.plot:
            plot = plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
        zdist.barrier(dist)
        if stop == "sigterm":
            raise TrainingStopped(f"stopped by SIGTERM after update {self.num_updates}, which is saved: "
                                  f"{_last_good(run_dir)} (continue with --resume)")
        best_dir = (run_dir / "best").resolve() if (run_dir / "best").exists() else None
        return {"run_dir": str(run_dir), "main": dist.is_main, "num_updates": self.num_updates,
                "last": self.last_val, "best": self.best, "plot": str(plot) if plot else None,
                "best_checkpoint": str(best_dir) if best_dir else None,
                # what was measured when the best checkpoint was saved (empty without validation)
                "best_val": snapshot.read_meta(best_dir).get("metrics", {}) if best_dir else {}}

    def _train_epoch(self, epoch: int):
        """The updates of one epoch (from the resumed update in the first). Returns the update it
        ended at and why it stopped early: None, "max_steps" or "sigterm" (that update is saved by
        the caller)."""
        dist, device, tr, rt = self.dist, self.device, self.R.train, self.R.runtime
        upe, optimizer, scaler = self.updates_per_epoch, self.optimizer, self.scaler
        first = self.start_update if epoch == self.start_epoch else 0
        self.sampler.set_epoch(epoch, first)
        self.scheduler.step(epoch)
        self.scheduler.step_update(self.num_updates)
        self.train_model.train()
        bar = None
        if self.show:
            from tqdm import tqdm
            bar = tqdm(total=upe, initial=first, desc=f"epoch {epoch + 1}/{self.total_epochs}", dynamic_ncols=True,
                       file=sys.stderr)
        t0, seen, loss_acc = time.perf_counter(), 0, 0.0
        micro_i, update_in_epoch, stop = 0, first, None
        try:
            for images, target in self.train_loader:
                images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
                if rt.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                if self.mixup is not None:
                    images, target = self.mixup(images, target)
                last_micro = micro_i == tr.accum_steps - 1
                sync = self.ddp.no_sync() if dist.enabled and not last_micro else contextlib.nullcontext()
                with sync:
                    with autocast(device, rt.amp):
                        # the loss in fp32: CPU autocast leaves log_softmax in bf16/fp16
                        loss = self.criterion(self.train_model(images).float(), target)
                    scaled = loss / tr.accum_steps
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                loss_acc += loss.detach().float().item() / tr.accum_steps
                micro_i += 1
                seen += images.shape[0]
                if not last_micro:
                    continue
                micro_i = 0
                # every rank must agree before anyone steps; the logged loss is the mean over ranks
                flag = torch.tensor([0.0 if math.isfinite(loss_acc) else 1.0, loss_acc, float(bool(self.terminate))])
                flag = zdist.all_reduce_sum(flag, dist).tolist()
                loss_acc = flag[1] / dist.world_size
                if flag[0] > 0:
                    raise NonFiniteLossError(
                        f"loss is {loss_acc} at epoch {epoch + 1}, update {self.num_updates + 1}: stopping. "
                        f"Last good checkpoint: {_last_good(self.run_dir)} (lower optimizer.lr, set "
                        f"optimizer.clip_grad, or try runtime.amp=bf16 instead of fp16)")
                self._step()
                update_in_epoch += 1
                cur_lr = optimizer.param_groups[0]["lr"]
                ips = seen * dist.world_size / max(time.perf_counter() - t0, 1e-9)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_acc:.4f}", lr=f"{cur_lr:.2e}", img_s=f"{ips:.0f}")
                if self.num_updates % tr.log_every == 0 or update_in_epoch == upe:
                    self.log.write(kind="train", epoch=epoch, update=self.num_updates,
                                   epoch_float=epoch + update_in_epoch / upe, loss=loss_acc, lr=cur_lr,
                                   images_per_s=ips)
                    if dist.is_main and bar is None:  # without a progress bar, a line per log entry
                        print(f"epoch {epoch + 1}/{self.total_epochs} update {update_in_epoch}/{upe}: loss "
                              f"{loss_acc:.4f}  lr {cur_lr:.2e}  {ips:.0f} img/s", file=sys.stderr)
                loss_acc = 0.0
                if flag[2] > 0:  # SIGTERM on some rank: checkpoint this update, then stop
                    stop = "sigterm"
                elif tr.max_steps is not None and self.num_updates >= tr.max_steps:
                    stop = "max_steps"
                if stop:
                    break
                if tr.save_every_steps and self.num_updates % tr.save_every_steps == 0 and update_in_epoch < upe:
                    self.save(epoch, update_in_epoch, self.last_val)
        finally:
            if bar is not None:
                bar.close()
        return update_in_epoch, stop

    def _step(self) -> None:
        """One optimizer update from the accumulated gradients: unscale, clip, step, EMA, schedule."""
        from timm.utils import dispatch_clip_grad

        opt_cfg, optimizer, scaler = self.R.optimizer, self.optimizer, self.scaler
        if scaler is not None:
            scaler.unscale_(optimizer)
        if opt_cfg.clip_grad is not None:
            dispatch_clip_grad(self.model.parameters(), opt_cfg.clip_grad, mode=opt_cfg.clip_mode)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.num_updates += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.num_updates)
        self.scheduler.step_update(self.num_updates)

    def _share_batchnorm_stats(self) -> None:
        """``runtime.dist_bn`` at an epoch's end: every rank's BatchNorm running statistics (DDP
        hands rank 0's to the others before each forward, then each rank updates them from its own
        batch) made the mean over the ranks or rank 0's, in the model and its EMA, so each rank
        validates the model the checkpoint holds. SyncBatchNorm's are equal already."""
        from timm.utils import distribute_bn

        rt, dist = self.R.runtime, self.dist
        if dist.enabled and rt.dist_bn and not rt.sync_batchnorm:
            for model in [self.model] + ([self.ema.module] if self.ema is not None else []):
                distribute_bn(model, dist.world_size, reduce=rt.dist_bn == "reduce")

    def _validate(self, epoch: int, final: bool) -> bool:
        """Validation at the end of an epoch (every ``train.eval_every``, and at the last); whether
        this epoch's checkpoint is the best so far (without validation, the newest is)."""
        tr, R = self.R.train, self.R
        if self.val_loader is None:
            self.best = {"metric": None, "epoch": epoch, "update": self.num_updates}
            return True
        if not ((epoch + 1) % tr.eval_every == 0 or epoch + 1 == self.total_epochs or final):
            return False
        m = evaluate(self.model, self.val_loader, self.device, R.runtime.amp, self.dist)
        rec = {"kind": "val", "epoch": epoch, "update": self.num_updates, **m}
        key = m["top1"]
        if self.ema is not None:
            me = evaluate(self.ema.module, self.val_loader, self.device, R.runtime.amp, self.dist)
            rec.update({f"ema_{k}": v for k, v in me.items()})
            if R.ema.select_best:
                key = me["top1"]
        self.log.write(**rec)
        self.last_val = {k: v for k, v in rec.items() if k != "kind"}
        if self.dist.is_main:
            print(format_validation(rec), file=sys.stderr)
        if self.best["metric"] is None or key > self.best["metric"]:
            self.best = {"metric": key, "epoch": epoch, "update": self.num_updates}
            return True
        return False


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


def _buffers(model: nn.Module) -> Dict[str, torch.Tensor]:
    """A CPU copy of the model's BatchNorm running statistics: the buffers that differ between
    ranks (timm's ``distribute_bn`` picks them by the same names); the others are constants."""
    return {name: b.detach().cpu().clone() for name, b in model.named_buffers()
            if name.endswith(("running_mean", "running_var"))}


def _load_buffers(model: nn.Module, saved: Dict[str, torch.Tensor]) -> None:
    for name, b in model.named_buffers():
        if name in saved:
            b.copy_(saved[name])


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


def _check_sync_batchnorm(R: Recipe, dist: zdist.Dist) -> None:
    if R.runtime.sync_batchnorm and dist.enabled and dist.device.type != "cuda":
        raise ConfigError(R.file, "runtime.sync_batchnorm", f"needs CUDA devices (torch's SyncBatchNorm runs on "
                                                            f"GPUs only); this run's {dist.world_size} processes "
                                                            f"are on {dist.device.type}")


def _sync_batchnorm(model: nn.Module, R: Recipe, dist: zdist.Dist) -> nn.Module:
    """``runtime.sync_batchnorm``: the model with torch's SyncBatchNorm in place of its BatchNorm
    layers (same parameters and buffers, so checkpoints load into the plain model), which take their
    training statistics over every process's batch. One process already sees the whole batch: the
    model is left as it is. (``_check_sync_batchnorm`` has refused CPU processes.)"""
    if not (R.runtime.sync_batchnorm and dist.enabled):
        return model
    count = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if dist.is_main:
        print(f"runtime.sync_batchnorm: {count} BatchNorm layers synchronised across {dist.world_size} processes"
              if count else "runtime.sync_batchnorm: the model has no BatchNorm layers, nothing to synchronise",
              file=sys.stderr)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


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


def _timm_version() -> str:
    import timm
    return timm.__version__


