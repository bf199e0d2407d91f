"""Swin: timm's layout and the original Microsoft layout -> zoo."""
from __future__ import annotations

import math
import re

from zoo.convert import register_converter, rename


def rpb_from_swin_table(table, window):
    """Swin's table ((2h-1)*(2w-1), heads) is indexed by query - key; the zoo's (heads, 2h-1, 2w-1)
    by key - query (NATTEN's convention): flip both offset axes. ``window`` is the model's; a table
    of another size is read as a square window's (as timm does), which ``resize_rpb`` then fits to
    the model's, and one that is no window's is returned as it is, for the fit check to report."""
    rows, side = table.shape[0], math.isqrt(table.shape[0])
    size = (2 * window[0] - 1, 2 * window[1] - 1)
    if rows != size[0] * size[1]:
        if side * side != rows:
            return table
        size = (side, side)
    return table.reshape(*size, -1).flip(0, 1).permute(2, 0, 1).contiguous()


@register_converter("swin")
def convert_swin(sd: dict, model) -> dict:
    original = "head.weight" in sd  # Microsoft's code: downsample at the end of a stage, bare head
    rules = [
        (r"relative_position_index$|attn_mask$", None),
        (r"^patch_embed\.", "stem."),
        (r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.", r"stages.\1.blocks.\2.mixer."),
        (r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks."),
        (r"^head\.(weight|bias)$", r"head.fc.\1"),
    ]
    out = {}
    for k, v in rename(sd, rules).items():
        m = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", k)
        if m:
            stage = int(m.group(1)) + (1 if original else 0)
            k = f"stages.{stage}.downsample.{m.group(2)}"
        if k.endswith("relative_position_bias_table"):
            k = k.replace("relative_position_bias_table", "rpb")
            v = rpb_from_swin_table(v, model.get_submodule(k.rsplit(".", 1)[0]).window_size)
        out[k] = v
    return out
