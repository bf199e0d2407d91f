"""LITv2: the authors' layout (ziplab/LITv2 classification/models) -> zoo.

Their deformable token merging (DTM) ends a level (``layers.i.downsample``); the zoo's
downsampler starts the next stage. Their BatchNorm is ``norm_layer``, the depth-wise conv of the
FFN is wrapped once more (``mlp.dwconv.dwconv``), the mixer is ``attn`` and the head is bare.
"""
from __future__ import annotations

import re

from zoo.convert import register_converter, rename


@register_converter("litv2")
def convert_litv2(sd: dict, model) -> dict:
    rules = [
        (r"^patch_embed\.", "stem."),
        (r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.", r"stages.\1.blocks.\2.mixer."),
        (r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv."),
        (r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks."),
        (r"^head\.(weight|bias)$", r"head.fc.\1"),
    ]
    out = {}
    for k, v in rename(sd, rules).items():
        m = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", k)
        if m:
            rest = re.sub(r"^norm_layer\.", "norm.", m.group(2))
            k = f"stages.{int(m.group(1)) + 1}.downsample.{rest}"
        out[k] = v
    return out
