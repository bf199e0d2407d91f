"""GC-ViT: counts against REFERENCE.md, logits against timm's ``gcvit_*``, any input size.

Sizes timm cannot run (its classifier needs whole windows and a window-sized global query) are
checked against timm's own modules with the authors' detection-code rule patched in: zero-pad
the normed tokens to whole windows and crop, resize the global query map to the window (bicubic).
"""
import copy
import types

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import zoo
from zoo import ConfigError, load_config



def _perturbed_timm(name):
    """A random-init timm model whose bias tables, layer scales and norms are far from their init."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "relative_position_bias_table" in n:
                p.normal_(0, 1)
            elif n.endswith("gamma"):
                p.uniform_(0.5, 1.5)
            elif "norm" in n:
                p.uniform_(0.5, 1.5) if n.endswith("weight") else p.normal_(0, 0.2)
    return model


def _zoo_from_timm(ref, name, tmp_path):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    return timm.create_model("zoo_" + name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()


@pytest.fixture(scope="module")
def xxtiny_pair(tmp_path_factory):
    """(timm gcvit_xxtiny perturbed, zoo_gcvit_xxtiny loaded from its state dict), built once."""
    ref = _perturbed_timm("gcvit_xxtiny")
    return ref, _zoo_from_timm(ref, "gcvit_xxtiny", tmp_path_factory.mktemp("gcvit"))


@pytest.mark.parametrize("name", ["gcvit_xxtiny", "gcvit_tiny"])
def test_logits_match_timm(name, xxtiny_pair, tmp_path):
    if name == "gcvit_xxtiny":
        ref, model = xxtiny_pair
    else:
        ref = _perturbed_timm(name)
        model = _zoo_from_timm(ref, name, tmp_path)
    x = torch.randn(2 if name == "gcvit_xxtiny" else 1, 3, 224, 224)
    with torch.no_grad():
        want, got = ref(x), model(x)
    assert (want - got).abs().max().item() < 1e-4


def _patch_authors_padding(ref):
    """timm's GC-ViT with the authors' detection-code handling of arbitrary sizes, written here."""
    from timm.models.gcvit import window_partition, window_reverse

    def window_attn(self, x, q_global=None):
        B, H, W, C = x.shape
        wh, ww = self.window_size
        x = F.pad(x, (0, 0, 0, -W % ww, 0, -H % wh))
        Hp, Wp = x.shape[1:3]
        win = window_partition(x, self.window_size).view(-1, wh * ww, C)
        return window_reverse(self.attn(win, q_global), self.window_size, (Hp, Wp))[:, :H, :W]

    def stage_forward(self, x):
        x = self.downsample(x)
        q = self.global_block(x)
        window = self.blocks[0].window_size
        if tuple(q.shape[-2:]) != tuple(window):
            q = F.interpolate(q, size=window, mode="bicubic", align_corners=False)
        q = q.permute(0, 2, 3, 1)
        x = x.permute(0, 2, 3, 1)
        for blk in self.blocks:
            x = blk(x, q)
        return self.norm(x).permute(0, 3, 1, 2)

    for stage in ref.stages:
        stage.forward = types.MethodType(stage_forward, stage)
        for blk in stage.blocks:
            blk._window_attn = types.MethodType(window_attn, blk)
    return ref


@pytest.fixture(scope="module")
def padded_pair(xxtiny_pair):
    ref, model = xxtiny_pair
    return _patch_authors_padding(copy.deepcopy(ref)), model


@pytest.mark.parametrize("size", [(32, 32), (65, 97), (224, 224), (300, 200)])
def test_any_input_size_follows_authors_padding(size, padded_pair):
    ref, model = padded_pair
    batch = 2 if size == (65, 97) else 1  # each image's windows must get that image's global query
    x = torch.randn(batch, 3, *size)
    with torch.no_grad():
        want, got = ref(x), model(x)
    assert got.shape == (batch, 1000) and torch.isfinite(got).all()
    assert (want - got).abs().max().item() < 1e-4


def test_features_only_strides():
    model = timm.create_model("zoo_gcvit_xxtiny", features_only=True, out_indices=(0, 1, 2, 3)).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 65, 97))
    assert [tuple(f.shape[-2:]) for f in feats] == [(17, 25), (9, 13), (5, 7), (3, 4)]
    assert [f.shape[1] for f in feats] == [64, 128, 256, 512]


def test_local_and_global_alternate_over_odd_depths():
    with torch.device("meta"):
        model = zoo.create_model("gcvit_tiny")
    for stage, depth in zip(model.stages, (3, 4, 19, 5)):
        assert [b.mixer.global_query for b in stage.blocks] == [i % 2 == 1 for i in range(depth)]
        assert [b.mixer.qkv.out_features // stage.blocks[0].mixer.qkv.in_features for b in stage.blocks] \
            == [2 if i % 2 else 3 for i in range(depth)]


def _tiny_raw():
    return {"model": {
        "stem": {"type": "gcvit_stem"}, "downsample": {"type": "gcvit_downsample"},
        "block": {"type": "transformer", "mixer": {"type": "gcvit_window", "heads": 2,
                                                   "global_query": [False, True]}},
        "stages": [{"depth": 1, "dim": 32, "context": {"type": "gcvit_global_query", "levels": 3}},
                   {"depth": 2, "dim": 64, "context": {"type": "gcvit_global_query", "levels": 2}}]}}


@pytest.mark.parametrize("block", ["litv2", "biformer"])
def test_global_query_mixer_in_other_families_blocks(block):
    """Any block can host the global-query mixer: its queries come from the stage's context."""
    raw = _tiny_raw()
    raw["model"]["block"]["type"] = block
    raw["model"]["stages"][0]["depth"] = 2
    model = zoo.Backbone(raw, num_classes=3)
    model(torch.randn(2, 3, 64, 96)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.stages[1].context.parameters())


def test_cycle_longer_than_depth_is_a_config_error():
    with pytest.raises(ConfigError, match=r"global_query: per-block list of length 2 is longer than the stage depth 1"):
        load_config(_tiny_raw())


def test_bad_levels_is_a_config_error():
    raw = _tiny_raw()
    raw["model"]["stages"][0]["depth"] = 2
    raw["model"]["stages"][1]["context"]["levels"] = -1
    with pytest.raises(ConfigError, match=r"stages\[1\]\.context\.levels"):
        load_config(raw)


def test_global_query_without_context_says_so():
    raw = _tiny_raw()
    raw["model"]["stages"][0]["depth"] = 2
    del raw["model"]["stages"][1]["context"]
    with pytest.raises(ConfigError, match=r"global_query\[1\]: needs the stage's 'gcvit_global_query' context"):
        zoo.Backbone(raw)
