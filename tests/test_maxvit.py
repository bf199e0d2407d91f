"""MaxViT: figures, equality with timm's maxvit_tiny_tf_224, any input size, features, config errors."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import zoo.registration  # noqa: F401  (registers zoo_* with timm)
from zoo.blocks import build
from zoo.config import load_config
from zoo.errors import ConfigError



@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    """A random timm maxvit_tiny_tf_224 whose bias tables and BatchNorm statistics matter."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    ref = timm.create_model("maxvit_tiny_tf_224").eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith("relative_position_bias_table"):
                p.normal_(0, 1.0)
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("maxvit") / "maxvit_tiny_tf.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    return ref, path


@pytest.fixture(scope="module")
def loaded(timm_weights):
    _, path = timm_weights
    return timm.create_model("zoo_maxvit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()


def test_same_logits_as_timm(timm_weights, loaded):
    ref, _ = timm_weights
    torch.manual_seed(1)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want_feat, got_feat = ref.forward_features(x), loaded.forward_features(x)
        want, got = ref.forward_head(want_feat), loaded.forward_head(got_feat)
    torch.testing.assert_close(got_feat, want_feat, atol=1e-4, rtol=0)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert want.abs().max() > 0.1  # the comparison is not between near-zero logits


def test_features_only_strides():
    model = timm.create_model("zoo_maxvit_tiny", features_only=True, out_indices=(0, 1, 2, 3)).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [64, 128, 256, 512]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 65, 97))
    for f, r in zip(feats, [4, 8, 16, 32]):
        assert f.shape[2:] == (math.ceil(65 / r), math.ceil(97 / r))


def _grid_reference(mixer, x):
    """Grid attention written out the way timm/TF do it (grid partition, dense attention), with the
    map zero-padded to a multiple of the grid and cropped afterwards."""
    B, H, W, C = x.shape
    g = mixer.grid_size[0]
    ph, pw = -H % g, -W % g
    xp = F.pad(x, (0, 0, 0, pw, 0, ph))
    Hp, Wp = H + ph, W + pw
    win = xp.view(B, g, Hp // g, g, Wp // g, C).permute(0, 2, 4, 1, 3, 5).reshape(-1, g * g, C)
    q, k, v = mixer.qkv(win).reshape(win.shape[0], g * g, 3, mixer.heads, -1).permute(2, 0, 3, 1, 4)
    pos = torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")).flatten(1)
    rel = pos[:, None, :] - pos[:, :, None] + g - 1  # key - query, per axis
    bias = mixer.rpb[:, rel[0], rel[1]]
    attn = (q @ k.transpose(-1, -2) * mixer.head_dim ** -0.5 + bias).softmax(-1)
    out = (attn @ v).transpose(1, 2).reshape(-1, g, g, C)
    out = out.view(B, Hp // g, Wp // g, g, g, C).permute(0, 3, 1, 4, 2, 5).reshape(B, Hp, Wp, C)
    return mixer.proj(out[:, :H, :W])


@pytest.mark.parametrize("size", [(14, 21), (10, 12), (7, 7)])
def test_grid_attention_matches_partition_with_padding(size):
    torch.manual_seed(0)
    mixer = build("mixer", {"type": "grid", "heads": 2, "grid_size": 7}, dim=16).eval()
    with torch.no_grad():
        mixer.rpb.normal_()
        x = torch.randn(2, *size, 16)
        torch.testing.assert_close(mixer(x), _grid_reference(mixer, x), atol=1e-5, rtol=1e-5)


def test_grid_attention_smaller_than_grid_is_global():
    mixer = build("mixer", {"type": "grid", "heads": 2, "grid_size": 7}, dim=16).eval()
    with torch.no_grad():
        out = mixer(torch.randn(1, 3, 2, 16))
    assert out.shape == (1, 3, 2, 16)


def _tiny_dict(**model_changes):
    import yaml
    raw = yaml.safe_load((load_config("maxvit_tiny").file).read_text())
    raw["model"].update(model_changes)
    return raw


def test_downsample_must_stand_for_the_first_block():
    raw = _tiny_dict()
    raw["model"]["block"] = raw["model"]["block"][1:]
    raw["model"]["stages"] = [{**s, "block": s["block"][1:]} for s in raw["model"]["stages"]]
    with pytest.raises(ConfigError, match="stands in for the stage's first block"):
        load_config(raw)


def test_downsample_must_match_the_block_it_stands_for():
    raw = _tiny_dict()
    raw["model"]["downsample"] = {**raw["model"]["downsample"], "expand_ratio": 6.0}
    with pytest.raises(ConfigError, match=r"model\.downsample\.expand_ratio: is 6\.0 but the 'mbconv' block "
                                          r"it stands in for has 4 .*\(for model\.stages\[1\]\)"):
        load_config(raw)


def test_stem_width_needs_a_downsample_to_change():
    raw = _tiny_dict()
    raw["model"]["stem"]["width"] = 32
    del raw["model"]["stages"][0]["downsample"]
    with pytest.raises(ConfigError, match="stem's width 32"):
        load_config(raw)


@pytest.mark.parametrize("change, words", [
    (lambda m: m["stem"].update(width=-8), r"model\.stem\.width: expected .*>= 1.*got -8"),
    (lambda m: m["block"][0].update(se_ratio=0.01), r"model\.block\[0\]\.se_ratio: gives no squeeze-excitation "
                                                     r"channels at width 64"),
])
def test_widths_that_build_nothing_are_config_errors(change, words):
    raw = _tiny_dict()
    change(raw["model"])
    with pytest.raises(ConfigError, match=words):
        load_config(raw)


def test_null_in_a_stage_downsample_drops_the_model_level_key():
    raw = _tiny_dict()
    raw["model"]["downsample"] = {"type": "mbconv", "se_ratio": 0.25}
    raw["model"]["stages"][1]["downsample"] = {"se_ratio": None}
    cfg = load_config(raw)
    assert cfg.stages[2].downsample["se_ratio"] == 0.25 and "se_ratio" not in cfg.stages[1].downsample


def test_bad_grid_size():
    raw = _tiny_dict()
    raw["model"]["block"][2]["mixer"]["grid_size"] = 0
    with pytest.raises(ConfigError, match="grid_size"):
        load_config(raw)
