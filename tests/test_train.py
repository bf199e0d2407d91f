"""train.py and eval.py (zoo.training, zoo.evaluation): recipes, exact resume, atomic checkpoints,
distributed equivalence, metrics and plots, evaluation, benchmarking, hub export. Short runs of the tiny zoo_nat_demo on a
few random 32x32 images; every run is a handful of optimizer steps on a CPU."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import zoo
from zoo import snapshot
from zoo.evaluation import evaluate_folder, format_validation
from zoo.training import NonFiniteLossError, train
from zoo.errors import CheckpointError, ConfigError, DataError, TrainingStopped
from zoo.metrics import read_jsonl
from zoo.recipe import SCHEDULES, list_recipes, load_recipe, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
PAPER_RECIPES = ["nat_tiny", "dinat_tiny", "swin_tiny", "cswin_tiny", "litv2_small", "maxvit_tiny", "gcvit_tiny",
                 "biformer_tiny", "fastervit_0"]


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x (8 train + 3 val) random 32x32 images, each class with its own mean colour."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 3)):
        for c in range(3):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                base = np.zeros((32, 32, 3)) + 60 + 70 * c
                img = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def tiny_sets(folder, **extra):
    """Overrides that cut the demo recipe down to a few steps on the tiny folder (24 train images,
    batch 4)."""
    return {"data.root": str(folder), "train.batch_size": 4, "train.epochs": 2, "train.progress": False,
            "schedule.warmup_epochs": 0, "runtime.threads": 1, "runtime.deterministic": True,
            "train.log_every": 1, "output.plot": False, **extra}


def tiny(folder, **extra):
    return load_recipe(ROOT / "configs/train/demo.yaml", tiny_sets(folder, **extra))


def weights(run_dir):
    return snapshot.read_weights((Path(run_dir) / "last").resolve())


# ------------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("name", PAPER_RECIPES + ["demo"])
def test_shipped_recipes_validate(name):
    r = load_recipe(ROOT / "configs/train" / f"{name}.yaml")
    assert r.name == name
    if name != "demo":
        assert r.model.name == f"zoo_{name}"
        assert r.train.epochs >= 300 and r.train.batch_size >= 1024
        assert r.reference and r.reference.get("source"), "paper recipes cite where their numbers come from"
    assert r.lr() > 0


def test_every_shipped_recipe_is_tested():
    assert set(list_recipes()) == set(PAPER_RECIPES + ["demo"])


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_a_recipe_may_name_trains(folder, tmp_path, name):
    decay = {"step": {"schedule.decay_epochs": 1}, "multistep": {"schedule.decay_milestones": [1]}}.get(name, {})
    s = train(tiny(folder, **{"schedule.name": name, "train.max_steps": 7, **decay}), out_dir=tmp_path / "run")
    assert s["num_updates"] == 7


def test_poly_schedule_takes_its_power(folder, tmp_path):
    """timm reads the poly schedule's power from decay_rate, which recipes keep for step decay."""
    s = {"schedule.name": "poly", "schedule.min_lr": 0.0, "train.max_steps": 6, "train.epochs": 1,
         "schedule.decay_rate": 0.5}
    lrs = {p: _lrs(train(tiny(folder, **{**s, "schedule.power": p}), out_dir=tmp_path / str(p))["run_dir"])
           for p in (1.0, 2.0, None)}  # None: timm's convention, decay_rate (recipes written before power)
    lr0 = tiny(folder).lr()
    for p, by_update in lrs.items():  # the lr used for update u+1 is set after update u
        assert by_update[3] == pytest.approx(lr0 * (1 - 3 / 6) ** (p or 0.5)), p


def test_lr_scales_with_batch():
    r = load_recipe(ROOT / "configs/train/swin_tiny.yaml")
    assert r.lr() == pytest.approx(1e-3)  # 5e-4 per 512 at 1024
    r2 = load_recipe(ROOT / "configs/train/swin_tiny.yaml", {"train.batch_size": 256})
    assert r2.lr() == pytest.approx(2.5e-4)
    assert load_recipe(ROOT / "configs/train/swin_tiny.yaml", {"optimizer.lr": 0.01}).lr() == 0.01


OK = "model: {name: zoo_nat_tiny}\ntrain: {epochs: 1, batch_size: 8}"  # valid; cases add one mistake


def test_recipe_takes_the_names_eval_and_bench_take(tmp_path):
    f = tmp_path / "short.yaml"
    f.write_text(OK.replace("zoo_nat_tiny", "nat_tiny"))  # a zoo name without its prefix
    assert load_recipe(f).model.name == "nat_tiny"


@pytest.mark.parametrize("text, key, words", [
    ("model: {name: zoo_nat_tiny}\ntrain: {epochs: 1, batch_size: 8, epoch: 3}", "train.epoch", "unknown key"),
    ("model: {name: zoo_nat_tiny}\ntrain: {epochs: one, batch_size: 8}", "train.epochs", "expected int"),
    ("model: {name: zoo_nat_tiny}\ntrain: {epochs: 1, batch_size: 8}\nruntime: {amp: fp8}", "runtime.amp",
     "bf16, fp16"),
    ("model: {name: zoo_nat_tiny}\ntrain: {epochs: 1, batch_size: 8}\naugment: {hflip: 1.5}", "augment.hflip",
     "probability"),
    ("train: {epochs: 1, batch_size: 8}", "model", "missing required key 'model.name'"),
    (OK + "\noptimizer: {name: adamww}", "optimizer.name", "unknown optimizer 'adamww'"),
    ("model: {name: zoo_nat_nope}\ntrain: {epochs: 1, batch_size: 8}", "model.name", "unknown model"),
    (OK + "\noptimizer: {lr: .inf}", "optimizer.lr", "finite"),
    (OK + "\noptimizer: {betas: [0.9, 1.5]}", "optimizer.betas", "each in [0, 1)"),
    (OK + "\nschedule: {name: step}", "schedule.decay_epochs", "the step schedule needs it"),
    (OK + "\nschedule: {name: multistep, decay_milestones: [30, 10]}", "schedule.decay_milestones",
     "increasing order"),
    (OK + "\naugment: {auto_augment: rand-m9-mstd}", "augment.auto_augment", "['mstd'] carry no value"),
    (OK + "\naugment: {auto_augment: augmix-z3}", "augment.auto_augment", "timm does not take it (Unknown AugMix"),
    (OK + "\naugment: {auto_augment: trivial}", "augment.auto_augment", "timm does not take it"),
    (OK + "\nruntime: {device: gpu}", "runtime.device", "must be auto, cpu, cuda"),
    (OK + "\nruntime: {dist_timeout: 0}", "runtime.dist_timeout", "must be positive (minutes) or null"),
    ("model: {name: zoo_nat_tiny}\ntrain: {epochs: 1, batch_size: 8, accum_steps: 3}", "train.accum_steps",
     "divide"),
    ("model: {name: zoo_nat_tiny}\noptimiser: {lr: 1}\ntrain: {epochs: 1, batch_size: 8}", "optimiser",
     "unknown key"),
])
def test_recipe_errors_name_file_and_key(tmp_path, text, key, words):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_recipe(f)
    assert str(f) in str(e.value) and key in str(e.value) and words in str(e.value)


def test_set_overrides_are_checked():
    demo = ROOT / "configs/train/demo.yaml"
    assert parse_overrides(["optimizer.lr=1e-3", "ema.enabled=true"]) == {"optimizer.lr": 1e-3,
                                                                          "ema.enabled": True}
    assert load_recipe(demo, ["optimizer.lr=1e-3"]).optimizer.lr == 1e-3
    with pytest.raises(ConfigError, match=r"--set: train.batch_size: expected int"):
        load_recipe(demo, ["train.batch_size=big"])
    with pytest.raises(ConfigError, match="unknown section"):
        load_recipe(demo, ["trian.epochs=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_recipe(demo, ["epochs"])


def test_recipe_base_inherits(tmp_path):
    swin = load_recipe("swin_tiny")
    assert swin.optimizer.clip_grad == 5.0 and swin.train.epochs == 300
    f = tmp_path / "mine.yaml"
    f.write_text(f"base: {ROOT / 'configs/train/swin_tiny.yaml'}\nmodel: {{name: zoo_swin_small}}\n"
                 f"optimizer: {{clip_grad: null}}\n")
    r = load_recipe(f)
    assert r.model.name == "zoo_swin_small" and r.train.epochs == 300 and r.optimizer.weight_decay == 0.05
    assert r.optimizer.clip_grad is None  # a null is a value in a recipe (no clipping), not the default
    # a dict names its base as a file does (the base was ignored: 'missing required key model.name')
    mine = load_recipe({"base": "swin_tiny", "train": {"epochs": 30}})
    assert mine.sections == {**swin.sections, "train": {**swin.sections["train"], "epochs": 30}}
    # a recipe of the shipped one's name extends the shipped one (it was a 'base cycle')
    (tmp_path / "swin_tiny.yaml").write_text("base: swin_tiny\ndata: {root: /data/in1k}\n")
    assert load_recipe(tmp_path / "swin_tiny.yaml").data.root == "/data/in1k"
    with pytest.raises(ConfigError, match=r"base: base recipe 'swin_tiyn' does not exist \(looked for"):
        load_recipe({"base": "swin_tiyn"})


# ------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """A 2-epoch run (12 updates) with EMA, metrics and the plot."""
    out = tmp_path_factory.mktemp("run")
    s = train(tiny(folder, **{"output.plot": True, "ema.enabled": True, "ema.decay": 0.9}), out_dir=out)
    return out, s


def test_run_writes_checkpoints_metrics_and_plot(trained):
    out, s = trained
    assert s["num_updates"] == 12
    snap = (out / "best").resolve()
    files = {p.name for p in snap.iterdir()}
    assert {"model.safetensors", "model_ema.safetensors", "model.yaml", "meta.json", "train_state.pt"} <= files
    meta = json.loads((snap / "meta.json").read_text())
    assert meta["architecture"] == "zoo_nat_demo" and meta["classes"] == ["class0", "class1", "class2"]
    assert meta["num_classes"] == 3
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "train" for r in rows) == 12
    val = [r for r in rows if r["kind"] == "val"]
    assert len(val) == 2 and {"top1", "top5", "loss", "ema_top1"} <= set(val[0])
    assert (out / "curves.png").stat().st_size > 1000
    # the saved model YAML rebuilds the model without the recipe
    net = zoo.create_model(str(snap / "model.yaml"))
    snapshot.load_into(net, snapshot.read_weights(snap), "test")
    assert net.num_classes == 3


def test_bf16_autocast_trains_with_an_fp32_loss(folder, tmp_path):
    """runtime.amp=bf16 on a CPU: the loss is computed from fp32 logits (CPU autocast would leave
    log_softmax in bf16, whose 8-bit mantissa the logged losses would show)."""
    train(tiny(folder, **{"runtime.amp": "bf16", "train.max_steps": 4}), out_dir=tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert any(torch.tensor(v).bfloat16().item() != v for v in losses), losses


def test_plot_skipped_with_warning_without_matplotlib(trained, monkeypatch, tmp_path):
    import builtins
    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    from zoo.metrics import plot_curves
    with pytest.warns(UserWarning, match="matplotlib"):
        assert plot_curves(trained[0] / "metrics.jsonl", tmp_path / "x.png") is None


def test_resume_continues_exactly(folder, tmp_path):
    # augmentation, mixup, drop path and label smoothing all on: every RNG stream must be restored
    extra = {"augment.mixup": 0.8, "augment.cutmix": 1.0, "augment.reprob": 0.25, "model.drop_path_rate": 0.1,
             "train.epochs": 3}
    # 6 updates per epoch: stop at 4 (mid-epoch) vs 2 + resume + 2
    train(tiny(folder, **{"train.max_steps": 4, **extra}), out_dir=tmp_path / "a")
    train(tiny(folder, **{"train.max_steps": 2, **extra}), out_dir=tmp_path / "b")
    train(tiny(folder, **{"train.max_steps": 4, **extra}), out_dir=tmp_path / "b", resume="auto")
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    sa = snapshot.read_train_state((tmp_path / "a/last").resolve())
    sb = snapshot.read_train_state((tmp_path / "b/last").resolve())
    assert sa["num_updates"] == sb["num_updates"] == 4
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(pa["exp_avg"], pb["exp_avg"])


def _lrs(run_dir):
    return {r["update"]: r["lr"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if r["kind"] == "train"}


def test_resume_follows_the_changed_recipe_and_trims_the_log(folder, tmp_path):
    # 6 updates per epoch. A 2-epoch run that went on to update 8 is continued from its update-4
    # checkpoint as a 3-epoch run with EMA switched on: the lrs after the resume are the 3-epoch
    # cosine's, the log holds each update once, and the EMA starts from the resumed weights.
    keep = {"train.save_every_steps": 4, "output.keep_last": 3}
    train(tiny(folder, **{"train.epochs": 3}), out_dir=tmp_path / "straight")
    train(tiny(folder, **{"train.max_steps": 8, **keep}), out_dir=tmp_path / "b")
    four = tmp_path / "b/checkpoints/update-00000004"
    start = snapshot.read_weights(four)
    summary = train(tiny(folder, **{"train.epochs": 3, "train.max_steps": 9, "ema.enabled": True, **keep}),
                    resume=str(four))
    assert Path(summary["run_dir"]) == (tmp_path / "b").resolve()  # --resume <checkpoint> writes into its run
    rows = [r["update"] for r in read_jsonl(tmp_path / "b/metrics.jsonl") if r["kind"] == "train"]
    assert rows == list(range(1, 10))
    assert _lrs(tmp_path / "b")[9] == pytest.approx(_lrs(tmp_path / "straight")[9])
    ema = snapshot.read_weights((tmp_path / "b/last").resolve(), ema=True)
    k = "stages.1.blocks.0.mlp.fc1.weight"
    assert (ema[k] - start[k]).abs().max() < 1e-3 < (weights(tmp_path / "b")[k] - start[k]).abs().max()


def test_resuming_an_older_checkpoint_relinks_last_and_best(folder, tmp_path, capsys):
    """A run validated after each of 3 epochs (updates 6, 12, 18) is resumed from its update-6
    checkpoint: 'best' must not stay on a checkpoint of the continuation being replaced."""
    train(tiny(folder, **{"train.epochs": 3, "output.keep_last": 5}), out_dir=tmp_path / "run")
    six = tmp_path / "run/checkpoints/update-00000006"
    train(tiny(folder, **{"train.epochs": 3, "train.max_steps": 9, "output.keep_last": 1}), resume=str(six))
    assert (tmp_path / "run/last").resolve().name == "update-00000009"
    assert (tmp_path / "run/best").resolve() == six.resolve()  # the only validation before update 9
    err = capsys.readouterr().err
    assert "resumed from" in err and "at the end of epoch 1 (6 updates done)" in err
    assert "(update-00000012, update-00000018) are from a continuation this run replaces" in err
    assert f"To continue from the newest instead: --resume {tmp_path / 'run/checkpoints/update-00000018'}" in err
    # nothing of the replaced continuation is deleted before the new run has passed it
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == [
        "update-00000006", "update-00000009", "update-00000012", "update-00000018"]
    train(tiny(folder, **{"train.epochs": 3, "train.max_steps": 13, "output.keep_last": 1}),
          out_dir=tmp_path / "run", resume="auto")
    names = {p.name for p in (tmp_path / "run/checkpoints").iterdir()}
    assert {"update-00000013", "update-00000018"} <= names and "update-00000009" not in names  # 18: not passed
    assert (tmp_path / "run/best").resolve().name in names


def test_resume_finds_a_checkpoint_written_just_before_a_kill(folder, tmp_path):
    """Killed after the first checkpoint's rename, before 'last' was linked: --resume takes it."""
    train(tiny(folder, **{"train.max_steps": 2}), out_dir=tmp_path / "run")
    (tmp_path / "run/last").unlink()
    train(tiny(folder, **{"train.max_steps": 3}), out_dir=tmp_path / "run", resume="auto")
    assert snapshot.read_train_state((tmp_path / "run/last").resolve())["num_updates"] == 3


def test_resume_refuses_what_would_lose_or_mislabel(folder, tmp_path):
    train(tiny(folder, **{"train.max_steps": 2, "ema.enabled": True}), out_dir=tmp_path / "a")
    train(tiny(folder, **{"train.max_steps": 1}), out_dir=tmp_path / "b")
    # into another run's directory: its checkpoints would be pruned
    with pytest.raises(ConfigError, match=r"--output: .*b: holds the checkpoints of an earlier run"):
        train(tiny(folder, **{"train.max_steps": 3, "ema.enabled": True}), out_dir=tmp_path / "b",
              resume=str(tmp_path / "a"))
    assert (tmp_path / "b/checkpoints/update-00000001").is_dir()
    # other class names: the head's outputs would mean other classes
    renamed = _copy_folder(folder, tmp_path, lambda r: [(r / s / "class2").rename(r / s / "zebra")
                                                        for s in ("train", "val")])
    with pytest.raises(CheckpointError, match=r"trained on other classes \(only in \S+train: \['zebra'\], only "
                                              r"in the checkpoint: \['class2'\]\)"):
        train(tiny(renamed, **{"train.max_steps": 3, "ema.enabled": True}), out_dir=tmp_path / "a", resume="auto")
    # a lost EMA file is an error, not a silent restart of the average
    ((tmp_path / "a/last").resolve() / snapshot.EMA_WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="model_ema.safetensors"):
        train(tiny(folder, **{"train.max_steps": 3, "ema.enabled": True}), out_dir=tmp_path / "a", resume="auto")


def test_resume_applies_the_changed_optimizer_settings(folder, tmp_path):
    """torch's Optimizer.load_state_dict brings back the saved weight decay and betas: the resumed
    run must train with the recipe's (it reports them as changed)."""
    train(tiny(folder, **{"train.max_steps": 2}), out_dir=tmp_path / "run")
    train(tiny(folder, **{"train.max_steps": 3, "optimizer.weight_decay": 0.3, "optimizer.betas": [0.8, 0.9]}),
          out_dir=tmp_path / "run", resume="auto")
    groups = snapshot.read_train_state((tmp_path / "run/last").resolve())["optimizer"]["param_groups"]
    assert {g["weight_decay"] for g in groups} == {0.0, 0.3}  # the no-decay group keeps 0
    assert {tuple(g["betas"]) for g in groups} == {(0.8, 0.9)}
    with pytest.raises(CheckpointError, match=r"changes optimizer.name \('adamw' -> 'sgd'\): the saved "
                                              r"optimizer state is the other optimizer's"):
        train(tiny(folder, **{"train.max_steps": 4, "optimizer.name": "sgd"}), out_dir=tmp_path / "run",
              resume="auto")


def test_resuming_a_run_that_reached_max_steps_trains_nothing(folder, tmp_path, capsys):
    train(tiny(folder, **{"train.max_steps": 2}), out_dir=tmp_path / "run")
    summary = train(tiny(folder, **{"train.max_steps": 2}), out_dir=tmp_path / "run", resume="auto")
    assert summary["num_updates"] == 2 and (tmp_path / "run/last").resolve().name == "update-00000002"
    assert "train.max_steps=2 was reached (update 2): nothing to train" in capsys.readouterr().err


def test_a_fresh_run_drops_the_log_of_a_run_killed_before_its_first_checkpoint(folder, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run/metrics.jsonl").write_text('{"kind": "train", "update": 1, "loss": 9.0}\n')
    train(tiny(folder, **{"train.max_steps": 1}), out_dir=tmp_path / "run")
    assert [r["loss"] != 9.0 for r in read_jsonl(tmp_path / "run/metrics.jsonl") if r["kind"] == "train"] == [True]


def test_a_new_run_keeps_out_of_an_earlier_runs_directory(folder, tmp_path):
    train(tiny(folder, **{"train.max_steps": 1}), out_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="holds the checkpoints of an earlier run.*pass --resume"):
        train(tiny(folder, **{"train.max_steps": 1}), out_dir=tmp_path / "run")
    assert (tmp_path / "run/checkpoints/update-00000001").is_dir()


def test_image_folder_reads_what_torchvision_reads(folder, tmp_path):
    from zoo.data import image_folder
    root = _copy_folder(folder, tmp_path, lambda r: None)
    for i, ext in enumerate((".bmp", ".webp", ".tif", ".JPG")):
        src = root / "train/class1" / f"{i}.png"
        Image.open(src).save(src.with_suffix(ext), format={".JPG": "JPEG"}.get(ext))
        src.unlink()
    ds = image_folder(root, "train")
    assert len(ds) == 24 and sorted(t for _, t in ds.reader.samples).count(1) == 8
    assert ds[0][0].size == (32, 32)


def _copy_folder(folder, tmp_path, edit):
    root = tmp_path / "data"
    shutil.copytree(folder, root)
    edit(root)
    return root


@pytest.mark.parametrize("edit,sets,error,words", [
    (lambda r: shutil.rmtree(r / "val/class1"), {}, DataError, r"only in \S*train: \['class1'\]"),
    (lambda r: [p.unlink() for p in (r / "train/class2").iterdir()], {}, DataError, r"without images: \['class2'\]"),
    # timm labels an image by its own folder: class0/extra/ would become a class 'extra'
    (lambda r: (r / "train/class0/extra").mkdir() or shutil.move(r / "train/class0/0.png", r / "train/class0/extra"),
     {}, DataError, r"1 image\(s\) not directly in a class folder \(e\.g\. class0/extra/0\.png\)"),
    (lambda r: None, {"data.val_split": "valid"}, DataError, "valid does not exist"),
    (lambda r: None, {"model.num_classes": 2}, ConfigError, "model.num_classes: is 2 but"),
    (lambda r: None, {"train.batch_size": 30}, ConfigError, "larger than the training set"),
])
def test_data_that_does_not_fit_is_refused_before_training(folder, tmp_path, edit, sets, error, words):
    root = _copy_folder(folder, tmp_path, edit)
    with pytest.raises(error, match=words):
        train(tiny(root, **sets), out_dir=tmp_path / "run")
    assert not (tmp_path / "run/checkpoints").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for a machine without CUDA")
def test_cuda_without_a_gpu_names_the_recipe_key(folder, tmp_path):
    with pytest.raises(ConfigError, match=r"demo\.yaml: runtime\.device: is 'cuda:0' but torch sees no CUDA"):
        train(tiny(folder, **{"runtime.device": "cuda:0"}), out_dir=tmp_path / "run")
    from zoo.bench import bench
    with pytest.raises(ConfigError, match="--device: is 'cuda' but torch sees no CUDA device"):
        bench(["resnet10t"], device="cuda", iters=1)


def test_pretrained_file_must_fit(folder, tmp_path):
    other = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("resnet10t").state_dict(), str(other))
    with pytest.raises(CheckpointError, match="does not fit"):
        train(tiny(folder, **{"model.pretrained_file": str(other), "train.max_steps": 1}), out_dir=tmp_path / "a")
    source = timm.create_model("zoo_nat_demo")  # 10 classes: its head is dropped, the body loads
    save_file(source.state_dict(), str(tmp_path / "demo.safetensors"))
    train(tiny(folder, **{"model.pretrained_file": str(tmp_path / "demo.safetensors"), "train.max_steps": 1,
                          "optimizer.lr": 1e-12}), out_dir=tmp_path / "b")
    k = "stages.0.blocks.0.mixer.qkv.weight"
    torch.testing.assert_close(weights(tmp_path / "b")[k], source.state_dict()[k], atol=1e-6, rtol=0)


def test_crash_mid_save_keeps_last_good(folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tiny(folder, **{"train.max_steps": 2}), out_dir=out)
    good = (out / "last").resolve()
    before = weights(out)
    real = snapshot.atomic_write_bytes

    def crash(path, data):
        if Path(path).name == snapshot.STATE:
            real(path, data[: len(data) // 2])  # half written...
            raise OSError("disk full")  # ...then the process dies
        return real(path, data)

    monkeypatch.setattr(snapshot, "atomic_write_bytes", crash)
    with pytest.raises(TrainingStopped, match=r"disk full\. Last good checkpoint: .*update-00000002"):
        train(tiny(folder, **{"train.max_steps": 4}), out_dir=out, resume="auto")
    assert (out / "last").resolve() == good
    after = weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert snapshot.read_train_state(good)["num_updates"] == 2
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_sigterm_checkpoints_the_update_and_resume_continues_exactly(folder, tmp_path, monkeypatch):
    """SIGTERM to the whole process group, as torchrun and cluster schedulers send it, data loader
    workers included: the run saves the update it is in. (torch's workers die of a SIGTERM not
    from their parent, and the loader then failed with 'DataLoader worker is killed by signal',
    saving nothing.)"""
    import multiprocessing
    import signal

    import zoo.training as training
    real, calls = training._criterion, {"n": 0}

    def preempted_at_third_update(recipe, mixup_on):
        base = real(recipe, mixup_on)

        def loss(out, target):
            calls["n"] += 1
            if calls["n"] == 3:  # what a cluster sends before it kills the job, from outside
                pids = [os.getpid()] + [p.pid for p in multiprocessing.active_children()]
                subprocess.run(["kill", "-TERM", *map(str, pids)], check=True)
            return base(out, target)
        return loss

    train(tiny(folder, **{"train.max_steps": 5}), out_dir=tmp_path / "straight")
    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(training, "_criterion", preempted_at_third_update)
    with pytest.raises(TrainingStopped, match=r"stopped by SIGTERM after update 3, which is saved: .*update-00000003"):
        # a worker (the order does not depend on how many)
        train(tiny(folder, **{"train.max_steps": 5, "data.workers": 1}), out_dir=tmp_path / "b")
    assert signal.getsignal(signal.SIGTERM) is handler  # the run's handler is gone with it
    monkeypatch.setattr(training, "_criterion", real)
    train(tiny(folder, **{"train.max_steps": 5}), out_dir=tmp_path / "b", resume="auto")
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_resumed_on_more_processes_gives_each_rank_its_own_random_stream(folder, tmp_path):
    """A run saved by 1 process and continued under torchrun with 2: rank 0 continues the saved
    stream; rank 1, which has none saved, draws its own drop-path masks and mixup lambdas (as a
    fresh run's ranks do), not copies of rank 0's."""
    from zoo.distributed import Dist
    from zoo.training import _Run

    train(tiny(folder, **{"train.max_steps": 1}), out_dir=tmp_path / "run")
    saved = snapshot.read_train_state((tmp_path / "run/last").resolve())["rng"]
    streams = []
    for rank in (0, 1):  # resume() joins no process group: each rank's part can run here
        run = _Run(tiny(folder, **{"train.max_steps": 2}), tmp_path / "run", Dist(rank=rank, world_size=2), False,
                   [])
        run.resume(tmp_path / "run")
        streams.append(torch.get_rng_state())
    assert len(saved) == 1 and torch.equal(streams[0], saved[0]["torch"])
    assert not torch.equal(streams[1], streams[0])


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    f = tmp_path / "x.bin"
    snapshot.atomic_write_bytes(f, b"good")

    def boom(fd):
        raise OSError("fsync failed")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        snapshot.atomic_write_bytes(f, b"bad")
    assert f.read_bytes() == b"good" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_truncated_or_foreign_checkpoint_is_a_clear_error(folder, trained, tmp_path):
    import shutil
    src = (trained[0] / "last").resolve()
    bad = tmp_path / "run"
    shutil.copytree(trained[0], bad, symlinks=True)
    snap = (bad / "last").resolve()
    w = snap / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        train(tiny(folder), out_dir=bad, resume="auto")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        evaluate_folder("zoo_nat_demo", folder, checkpoint=snap, ema=False, progress=False)
    st = snap / "train_state.pt"
    st.write_bytes(st.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="train_state.pt"):
        snapshot.read_train_state(snap)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "meta.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not a zoo training checkpoint"):
        train(tiny(folder), out_dir=tmp_path / "x", resume=str(foreign))
    (foreign / "meta.json").write_text("{trunc")
    with pytest.raises(CheckpointError, match="truncated"):
        snapshot.read_meta(foreign)
    with pytest.raises(CheckpointError, match="does not exist"):
        train(tiny(folder), out_dir=tmp_path / "y", resume=str(tmp_path / "nowhere"))
    # weights of another architecture
    with pytest.raises(CheckpointError, match="checkpoint is of 'zoo_nat_demo'"):
        train(tiny(folder, **{"model.name": "zoo_nat_mini", "data.img_size": 32}), out_dir=tmp_path / "z",
              resume=str(src))


def test_non_finite_loss_stops_and_keeps_last_good(folder, tmp_path, monkeypatch):
    import zoo.training as training
    real = training._criterion
    calls = {"n": 0}

    def poisoned(recipe, mixup_on):
        base = real(recipe, mixup_on)

        def loss(out, target):
            calls["n"] += 1
            val = base(out, target)
            return val * float("nan") if calls["n"] >= 3 else val
        return loss

    monkeypatch.setattr(training, "_criterion", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 1, update 3.*update-00000002"):
        train(tiny(folder, **{"train.save_every_steps": 1}), out_dir=out)
    w = weights(out)
    assert all(torch.isfinite(v).all() for v in w.values())
    assert snapshot.read_train_state((out / "last").resolve())["num_updates"] == 2


def test_cli_reports_config_errors(capsys, folder, monkeypatch):
    mod = _load_script("train")
    assert mod.main([str(ROOT / "configs/train/demo.yaml"), "--set", "train.epochs=-1"]) == 1
    err = capsys.readouterr().err
    assert "--set: train.epochs: must be positive" in err
    # under torchrun, a recipe error is said once (rank 0), a run's error by each rank that meets it
    monkeypatch.setenv("RANK", "1")
    assert mod.main([str(ROOT / "configs/train/demo.yaml"), "--set", "train.epochs=-1"]) == 1
    assert mod.main([str(ROOT / "configs/train/demo.yaml"), "--set", f"data.root={folder}", "--set",
                     "data.val_split=nope"]) == 1
    assert capsys.readouterr().err.splitlines() == [f"error (rank 1): {folder / 'nope'} does not exist: set "
                                                    f"data.val_split to the validation folder, or to null to train "
                                                    f"without validation"]


def test_eval_cli_refuses_bad_arguments_and_empty_folders(trained, tmp_path, capsys):
    out, _ = trained
    mod = _load_script("eval")
    (tmp_path / "val/a").mkdir(parents=True)  # a class folder without images
    for args, words in [(["--batch-size", "-4"], "--batch-size: must be a positive integer, got -4"),
                        (["--device", "bogus"], "--device: is 'bogus', not a device torch knows"),
                        ([], f"image folder {tmp_path / 'val'} has no images")]:
        try:
            code = mod.main(["zoo_nat_demo", "--checkpoint", str(out / "best"), "--data", str(tmp_path)] + args)
        except SystemExit as e:  # argparse
            code = e.code
        assert code in (1, 2) and words in capsys.readouterr().err, args


def test_cli_names_the_best_checkpoint_with_its_own_validation(folder, tmp_path, capsys):
    """train.py ends by naming the best checkpoint beside the validation it was chosen on (it once
    printed the last epoch's figures there, beside an earlier epoch's checkpoint)."""
    mod = _load_script("train")
    sets = [["--set", f"{k}={v}"] for k, v in tiny_sets(folder, **{"train.epochs": 3}).items()]
    assert mod.main([str(ROOT / "configs/train/demo.yaml"), "--output", str(tmp_path), *sum(sets, [])]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("best checkpoint: ")]
    val = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "val"]
    best = max(val, key=lambda r: r["top1"])  # the first of equals, as training keeps
    path = (tmp_path / "checkpoints" / f"update-{best['update']:08d}").resolve()
    assert line == [f"best checkpoint: {path}  ({format_validation(best)})"]


# ------------------------------------------------------------------------------------------ distributed


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(folder, out, extra, *args, wrapper=None):
    """train.py in 2 gloo processes on the tiny folder (run by ``wrapper``, a script given train.py's
    path and arguments, if one is given; else asserts that it succeeds)."""
    sets = [f"--set={k}={'null' if v is None else v}" for k, v in {**tiny_sets(folder), **extra}.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", *([str(wrapper)] if wrapper else []), str(ROOT / "train.py"),
           str(ROOT / "configs/train/demo.yaml"), "--output", str(out), "--no-progress", *sets, *args]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert wrapper or res.returncode == 0, res.stderr[-3000:]
    return res


HANG_AT_SECOND_UPDATE = """import os, runpy, signal, sys, time
from zoo import training
real, calls = training._criterion, []
def criterion(*a):
    loss = real(*a)
    def hang(*x):
        calls.append(1)
        if len(calls) == 2 and os.environ["RANK"] == "1":
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # hung, but torchrun's SIGTERM ends it
            time.sleep(600)
        return loss(*x)
    return hang
training._criterion = criterion
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_hung_process_stops_the_run_after_runtime_dist_timeout(folder, tmp_path):
    """Rank 1 stops answering at its second update: rank 0 waits runtime.dist_timeout (6 s here, not
    gloo's 30 min), then stops with one line naming the wait and the last good checkpoint."""
    wrapper = tmp_path / "hang.py"
    wrapper.write_text(HANG_AT_SECOND_UPDATE)
    res = _torchrun(folder, tmp_path / "run", {"runtime.dist_timeout": 0.1, "train.save_every_steps": 1},
                    wrapper=wrapper)
    assert res.returncode != 0
    line = [x for x in res.stderr.splitlines() if x.startswith("error")]
    assert len(line) == 1 and "[rank0]" not in res.stderr, res.stderr[-3000:]
    assert line[0].startswith("error: another process died, or did not answer within 0.1 min "
                              "(runtime.dist_timeout): ") and "Timed out" in line[0], line
    assert line[0].endswith(f"Last good checkpoint: {(tmp_path / 'run/checkpoints/update-00000001').resolve()} "
                            f"(continue with --resume)"), line


def test_two_processes_train_a_model_with_parameters_unused_at_this_size(folder, tmp_path):
    """FasterViT's carrier tokens take no part on a map of one window (32 px here): DDP must be
    told, or it stops at the second update waiting for their gradients."""
    res = _torchrun(folder, tmp_path / "run", {"model.name": ROOT / "tests/configs/tiny_fastervit.yaml",
                                               "train.max_steps": 2})
    assert "38 parameters take no part at 32x32 px (e.g. stages.2.context.pos_embed.weight)" in res.stderr
    assert snapshot.read_train_state((tmp_path / "run/last").resolve())["num_updates"] == 2


def test_two_processes_match_one(folder, tmp_path):
    """2 gloo processes with half the batch each == 1 process with the whole batch (no dropout-like
    randomness, so the only difference is the order of the gradient sum). SGD, because Adam's
    g / sqrt(v) turns rounding noise in near-zero gradients into lr-sized steps (up to ~1e-5 here)."""
    extra = {"train.max_steps": 3, "model.drop_path_rate": 0.0, "augment.mixup": 0.0, "augment.cutmix": 0.0,
             "optimizer.name": "sgd", "optimizer.lr": 0.05, "optimizer.clip_grad": None}
    train(tiny(folder, **extra), out_dir=tmp_path / "one")
    res = _torchrun(folder, tmp_path / "two", extra)
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")
    # rank 0 alone wrote: one snapshot per save, one metrics file, and reported once
    assert len(list((tmp_path / "two/checkpoints").iterdir())) == 1
    assert res.stdout.count("run directory:") == 1
    # the logged loss is the whole batch's (the mean over ranks), as with one process
    def first_loss(run):
        return next(r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train")
    assert first_loss(tmp_path / "two") == pytest.approx(first_loss(tmp_path / "one"), rel=1e-5)


def test_two_processes_validate_the_batchnorm_statistics_they_save_and_resume_exactly(folder, tmp_path):
    """Under DDP each rank updates its BatchNorm statistics from its own half of the batch; at the
    epoch's end (runtime.dist_bn: reduce, timm's default) they are averaged, so both ranks validate
    the model (and EMA) the checkpoint holds: eval.py of that checkpoint in one process gives the
    validation the run logged. Without it the rank of the second shard validated other statistics
    (its loss was off by 6e-3 here). Stopped mid-epoch and resumed, the 2 processes continue
    exactly: each rank's EMA follows its own statistics until that average, so every rank's is
    saved (with rank 0's alone, the resumed EMA's running_var was off by 2e-2 after the epoch)."""
    extra = {"model.name": ROOT / "tests/configs/tiny_maxvit.yaml", "train.epochs": 2, "ema.enabled": True,
             "ema.decay": 0.5, "augment.mixup": 0.8, "augment.cutmix": 1.0}  # every rank's random stream too
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    _torchrun(folder, run, {**extra, "train.max_steps": 7})  # 6 updates per epoch: validated at 6
    _torchrun(folder, resumed, {**extra, "train.max_steps": 4})
    _torchrun(folder, resumed, {**extra, "train.max_steps": 7}, "--resume")
    val = next(r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "val")
    assert [r for r in read_jsonl(resumed / "metrics.jsonl") if r["kind"] == "val"] == [val]
    for ema, prefix in ((False, ""), (True, "ema_")):
        m = evaluate_folder(str(ROOT / "tests/configs/tiny_maxvit.yaml"), folder, "val", checkpoint=run / "best",
                            ema=ema, progress=False, device="cpu")
        assert m["loss"] == pytest.approx(val[f"{prefix}loss"], rel=1e-5), prefix
        assert m["top1"] == val[f"{prefix}top1"]
        a, b = (snapshot.read_weights((r / "last").resolve(), ema=ema) for r in (run, resumed))
        assert all(torch.equal(a[k], b[k]) for k in a), prefix


def test_sync_batchnorm_swaps_the_layers_for_gpu_processes_and_refuses_cpu_ones(folder, capsys):
    """runtime.sync_batchnorm: under torchrun on GPUs every BatchNorm becomes a SyncBatchNorm with the
    same state (so checkpoints load into the plain model); gloo CPU processes, which SyncBatchNorm
    cannot serve, are refused by name before the data is read; one process keeps its model."""
    from zoo.distributed import Dist
    from zoo.models import build_model
    from zoo.training import _check_sync_batchnorm, _sync_batchnorm

    R = tiny(folder, **{"runtime.sync_batchnorm": True})
    model = build_model(str(ROOT / "tests/configs/tiny_maxvit.yaml"))
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert bn > 0
    assert _sync_batchnorm(model, R, Dist()) is model
    gpus = Dist(rank=0, world_size=2, device=torch.device("cuda", 0))
    _check_sync_batchnorm(R, gpus)
    synced = _sync_batchnorm(model, R, gpus)
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == bn
    assert not any(type(m) is torch.nn.BatchNorm2d for m in synced.modules())
    assert synced.state_dict().keys() == plain.keys()
    assert all(torch.equal(v, plain[k]) for k, v in synced.state_dict().items())
    assert f"{bn} BatchNorm layers synchronised across 2 processes" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"runtime\.sync_batchnorm: needs CUDA devices .* 2 processes are on cpu"):
        _check_sync_batchnorm(R, Dist(rank=1, world_size=2, device=torch.device("cpu")))


# ------------------------------------------------------------------------------------------ eval / bench / hub


def test_eval_matches_training_validation(trained, folder, capsys):
    out, s = trained
    meta = json.loads(((out / "best").resolve() / "meta.json").read_text())
    m = evaluate_folder("zoo_nat_demo", folder, "val", checkpoint=out / "best", ema=False, progress=False)
    assert m["count"] == 9
    assert m["top1"] == pytest.approx(meta["metrics"]["top1"]) and m["loss"] == pytest.approx(meta["metrics"]["loss"])
    mod = _load_script("eval")
    assert mod.main(["zoo_nat_demo", "--checkpoint", str(out / "best"), "--data", str(folder), "--json",
                     "--workers", "0", "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "eval" not in printed.err  # --no-progress: no bar
    line = json.loads(printed.out.strip().splitlines()[-1])
    assert line["top1"] == pytest.approx(meta["metrics"]["ema_top1"])  # best_weights: the EMA


def test_eval_says_which_weights_and_refuses_what_does_not_fit(trained, folder, tmp_path):
    out, _ = trained
    best = (out / "best").resolve()
    raw = evaluate_folder("nat_demo", folder, checkpoint=best, ema=False, progress=False)  # short name
    # a weights file of a checkpoint is read with its checkpoint's data config and classes
    from_file = evaluate_folder("zoo_nat_demo", folder, checkpoint=best / "model.safetensors", progress=False)
    assert [from_file[k] for k in ("count", "top1", "loss")] == [raw[k] for k in ("count", "top1", "loss")]
    for kw, words in [(dict(model_name="resnet18", checkpoint=best), "checkpoint is of 'zoo_nat_demo', not 'resnet18'"),
                      (dict(model_name="nat_demo", checkpoint=None), "no weights to download")]:
        with pytest.raises(CheckpointError, match=words):
            evaluate_folder(root=folder, progress=False, **kw)
    renamed = _copy_folder(folder, tmp_path, lambda r: (r / "val/class2").rename(r / "val/zebra"))
    with pytest.raises(DataError, match=r"differ from those the checkpoint was trained on \(only in the folder: "
                                        r"\['zebra'\], only in the checkpoint: \['class2'\]\)"):
        evaluate_folder("zoo_nat_demo", renamed, checkpoint=best, progress=False)


def test_dangling_last_names_the_checkpoints_that_remain(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run, symlinks=True)
    (run / "last").unlink()
    (run / "last").symlink_to("checkpoints/update-99999999")
    with pytest.raises(CheckpointError, match=r"last points to .*which is missing; the checkpoints there: \['update-"):
        snapshot.resolve(run)


def test_eval_timm_model(folder):
    import timm  # no network: a timm model with weights of our own, loaded as a file
    net = timm.create_model("resnet10t", num_classes=3)
    sd = net.state_dict()
    f = Path(folder).parent / "r10t.safetensors"
    from safetensors.torch import save_file
    save_file(sd, str(f))
    m = evaluate_folder("resnet10t", folder, "val", checkpoint=f, img_size=32, progress=False)
    assert m["count"] == 9 and 0 <= m["top1"] <= 100


def test_bench_writes_json_and_plot(tmp_path):
    from zoo.bench import bench
    out = tmp_path / "bench.json"
    rows = bench(["nat_demo", "resnet10t"], batch_size=2, img_size=32, warmup=1, iters=1, out=str(out))
    assert [r["source"] for r in rows] == ["zoo", "timm"] and all(r["images_per_s"] > 0 for r in rows)
    assert json.loads(out.read_text())["results"][0]["model"] == "zoo_nat_demo"  # the short name resolved
    assert out.with_suffix(".png").stat().st_size > 1000
    # a model that fails gets an error row; the others are still measured and written
    rows = bench(["zoo_nat_demo", "resnet10t"], batch_size=1, img_size=16, warmup=1, iters=1, out=str(out))
    assert "at least 32x32" in rows[0]["error"] and rows[1]["images_per_s"] > 0
    assert len(json.loads(out.read_text())["results"]) == 2
    with pytest.raises(ValueError, match="unknown model 'nat_nope'"):
        bench(["resnet10t", "nat_nope"], iters=1)
    with pytest.raises(ValueError, match="is a directory; give the path of the JSON file"):
        bench(["resnet10t"], iters=1, out=str(tmp_path))  # said before anything is measured


@pytest.mark.parametrize("kwargs", [{}, {"global_pool": ""}, {"global_pool": "max", "in_chans": 1, "num_classes": 5}])
def test_save_pretrained_keeps_the_arguments_that_shaped_the_model(tmp_path, kwargs):
    model = zoo.create_model("zoo_nat_demo", **kwargs).eval()
    d = zoo.save_pretrained(model, tmp_path / "export")
    x = torch.randn(2, kwargs.get("in_chans", 3), 64, 64)
    for i, loaded in enumerate((zoo.create_model(d, pretrained=True),
                                timm.create_model(f"local-dir:{d}", pretrained=True))):
        torch.testing.assert_close(loaded.eval()(x), model(x))
        again = zoo.save_pretrained(loaded, tmp_path / f"again{i}")  # a loaded model saves (and pushes) again
        torch.testing.assert_close(zoo.create_model(again, pretrained=True).eval()(x), model(x))
    (d / "config.json").unlink()
    with pytest.raises(ValueError, match="has no config.json: not a folder zoo.save_pretrained wrote"):
        zoo.create_model(d, pretrained=True)


def test_save_pretrained_loads_with_timm(tmp_path, monkeypatch):
    import timm
    model = zoo.create_model("zoo_nat_demo", num_classes=5).eval()
    d = zoo.save_pretrained(model, tmp_path / "export")
    assert {"config.json", "model.safetensors", "zoo_model.yaml"} <= {p.name for p in d.iterdir()}
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architecture"] == "zoo_nat_demo" and cfg["num_classes"] == 5
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    a = timm.create_model(f"local-dir:{d}", pretrained=True).eval()
    torch.testing.assert_close(a(x), ref)
    # a head of another size than the config's: say so in the overlay, or timm re-initialises it
    b = timm.create_model("zoo_nat_demo", pretrained=True, num_classes=5,
                          pretrained_cfg_overlay=dict(file=str(d / "model.safetensors"), num_classes=5)).eval()
    torch.testing.assert_close(b(x), ref)
    # hf-hub: timm's download reads the local directory instead of the network
    import timm.models._hub as hub

    def fake_download(repo_id, filename, **kw):
        assert repo_id == "someone/nat-demo"
        return str(d / filename)

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    c = timm.create_model("hf-hub:someone/nat-demo", pretrained=True).eval()
    torch.testing.assert_close(c(x), ref)


def test_a_model_from_your_own_yaml_saves_and_loads_with_zoo(tmp_path):
    import timm
    mine = tmp_path / "my_net.yaml"  # not registered: timm cannot rebuild it, zoo can from the saved YAML
    mine.write_text("base: nat_demo\nmodel: {stages: [{}, {}, {depth: 1}, {}]}\n")
    model = zoo.create_model(mine, num_classes=5, img_size=48).eval()
    d = zoo.save_pretrained(model, tmp_path / "export")
    loaded = zoo.create_model(d, pretrained=True).eval()
    x = torch.randn(2, 3, 48, 48)
    assert loaded.num_classes == 5 and loaded.pretrained_cfg["input_size"] == (3, 48, 48)
    assert torch.equal(loaded(x), model(x))
    assert not torch.equal(zoo.create_model(d).eval()(x), model(x))  # without pretrained: random weights
    with pytest.raises(RuntimeError, match="zoo_my_net"):
        timm.create_model(f"local-dir:{d}", pretrained=True)
    with pytest.raises(ValueError, match="not a registered zoo model"):
        zoo.push_to_hub(model, "me/my_net")


def test_save_pretrained_refuses_a_user_yaml_that_shares_a_registered_name(tmp_path):
    mine = tmp_path / "nat_demo.yaml"  # a user's own nat_demo, one block shallower than the shipped one
    mine.write_text("base: nat_demo\nmodel: {stages: [{}, {}, {depth: 1}, {}]}\n")
    model = zoo.create_model(mine)
    with pytest.raises(ValueError, match="shares the name zoo_nat_demo with the registered"):
        zoo.save_pretrained(model, tmp_path / "export")


def test_push_to_hub_uploads_the_export(tmp_path, monkeypatch):
    import huggingface_hub
    seen = {}

    class FakeApi:
        def __init__(self, token=None, **kw):
            seen["token"] = token

        def create_repo(self, repo_id, private=False, exist_ok=False):
            seen["created"] = repo_id
            return type("Url", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, revision=None, commit_message=""):
            seen["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            seen["repo"] = repo_id
            return "ok"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model = zoo.create_model("zoo_nat_demo")
    assert zoo.push_to_hub(model, "me/nat-demo", token="t") == "ok"
    assert seen["repo"] == "me/nat-demo" and {"config.json", "model.safetensors"} <= set(seen["files"])
    # what cannot be saved is refused before a repo is created on the hub
    seen.clear()
    with pytest.raises(ValueError, match="features_only"):
        zoo.push_to_hub(zoo.create_model("zoo_nat_demo", features_only=True), "me/feats")
    assert "created" not in seen


def test_digits_demo_data(tmp_path):
    pytest.importorskip("sklearn")
    from zoo.demo import write_digits
    root = write_digits(tmp_path / "digits")
    train_files = list((root / "train").rglob("*.png"))
    val_files = list((root / "val").rglob("*.png"))
    assert len(train_files) + len(val_files) == 1797 and len(val_files) == 360
    assert sorted(p.name for p in (root / "train").iterdir()) == [str(i) for i in range(10)]
    assert Image.open(train_files[0]).size == (32, 32)
    mtime = train_files[0].stat().st_mtime
    write_digits(root)  # second call: already there, nothing rewritten
    assert train_files[0].stat().st_mtime == mtime


# ------------------------------------------------------------------------------------------ hybrids

HYBRIDS = sorted(n for n in zoo.list_models() if n.startswith("zoo_hybrid_"))


@pytest.mark.parametrize("name", HYBRIDS)
def test_demo_recipe_trains_each_hybrid(name, folder, tmp_path):
    """The cross-family hybrids (configs/models/hybrids/) learn under the demo recipe: the
    training loss falls over a few epochs on the tiny colour-coded folder."""
    assert len(HYBRIDS) >= 2
    summary = train(tiny(folder, **{"model.name": name, "train.epochs": 4, "optimizer.lr": 1e-3}),
                    out_dir=tmp_path / "run")
    losses = [json.loads(line)["loss"] for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text()
              .splitlines() if json.loads(line)["kind"] == "train"]
    assert len(losses) >= 8 and all(np.isfinite(losses))
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.8 * first, (name, losses)
