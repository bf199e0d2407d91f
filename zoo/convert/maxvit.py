"""MaxViT: timm's ``maxvit_*_tf`` layout -> zoo.

timm keeps one ``MaxxVitBlock`` per unit (``conv``, ``attn_block``, ``attn_grid``); the zoo's stage
holds the stride-2 MBConv of unit 0 as its ``downsample`` and then the remaining blocks in order,
so unit u's modules sit at blocks 3u-1 (MBConv, u >= 1), 3u (block attention) and 3u+1 (grid).
timm's ``RelPosBiasTf`` table is (heads, 2w-1, 2w-1) indexed by key - query, the zoo's convention,
so it is copied unchanged. Its qkv is not head-interleaved (``head_first=False``): q, k, v then heads,
as the zoo's split.
"""
from __future__ import annotations

import re

from zoo.convert import register_converter

MBCONV = {
    "shortcut.expand.": "shortcut_proj.",
    "pre_norm.": "pre_norm.",
    "conv1_1x1.": "expand_conv.",
    "norm1.": "expand_norm.",
    "conv2_kxk.": "dw_conv.",
    "norm2.": "dw_norm.",
    "se.fc1.": "se.reduce.",
    "se.fc2.": "se.expand.",
    "conv3_1x1.": "proj_conv.",
}
ATTENTION = {
    "attn.rel_pos.relative_position_bias_table": "mixer.rpb",
    "attn.qkv.": "mixer.qkv.",
    "attn.proj.": "mixer.proj.",
}


def _swap_prefix(rest: str, table: dict) -> str:
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


@register_converter("maxvit")
def convert_maxvit(sd: dict, model) -> dict:
    out = {}
    for k, v in sd.items():
        if k.endswith(("height_lookup", "width_lookup")):  # timm's non-persistent lookup buffers
            continue
        m = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.(conv|attn_block|attn_grid)\.(.*)$", k)
        if m:
            stage, unit, part, rest = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
            if part == "conv":
                where = f"stages.{stage}.downsample" if unit == 0 else f"stages.{stage}.blocks.{3 * unit - 1}"
                k = f"{where}.{_swap_prefix(rest, MBCONV)}"
            else:
                index = 3 * unit + (0 if part == "attn_block" else 1)
                k = f"stages.{stage}.blocks.{index}.{_swap_prefix(rest, ATTENTION)}"
        out[k] = v
    return out
