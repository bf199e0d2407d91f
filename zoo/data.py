"""ImageFolder data for training and evaluation: timm's datasets and transforms, with a sampler
that makes every run reproducible across resumes, worker counts and numbers of processes.

Each sample's augmentation is seeded from (seed, epoch, index), so the same image gets the same
crop whichever process or worker loads it, and a run resumed mid-epoch sees the same batches.
The global batch of update ``u`` is samples ``perm[u*B:(u+1)*B]`` of the epoch's permutation;
rank ``r`` of ``W`` takes its ``r``-th share of it, so W processes compute the same update as one.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

MIX = 0x9E3779B97F4A7C15


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (((seed * 1_000_003) ^ (epoch * 7919) ^ (index * MIX)) + index) % (2 ** 63)


class SeededDataset(Dataset):
    """Wraps a dataset; ``ds[(index, epoch)]`` runs its random transform under a per-sample seed and
    leaves the caller's random state untouched."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        s = sample_seed(self.seed, epoch, index)
        py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            random.seed(s)
            np.random.seed(s % (2 ** 32))
            # the CPU generator only: torch.manual_seed also queues a CUDA reseed that records a
            # stack trace per call (slow, and the transforms run on the CPU anyway)
            torch.default_generator.manual_seed(s)
            return self.dataset[index]
        finally:
            random.setstate(py)
            np.random.set_state(npy)
            torch.set_rng_state(th)


class UpdateSampler(Sampler):
    """Yields this rank's micro-batches of ``(index, epoch)`` keys for one epoch.

    ``batch_size`` is the global batch of one optimizer update; it is cut into ``world * accum``
    equal shares, micro-batch ``a`` of rank ``r`` being share ``a * world + r``. Incomplete last
    updates are dropped. ``start_update`` skips updates already done (resume mid-epoch).
    """

    def __init__(self, n: int, batch_size: int, world: int = 1, rank: int = 0, accum: int = 1, seed: int = 0,
                 shuffle: bool = True):
        if batch_size % (world * accum):
            raise ValueError(f"batch size {batch_size} is not divisible by processes x accumulation "
                             f"steps = {world} x {accum}")
        self.n, self.batch_size, self.world, self.rank, self.accum = n, batch_size, world, rank, accum
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_update = 0, 0

    @property
    def updates_per_epoch(self) -> int:
        return self.n // self.batch_size

    def set_epoch(self, epoch: int, start_update: int = 0) -> None:
        self.epoch, self.start_update = epoch, start_update

    def __len__(self) -> int:
        return (self.updates_per_epoch - self.start_update) * self.accum

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        share = self.batch_size // (self.world * self.accum)
        for u in range(self.start_update, self.updates_per_epoch):
            batch = perm[u * self.batch_size:(u + 1) * self.batch_size]
            for a in range(self.accum):
                j = a * self.world + self.rank
                yield [(i, self.epoch) for i in batch[j * share:(j + 1) * share]]


class ShardSampler(Sampler):
    """Evaluation: rank r takes every W-th sample, no padding, so summed counts are exact."""

    def __init__(self, n: int, batch_size: int, world: int = 1, rank: int = 0):
        self.idx = list(range(rank, n, world))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.idx) // self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.idx), self.batch_size):
            yield [(j, 0) for j in self.idx[i:i + self.batch_size]]


# torchvision's ImageFolder extensions (timm's reader alone takes .png/.jpg/.jpeg and skips the rest)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def image_folder(root, split: Optional[str] = None, transform=None):
    """timm's ImageDataset over ``root/split``: one sub-folder of images per class, sorted. A folder
    laid out otherwise is refused: timm's reader labels an image by its own folder's name, so images
    in nested folders would become classes of their own, and an empty class folder would shift
    every later label."""
    from timm.data import ImageDataset

    from zoo.errors import DataError
    path = Path(root) / split if split else Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"image folder {path} does not exist (expected {Path(root)}/<split>/<class>/<image>)")
    try:
        ds = ImageDataset(str(path), transform=transform, input_key=";".join(EXTENSIONS))
    except RuntimeError as e:  # timm's reader raises on a folder without images
        if "Found 0 images" not in str(e):
            raise
        ds = ()
    if len(ds) == 0:
        raise FileNotFoundError(f"image folder {path} has no images (expected {path}/<class>/<image>, "
                                f"{'|'.join(e[1:] for e in EXTENSIONS)})")
    top = str(path)
    misplaced = [f for f, _ in ds.reader.samples if os.path.dirname(os.path.dirname(f)) != top]
    if misplaced:
        where = os.path.relpath(misplaced[0], top)
        raise DataError(f"{path}: {len(misplaced)} image(s) not directly in a class folder (e.g. {where}); an "
                        f"image folder holds one level of class folders, <class>/<image>")
    classes = set(class_names(ds))
    empty = sorted(p.name for p in path.iterdir() if p.is_dir() and p.name not in classes)
    if empty:
        raise DataError(f"{path}: class folder(s) without images: {empty[:5]}")
    return ds


def check_classes(root, train_split: str, train_ds, val_split: Optional[str], val_ds) -> List[str]:
    """The training classes, after checking that they make a classification data set (at least two)
    and that the validation split has the same."""
    from zoo.errors import DataError
    train_dir = Path(root) / train_split
    classes = class_names(train_ds)
    if len(classes) < 2:
        raise DataError(f"{train_dir}: found {len(classes)} class folder(s) with images; an ImageFolder holds "
                        f"one sub-folder of images per class, at least two")
    if val_ds is not None:
        differ = class_difference(classes, str(train_dir), class_names(val_ds), str(Path(root) / val_split))
        if differ:
            raise DataError(f"{Path(root) / val_split}: its classes differ from {train_dir}'s ({differ}); labels "
                            f"would not match")
    return classes


def class_difference(a: List[str], a_name: str, b: List[str], b_name: str) -> str:
    """How two class lists differ ('' when equal): the names only one of them has, or the first
    place where the order differs."""
    if a == b:
        return ""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        return f"only in {a_name}: {only_a[:5]}, only in {b_name}: {only_b[:5]}"
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return f"the same names in another order: class {i} is {a[i]!r} in {a_name}, {b[i]!r} in {b_name}"


def class_names(ds) -> List[str]:
    reader = getattr(ds, "reader", None)
    mapping = getattr(reader, "class_to_idx", None) or {}
    return [k for k, _ in sorted(mapping.items(), key=lambda kv: kv[1])]


def loader(dataset: Dataset, batch_sampler: Sampler, workers: int = 0, pin_memory: bool = False) -> DataLoader:
    # Its own generator, so creating an iterator never draws from the global RNG (exact resume).
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(0), persistent_workers=False,
                      worker_init_fn=_ignore_sigterm)


def _ignore_sigterm(worker_id: int) -> None:
    """torchrun and cluster schedulers send SIGTERM to the whole process group; the training
    process turns it into a checkpoint at the end of the update, which needs its loader's workers
    until then (torch's worker handler dies of a SIGTERM that is not its parent's). The loader still
    stops them through its own channel, and they exit when the training process is gone."""
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def data_config(model, img_size=None, crop_pct=None, interpolation=None, mean=None, std=None) -> dict:
    """timm's data config of the model with the recipe's choices laid over it."""
    from timm.data import resolve_data_config
    cfg = resolve_data_config({}, model=model)
    if img_size:
        cfg["input_size"] = (cfg["input_size"][0], img_size, img_size)
    for key, val in (("crop_pct", crop_pct), ("interpolation", interpolation), ("mean", mean), ("std", std)):
        if val is not None:
            cfg[key] = tuple(val) if isinstance(val, list) else val
    cfg["mean"], cfg["std"] = tuple(cfg["mean"]), tuple(cfg["std"])
    return cfg


def eval_transform(cfg: dict):
    from timm.data import create_transform
    return create_transform(cfg["input_size"], is_training=False, interpolation=cfg["interpolation"],
                            mean=cfg["mean"], std=cfg["std"], crop_pct=cfg["crop_pct"],
                            crop_mode=cfg.get("crop_mode"))


def train_transform(cfg: dict, aug: dict, interpolation: str = "random"):
    from timm.data import create_transform
    if aug["no_aug"]:
        return create_transform(cfg["input_size"], is_training=True, no_aug=True,
                                interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"])
    return create_transform(
        cfg["input_size"], is_training=True, scale=tuple(aug["scale"]), ratio=tuple(aug["ratio"]),
        hflip=aug["hflip"], vflip=aug["vflip"], color_jitter=aug["color_jitter"] or 0.0,
        auto_augment=aug["auto_augment"], interpolation=interpolation, mean=cfg["mean"], std=cfg["std"],
        re_prob=aug["reprob"], re_mode=aug["remode"], re_count=aug["recount"])
