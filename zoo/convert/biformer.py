"""BiFormer: the authors' layout (rayleizhu/BiFormer models/biformer.py) -> zoo.

Their ``downsample_layers[0]`` is the stem and ``downsample_layers[i]`` opens stage ``i`` (as the
zoo's downsample does); ``stages[i][j]`` are the blocks. In BRA the qkv linear sits one level
down (``attn.qkv.qkv``) and the output projection is ``attn.wo``; the last stage's global
attention already says ``attn.qkv`` / ``attn.proj``. Their MLP is a Sequential (Linear, Identity,
GELU, Linear). Checkpoints saved with gradient checkpointing carry fairscale's
``_checkpoint_wrapped_module.`` in their names; it is dropped.
"""
from __future__ import annotations

from zoo.convert import register_converter, rename


@register_converter("biformer")
def convert_biformer(sd: dict, model) -> dict:
    rules = [
        (r"_checkpoint_wrapped_module\.", ""),
        (r"^downsample_layers\.0\.", "stem.proj."),
        (r"^downsample_layers\.(\d+)\.0\.", r"stages.\1.downsample.reduction."),
        (r"^downsample_layers\.(\d+)\.1\.", r"stages.\1.downsample.norm."),
        (r"^stages\.(\d+)\.(\d+)\.attn\.qkv\.qkv\.", r"stages.\1.blocks.\2.mixer.qkv."),
        (r"^stages\.(\d+)\.(\d+)\.attn\.wo\.", r"stages.\1.blocks.\2.mixer.proj."),
        (r"^stages\.(\d+)\.(\d+)\.attn\.", r"stages.\1.blocks.\2.mixer."),
        (r"^stages\.(\d+)\.(\d+)\.mlp\.0\.", r"stages.\1.blocks.\2.mlp.fc1."),
        (r"^stages\.(\d+)\.(\d+)\.mlp\.3\.", r"stages.\1.blocks.\2.mlp.fc2."),
        (r"^stages\.(\d+)\.(\d+)\.gamma1$", r"stages.\1.blocks.\2.ls1.gamma"),
        (r"^stages\.(\d+)\.(\d+)\.gamma2$", r"stages.\1.blocks.\2.ls2.gamma"),
        (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
        (r"^head\.(weight|bias)$", r"head.fc.\1"),
    ]
    return rename(sd, rules)
