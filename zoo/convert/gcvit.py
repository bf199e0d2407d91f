"""GC-ViT: timm's layout (``gcvit_*``, also the layout of its released NVIDIA weights) -> zoo.

Module names already match (stem, downsample, MBConv, block norms, MLP, layer scales, head); the
global query generator is the stage's ``context``, the attention is the block's ``mixer``, the last
stage's norm is the model's final norm, and the relative position bias table is re-read in the
zoo's (heads, 2w-1, 2w-1) key - query convention.
"""
from __future__ import annotations

from zoo.convert import register_converter, rename
from zoo.convert.swin import rpb_from_swin_table


@register_converter("gcvit")
def convert_gcvit(sd: dict, model) -> dict:
    last = len(model.stages) - 1
    rules = [
        (r"relative_position_index$", None),
        (r"^stages\.(\d+)\.global_block\.", r"stages.\1.context."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.attn\.rel_pos\.relative_position_bias_table$",
         r"stages.\1.blocks.\2.mixer.rpb"),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.attn\.", r"stages.\1.blocks.\2.mixer."),
        (rf"^stages\.{last}\.norm\.", "norm."),
    ]
    modules = dict(model.named_modules())
    out = {}
    for k, v in rename(sd, rules).items():
        mixer = modules.get(k[:-len(".rpb")]) if k.endswith(".mixer.rpb") else None
        if mixer is not None and v.dim() == 2:  # timm's ((2w-1)^2, heads) table; the zoo's has 3 dims
            v = rpb_from_swin_table(v, mixer.window_size)
        out[k] = v  # a key with no module here is reported by the fit check
    return out
