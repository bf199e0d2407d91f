"""The digits demo data: scikit-learn's bundled handwritten digits (1,797 real 8x8 images,
10 classes) written once as an ImageFolder with a stratified train/val split, upscaled to PNGs of
at least 32x32 because zoo models need inputs of 32x32 or more.

    python -m zoo.demo data/digits
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

MARKER = "digits.json"


def write_digits(root, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write ``root/{train,val}/<digit>/<n>.png`` unless already there. Returns ``root``."""
    root = Path(root)
    marker = root / MARKER
    want = {"size": size, "val_fraction": val_fraction, "seed": seed}
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("params") == want:
                return root
        except ValueError:
            pass
    try:
        import numpy as np
        from PIL import Image
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise SystemExit(f"the digits demo needs scikit-learn: pip install 'zoo[demo]' ({e})") from None
    if size < 32:
        raise ValueError(f"size must be at least 32 (zoo models need >= 32x32 input), got {size}")
    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
    idx = np.arange(len(images))
    train_idx, val_idx = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=digits.target)
    counts = {}
    for split, ids in (("train", train_idx), ("val", val_idx)):
        for i in ids:
            d = root / split / str(int(digits.target[i]))
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).resize((size, size), Image.BICUBIC).save(d / f"{i:04d}.png")
        counts[split] = len(ids)
    marker.write_text(json.dumps({"params": want, "counts": counts,
                                  "source": "sklearn.datasets.load_digits (UCI optical digits test set)"}))
    return root


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", nargs="?", default="data/digits")
    p.add_argument("--size", type=int, default=32)
    a = p.parse_args(argv)
    root = write_digits(a.root, a.size)
    print(f"digits ImageFolder ready at {root}: {json.loads((root / MARKER).read_text())['counts']}")


if __name__ == "__main__":
    main()
