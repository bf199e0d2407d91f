"""Original checkpoints load through timm's pretrained path and give the original logits.

Swin is compared with timm's implementation itself, also at another window size (timm and the zoo
both resize the relative position bias tables). NAT/DiNAT's authors' code needs NATTEN 0.14
(relative positional bias), which builds from source only: a golden fixture holds the logits their
code gave, and an opt-in test runs it live.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

import zoo  # noqa: F401  (registers the zoo models)
from zoo import CheckpointError


def _save(sd, path):
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, str(path))
    return str(path)


def _load(name, path, **kw):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **kw).eval()


def _timm_swin(variant):
    torch.manual_seed(0)
    ref = timm.create_model(f"swin_{variant}_patch4_window7_224").eval()
    with torch.no_grad():  # random tables, so a wrongly indexed or unflipped bias shows in the logits
        for n, p in ref.named_parameters():
            if "relative_position_bias_table" in n:
                p.normal_(0, 1)
    return ref


@pytest.mark.parametrize("variant", ["tiny", "small", "base"])
def test_swin_equals_timm(tmp_path, variant):
    ref = _timm_swin(variant)
    model = _load(f"zoo_swin_{variant}", _save(ref.state_dict(), tmp_path / "swin.safetensors"))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected, got = ref(x), model(x)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_checkpoint_path_and_load_state_dict_take_an_original_checkpoint(tmp_path):
    """timm's ``checkpoint_path=`` (and ``load_checkpoint``) call ``model.load_state_dict``, which
    converts a layout that is not the zoo's, as ``pretrained=True`` does."""
    ref = _timm_swin("tiny")
    path = tmp_path / "swin.pth"
    torch.save({"model": ref.state_dict()}, path)  # the authors' wrapping; timm unwraps it
    model = timm.create_model("zoo_swin_tiny", checkpoint_path=str(path)).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=0)
    sd = dict(ref.state_dict(), extra=torch.zeros(1))
    with pytest.raises(CheckpointError, match=r"does not fit zoo_swin_tiny .*unexpected .*'extra'"):
        model.load_state_dict(sd)
    # what nn.Module takes stays nn.Module's: a partial load of the zoo's own keys, not strict
    head = {k: torch.zeros_like(v) for k, v in model.state_dict().items() if k.startswith("head.")}
    assert model.load_state_dict(head, strict=False).unexpected_keys == []
    assert model.head.fc.weight.abs().sum() == 0


def _fastervit(i):
    fv = pytest.importorskip("fastervit.models.faster_vit", reason="the authors' `fastervit` package is not installed")
    return getattr(fv, f"faster_vit_{i}_224")()


# The variants that the family tests do not build (they take T, XXT/T and 0 apart, with more detail).
INSTALLED_REFERENCES = {**{f"maxvit_{v}": lambda v=v: timm.create_model(f"maxvit_{v}_tf_224") for v in ("small", "base")},
                        **{f"gcvit_{v}": lambda v=v: timm.create_model(f"gcvit_{v}") for v in ("xtiny", "small", "base")},
                        **{f"fastervit_{i}": lambda i=i: _fastervit(i) for i in range(1, 5)}}


@pytest.mark.parametrize("name", sorted(INSTALLED_REFERENCES))
def test_every_variant_equals_its_installed_reference(tmp_path, name):
    """Its reference with random bias tables, norms and BatchNorm statistics, loaded through the
    converter: equal logits in float64. Float32 would not do: MaxViT-B's activations of ~2e3 turn
    rounding into 8e-4, while GELU for MaxViT's tanh GELU, which no parameter count sees, moves the
    logits by 2e-4."""
    torch.manual_seed(0)
    ref = INSTALLED_REFERENCES[name]().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) if "bias_table" in n else
                    p + 0.1 * torch.randn(p.shape, generator=g) if p.dim() == 1 or "gamma" in n else p)
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(1, 1.2, generator=g)
    path = _save(ref.state_dict(), tmp_path / f"{name}.pth")
    x = torch.randn(1, 3, 224, 224, generator=g, dtype=torch.float64)
    with torch.no_grad():
        want = ref.double()(x)
        del ref  # FasterViT-4 is 366M parameters: one model at a time in float64
        got = _load(f"zoo_{name}", path).double()(x)
    assert want.abs().max() > 0.5
    torch.testing.assert_close(got, want, atol=1e-8, rtol=0)


def test_swin_original_microsoft_layout(tmp_path):
    """Microsoft's checkpoints put the downsampler at the end of a stage and name the head `head`."""
    ref = _timm_swin("tiny")
    sd = {}
    for k, v in ref.state_dict().items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        k = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else k
        sd[k.replace("head.fc.", "head.")] = v
    model = _load("zoo_swin_tiny", _save({"model": sd}, tmp_path / "swin_tiny_patch4_window7_224.pth"))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=0)


def _variant(path, base, model):
    """A config file of ``base`` with ``model`` merged over it."""
    path.write_text(yaml.safe_dump({"base": str(base), "model": model}))
    return str(path)


def test_swin_at_another_window_equals_timm(tmp_path):
    """timm's window-7 checkpoint in a window-12 model at 384: the bias tables resized as timm does."""
    ref = _timm_swin("tiny")
    path = _save(ref.state_dict(), tmp_path / "swin.safetensors")
    config = _variant(tmp_path / "swin_w12.yaml", "swin_tiny", {"img_size": 384, "block": {"mixer": {"window_size": 12}}})
    with pytest.warns(UserWarning, match=r"resized 12 relative position bias table\(s\) from 13x13 to 23x23"):
        model = zoo.create_model(config, pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()
    ref = _load("swin_tiny_patch4_window7_224", path, img_size=384, window_size=12)  # timm's own resizing
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        expected, got = ref(x), model(x)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


CONFIGS = Path(__file__).parent / "configs"
OTHER_WINDOW = {  # each family's reduced config at another window, grid or kernel size
    "swin": {"block": {"mixer": {"window_size": 5}}},
    "maxvit": {"block": [{}, {"mixer": {"window_size": 5}}, {"mixer": {"grid_size": 5}}]},
    "nat": {"block": {"mixer": {"kernel_size": 5}}},
    "gcvit": {"img_size": 448, "block": {"mixer": {"window_size": 14}},  # windows double with the input
              "stages": [{}, {}, {"block": {"mixer": {"window_size": 28}}}, {}]},
}


@pytest.mark.parametrize("family", sorted(OTHER_WINDOW))
def test_zoo_checkpoint_at_another_window_is_resized(tmp_path, family):
    torch.manual_seed(0)
    src = zoo.create_model(CONFIGS / f"tiny_{family}.yaml")
    with torch.no_grad():
        for n, p in src.named_parameters():
            if n.endswith("rpb"):
                p.normal_(0, 1)
    tables = {k: v for k, v in src.state_dict().items() if k.endswith("rpb")}
    path = _save(src.state_dict(), tmp_path / "zoo.safetensors")
    config = _variant(tmp_path / "other.yaml", CONFIGS / f"tiny_{family}.yaml", OTHER_WINDOW[family])
    with pytest.warns(UserWarning, match=r"resized \d+ relative position bias table") as record:
        model = zoo.create_model(config, pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *model.cfg.img_size)).isfinite().all()
    counts = [int(m) for w in record for m in re.findall(r"resized (\d+) relative", str(w.message))]
    assert sum(counts) == len(tables)
    got = model.state_dict()
    for k, v in tables.items():
        assert got[k].shape != v.shape
        h, w = (s // 2 for s in v.shape[1:])
        torch.testing.assert_close(got[k][:, got[k].shape[1] // 2, got[k].shape[2] // 2], v[:, h, w])  # zero offset kept


def test_bias_table_of_no_window_names_its_key(tmp_path):
    sd = _timm_swin("tiny").state_dict()
    sd["layers.0.blocks.0.attn.relative_position_bias_table"] = torch.zeros(170, 3)
    with pytest.raises(CheckpointError, match=r"1 of another shape \(e.g. stages\.0\.blocks\.0\.mixer\.rpb: \(170, 3\) vs \(3, 13, 13\)\)"):
        _load("zoo_swin_tiny", _save(sd, tmp_path / "s.safetensors"))


NAT_FIXTURE = Path(__file__).parent / "fixtures" / "nat_golden.json"


@pytest.mark.parametrize("name", ["dinat_mini", "nat_small"])  # dilations; layer scale
def test_nat_golden_logits_of_the_authors_code(tmp_path, name):
    """Logits that SHI-Labs' own model gave (NATTEN 0.14.6, with its relative positional bias) for
    weights rebuilt from its key list, here from the zoo model that loads them as a user loads their
    .pth. The fixture also records that flipping the bias tables moves their logits by far more
    than the tolerance. Remade by tests/nat_authors_logits.py --write."""
    from golden import golden_input, golden_state_dict
    from nat_authors_logits import SCALES, SIZES
    fixture = json.loads(NAT_FIXTURE.read_text())["models"][name]
    assert fixture["control_min_diff"] > 100 * 1e-4
    sd = golden_state_dict([(k, tuple(s)) for k, s in fixture["keys"]], SCALES)
    model = _load(f"zoo_{name}", _save({"model": sd}, tmp_path / f"{name}.pth"))
    for h, w in SIZES:
        with torch.no_grad():
            got = model(golden_input((1, 3, h, w)))[0]
        torch.testing.assert_close(got, torch.tensor(fixture[f"logits_{h}x{w}"]), atol=1e-4, rtol=0)


NAT_VARIANTS = ["nat_mini", "nat_tiny", "nat_small", "nat_base", "dinat_mini", "dinat_tiny", "dinat_small",
                "dinat_base", "dinat_large"]


@pytest.mark.skipif(not os.environ.get("ZOO_NAT_AUTHORS"), reason="the authors' NAT code needs NATTEN 0.14.x: set "
                    "ZOO_NAT_AUTHORS to a PYTHONPATH holding it and their classification/ folder (README, Tests)")
def test_nat_equals_the_authors_code():
    """All 9 NAT/DiNAT variants of the authors' code, live, against the zoo, and the attention op
    against NATTEN 0.14's on 100 random cases (see nat_authors_logits.py)."""
    env = {**os.environ, "PYTHONPATH": os.environ["ZOO_NAT_AUTHORS"]}
    res = subprocess.run([sys.executable, str(Path(__file__).with_name("nat_authors_logits.py")), "--ops", "100",
                          *NAT_VARIANTS], env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    ops, *rows = [json.loads(x) for x in res.stdout.splitlines()]
    assert ops["ops"] == 100 and ops["diff"] < 1e-10, ops
    assert sorted({r["model"] for r in rows}) == sorted(NAT_VARIANTS) and len(rows) == 3 * len(NAT_VARIANTS)
    for r in rows:
        assert r["params"][0] == r["params"][1], r
        assert r["diff"] <= 1e-5 * r["scale"] and r["control"] > 100 * 1e-5 * r["scale"], r


def test_other_num_classes_keeps_the_body(tmp_path):
    ref = _timm_swin("tiny")
    model = _load("zoo_swin_tiny", _save(ref.state_dict(), tmp_path / "s.safetensors"), num_classes=10)
    assert model.get_classifier().out_features == 10
    torch.testing.assert_close(model.stem.proj.weight, ref.patch_embed.proj.weight)


def test_other_in_chans_and_no_classifier_load_as_timm_does(tmp_path):
    path = _save(_timm_swin("tiny").state_dict(), tmp_path / "s.safetensors")
    rgb = _load("zoo_swin_tiny", path)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        # timm folds the RGB filters of the first conv into one channel: a grey image, same logits
        torch.testing.assert_close(_load("zoo_swin_tiny", path, in_chans=1)(x), rgb(x.expand(-1, 3, -1, -1)),
                                   atol=1e-4, rtol=0)
        x = x.expand(-1, 3, -1, -1)
        torch.testing.assert_close(_load("zoo_swin_tiny", path, num_classes=0)(x),
                                   rgb.forward_head(rgb.forward_features(x), pre_logits=True))


def _bad_checkpoint(kind, d):
    if kind == "missing":
        return str(d / "missing.safetensors")
    if kind == "empty":
        (d / "empty.pth").write_bytes(b"")
        return str(d / "empty.pth")
    if kind == "truncated-safetensors":
        good = _save(_timm_swin("tiny").state_dict(), d / "good.safetensors")
        (d / "cut.safetensors").write_bytes(open(good, "rb").read()[:5000])
        return str(d / "cut.safetensors")
    if kind == "truncated-torch":
        good = _save(_timm_swin("tiny").state_dict(), d / "good.pth")
        (d / "cut.pth").write_bytes(open(good, "rb").read()[:5000])
        return str(d / "cut.pth")
    if kind == "foreign":
        return _save(timm.create_model("resnet18").state_dict(), d / "resnet18.safetensors")
    if kind == "no-weights":
        return _save({"epoch": 3, "args": {"lr": 0.1}}, d / "meta.pth")


@pytest.mark.parametrize("kind,words", [
    ("missing", "checkpoint file does not exist"),
    ("empty", "checkpoint file is empty"),
    ("truncated-safetensors", "not a readable safetensors file"),
    ("truncated-torch", "not a readable torch checkpoint"),
    ("foreign", r"checkpoint does not fit zoo_swin_tiny .*missing .*unexpected"),
    ("no-weights", "no state dict of tensors found"),
])
def test_unreadable_checkpoint_is_a_clear_error(tmp_path, kind, words):
    path = _bad_checkpoint(kind, tmp_path)
    with pytest.raises(CheckpointError, match=words) as info:
        _load("zoo_swin_tiny", path)
    if kind != "foreign":
        assert str(path) in str(info.value)


@pytest.mark.parametrize("source,target,words", [
    ("zoo_nat_mini", "zoo_nat_small", r"233 of another shape \(e.g. norm.bias: \(512,\) vs \(768,\)"),
    ("zoo_gcvit_xtiny", "zoo_gcvit_xxtiny", "unexpected"),  # more blocks: the converter must not trip on them
])
def test_wrong_variant_names_the_mismatched_keys(tmp_path, source, target, words):
    path = _save(timm.create_model(source).state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=rf"does not fit {target} .*{words}"):
        _load(target, path)
