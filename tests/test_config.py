"""The YAML grammar: bases, per-block cycles, and one clear ConfigError per kind of mistake."""
import copy
import textwrap

import pytest
import torch
import yaml

import zoo
from zoo import ConfigError, load_config

GOOD = yaml.safe_load(textwrap.dedent("""
    description: a small NAT for tests
    model:
      img_size: 64
      num_classes: 10
      stem: {type: conv_tokenizer}
      downsample: {type: conv_downsample}
      block: {type: transformer, mlp_ratio: 2, mixer: {type: neighborhood, kernel_size: 3}}
      stages:
        - {depth: 2, dim: 16, block: {mixer: {heads: 2, dilation: [1, 2]}}}
        - {depth: 1, dim: 32, block: {mixer: {heads: 2}}}
      norm: {type: layernorm}
"""))


def write(tmp_path, data, name="net.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def edit(fn):
    cfg = copy.deepcopy(GOOD)
    fn(cfg)
    return cfg


def test_good_config_builds_and_runs(tmp_path):
    path = write(tmp_path, GOOD)
    cfg = load_config(path)
    assert [u[0]["mixer"]["dilation"] for u in cfg.stages[0].units] == [1, 2]  # the cycle, resolved
    model = zoo.create_model(path).eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_variant_states_only_what_differs(tmp_path):
    write(tmp_path, GOOD, "parent.yaml")
    child = write(tmp_path, {"base": "parent", "model": {"stages": [{"depth": 4}, {"dim": 48}]}}, "child.yaml")
    cfg = load_config(child)
    assert cfg.stages[0].depth == 4 and cfg.stages[1].dim == 48
    assert cfg.stages[0].units[0][0]["mixer"]["heads"] == 2  # inherited
    assert [u[0]["mixer"]["dilation"] for u in cfg.stages[0].units] == [1, 2, 1, 2]


def test_shipped_variants_inherit():
    tiny, dinat = load_config("nat_tiny"), load_config("dinat_tiny")
    assert [s.depth for s in tiny.stages] == [s.depth for s in dinat.stages]
    assert [u[0]["mixer"]["dilation"] for u in dinat.stages[0].units] == [1, 8, 1]
    assert [u[0]["mixer"]["dilation"] for u in dinat.stages[2].units][:4] == [1, 2, 1, 2]
    swin = load_config("swin_tiny")
    assert [u[0]["mixer"]["shift"] for u in swin.stages[2].units] == [False, True] * 3


def test_cycle_repeats_and_may_be_cut_short(tmp_path):
    path = write(tmp_path, edit(lambda c: _stage0(c).update(depth=3)))
    assert [u[0]["mixer"]["dilation"] for u in load_config(path).stages[0].units] == [1, 2, 1]


def test_null_removes_inherited_key(tmp_path):
    parent = edit(lambda c: c["model"]["block"].update(layer_scale=1e-5))
    write(tmp_path, parent, "parent.yaml")
    child = write(tmp_path, {"base": "parent", "model": {"block": {"layer_scale": None}}}, "child.yaml")
    assert "layer_scale" not in load_config(child).stages[0].units[0][0]


def _stage0(c):
    return c["model"]["stages"][0]


def test_neighborhood_wider_than_the_map_is_padded(tmp_path):
    """kernel x dilation may exceed a feature map at the config's img_size: NAT/DiNAT's mixer
    zero-pads the map, as the authors' code does (here dilation 8 x kernel 3 on a 16x16 map)."""
    path = write(tmp_path, edit(lambda c: _stage0(c)["block"]["mixer"].update(dilation=[1, 8])))
    with torch.no_grad():
        assert zoo.create_model(path).eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    # DiNAT-T's dilation 8 on a 48-token map at 192; NAT-Mini's 7x7 kernel on a 2x2 last map at 64
    for base, img_size in (("dinat_tiny", 192), ("nat_mini", 64)):
        assert load_config({"base": base, "model": {"img_size": img_size}}).img_size == (img_size, img_size)


# (kind of mistake, how to make it, the key path the error must name, words the message must hold)
BAD = [
    ("unknown top-level key", lambda c: c.update(modle={}), "modle", "unknown key"),
    ("unknown model key", lambda c: c["model"].update(depths=[2, 2]), "model.depths", "unknown key"),
    ("unknown block key (where it is written)", lambda c: c["model"]["block"].update(mlp_ration=4),
     "model.block.mlp_ration", "(for model.stages[0])"),
    ("unknown mixer key", lambda c: _stage0(c)["block"]["mixer"].update(kernal_size=3),
     "model.stages[0].block.mixer.kernal_size", "unknown key"),
    ("unknown mixer type", lambda c: c["model"]["block"]["mixer"].update(type="neighbourhood"),
     "model.block.mixer.type", "unknown mixer type"),
    ("unknown stem type", lambda c: c["model"]["stem"].update(type="conv_tokeniser"), "model.stem.type",
     "unknown stem type"),
    ("wrong type (string for int)", lambda c: _stage0(c)["block"]["mixer"].update(heads="two"),
     "model.stages[0].block.mixer.heads", "expected int"),
    ("wrong type (bool for int)", lambda c: _stage0(c).update(depth=True), "model.stages[0].depth",
     "expected int"),
    ("wrong type (float for int)", lambda c: _stage0(c).update(dim=16.5), "model.stages[0].dim", "expected int"),
    ("dim not divisible by heads", lambda c: _stage0(c)["block"]["mixer"].update(heads=3),
     "model.stages[0].block.mixer.heads", "not divisible"),
    ("even kernel size", lambda c: c["model"]["block"]["mixer"].update(kernel_size=4),
     "model.block.mixer.kernel_size", "odd"),
    ("negative depth", lambda c: _stage0(c).update(depth=-1), "model.stages[0].depth", "positive"),
    ("cycle longer than the stage", lambda c: _stage0(c)["block"]["mixer"].update(dilation=[1, 2, 1]),
     "model.stages[0].block.mixer.dilation", "longer than the stage depth 2"),
    ("dilation below 1", lambda c: _stage0(c)["block"]["mixer"].update(dilation=[1, 0]),
     "model.stages[0].block.mixer.dilation[1]", "must be >= 1"),
    ("missing stages", lambda c: c["model"].pop("stages"), "model.stages", "non-empty list"),
    ("missing mixer type", lambda c: c["model"]["block"]["mixer"].pop("type"),
     "model.stages[0].block.mixer", "missing 'type'"),
    ("missing required key", lambda c: _stage0(c).pop("dim"), "model.stages[0]", "missing required key 'dim'"),
    ("missing required mixer param", lambda c: [s["block"]["mixer"].pop("heads") for s in c["model"]["stages"]],
     "model.stages[0].block.mixer", "missing required key(s) ['heads']"),
    ("drop path out of range", lambda c: c["model"].update(drop_path_rate=1.5), "model.drop_path_rate",
     "[0, 1)"),
    ("input smaller than 32", lambda c: c["model"].update(img_size=16), "model.img_size", "at least 32"),
    ("width change without downsample", lambda c: c["model"].pop("downsample"), "model.stages[1].dim",
     "without a downsample"),
    ("too many downsamplings", lambda c: c["model"]["stages"].extend(  # 32 px: 8, 4, 2, 1, 0
        [{"depth": 1, "dim": 32, "downsample": {"type": "convnext_downsample"}, "block": {"type": "convnext"}}] * 3),
     "model.stages[4].downsample", "leaves a 0x0 map at the smallest input, 32x32"),
    ("head pool unknown", lambda c: c["model"].update(head={"pool": "median"}), "model.head.pool", "one of"),
    ("head pool too wide for a head norm", lambda c: c["model"].update(
        head={"pool": "catavgmax", "norm": {"type": "layernorm2d"}}), "model.head.pool", "doubles the pooled width"),
    ("activation not a choice", lambda c: c["model"]["block"].update(act="swish"),
     "model.block.act", "one of"),
    ("null block", lambda c: _stage0(c).update(block=[None]), "model.stages[0].block", "got null"),
    ("empty block list", lambda c: _stage0(c).update(block=[]), "model.stages[0].block", "empty list"),
    ("context no block reads", lambda c: _stage0(c).update(context={"type": "carrier_tokens"}),
     "model.stages[0].context", "no block of the stage reads"),
    ("rate out of range", lambda c: c["model"]["block"].update(proj_drop=5.0), "model.block.proj_drop",
     "expected float in [0, 1)"),
    ("norm eps not positive", lambda c: c["model"]["norm"].update(eps=-1.0), "model.norm.eps", "float > 0"),
    ("head norm channels-last", lambda c: c["model"].update(head={"norm": {"type": "layernorm"}}),
     "model.head.norm.type", "channels-first"),
    ("head activation unknown", lambda c: c["model"].update(head={"hidden_size": 8, "hidden_act": "swishy"}),
     "model.head.hidden_act", "unknown activation"),
    ("head activation with no hidden layer", lambda c: c["model"].update(head={"hidden_act": "relu"}),
     "model.head.hidden_act", "give model.head.hidden_size too"),
    ("named mean unknown", lambda c: c.update(pretrained={"mean": "imagenett"}), "pretrained.mean", "one of"),
    ("mean without std", lambda c: c.update(pretrained={"mean": [0.5, 0.5, 0.5]}), "pretrained.std",
     "list of 3 numbers"),
    ("rectangular value malformed", lambda c: c["model"]["block"]["mixer"].update(kernel_size={"h": 3}),
     "model.block.mixer.kernel_size", "{h: ..., w: ...}"),
]


@pytest.mark.parametrize("kind,mutate,keypath,words", BAD, ids=[b[0] for b in BAD])
def test_bad_config_names_file_and_key(tmp_path, kind, mutate, keypath, words):
    path = write(tmp_path, edit(mutate))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.file == str(path.resolve()), err
    assert err.keypath == keypath, str(err)
    assert words in err.message, str(err)
    assert str(path.resolve()) in str(err) and keypath in str(err)


def test_missing_base(tmp_path):
    path = write(tmp_path, {"base": "no_such_net", "model": {}})
    with pytest.raises(ConfigError, match=r"net\.yaml: base: base model config 'no_such_net' does not exist"):
        load_config(path)


def test_base_cycle(tmp_path):
    write(tmp_path, {"base": "b", "model": {}}, "a.yaml")
    write(tmp_path, {"base": "a", "model": {}}, "b.yaml")
    with pytest.raises(ConfigError, match=r"base cycle: a.yaml -> b.yaml -> a.yaml"):
        load_config(tmp_path / "a.yaml")


def test_not_yaml(tmp_path):
    path = write(tmp_path, "model: {stages: [1, 2\n")
    with pytest.raises(ConfigError, match=r"net\.yaml: not valid YAML"):
        load_config(path)


def test_not_a_mapping(tmp_path):
    path = write(tmp_path, "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping at top level"):
        load_config(path)


def test_error_in_base_names_the_base_file(tmp_path):
    parent = write(tmp_path, edit(lambda c: c["model"]["block"]["mixer"].update(kernel_size=4)), "parent.yaml")
    child = write(tmp_path, {"base": "parent", "model": {"num_classes": 5}}, "child.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(child)
    assert info.value.file == str(parent.resolve()) and "in the base of child.yaml" in str(info.value)


def test_unknown_shipped_name():
    with pytest.raises(ConfigError, match="no such model config"):
        load_config("nat_gigantic")


def test_yaml_reads_exponent_floats_and_refuses_repeated_keys(tmp_path):
    text = yaml.safe_dump(GOOD).replace("mlp_ratio: 2", "mlp_ratio: 2\n    layer_scale: 1e-5")
    assert load_config(write(tmp_path, text)).stages[0].units[0][0]["layer_scale"] == 1e-5
    repeated = text.replace("num_classes: 10", "num_classes: 10\n  num_classes: 5")
    with pytest.raises(ConfigError, match=r"not valid YAML: the key 'num_classes' is written twice"):
        load_config(write(tmp_path, repeated))


def test_a_broken_config_file_is_skipped_with_a_warning(tmp_path, monkeypatch):
    from zoo import registration
    bad = write(tmp_path, edit(lambda c: _stage0(c)["block"]["mixer"].update(heads=3)), "broken_net.yaml")
    monkeypatch.setattr(registration, "config_paths", lambda: {"broken_net": bad})
    with pytest.warns(UserWarning, match=r"zoo_broken_net is not registered: .*not divisible"):
        registration.register_all()
    assert "zoo_broken_net" not in registration.REGISTERED


def test_a_variant_states_its_own_figures_and_may_share_a_shipped_name(tmp_path):
    mine = write(tmp_path, {"base": "nat_tiny", "model": {"stages": [{}, {}, {"depth": 2}, {}]}}, "nat_tiny.yaml")
    cfg = load_config(mine)  # its base is the shipped nat_tiny, not itself
    assert [s.depth for s in cfg.stages] == [3, 4, 2, 5]
    assert cfg.reference == {"source": load_config("nat_tiny").reference["source"], "layout": "nat"}
    assert cfg.description == ""
    from_dict = load_config({"base": "nat_tiny", "model": {"num_classes": 5}})
    assert from_dict.num_classes == 5 and [s.depth for s in from_dict.stages] == [3, 4, 18, 5]


def test_a_mixer_of_your_own_needs_no_edit_to_the_builder(tmp_path):
    from torch import nn

    from zoo.blocks import register
    from zoo.blocks.registry import SpecError

    @register("mixer", "test_depthwise_conv")
    class DepthwiseConvMixer(nn.Module):
        layout = "nhwc"

        def __init__(self, dim: int, kernel_size: int = 3):
            super().__init__()
            self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

        @classmethod
        def check(cls, params, ctx):
            if params["kernel_size"] % 2 == 0:
                raise SpecError("kernel_size", "must be odd")

        def forward(self, x):
            return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    mine = edit(lambda c: c["model"]["block"].update(mixer={"type": "test_depthwise_conv", "kernel_size": 5}))
    for stage in mine["model"]["stages"]:
        stage.pop("block")
    model = zoo.create_model(write(tmp_path, mine)).eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    mine["model"]["block"]["mixer"]["kernel_size"] = 4
    with pytest.raises(ConfigError, match=r"model\.block\.mixer\.kernel_size: must be odd"):
        load_config(write(tmp_path, mine))

    class NoLayoutNoCtx(nn.Module):
        def __init__(self, width: int):
            super().__init__()

        def forward(self, x):
            return x

    with pytest.raises(TypeError, match=r"needs a class attribute `layout`.*__init__ parameters \['dim', "
                                        r"'drop_path'\].*forward\(self, x, ctx\)"):
        register("block", "test_broken_block")(NoLayoutNoCtx)

    class StemWithoutSizes(nn.Module):  # the config could not size the stages after it
        layout = "nchw"

        def __init__(self, in_chans: int, out_dim: int):
            super().__init__()

    with pytest.raises(TypeError, match=r"`downscale` \(its stride\).*`out_length\(n, params\)`"):
        register("stem", "test_broken_stem")(StemWithoutSizes)
