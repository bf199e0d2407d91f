"""timm's model API on zoo models, and clear errors for bad input tensors."""
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2

import zoo

NAME = "zoo_nat_mini"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model(NAME).eval()


def test_create_with_num_classes_and_pretrained_cfg():
    m = timm.create_model("zoo_dinat_tiny", num_classes=10)
    assert m.num_classes == 10 and m.get_classifier().out_features == 10
    cfg = m.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["crop_pct"] == 0.875
    assert cfg["first_conv"] == "stem.proj.0" and cfg["classifier"] == "head.fc"
    data_cfg = timm.data.resolve_data_config({}, model=m)
    assert data_cfg["input_size"] == (3, 224, 224)
    swin = timm.create_model("zoo_swin_tiny").pretrained_cfg
    assert swin["crop_pct"] == 0.9 and swin["paper_ids"] == "https://arxiv.org/abs/2103.14030"
    assert swin["notes"] == ("architecture as timm swin_tiny_patch4_window7_224",) and "origin_url" not in swin


def test_forward_features_head_and_intermediates(model):
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        f = model.forward_features(x)
        assert f.shape == (2, model.num_features, 3, 4)
        assert model.forward_head(f, pre_logits=True).shape == (2, model.num_features)
        assert torch.allclose(model.forward_head(f), model(x), atol=1e-5)
        final, inter = model.forward_intermediates(x)
        assert torch.allclose(final, f, atol=1e-5)
        assert [t.shape[-2:] for t in inter] == [(24, 32), (12, 16), (6, 8), (3, 4)]
        nhwc = model.forward_intermediates(x, indices=[1], output_fmt="NHWC", intermediates_only=True)
        assert len(nhwc) == 1 and nhwc[0].shape == (2, 12, 16, 128)
        early, inter = model.forward_intermediates(x, indices=[1], stop_early=True)
        assert early.shape == (2, 128, 12, 16) and torch.equal(early, inter[0])  # NCHW, as forward_features


def test_features_only_gives_strides_4_to_32():
    m = timm.create_model("zoo_swin_tiny", features_only=True, out_indices=(0, 1, 2, 3)).eval()
    assert m.feature_info.reduction() == [4, 8, 16, 32]
    assert m.feature_info.channels() == [96, 192, 384, 768]
    with torch.no_grad():
        outs = m(torch.randn(1, 3, 160, 96))
    assert [tuple(o.shape[1:]) for o in outs] == [(96, 40, 24), (192, 20, 12), (384, 10, 6), (768, 5, 3)]
    m2 = timm.create_model("zoo_nat_mini", features_only=True, out_indices=(1, 3))
    assert m2.feature_info.reduction() == [8, 32] and len(m2.model.stages) == 4


@pytest.mark.parametrize("family", ["nat", "swin", "cswin", "litv2", "biformer", "maxvit", "gcvit", "fastervit"])
def test_fx_and_hook_features_are_the_stage_outputs(family):
    """timm's other feature extractors: FX (stems, norms and stages are leaves, since they decide
    padding per input size in Python) and forward hooks give each stage's output in its native
    layout, the same numbers as the default NCHW features."""
    config = Path(__file__).parent / "configs" / f"tiny_{family}.yaml"
    x = torch.randn(2, 3, 64, 96)
    torch.manual_seed(0)
    getter = zoo.create_model(config, features_only=True).eval()
    layouts = [s.out_layout for s in getter.model.stages]
    with torch.no_grad():
        want = getter(x)
        for feature_cls in ("fx", "hook"):
            torch.manual_seed(0)
            got = zoo.create_model(config, features_only=True, feature_cls=feature_cls).eval()(x)
            got = list(got.values()) if isinstance(got, dict) else got
            for g, w, layout in zip(got, want, layouts, strict=True):
                torch.testing.assert_close(g.permute(0, 3, 1, 2) if layout == "nhwc" else g, w)


def test_reset_classifier(model):
    m = timm.create_model(NAME)
    m.reset_classifier(5)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    m.reset_classifier(0)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, m.num_features)


@pytest.mark.parametrize("name,timm_name,timm_kw", [(NAME, "swin_tiny_patch4_window7_224", {"img_size": (64, 96)}),
                                                    ("zoo_maxvit_tiny", "convnext_atto", {})])  # a head norm
def test_pruned_model_works_as_timms_does(name, timm_name, timm_kw):
    """prune_intermediate_layers to stage 1: forward_features ends there, the head takes its width."""
    x = torch.randn(1, 3, 64, 96)
    for net in (timm.create_model(name).eval(), timm.create_model(timm_name, **timm_kw).eval()):
        assert net.prune_intermediate_layers([1], prune_norm=False, prune_head=False) == [1]
        width = net.feature_info[1]["num_chs"]
        assert net.num_features == net.head_hidden_size == width
        f = net.forward_features(x)
        assert f.numel() == width * 8 * 12  # NCHW here, NHWC in timm's Swin
        net.reset_classifier(5, "avg")
        assert net(x).shape == (1, 5)
        if net.__module__.startswith("zoo"):
            inter = net.forward_intermediates(x, indices=[1], norm=True, intermediates_only=True)
            torch.testing.assert_close(inter[0], f)
    m = timm.create_model(name).to(torch.bfloat16)
    m.prune_intermediate_layers([3])  # the default prune_head: features at the end, no head
    assert m(x.bfloat16()).shape == (1, m.num_features, 2, 3) and m.head_hidden_size == m.num_features
    m.reset_classifier(5, "avg")  # the pruned head has no parameters to take a dtype from
    assert m.get_classifier().weight.dtype == torch.bfloat16 and m(x.bfloat16()).shape == (1, 5)


@pytest.mark.parametrize("name", [NAME, "zoo_maxvit_tiny"])  # a plain head; one with norm and hidden layer
def test_global_pool_empty_gives_logits_at_every_position(name):
    torch.manual_seed(0)
    pooled = timm.create_model(name).eval()
    dense = timm.create_model(name, global_pool="").eval()
    dense.load_state_dict(pooled.state_dict())  # same parameters: pretrained weights load either way
    x = torch.randn(2, 3, 96, 128)
    feats = dense.forward_features(x)
    logits = dense.forward_head(feats)
    assert logits.shape == (2, 1000, 3, 4)
    for h, w in [(0, 0), (2, 3), (1, 2)]:  # at each position, the pooled head on that position alone
        torch.testing.assert_close(logits[:, :, h, w], pooled.forward_head(feats[:, :, h:h + 1, w:w + 1]))
    assert dense.forward_head(feats, pre_logits=True).shape == (2, dense.head_hidden_size, 3, 4)
    dense.reset_classifier(7, "avg")
    assert dense(x).shape == (2, 7)
    pooled.reset_classifier(0, "")
    assert pooled(x).shape == (2, pooled.head_hidden_size, 3, 4)
    with pytest.raises(ValueError, match=r"global_pool: expected one of .*got 'mean'"):
        timm.create_model(name, global_pool="mean")
    if name == "zoo_maxvit_tiny":
        with pytest.raises(ValueError, match="catavgmax doubles the pooled width"):
            pooled.reset_classifier(3, "catavgmax")


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    m = timm.create_model(NAME, num_classes=3, drop_path_rate=0.0)  # no stochastic depth: deterministic
    x = torch.randn(2, 3, 64, 64)
    m(x).sum().backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.set_grad_checkpointing(True)
    assert all(s.grad_checkpointing for s in m.stages)
    m(x).sum().backward()
    for n, p in m.named_parameters():
        assert torch.allclose(p.grad, ref[n], atol=1e-5), n


def test_no_weight_decay_and_param_groups(model):
    nwd = model.no_weight_decay()
    assert "stages.0.blocks.0.mixer.rpb" in nwd and all(n.endswith("rpb") for n in nwd)
    assert len(nwd) == sum(s.depth for s in model.cfg.stages)
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.8)
    assert len(opt.param_groups) > 4  # layer decay needs group_matcher to place every parameter
    named = dict(model.named_parameters())
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)
    matcher = model.group_matcher()
    assert set(matcher) == {"stem", "blocks"}
    # lr scales: a layer per block for Swin-T's 12 (the same 14 scales as timm's swin_tiny), and a
    # layer per unit of three blocks for MaxViT-T's 11 (MBConv, block and grid attention together)
    from timm.optim._param_groups import param_groups_layer_decay
    for name, layers in (("zoo_swin_tiny", 12 + 2), ("zoo_maxvit_tiny", 11 + 2)):
        groups = param_groups_layer_decay(timm.create_model(name, device="meta"), layer_decay=0.5)
        assert len({g["lr_scale"] for g in groups}) == layers, name


def test_user_yaml_through_zoo_create_model(tmp_path):
    path = tmp_path / "my_net.yaml"
    path.write_text("base: swin_tiny\nmodel:\n  num_classes: 4\n  stages: [{depth: 2}, {depth: 2}, {depth: 2}, {depth: 2}]\n")
    m = zoo.create_model(str(path)).eval()
    assert m.cfg.name == "my_net" and m(torch.randn(1, 3, 64, 80)).shape == (1, 4)
    assert m.pretrained_cfg["input_size"] == (3, 224, 224)
    feats = zoo.create_model(str(path), features_only=True)
    assert feats.feature_info.reduction() == [4, 8, 16, 32]


def test_img_size_keyword_sets_the_data_config_and_is_checked():
    m = timm.create_model("zoo_swin_tiny", img_size=(288, 320), device="meta")
    assert m.pretrained_cfg["input_size"] == (3, 288, 320) and m.pretrained_cfg["pool_size"] == (9, 10)
    assert timm.data.resolve_data_config({}, model=m)["input_size"] == (3, 288, 320)
    assert m.cfg.img_size == (288, 320) and m.cfg.raw["model"]["img_size"] == [288, 320]  # saved with it
    with pytest.raises(zoo.ConfigError, match=r"swin_tiny.yaml at img_size=16: model.img_size: must be at least 32"):
        timm.create_model("zoo_swin_tiny", img_size=16)


def test_create_model_from_a_config_dict():
    import yaml
    raw = yaml.safe_load((Path(__file__).parent / "configs" / "tiny_nat.yaml").read_text())
    torch.manual_seed(0)
    from_dict = zoo.create_model(raw, num_classes=4).eval()
    torch.manual_seed(0)
    from_file = zoo.create_model(Path(__file__).parent / "configs" / "tiny_nat.yaml", num_classes=4).eval()
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(from_dict(x), from_file(x))


def test_create_model_device_dtype_and_bad_keyword_values():
    m = timm.create_model(NAME, device="meta", dtype=torch.bfloat16)
    assert {(p.device.type, p.dtype) for p in m.parameters()} == {("meta", torch.bfloat16)}
    for kw, words in [(dict(drop_path_rate=1.5), r"drop_path_rate: must be in \[0, 1\), got 1.5"),
                      (dict(num_classes=-3), "num_classes: must be >= 0, got -3"),
                      (dict(in_chans=True), "in_chans: expected int, got True")]:
        with pytest.raises(ValueError, match=words):
            timm.create_model("zoo_nat_demo", **kw)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown zoo model 'zoo_nat_huge'"):
        zoo.create_model("zoo_nat_huge")


def test_pretrained_without_a_file_says_how_to_give_one():
    with pytest.raises(RuntimeError, match=r"zoo_nat_mini: pretrained=True needs a weights file .*"
                                           r"pretrained_cfg_overlay=dict\(file=\.\.\.\)"):
        timm.create_model("zoo_nat_mini", pretrained=True)


@pytest.mark.parametrize("x,words", [
    (torch.randn(3, 64, 64), r"expected an image batch of shape \(B, 3, H, W\), got \(3, 64, 64\)"),
    (torch.randn(1, 64, 64, 3), "expected 3 input channels, got 64"),
    (torch.randn(1, 3, 31, 64), "input must be at least 32x32, got 31x64"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "expected a floating point image batch"),
])
def test_bad_input_tensor(model, x, words):
    with pytest.raises(ValueError, match=words):
        model(x)


def test_python_m_zoo_list():
    out = subprocess.run([sys.executable, "-m", "zoo", "list", "--filter", "swin"], capture_output=True,
                         text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["model", "params", "code"]
    assert any(line.startswith("zoo_swin_tiny") and "28,288,354" in line and "4.49" in line for line in lines)
    assert "MISMATCH" not in out


def test_python_m_zoo_list_prints_each_row_as_measured_and_stops_when_the_reader_leaves(
        monkeypatch, tmp_path):
    """A row appears once its model is measured (about 2 s each), not after all 37; a reader
    that leaves (``| head -2``) ends the listing with status 0 and no traceback."""
    import zoo.measure
    from zoo.__main__ import main
    log = []  # ("measure", name) and ("line", text) in the order they happen
    monkeypatch.setattr(zoo.measure, "measure", lambda name: log.append(("measure", name)) or (1, 1.0))

    class ReaderLeavesAfterTwoLines:
        def __init__(self, target):
            self.target = target  # the file main() points at /dev/null once the pipe breaks

        def write(self, text):
            if text == "\n":
                if sum(kind == "line" for kind, _ in log) == 2:
                    raise BrokenPipeError(32, "Broken pipe")
                log.append(("line", ""))

        def flush(self):
            pass

        def fileno(self):
            return self.target.fileno()

    with open(tmp_path / "stdout", "w") as target:
        monkeypatch.setattr(sys, "stdout", ReaderLeavesAfterTwoLines(target))
        assert main(["list", "--filter", "swin"]) == 0
    assert log == [("line", ""), ("measure", "zoo_cswin_base"), ("line", ""),
                   ("measure", "zoo_cswin_small")]  # the header, a row, then the reader had left


def test_python_m_zoo_refuses_what_matches_nothing():
    from zoo.__main__ import main
    for argv, words in ((["forward", "--filter", "nope"], "no model name contains 'nope'"),
                        (["list", "--filter", "nope"], "no model name contains 'nope'")):
        with pytest.raises(SystemExit, match=words):
            main(argv)
    with pytest.raises(SystemExit):  # argparse: --size below 32
        main(["forward", "--size", "16"])
