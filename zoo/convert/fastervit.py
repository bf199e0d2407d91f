"""FasterViT: the authors' layout (PyPI ``fastervit`` 1.0.0, faster_vit.py) -> zoo.

Their downsampler sits at the end of a level, the zoo's at the start of the next stage. Their
state dicts also hold buffers the zoo computes on the fly (relative coordinate tables and
indices, cached biases) and the carrier-token convolution twice (``pos_embed`` and its alias
``to_global_feature.pos``); those are dropped. Their continuous-bias MLPs already produce the
bias from coordinates, so no table needs re-indexing.
"""
from __future__ import annotations

import re

from zoo.convert import register_converter, rename


@register_converter("fastervit")
def convert_fastervit(sd: dict, model) -> dict:
    rules = [
        (r"relative_coords_table$|relative_position_index$|relative_bias$", None),
        (r"\.global_tokenizer\.to_global_feature\.", None),
        (r"^patch_embed\.", "stem."),
        (r"^levels\.(\d+)\.global_tokenizer\.", r"levels.\1.context."),
        (r"\.pos_emb_funct\.cpb_mlp\.", ".cpb."),
        (r"\.(hat_)?pos_embed\.cpb_mlp\.", r".\1pos_embed."),
        (r"\.gamma1$", ".hat_ls1.gamma"),
        (r"\.gamma2$", ".hat_ls2.gamma"),
        (r"\.gamma3$", ".ls1.gamma"),
        (r"\.gamma4$", ".ls2.gamma"),
        (r"\.downsample\.reduction\.0\.", ".downsample.reduction."),
        (r"^head\.(weight|bias)$", r"head.fc.\1"),
    ]
    out = {}
    for k, v in rename(sd, rules).items():
        m = re.match(r"^levels\.(\d+)\.downsample\.(.*)$", k)
        if m:
            k = f"stages.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
        k = re.sub(r"^levels\.", "stages.", k)
        out[k] = v
    return out
