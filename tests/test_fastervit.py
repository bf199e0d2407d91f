"""FasterViT: sizes and GMACs of the five variants, equal logits to the authors' PyPI package
``fastervit`` 1.0.0 (fixed-224 model and its any-resolution variant), any input size, features."""
import warnings

import pytest
import timm
import torch

import zoo  # noqa: F401  (registers the zoo_* models)
from zoo.backbone import Backbone
from zoo.config import load_config
from zoo.convert import convert_checkpoint
from zoo.errors import ConfigError



@pytest.fixture(scope="module")
def authors():
    """The authors' package; it is in the test extra, so CI has it."""
    with warnings.catch_warnings():  # it imports timm's deprecated module paths
        warnings.simplefilter("ignore")
        fixed = pytest.importorskip("fastervit.models.faster_vit",
                                    reason="the authors' `fastervit` package is not installed")
        any_res = pytest.importorskip("fastervit.models.faster_vit_any_res",
                                      reason="the authors' `fastervit` package is not installed")
    return fixed, any_res


def perturb(model, seed=0):
    """Random weights that make every path count: unit-gain linears, non-trivial biases, norms,
    layer scales and BatchNorm statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * m.weight.shape[1] ** -0.5)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(1 + 0.2 * torch.rand(m.running_var.shape, generator=gen))
        for name, p in model.named_parameters():
            if p.dim() == 1 or "gamma" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def carrier_windows(ct):
    """Ours (B, Hc, Wc, C) raster -> the authors' (B, N, C): window-major, 2x2 inside."""
    B, hc, wc, C = ct.shape
    return ct.reshape(B, hc // 2, 2, wc // 2, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(B, -1, C)


@pytest.fixture(scope="module")
def pair_0(authors, tmp_path_factory):
    """The authors' faster_vit_0_224 with perturbed weights, and the zoo model loaded from its
    state dict through timm's pretrained path."""
    fixed, _ = authors
    torch.manual_seed(0)
    ref = perturb(fixed.faster_vit_0_224())
    path = tmp_path_factory.mktemp("fastervit") / "faster_vit_0.pth"
    torch.save(ref.state_dict(), path)
    ours = timm.create_model("zoo_fastervit_0", pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(path))).eval()
    return ref, ours


def test_logits_and_carrier_tokens_match_authors_224(pair_0):
    ref, ours = pair_0
    got = {}
    hooks = [ref.levels[2].blocks[-1].register_forward_hook(lambda m, i, o: got.update(ref=o[1])),
             ours.stages[2].blocks[-1].register_forward_hook(lambda m, i, o: got.update(ours=o[1].carrier))]
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, out = ref(x), ours(x)
    for h in hooks:
        h.remove()
    assert want.abs().max() > 1  # the perturbed model is not near-constant
    torch.testing.assert_close(out, want, atol=1e-4, rtol=0)
    # The carrier tokens barely move the logits, so compare them where they are made.
    torch.testing.assert_close(carrier_windows(got["ours"]), got["ref"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", [(256, 256), (32, 32)])
def test_logits_match_authors_any_resolution(authors, pair_0, size):
    """Stage maps that are not window multiples: padded once per stage, carrier grid from the
    padded map (256: 16x16 -> 21x21, a 6x6 carrier grid; 32: one window,
    no carrier tokens), as the authors' faster_vit_any_res built for that resolution."""
    _, any_res = authors
    ref, ours = pair_0
    torch.manual_seed(0)
    other = any_res.faster_vit_0_any_res(resolution=list(size)).eval()
    # Their coordinate tables and cached biases are buffers sized for the resolution.
    sd = {k: v for k, v in ref.state_dict().items() if "relative" not in k}
    missing, _ = other.load_state_dict(sd, strict=False)
    assert all("relative" in k for k in missing), missing
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), other(x), atol=1e-4, rtol=0)


def test_layer_scale_and_propagation_match_authors(authors):
    """FasterViT-3/4's layer scale and carrier-token propagation, on a narrow FasterViT-3."""
    fixed, _ = authors
    torch.manual_seed(0)
    ref = perturb(fixed.faster_vit_3_224(dim=32, in_dim=16, depths=[1, 1, 3, 2], num_heads=[2, 2, 4, 8]))
    raw = load_config("fastervit_3").raw
    raw["model"]["stem"]["hidden_dim"] = 16
    raw["model"]["stages"] = [
        {**s, "depth": d, "dim": 32 * 2 ** i} for i, (s, d) in enumerate(zip(raw["model"]["stages"], [1, 1, 3, 2]))]
    raw["model"]["stages"][2]["block"] = {"heads": 4, "hat": True, "propagate": [False, False, True]}
    raw["model"]["stages"][3]["block"] = {"heads": 8}
    ours = Backbone(raw).eval()
    ours.load_state_dict(convert_checkpoint(ref.state_dict(), ours))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


def test_features_only_strides():
    model = timm.create_model("zoo_fastervit_0", features_only=True, out_indices=(0, 1, 2, 3)).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 96, 128))
    assert [tuple(f.shape) for f in feats] == [(1, 64, 24, 32), (1, 128, 12, 16), (1, 256, 6, 8),
                                                (1, 512, 3, 4)]


def _config(**stage2):
    raw = load_config("fastervit_0").raw
    raw["model"]["stages"][2] = {**raw["model"]["stages"][2], **stage2}
    return raw


@pytest.mark.parametrize("stage2,match", [
    (dict(block={"heads": 8, "hat": False, "propagate": True}), "propagate"),
    (dict(block={"heads": 7, "hat": True}), "heads"),
    (dict(context={"type": "carrier_tokens", "ct_size": 8}), "ct_size"),
    (dict(context={"type": "carrier_tokens", "window_size": 2, "ct_size": 1}),
     r"block\.window_size: must equal the stage's carrier_tokens window_size 2, got 7"),
    (dict(context={"type": "gcvit_global_query"}), "reads the stage's context as 'carrier_tokens'"),
])
def test_bad_configs(stage2, match):
    with pytest.raises(ConfigError, match=match):
        load_config(_config(**stage2))


def test_hat_block_without_context_is_an_error():
    with pytest.raises(ConfigError, match=r"model\.stages\[2\]\.block\.hat: needs the stage's 'carrier_tokens'"):
        Backbone(_config(context=None))
