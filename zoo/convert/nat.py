"""NAT / DiNAT: the authors' layout (SHI-Labs classification/nat.py, dinat.py) -> zoo.

Their downsampler sits at the end of a level; the zoo's at the start of the next stage. Their
``rpb`` already uses NATTEN's key - query convention, which is the zoo's.
"""
from __future__ import annotations

import re

from zoo.convert import register_converter, rename


@register_converter("nat")
def convert_nat(sd: dict, model) -> dict:
    rules = [
        (r"^patch_embed\.", "stem."),
        (r"^levels\.(\d+)\.blocks\.(\d+)\.attn\.", r"stages.\1.blocks.\2.mixer."),
        (r"^levels\.(\d+)\.blocks\.(\d+)\.gamma1$", r"stages.\1.blocks.\2.ls1.gamma"),
        (r"^levels\.(\d+)\.blocks\.(\d+)\.gamma2$", r"stages.\1.blocks.\2.ls2.gamma"),
        (r"^levels\.(\d+)\.blocks\.", r"stages.\1.blocks."),
        (r"^head\.(weight|bias)$", r"head.fc.\1"),
    ]
    out = {}
    for k, v in rename(sd, rules).items():
        m = re.match(r"^levels\.(\d+)\.downsample\.(.*)$", k)
        if m:
            k = f"stages.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
        out[k] = v
    return out
