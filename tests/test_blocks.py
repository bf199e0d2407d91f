"""Blocks that belong to no attention family: ConvNeXt's block and downsampler, and the
positional encodings a transformer block takes (``pos:``), each mixed into a zoo model.

ConvNeXt is checked against timm's own models: a zoo config of ConvNeXt-T (tests/configs) and one
of ConvNeXt-V2-Atto (global response norm, no layer scale) load timm's weights under timm's key
names (only the stem's differ) and give timm's logits.
"""
from pathlib import Path

import pytest
import timm
import torch

import zoo
from zoo.config import ConfigError, load_config

CONVNEXT_T = Path(__file__).parent / "configs" / "convnext_tiny.yaml"


def _from_timm(sd: dict) -> dict:
    """timm's ConvNeXt keys -> the zoo's: the stem is a patch_embed (proj, norm); V2's 1x1-conv
    MLPs (timm's conv_mlp) are linears here."""
    out = {}
    for k, v in sd.items():
        k = k.replace("stem.0.", "stem.proj.").replace("stem.1.", "stem.norm.")
        if ".mlp.fc" in k and v.dim() == 4:  # (out, in, 1, 1) -> (out, in)
            v = v.flatten(1)
        elif ".mlp.grn." in k:  # (1, 1, 1, C) or (C,)
            v = v.flatten()
        out[k] = v
    return out


@pytest.mark.parametrize("timm_name,config", [
    ("convnext_tiny", CONVNEXT_T),
    ("convnextv2_atto", {"base": str(CONVNEXT_T), "model": {
        "block": {"grn": True, "layer_scale": None},  # null: back to the default, none
        "stages": [{"depth": 2, "dim": 40}, {"depth": 2, "dim": 80}, {"depth": 6, "dim": 160},
                   {"depth": 2, "dim": 320}]}}),
])
def test_convnext_from_zoo_blocks_gives_timms_logits(timm_name, config):
    torch.manual_seed(0)
    ref = timm.create_model(timm_name).eval()
    with torch.no_grad():  # non-trivial norms, layer scales and GRN (timm initialises them to 1 / 0)
        for name, p in ref.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model = zoo.create_model(config).eval()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    model.load_state_dict(_from_timm(ref.state_dict()))
    for size in [(224, 224), (256, 192)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x), atol=2e-5, rtol=1e-4)
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]


def test_convnext_stage_before_attention_stages_trains():
    """Mixing: a ConvNeXt stage, then Swin window attention with a conditional (depth-wise conv)
    positional encoding, then NAT with the sine-cosine one."""
    model = zoo.create_model({"model": {
        "stem": {"type": "patch_embed"},
        "stages": [
            {"depth": 2, "dim": 32, "block": {"type": "convnext"}},
            {"depth": 2, "dim": 64, "downsample": {"type": "convnext_downsample"},
             "block": {"type": "transformer", "pos": {"type": "dwconv"},
                       "mixer": {"type": "window", "heads": 2, "window_size": 4}}},
            {"depth": 1, "dim": 128, "downsample": {"type": "patch_merging"},
             "block": {"type": "transformer", "pos": {"type": "sincos"},
                       "mixer": {"type": "neighborhood", "heads": 4, "kernel_size": 3}}}],
        "norm": {"type": "layernorm"}}}, num_classes=3)
    x = torch.randn(2, 3, 70, 90)
    loss = model(x).logsumexp(-1).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    pos = model.stages[1].blocks[0].pos_embed
    assert pos.weight.shape == (64, 1, 3, 3)


def test_sincos_encoding_is_timms_at_the_maps_size():
    from zoo.blocks import build
    from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
    pos = build("pos", {"type": "sincos", "temperature": 10000.0}, dim=16)
    x = torch.zeros(1, 5, 7, 16)
    torch.testing.assert_close(pos(x)[0], build_sincos2d_pos_embed([5, 7], 16).reshape(5, 7, 16))
    assert list(pos.parameters()) == []


@pytest.mark.parametrize("edit,path,words", [
    (lambda m: m["stages"][0]["block"].update(kernel_size=4), "model.stages[0].block.kernel_size",
     "positive odd number"),
    (lambda m: m["stages"][1]["block"].update(pos={"type": "dwconv", "kernel_size": 2}),
     "model.stages[1].block.pos.kernel_size", "positive odd number"),
    (lambda m: m["stages"][1].update(dim=66), "model.stages[1].block.pos", "divisible by 4"),
    (lambda m: m["stages"][1]["block"].update(pos={"type": "rope"}), "model.stages[1].block.pos.type",
     "unknown pos type 'rope'"),
])
def test_bad_block_and_pos_specs_name_their_key(edit, path, words):
    m = {"stem": {"type": "patch_embed"},
         "stages": [{"depth": 1, "dim": 32, "block": {"type": "convnext"}},
                    {"depth": 1, "dim": 64, "downsample": {"type": "convnext_downsample"},
                     "block": {"type": "transformer", "pos": {"type": "sincos"},
                               "mixer": {"type": "window", "heads": 2}}}]}
    edit(m)
    with pytest.raises(ConfigError) as e:
        load_config({"model": m})
    assert path in str(e.value) and words in str(e.value)
