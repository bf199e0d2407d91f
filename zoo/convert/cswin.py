"""CSWin: the authors' checkpoints (microsoft/CSWin-Transformer models/cswin.py) -> zoo.

Their keys: ``stage1_conv_embed.{0,2}`` (conv, LayerNorm), ``stage{1..4}.{i}.{norm1,qkv,proj,
attns.{0,1}.get_v,norm2,mlp.fc1,mlp.fc2}``, ``merge{1..3}.{conv,norm}``, ``norm``, ``head``. The
two branches' depth-wise ``get_v`` convolutions (one per half of the channels; a single one in the
last stage) become the one ``lepe`` convolution of the zoo mixer, concatenated in channel order.
"""
from __future__ import annotations

import re

import torch

from zoo.convert import register_converter, rename


@register_converter("cswin")
def convert_cswin(sd: dict, model) -> dict:
    rules = [
        (r"^stage1_conv_embed\.0\.", "stem.proj."),
        (r"^stage1_conv_embed\.2\.", "stem.norm."),
        (r"^merge(\d)\.", lambda m: f"stages.{m.group(1)}.downsample."),
        (r"^stage(\d)\.(\d+)\.(qkv|proj)\.",
         lambda m: f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.mixer.{m.group(3)}."),
        (r"^stage(\d)\.(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}."),
        (r"^head\.(weight|bias)$", r"head.fc.\1"),
    ]
    out, lepe = {}, {}
    for k, v in rename(sd, rules).items():
        m = re.match(r"^(.*\.blocks\.\d+)\.attns\.(\d)\.get_v\.(weight|bias)$", k)
        if m:
            lepe.setdefault(f"{m.group(1)}.mixer.lepe.{m.group(3)}", {})[int(m.group(2))] = v
        else:
            out[k] = v
    for k, parts in lepe.items():
        out[k] = torch.cat([parts[i] for i in sorted(parts)], dim=0)
    return out
