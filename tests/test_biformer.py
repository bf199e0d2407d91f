"""BiFormer-T/S/B: exact parameter counts, GMACs, logits equal to the authors' model, any input size.

The golden test needs no code of the authors: tests/fixtures/biformer_tiny_golden.json holds the
ordered key names and shapes of their ``biformer_tiny`` state dict and the logits their model
gave (fp32, eval) for ``golden_input()`` at 224x224 and, with their ``auto_pad=True`` (the
setting of their detection/segmentation backbones), at 65x97, with the weights ``golden_state_dict(keys)`` below. It
was produced once, locally, by building their model from rayleizhu/BiFormer (models/biformer.py,
models/_common.py, ops/bra_legacy.py at commit 1697bbb), loading ``golden_state_dict`` of its own
key list into it (strict) and writing its logits; the fixture's ``about`` field says the same.
Here the state dict is regenerated, written as .safetensors and loaded the way users load
checkpoints, through the converter.
"""
import json
from pathlib import Path

import pytest
import timm
import torch

import zoo.registration  # noqa: F401  (registers the zoo_ models)
from zoo.config import load_config

FIXTURE = Path(__file__).parent / "fixtures" / "biformer_tiny_golden.json"


def golden_state_dict(keys):
    """Deterministic weights from an ordered [(name, shape)] list: key i uses torch.manual_seed(i);
    0.02 * randn, except norm weights (1-D '.weight') and BN running_var, 1 + 0.02 * randn, and
    num_batches_tracked, 0."""
    sd = {}
    for i, (name, shape) in enumerate(keys):
        torch.manual_seed(i)
        if name.endswith("num_batches_tracked"):
            sd[name] = torch.tensor(0, dtype=torch.long)
            continue
        x = 0.02 * torch.randn(shape)
        if name.endswith("running_var") or (name.endswith(".weight") and len(shape) == 1):
            x = x + 1.0
        sd[name] = x
    return sd


def golden_input(height=224, width=224):
    torch.manual_seed(0)
    return torch.randn(1, 3, height, width)


def test_golden_logits_of_the_authors_model(tmp_path):
    from safetensors.torch import save_file
    fixture = json.loads(FIXTURE.read_text())
    sd = golden_state_dict(fixture["keys"])
    path = tmp_path / "biformer_tiny_authors.safetensors"
    save_file(sd, str(path))
    model = timm.create_model("zoo_biformer_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with torch.no_grad():
        logits = model.eval()(golden_input())
        # 65x97: every stage's map is padded to a multiple of n_win (the authors' auto_pad=True).
        logits_odd = model(golden_input(65, 97))
    torch.testing.assert_close(logits, torch.tensor([fixture["logits"]]), rtol=0, atol=1e-4)
    torch.testing.assert_close(logits_odd, torch.tensor([fixture["logits_65x97"]]), rtol=0, atol=1e-4)


def test_features_only_strides():
    model = timm.create_model("zoo_biformer_tiny", features_only=True, out_indices=(0, 1, 2, 3)).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [64, 128, 256, 512]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 96, 128))
    assert [tuple(f.shape[2:]) for f in feats] == [(24, 32), (12, 16), (6, 8), (3, 4)]


def test_bra_pads_bottom_right_and_crops():
    """The BRA pads bottom/right to a multiple of n_win and crops: a map that is already a
    multiple is untouched, and an odd one gives the output of the explicitly padded map."""
    from zoo.blocks.biformer import BiLevelRoutingAttention
    torch.manual_seed(0)
    bra = BiLevelRoutingAttention(dim=32, heads=2, n_win=3, topk=2).eval()
    x = torch.randn(1, 7, 8, 32)
    padded = torch.nn.functional.pad(x, (0, 0, 0, 1, 0, 2))
    with torch.no_grad():
        torch.testing.assert_close(bra(x), bra(padded)[:, :7, :8])


@pytest.mark.parametrize("mixer, match", [
    ("{topk: 50}", "topk"),
    ("{heads: 3}", "heads"),
    ("{lepe_kernel: 4}", "lepe_kernel"),
])
def test_bad_mixer_values_name_the_key(tmp_path, mixer, match):
    from zoo.errors import ConfigError
    path = tmp_path / "bad.yaml"
    path.write_text(f"base: biformer_tiny\nmodel:\n  stages: [{{block: {{mixer: {mixer}}}}}, {{}}, {{}}, {{}}]\n")
    with pytest.raises(ConfigError, match=match):
        load_config(path)
