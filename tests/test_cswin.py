"""CSWin Transformer: sizes, any input size, feature strides, and equal outputs to the authors' code.

The golden fixture tests/fixtures/cswin_tiny_golden.json was produced once, outside the repository,
by the authors' code (microsoft/CSWin-Transformer at commit f111ae2, run on a CPU in fp32), with the
weights and inputs of tests/golden.py:

* ``keys``: the ordered (name, shape) list of ``CSWin_64_12211_tiny_224().state_dict()``
  (models/cswin.py), i.e. the key names of their released checkpoints.
* Their model loaded the state dict that ``golden_state_dict(keys)`` builds (every tensor
  seeded by its index in that list, so no file of weights needs to be kept).
* ``logits_224``: their classification model's logits for ``golden_input((1, 3, 224, 224))``.
* ``logits_131x150``: their segmentation backbone (segmentation/backbone/cswin_transformer.py,
  ``CSWin(embed_dim=64, depth=[1, 2, 21, 1], split_size=[1, 2, 7, 7], num_heads=[2, 4, 8, 16])``,
  loaded with the same state dict, its per-stage output norms replaced by identities) at
  ``golden_input((1, 3, 131, 150))``, its last-stage tokens then through the classification
  model's own ``norm``, mean and ``head`` (what their classifier computes, which itself only runs at
  its construction size). Stage 3 there is 9x10 with 7-wide stripes: several stripes per axis and
  a pad of 5 and 4, so it checks the centred zero padding and the per-stripe LePE at the borders.

Here the same state dict is written as .safetensors and loaded the way a user loads the authors'
checkpoint, through the converter.
"""
import json
from pathlib import Path

import pytest
import timm
import torch

import zoo  # noqa: F401  (registers the zoo_ models with timm)
from golden import golden_input, golden_state_dict  # tests/ is on sys.path
from zoo.config import load_config

FIXTURE = Path(__file__).parent / "fixtures" / "cswin_tiny_golden.json"


def test_features_only_strides():
    m = timm.create_model("zoo_cswin_tiny", features_only=True, out_indices=(0, 1, 2, 3)).eval()
    assert m.feature_info.reduction() == [4, 8, 16, 32]
    assert m.feature_info.channels() == [64, 128, 256, 512]
    with torch.no_grad():
        feats = m(torch.randn(1, 3, 128, 96))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 32, 24), (128, 16, 12), (256, 8, 6), (512, 4, 3)]


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    from safetensors.torch import save_file
    fixture = json.loads(FIXTURE.read_text())
    keys = [(k, tuple(s)) for k, s in fixture["keys"]]
    path = tmp_path_factory.mktemp("cswin") / "cswin_tiny_authors.safetensors"
    save_file(golden_state_dict(keys), str(path))
    model = timm.create_model("zoo_cswin_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    return fixture, model.eval()


def test_golden_logits_224(golden):
    fixture, model = golden
    with torch.no_grad():
        logits = model(golden_input((1, 3, 224, 224)))
    want = torch.tensor(fixture["logits_224"]).reshape(logits.shape)
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=0)


def test_golden_logits_131x150(golden):
    """Stripe padding (centred, unmasked zero tokens) and per-stripe LePE at a size no stripe divides."""
    fixture, model = golden
    with torch.no_grad():
        logits = model(golden_input((1, 3, 131, 150)))
    want = torch.tensor(fixture["logits_131x150"]).reshape(logits.shape)
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=0)


def test_odd_heads_rejected():
    from zoo.errors import ConfigError
    raw = load_config("cswin_tiny").raw
    raw["model"]["stages"][1]["block"]["mixer"]["heads"] = 3
    with pytest.raises(ConfigError, match="heads"):
        load_config(raw)
