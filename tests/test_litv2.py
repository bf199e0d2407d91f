"""LITv2 (HiLo attention): sizes, any input size, features, and logits against the authors' model.

Golden fixture (tests/fixtures/litv2_small_golden.json). The authors' code (ziplab/LITv2,
classification/models, commit 7501c86) needs a CUDA-only DCN extension and is not installable, so
their logits are stored instead of recomputed. How the fixture was made, outside this repository:
their ``LITv2`` class was built as litv2_small (embed_dim 96, depths [2, 2, 6, 2], heads
[3, 6, 12, 24], alpha 0.9, local_ws [0, 0, 2, 1], qkv_bias True, drop_path 0) with their DCN
function replaced by ``torchvision.ops.deform_conv2d`` (same DCNv1 semantics, and the only
substitution); its state-dict keys and shapes were listed in order, weights were generated from
that list by ``synthetic_state_dict`` below (imported from this file), loaded with
``load_state_dict``, and the model was run in eval mode, fp32, on CPU on ``golden_input()``.
Those logits are ``logits`` in the fixture. The same check against their live code gave a max
difference of 5e-7 for S/M/B (random init and synthetic weights), and 4e-6 per stage against
their detection backbone at 32x32, 48x80, 65x97, 100x116, 300x200 (HiLo padding, odd DTM sizes).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

import zoo  # noqa: F401  (registers zoo_* with timm)

FIXTURE = Path(__file__).parent / "fixtures" / "litv2_small_golden.json"


def synthetic_state_dict(keys_and_shapes) -> dict:
    """Deterministic weights from an ordered key list: key i draws from a generator seeded with i.
    Norm weights around 1, BatchNorm variances in [1, 1.1), everything else N(0, 0.02^2); the
    deformable offsets this gives are ~0.3 px, so the bilinear sampling is exercised."""
    sd = {}
    for i, (key, shape) in enumerate(keys_and_shapes):
        g = torch.Generator().manual_seed(i)
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.zeros(shape, dtype=torch.long)
        elif key.endswith("running_var"):
            sd[key] = 1 + 0.1 * torch.rand(shape, generator=g)
        elif key.endswith(".weight") and len(shape) == 1:
            sd[key] = 1 + 0.02 * torch.randn(shape, generator=g)
        else:
            sd[key] = 0.02 * torch.randn(shape, generator=g)
    return sd


def golden_input() -> torch.Tensor:
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2022))


def test_golden_logits(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    fixture = json.loads(FIXTURE.read_text())
    sd = synthetic_state_dict(fixture["keys"])
    path = tmp_path / "litv2_small_authors.safetensors"
    safetensors.save_file(sd, str(path))
    model = timm.create_model("zoo_litv2_small", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        logits = model(golden_input())
    expected = torch.tensor(fixture["logits"]).reshape(logits.shape)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def small():
    return timm.create_model("zoo_litv2_small").eval()


def test_features_only():
    model = timm.create_model("zoo_litv2_small", features_only=True, out_indices=(0, 1, 2, 3)).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [96, 192, 384, 768]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 128, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 96, 32, 24), (1, 192, 16, 12), (1, 384, 8, 6), (1, 768, 4, 3)]


def test_odd_sizes_floor_in_token_merging(small):
    # The authors' DTM (2x2 stride-2 deformable conv, no padding) drops an odd last row/column.
    with torch.no_grad():
        feats = small.forward_intermediates(torch.randn(1, 3, 100, 116), intermediates_only=True)
    assert [tuple(f.shape[2:]) for f in feats] == [(25, 29), (12, 14), (6, 7), (3, 3)]


def test_hilo_heads_split():
    with torch.device("meta"):
        model = timm.create_model("zoo_litv2_base")
    hilo3 = model.stages[2].blocks[0].mixer  # 16 heads, alpha 0.9 -> int(14.4) = 14 Lo-Fi, 2 Hi-Fi
    assert (hilo3.l_heads, hilo3.h_heads) == (14, 2)
    hilo4 = model.stages[3].blocks[0].mixer  # window 1: every head is Lo-Fi (plain MSA)
    assert (hilo4.l_heads, hilo4.h_heads) == (32, 0)
    assert model.stages[0].blocks[0].mixer is None  # attention-free early stages


def test_bf16_runs_deformable_merging_in_fp32():
    """torchvision's deform_conv2d has no bf16 kernel and no CPU autocast rule: a bf16 model, CPU
    autocast, and under autocast a merging handed fp32 maps (as after a detector's frozen
    BatchNorm) still run, and return their input's dtype."""
    from zoo.blocks.litv2 import DeformableTokenMerging
    torch.manual_seed(0)
    model = zoo.create_model(Path(__file__).parent / "configs" / "tiny_litv2.yaml", num_classes=3).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        want = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = model(x)
        low = model.to(torch.bfloat16)(x.bfloat16())
    assert low.dtype == torch.bfloat16
    for got in (amp, low):
        torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)

    merging = DeformableTokenMerging(8, 16).eval()
    with torch.no_grad():
        merging.dconv.conv_offset.weight.normal_(0, 0.3)  # offsets that move the samples
        maps = torch.randn(2, 8, 12, 10)
        want = merging(maps)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = merging.dconv(maps)
        assert got.dtype == torch.float32
        torch.testing.assert_close(merging.act(merging.norm(got)), want, atol=0.05, rtol=0.05)
