"""Every registered model, as a user meets it: built by name, measured, run on awkward sizes.

The figures come from each config's ``reference`` block (REFERENCE.md's code column): parameter
counts must be exact and GMACs within 3%, both counted on the meta device.
"""
import re
from pathlib import Path

import pytest
import timm
import torch

import zoo
from zoo.blocks import registry
from zoo.blocks.layers import NHWC
from zoo.config import config_paths, load_config, resize
from zoo.measure import measure
from zoo.registration import REGISTERED, pretrained_cfg_for

NAMES = zoo.list_models()
# One model per family (and each hybrid): the smallest, since variants share their code paths.
FAMILY_MODELS = ["zoo_nat_mini", "zoo_dinat_mini", "zoo_swin_tiny", "zoo_cswin_tiny",
                 "zoo_litv2_small", "zoo_maxvit_tiny", "zoo_gcvit_xxtiny", "zoo_biformer_tiny",
                 "zoo_fastervit_0", "zoo_hybrid_conv_na_routed_full",
                 "zoo_hybrid_ffn_window_dilated_grid"]
# Awkward sizes (tiny, odd, non-square) catch rounding and padding bugs in every variant. The
# larger ones run on one model per family: the other variants share its code paths (they differ
# in widths, depths, heads and window sizes), and each is traced at 224 px on the meta device
# by test_params_and_gmacs_match_reference.
SIZES = [(32, 32), (65, 97)]
LARGE_SIZES = [(224, 224), (300, 200)]


def test_every_config_is_registered_with_timm():
    # register_all skips a broken config with a warning; a shipped one must never be skipped
    assert NAMES == sorted("zoo_" + stem for stem in config_paths())
    for name in NAMES:
        assert name.startswith("zoo_") and timm.is_model(name)
        cfg = load_config(REGISTERED[name])
        assert timm.models.get_pretrained_cfg(name).input_size == (cfg.in_chans, *cfg.img_size)


@pytest.mark.parametrize("name", NAMES)
def test_params_and_gmacs_match_reference(name):
    ref = load_config(REGISTERED[name]).reference
    params, gmacs = measure(name)
    assert params == ref["params"], f"{name}: {params:,} params, reference code has {ref['params']:,}"
    assert abs(gmacs - ref["gmacs"]) <= 0.03 * ref["gmacs"], f"{name}: {gmacs:.3f} GMACs vs {ref['gmacs']}"


# REFERENCE.md (the project's shared brief, beside the checkout in CI) is the source of the figures
# each config pins in its `reference:` block; this catches a figure copied wrongly into a config.
REFERENCE_MD = Path(__file__).resolve().parents[2] / "shared" / "REFERENCE.md"


@pytest.mark.skipif(not REFERENCE_MD.is_file(), reason="shared/REFERENCE.md is not beside this checkout")
def test_config_figures_are_reference_md():
    rows = re.findall(r"^\| (\w+) \| ([\d,]+) \| ([\d.]+) \|", REFERENCE_MD.read_text(), flags=re.M)
    assert len(rows) >= 34
    for name, params, gmacs in rows:
        ref = load_config(name).reference
        assert ref["params"] == int(params.replace(",", "")), name
        assert ref["gmacs"] == pytest.approx(float(gmacs)), name


@pytest.mark.parametrize("name", NAMES)
def test_any_input_size_runs_and_a_step_trains_every_parameter(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7).eval()
    for h, w in SIZES + LARGE_SIZES * (name in FAMILY_MODELS):
        with torch.no_grad():
            feats = model.forward_intermediates(torch.randn(1, 3, h, w), intermediates_only=True)
            logits = model(torch.randn(1, 3, h, w))
        assert logits.shape == (1, 7) and torch.isfinite(logits).all(), (name, h, w)
        for f, info in zip(feats, model.feature_info):
            stride = info["reduction"]
            assert f.shape[1] == info["num_chs"]
            # Families round differently at odd sizes (padded stride-2 convs round up; CSWin's 7x7/4
            # stem and LITv2's deformable merging round down, as their authors' code does).
            assert abs(f.shape[2] - h / stride) < 1 and abs(f.shape[3] - w / stride) < 1, \
                (name, h, w, tuple(f.shape), stride)
        assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]
    if name in FAMILY_MODELS:  # an empty batch (a data shard's remainder) runs too
        with torch.no_grad():
            assert model(torch.randn(0, 3, 65, 97)).shape == (0, 7)
    # One training step reaches every parameter: none is built and left unused (timm's own model
    # tests check this for its models). 64x128 gives FasterViT's stride-16 map two windows, so its
    # carrier tokens take part; on a map of one window (64x64) they do not, as in the authors' code
    # (tests/test_train.py checks that DDP is told).
    model.train()
    model(torch.randn(1, 3, 64, 128)).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"{name}: no gradient for {len(missing)} parameters, e.g. {missing[:3]}"


# The config's stage sizes and timm's pool_size come from each stem's and downsampler's own
# out_length: families round odd sizes differently (see
# test_any_input_size_runs_and_a_step_trains_every_parameter).
TINY_CONFIGS = sorted((Path(__file__).parent / "configs").glob("tiny_*.yaml"))
# The tiny configs and the hybrids hold every stem and downsampler type the shipped configs use.
SIZE_CONFIGS = TINY_CONFIGS + [REGISTERED[n] for n in NAMES if n.startswith("zoo_hybrid_")]
ODD_SIZES = [(97, 131), (200, 200), (33, 47)]


def _resizing_specs():
    """(kind, spec) of every stem and downsampler spec in the shipped and test configs, and of
    every other registered stem and downsampler type with its defaults."""
    found = {}
    for path in list(config_paths().values()) + TINY_CONFIGS:
        cfg = load_config(path)
        for kind, spec in [("stem", cfg.stem)] + [("downsample", s.downsample) for s in cfg.stages]:
            if spec is not None:
                found.setdefault(repr((kind, sorted(spec.items()))), (kind, spec))
    for kind in ("stem", "downsample"):
        for name in registry.names(kind):
            if not any(k == kind and spec["type"] == name for k, spec in found.values()):
                found[(kind, name)] = (kind, {"type": name})
    return list(found.values())


RESIZING = _resizing_specs()


@pytest.mark.parametrize("kind,spec", RESIZING, ids=[f"{k}:" + ",".join(f"{p}={v}" for p, v in spec.items())
                                                     for k, spec in RESIZING])
def test_resize_is_the_module_output_size(kind, spec):
    """The size the config gives a stem's or downsampler's output (config.resize, from the class's
    out_length) is the size its module makes, at every residue of its stride: images of 32-40
    px for stems, maps of 2-10 tokens for downsamplers (NHWC ones take channels-last maps)."""
    layout = registry.lookup(kind, spec["type"]).layout
    if kind == "stem":
        module, lengths = registry.build(kind, spec, in_chans=3, out_dim=16), range(32, 41)
    else:
        module, lengths = registry.build(kind, spec, in_dim=8, out_dim=16), range(2, 11)
    module.eval()
    for h, w in zip(lengths, reversed(lengths)):
        x = torch.randn(1, 3 if kind == "stem" else 8, h, w)
        if kind == "downsample" and layout == NHWC:
            x = x.permute(0, 2, 3, 1)
        with torch.no_grad():
            y = module(x)
        made = tuple(y.shape[1:3]) if layout == NHWC else tuple(y.shape[2:])
        assert resize(kind, spec, (h, w))[1] == made, (h, w)


@pytest.mark.parametrize("path", SIZE_CONFIGS, ids=lambda p: p.stem)
def test_config_sizes_are_the_forward_sizes(path):
    """Each stage's input_size and timm's pool_size, computed by the config at odd img_size
    values, are the feature maps forward_intermediates returns at that size."""
    model = zoo.create_model(path).eval()
    for h, w in ODD_SIZES:
        cfg = load_config({"base": str(path), "model": {"img_size": [h, w]}})
        with torch.no_grad():
            feats = model.forward_intermediates(torch.randn(1, 3, h, w), intermediates_only=True)
        assert [s.input_size for s in cfg.stages] == [tuple(f.shape[2:]) for f in feats], (h, w)
        assert pretrained_cfg_for(cfg)["pool_size"] == tuple(feats[-1].shape[2:]), (h, w)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_compiles_to_one_graph_with_every_attention_fused(name, monkeypatch):
    """torch.compile(model, fullgraph=True) traces the whole model, and every attention call of
    an eager forward is one of zoo's Triton custom ops in that graph (none decomposed, none left
    to the reference). On the meta device: with the Triton backend forced, the custom ops run
    their fake implementations, so no GPU is needed to trace."""
    from zoo.kernels import backend, triton_na, triton_routed

    eager_calls = []
    for module, fn in ((triton_na, "na2d_triton"), (triton_routed, "routed_attention_triton")):
        real = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda *a, real=real, **k: eager_calls.append(1) or real(*a, **k))
    with torch.device("meta"):
        model = timm.create_model(name)
    x = torch.empty(2, 3, 224, 224, device="meta")
    with backend("triton"):
        model(x)
    monkeypatch.undo()

    graph_ops = []

    def count_zoo_ops(gm, example_inputs):
        graph_ops.extend(n.target for n in gm.graph.nodes
                         if n.op == "call_function" and str(n.target).startswith("zoo."))
        return gm.forward

    torch._dynamo.reset()
    with backend("triton"):
        out = torch.compile(model, fullgraph=True, backend=count_zoo_ops)(x)
    assert out.shape == (2, model.num_classes)
    assert len(eager_calls) > 0 and len(graph_ops) == len(eager_calls), (graph_ops, len(eager_calls))

