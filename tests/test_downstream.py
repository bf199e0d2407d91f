"""Zoo backbones under torchvision's detectors and a segmentation head, as detection/segmentation
training uses them: non-square images (480x640 and others), frozen early stages, frozen
BatchNorm, a few optimiser steps on one synthetic batch with the loss going down, then inference.
Reduced-width configs (tests/configs/tiny_*.yaml) keep this affordable on a 2-core CPU."""
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

from zoo.detection import ZooFeatures, ZooFPN, faster_rcnn, mask_rcnn, retinanet  # noqa: E402
from zoo.segmentation import SegmentationModel, segmentation_loss  # noqa: E402

CONFIGS = Path(__file__).parent / "configs"
# Adding a family is one entry here (and its tests/configs/tiny_<family>.yaml).
FAMILIES = ["nat", "dinat", "swin", "cswin", "litv2", "biformer", "maxvit", "gcvit", "fastervit"]
BOXES = torch.tensor([[100., 120., 260., 300.], [330., 60., 560., 200.], [40., 330., 300., 460.]])


def _cfg(family):
    return CONFIGS / f"tiny_{family}.yaml"


def _targets(h, w, boxes=BOXES):
    masks = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
    for m, (x0, y0, x1, y1) in zip(masks, boxes.long().tolist()):
        m[y0:y1, x0 + (x1 - x0) // 4:x1] = 1  # not the whole box, so masks are not trivial
    return dict(boxes=boxes, labels=torch.arange(1, len(boxes) + 1), masks=masks)


def _image(h, w):
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, h, w, generator=g) * 0.3
    for i, (x0, y0, x1, y1) in enumerate(BOXES.long().tolist()):
        img[i % 3, y0:y1, x0:x1] += 0.6  # objects are bright patches in one channel
    return img


def _train(model, loss_fn, steps, lr=3e-4):
    """``steps`` Adam steps on one batch; the loss before and after (same seed, so the detectors'
    proposal samplers draw alike)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()

    def loss():
        torch.manual_seed(0)
        return loss_fn()

    with torch.no_grad():
        before = loss().item()
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        after = loss().item()
    return before, after


def test_features_adapter_options():
    feats = ZooFeatures(_cfg("biformer"), out_indices=(1, 2, 3), frozen_stages=1)
    assert feats.channels == [64, 128, 256] and feats.strides == [8, 16, 32]
    assert len(feats.trunk.stages) == 4 and isinstance(feats.trunk.head.fc, torch.nn.Identity)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in feats.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in feats.modules())
    frozen = [feats.trunk.stem, feats.trunk.stages[0]]
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in feats.trunk.stages[1].parameters())
    feats.train()
    assert not feats.trunk.stages[0].training and feats.trunk.stages[1].training
    # LayerNorms are left as they are (and train with the unfrozen stages).
    assert all(p.requires_grad for n, p in feats.named_parameters() if "norms" in n)
    with torch.no_grad():
        out = feats(torch.randn(1, 3, 65, 97))
    assert [tuple(v.shape) for v in out.values()] == [(1, 64, 9, 13), (1, 128, 5, 7), (1, 256, 3, 4)]
    fpn = ZooFPN(ZooFeatures(_cfg("nat"), out_indices=(0, 1, 2, 3), freeze_bn=False), 32)
    with torch.no_grad():
        out = fpn(torch.randn(1, 3, 96, 160))
    assert list(out) == ["0", "1", "2", "3", "pool"] and all(v.shape[1] == 32 for v in out.values())
    for bad in ((2, 1), (0, 5), (), 3, (True, 2)):  # 5 used to wrap around to stage 1
        with pytest.raises(ValueError, match="out_indices"):
            ZooFeatures(_cfg("nat"), out_indices=bad)
    for bad in (7, "1", 1.5, True):
        with pytest.raises(ValueError, match="frozen_stages"):
            ZooFeatures(_cfg("nat"), frozen_stages=bad)
    # a model passed in is copied: the trunk prunes it and drops its head, the original still classifies
    import zoo
    classifier = zoo.create_model(_cfg("maxvit"), num_classes=10).eval()
    feats = ZooFeatures(classifier, out_indices=(0, 1))
    assert len(feats.trunk.stages) == 2 and feats.trunk is not classifier
    assert classifier(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in classifier.modules())
    # the output norm of a frozen stage is frozen with it
    feats = ZooFeatures(_cfg("nat"), frozen_stages=2)
    assert [all(not p.requires_grad for p in n.parameters()) for n in feats.norms] == [True, True, False, False]


def test_low_precision_trunks():
    """A bf16 trunk stays bf16 through its frozen BatchNorms, and under autocast a trunk whose
    frozen (fp32) BatchNorms hand fp32 maps to LITv2's deformable merging runs, close to fp32."""
    feats = ZooFeatures(_cfg("maxvit"), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        out = feats(torch.randn(1, 3, 64, 64, dtype=torch.bfloat16))
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    feats = ZooFeatures(_cfg("litv2")).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        want = feats(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = feats(x)
    for level in want:
        assert (got[level].float() - want[level]).norm() / want[level].norm() < 0.02, level


def test_detector_keywords_reach_the_backbone():
    model = faster_rcnn(_cfg("nat"), num_classes=3, drop_path_rate=0.3, min_size=96)
    rates = [m.drop_prob for m in model.backbone.body.trunk.modules() if hasattr(m, "drop_prob")]
    assert max(rates) == pytest.approx(0.3) and model.transform.min_size == (96,)
    with pytest.raises(TypeError, match="frozen_stage"):  # a typo is not swallowed by torchvision
        faster_rcnn(_cfg("nat"), num_classes=3, frozen_stage=2)
    for kw in ({"num_classes": 0}, {"num_classes": 3, "fpn_channels": 0}):
        with pytest.raises(ValueError, match=f"{[k for k in kw if kw[k] == 0][0]} must be a positive int"):
            retinanet(_cfg("nat"), **kw)


def test_detectors_normalise_as_the_model_was_trained(tmp_path):
    """torchvision's transform uses ImageNet's 3-channel mean/std unless told; the model's own are
    given to it, and a model of other input channels must be given its own."""
    inception = tmp_path / "inception_stats.yaml"
    inception.write_text(f"base: {_cfg('nat')}\npretrained: {{mean: inception}}\n")
    import zoo
    for model in (inception, zoo.Backbone(inception)):  # built by name, or directly (no pretrained_cfg)
        detector = faster_rcnn(model, num_classes=3)
        assert detector.transform.image_mean == detector.transform.image_std == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="takes 1 input channel.*mean has 3 value.*pass image_mean and image_std"):
        retinanet(_cfg("nat"), num_classes=3, in_chans=1)
    gray = retinanet(_cfg("nat"), num_classes=3, in_chans=1, image_mean=[0.5], image_std=[0.25],
                     min_size=64, max_size=64).eval()
    with torch.no_grad():
        assert set(gray([torch.rand(1, 64, 64)])[0]) == {"boxes", "scores", "labels"}


def test_segmentation_any_width_and_a_void_crop():
    model = SegmentationModel(_cfg("nat"), num_classes=3, channels=100)  # 100 is not a multiple of 16
    logits = model(torch.randn(1, 3, 64, 64))
    assert segmentation_loss(logits, torch.full((1, 64, 64), 255)).item() == 0.0
    with pytest.raises(ValueError, match="class indices .* got torch.float32"):  # not silently truncated
        segmentation_loss(logits, torch.full((1, 64, 64), 2.9))


def _mask_rcnn(family, h, w):
    # frozen_stages=1 (stem and stage 1 frozen, as detection fine-tuning often does) also keeps the
    # stride-4 backward, the dearest part on a CPU, out of the test; small heads for the same reason.
    return mask_rcnn(_cfg(family), num_classes=4, fpn_channels=64, frozen_stages=1, min_size=h, max_size=w,
                     rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=300, box_batch_size_per_image=128,
                     rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100,
                     box_detections_per_img=10)


def _check_detections(model, sizes):
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, hh, ww) for hh, ww in sizes])
    for o, (hh, ww) in zip(out, sizes):
        assert o["boxes"].shape[1:] == (4,) and o["masks"].shape[1:] == (1, hh, ww)
        if len(o["boxes"]):
            assert (o["boxes"][:, 2] <= ww).all() and (o["boxes"][:, 3] <= hh).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_rcnn_trains_and_infers(family):
    """Every family: 3 steps at 480x640, then inference on sizes that are not multiples of 32,
    one portrait and one landscape."""
    torch.manual_seed(0)
    h, w = 480, 640
    model = _mask_rcnn(family, h, w)
    img, tgt = _image(h, w), _targets(h, w)
    before, after = _train(model, lambda: sum(model([img], [tgt]).values()), steps=3)
    assert after < 0.9 * before, f"{family}: Mask R-CNN loss {before:.3f} -> {after:.3f}"
    _check_detections(model, [(357, 501), (450, 330)])


@pytest.mark.parametrize("build", [faster_rcnn, retinanet])
def test_faster_rcnn_and_retinanet(build):
    torch.manual_seed(0)
    h, w = 160, 224
    model = build(_cfg("biformer"), num_classes=4, fpn_channels=32, min_size=h, max_size=w)
    img = torch.nn.functional.interpolate(_image(480, 640)[None], size=(h, w))[0]
    tgt = dict(boxes=BOXES * (h / 480), labels=torch.arange(1, 4))
    before, after = _train(model, lambda: sum(model([img], [tgt]).values()), steps=3)
    assert after < before, f"{build.__name__}: loss {before:.3f} -> {after:.3f}"
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 201, 299)])
    assert out[0]["boxes"].shape[1:] == (4,)


@pytest.mark.parametrize("family", FAMILIES)
def test_segmentation_trains_and_infers(family):
    torch.manual_seed(0)
    h, w = 160, 224
    head = "upernet" if family in ("swin", "nat", "dinat", "cswin") else "fpn"  # each paper's head
    model = SegmentationModel(_cfg(family), num_classes=4, head=head, channels=32, frozen_stages=1)
    imgs = torch.rand(2, 3, h, w) * 0.3
    masks = torch.zeros(2, h, w, dtype=torch.long)
    for b, (cls, y0, y1, x0, x1) in enumerate([(1, 40, 100, 30, 90), (2, 20, 70, 120, 200)]):
        masks[b, y0:y1, x0:x1] = cls
        imgs[b, cls, y0:y1, x0:x1] += 0.6
    masks[1, 120:, 150:] = 3
    imgs[1, 0, 120:, 150:] += 0.6
    masks[1, :10] = 255  # ignored
    before, after = _train(model, lambda: segmentation_loss(model(imgs), masks), steps=4)
    assert after < 0.9 * before, f"{family}: segmentation loss {before:.3f} -> {after:.3f}"
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 257, 351))
    assert logits.shape == (1, 4, 257, 351) and torch.isfinite(logits).all()


def test_other_pyramid_levels_get_anchors_for_them():
    # torchvision's default anchors assume 5 levels: other out_indices failed at the first forward
    for model in (faster_rcnn(_cfg("nat"), 3, out_indices=(1, 2, 3), min_size=96, max_size=128),
                  retinanet(_cfg("nat"), 3, out_indices=(0, 1, 2, 3), min_size=96, max_size=128)):
        with torch.no_grad():
            assert {"boxes", "labels", "scores"} <= set(model.eval()([torch.rand(3, 96, 128)])[0])
