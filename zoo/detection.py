"""Any zoo model as a torchvision detection backbone (Faster R-CNN, Mask R-CNN, RetinaNet).

``ZooFeatures`` is the trunk as dense-prediction code uses it: per-stage maps at strides 4-32 for
the chosen ``out_indices``, an optional LayerNorm on each output (the Swin/NAT/CSWin detection
backbones add one), early stages frozen, BatchNorm frozen. ``ZooFPN`` puts torchvision's feature
pyramid on it and has the ``out_channels`` attribute torchvision's detectors read. The builders
``faster_rcnn``/``mask_rcnn``/``retinanet`` pass the keywords that torchvision's detector or its
image transform name (``min_size``, ``max_size``, ``box_detections_per_img``, ...) to torchvision,
and any other to the backbone (``zoo.create_model``), which refuses what it does not know.

Needs torchvision (``pip install zoo[detection]``).
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Dict, Optional, Sequence, Union

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from zoo.backbone import Backbone
from zoo.blocks.layers import LayerNorm2d
from zoo.config import check_positive_int, value_problem

__all__ = ["ZooFeatures", "ZooFPN", "freeze_batchnorm", "faster_rcnn", "mask_rcnn", "retinanet"]


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d (and SyncBatchNorm) by torchvision's FrozenBatchNorm2d holding its
    statistics and affine parameters as buffers: detection batches are too small for batch
    statistics. LayerNorms are per-token and left as they are. Returns the module (changed in place)."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and child.affine and child.track_running_stats:
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            frozen.to(device=child.weight.device, dtype=child.weight.dtype)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def _as_backbone(model: Union[str, nn.Module], pretrained: bool, **kwargs) -> Backbone:
    """A zoo model to become a trunk; a model passed in is copied, since the trunk prunes it,
    drops its head and freezes its BatchNorms (the caller's model keeps working as it was)."""
    if isinstance(model, nn.Module):
        if not isinstance(model, Backbone):
            raise ValueError(f"model must be a zoo model (zoo.Backbone, not features_only), a name or a YAML "
                             f"path, got {type(model).__name__}")
        if kwargs or pretrained:
            raise ValueError(f"{sorted(kwargs) + ['pretrained'] * pretrained} configure a model built here; "
                             f"pass them to zoo.create_model for a model you built")
        return copy.deepcopy(model)
    from zoo.registration import create_model
    return create_model(model, pretrained=pretrained, num_classes=0, **kwargs)


class ZooFeatures(nn.Module):
    """A zoo model's stage outputs as an ``OrderedDict`` of NCHW maps keyed ``"0"``, ``"1"``, ...

    Args:
        model: a zoo model (copied: the original is left as it is), a registered name
            (``"nat_tiny"``) or a YAML path.
        out_indices: which stages to return (strides 4, 8, 16, 32 for 0-3).
        frozen_stages: -1 trains everything; 0 freezes the stem; ``i`` the stem and stages ``< i``
            (mmdetection's convention). Frozen parts run in eval mode with no gradients.
        freeze_bn: turn every BatchNorm into FrozenBatchNorm2d (LayerNorms are untouched).
        out_norm: a LayerNorm on each returned map, as the authors' detection backbones.
        pretrained, kwargs: passed to ``zoo.create_model`` when ``model`` is a name.
    """

    def __init__(self, model: Union[str, nn.Module], out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1, freeze_bn: bool = True, out_norm: bool = True,
                 pretrained: bool = False, **kwargs):
        super().__init__()
        trunk = _as_backbone(model, pretrained, **kwargs)
        n = len(trunk.stages)
        ok = isinstance(out_indices, (tuple, list)) and out_indices and all(
            not value_problem(i, int, lambda i: -n <= i < n) for i in out_indices)
        self.out_indices = tuple(i % n for i in out_indices) if ok else ()
        if not ok or list(self.out_indices) != sorted(set(self.out_indices)):
            raise ValueError(f"out_indices must be a non-empty sequence of increasing stage indices in [0, {n}) "
                             f"(or negative from the end), got {out_indices!r}")
        if value_problem(frozen_stages, int, lambda v: -1 <= v <= n):
            raise ValueError(f"frozen_stages must be in [-1, {n}], got {frozen_stages}")
        trunk.prune_intermediate_layers(list(self.out_indices), prune_norm=True, prune_head=True)
        self.trunk = freeze_batchnorm(trunk) if freeze_bn else trunk
        self.frozen_stages = frozen_stages
        info = [trunk.feature_info[i] for i in self.out_indices]
        self.channels = [f["num_chs"] for f in info]
        self.strides = [f["reduction"] for f in info]
        self.norms = nn.ModuleList(LayerNorm2d(c) if out_norm else nn.Identity() for c in self.channels)
        self._freeze()

    def _frozen_modules(self):
        if self.frozen_stages >= 0:
            yield self.trunk.stem
            yield from list(self.trunk.stages)[:self.frozen_stages]
            # the output norm of a frozen stage belongs to it (mmdetection's Swin freezes it too)
            yield from (norm for i, norm in zip(self.out_indices, self.norms) if i < self.frozen_stages)

    def _freeze(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze()  # frozen stages stay in eval mode (dropout/drop-path off)
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = self.trunk.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True)
        return OrderedDict((str(i), norm(f)) for i, (f, norm) in enumerate(zip(feats, self.norms)))


class ZooFPN(nn.Module):
    """``ZooFeatures`` plus torchvision's FPN: a dict of ``out_channels``-wide maps, the input
    torchvision's detectors expect. ``extra="pool"`` adds a max-pooled level (Faster/Mask R-CNN),
    ``"p6p7"`` RetinaNet's P6/P7 from P5, ``None`` nothing."""

    def __init__(self, features: ZooFeatures, out_channels: int = 256, extra: Optional[str] = "pool"):
        super().__init__()
        self.body = features
        extra_blocks = {"pool": LastLevelMaxPool(), "p6p7": LastLevelP6P7(out_channels, out_channels), None: None}
        if extra not in extra_blocks:
            raise ValueError(f"extra must be 'pool', 'p6p7' or None, got {extra!r}")
        self.fpn = FeaturePyramidNetwork(features.channels, out_channels, extra_blocks=extra_blocks[extra])
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def _split(detector: type, kwargs: dict):
    """(backbone keywords, detector keywords). torchvision's detectors take unknown keywords
    silently (their **kwargs), so everything that is not a named parameter of the detector or of
    its image transform goes to the backbone (ZooFeatures, then zoo.create_model), which refuses
    what it does not know."""
    import inspect

    from torchvision.models.detection.transform import GeneralizedRCNNTransform
    known = (set(inspect.signature(detector.__init__).parameters)
             | set(inspect.signature(GeneralizedRCNNTransform.__init__).parameters)) - {"self", "kwargs", "backbone"}
    detector_kw = {k: v for k, v in kwargs.items() if k in known}
    return {k: v for k, v in kwargs.items() if k not in known}, detector_kw


def _features(model, num_classes: int, fpn_channels: int, mine: dict, rest: dict) -> ZooFeatures:
    """The detector's trunk, after checking the builder's numbers. torchvision's image transform
    normalises with ImageNet's 3-channel mean and std unless told: it is told the model's own
    (its pretrained_cfg), which must have one value per input channel."""
    check_positive_int("num_classes", num_classes)  # torchvision's count, background included
    check_positive_int("fpn_channels", fpn_channels)
    features = ZooFeatures(model, **mine)
    trunk = features.trunk
    from zoo.registration import pretrained_cfg_for
    cfg = getattr(trunk, "pretrained_cfg", None) or pretrained_cfg_for(trunk.cfg)  # a Backbone built directly
    for key, field in (("image_mean", "mean"), ("image_std", "std")):
        if key not in rest:
            value = tuple(cfg.get(field) or ())
            if len(value) != trunk.in_chans:
                raise ValueError(f"{trunk.cfg.name} takes {trunk.in_chans} input channel(s) but its "
                                 f"pretrained_cfg {field} has {len(value)} value(s): pass image_mean and image_std")
            rest[key] = list(value)
    return features


def _levels(features: ZooFeatures, extra: int) -> list:
    """The strides of the pyramid's levels: the chosen stages', then ``extra`` halvings."""
    return list(features.strides) + [features.strides[-1] * 2 ** (i + 1) for i in range(extra)]


def _rcnn(detector: type, model, num_classes: int, fpn_channels: int, kwargs: dict, mask: bool = False):
    """torchvision's defaults assume four levels plus the pooled one; anchors (8 x stride, as theirs:
    32-512 for strides 4-64) and RoI pools are sized to the levels the chosen out_indices give."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign
    mine, rest = _split(detector, kwargs)
    features = _features(model, num_classes, fpn_channels, mine, rest)
    strides, names = _levels(features, 1), [str(i) for i in range(len(features.strides))]
    rest.setdefault("rpn_anchor_generator",
                    AnchorGenerator(tuple((8 * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides)))
    rest.setdefault("box_roi_pool", MultiScaleRoIAlign(names, 7, 2))
    if mask:
        rest.setdefault("mask_roi_pool", MultiScaleRoIAlign(names, 14, 2))
    return detector(ZooFPN(features, fpn_channels, "pool"), num_classes=num_classes, **rest)


def faster_rcnn(model: Union[str, nn.Module], num_classes: int, fpn_channels: int = 256, **kwargs):
    """torchvision's Faster R-CNN on a zoo backbone with an FPN (levels P2-P6 by default)."""
    from torchvision.models.detection import FasterRCNN
    return _rcnn(FasterRCNN, model, num_classes, fpn_channels, kwargs)


def mask_rcnn(model: Union[str, nn.Module], num_classes: int, fpn_channels: int = 256, **kwargs):
    """torchvision's Mask R-CNN on a zoo backbone with an FPN (levels P2-P6 by default)."""
    from torchvision.models.detection import MaskRCNN
    return _rcnn(MaskRCNN, model, num_classes, fpn_channels, kwargs, mask=True)


def retinanet(model: Union[str, nn.Module], num_classes: int, fpn_channels: int = 256, **kwargs):
    """torchvision's RetinaNet on a zoo backbone: FPN over strides 8-32 plus P6/P7 (as the paper;
    other ``out_indices`` get anchors for their levels: 3 scales of 4 x stride, as torchvision's)."""
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    mine, rest = _split(RetinaNet, kwargs)
    mine.setdefault("out_indices", (1, 2, 3))
    features = _features(model, num_classes, fpn_channels, mine, rest)
    strides = _levels(features, 2)
    rest.setdefault("anchor_generator", AnchorGenerator(
        tuple((4 * s, int(4 * s * 2 ** (1 / 3)), int(4 * s * 2 ** (2 / 3))) for s in strides),
        ((0.5, 1.0, 2.0),) * len(strides)))
    return RetinaNet(ZooFPN(features, fpn_channels, "p6p7"), num_classes=num_classes, **rest)
