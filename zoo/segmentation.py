"""Semantic segmentation on any zoo model: a Semantic FPN or UPerNet head over its stage outputs.

* ``fpn``: Semantic FPN (Kirillov et al., "Panoptic Feature Pyramid Networks", 2019), the head
  LITv2 and BiFormer report ADE20K with: an FPN, each level brought to stride 4 by 3x3 conv +
  norm + ReLU + 2x upsampling steps, summed, classified by a 1x1 conv.
* ``upernet``: UPerNet (Xiao et al., 2018), the head Swin, NAT/DiNAT and CSWin report with: a
  pyramid pooling module on the last stage, an FPN top-down path, every level upsampled to
  stride 4, concatenated and fused by a 3x3 conv.

GroupNorm (16 channels a group) instead of the papers' (Sync)BatchNorm: segmentation batches on
one device are small, and the 1x1 pooled map of the pyramid pooling has no batch statistics.
The logits are upsampled to the input size; ``segmentation_loss`` is pixel-wise cross-entropy
with an ignore label (255, as ADE20K and Cityscapes loaders write it).
"""
from __future__ import annotations

from typing import List, Literal, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from zoo.config import check_positive_int
from zoo.detection import ZooFeatures

__all__ = ["SegmentationModel", "segmentation_loss"]


def _groups(channels: int) -> int:
    """About 16 channels a group: the largest divisor of ``channels`` not above channels // 16."""
    return max(d for d in range(1, max(1, channels // 16) + 1) if channels % d == 0)


def _conv(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
                         nn.GroupNorm(_groups(cout), cout), nn.ReLU(inplace=True))


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class SemanticFPNHead(nn.Module):
    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], channels: int, num_classes: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)
        # A level at stride s gets log2(s / min_stride) conv+upsample steps (at least one conv).
        base = min(strides)
        self.scale = nn.ModuleList(
            nn.ModuleList(_conv(channels, channels) for _ in range(max(1, (s // base).bit_length() - 1)))
            for s in strides)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 1, 0, -1):  # top-down
            lat[i - 1] = lat[i - 1] + _resize(lat[i], lat[i - 1].shape[-2:])
        size = lat[0].shape[-2:]
        out = 0
        for x, smooth, steps in zip(lat, self.smooth, self.scale):
            x = smooth(x)
            for conv in steps:
                x = conv(x)
                if x.shape[-2:] != size:
                    x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            out = out + (_resize(x, size) if x.shape[-2:] != size else x)
        return self.classifier(out)


class UPerNetHead(nn.Module):
    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), _conv(in_channels[-1], channels, 1))
                                 for s in pool_scales)
        self.bottleneck = _conv(in_channels[-1] + len(pool_scales) * channels, channels)
        self.lateral = nn.ModuleList(_conv(c, channels, 1) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(_conv(channels, channels) for _ in in_channels[:-1])
        self.fuse = _conv(len(in_channels) * channels, channels)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        pooled = [_resize(p(top), top.shape[-2:]) for p in self.ppm]
        lat = [conv(f) for conv, f in zip(self.lateral, feats[:-1])] + [self.bottleneck(torch.cat([top] + pooled, 1))]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + _resize(lat[i], lat[i - 1].shape[-2:])
        size = lat[0].shape[-2:]
        outs = [conv(x) for conv, x in zip(self.fpn, lat[:-1])] + [lat[-1]]
        return self.classifier(self.fuse(torch.cat([_resize(x, size) for x in outs], 1)))


class SegmentationModel(nn.Module):
    """A zoo trunk (``ZooFeatures``: frozen stages, frozen BatchNorm, out_indices) and a head.
    ``model(images)`` returns logits (B, num_classes, H, W) at the input size."""

    def __init__(self, model: Union[str, nn.Module], num_classes: int, head: Literal["fpn", "upernet"] = "fpn",
                 channels: int = 256, **feature_kwargs):
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("channels", channels)
        self.backbone = ZooFeatures(model, **feature_kwargs)
        if head == "fpn":
            self.head = SemanticFPNHead(self.backbone.channels, self.backbone.strides, channels, num_classes)
        elif head == "upernet":
            self.head = UPerNetHead(self.backbone.channels, channels, num_classes)
        else:
            raise ValueError(f"head must be 'fpn' or 'upernet', got {head!r}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = list(self.backbone(images).values())
        return _resize(self.head(feats), images.shape[-2:])


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Pixel-wise cross-entropy; ``target`` is (B, H, W) class indices, ``ignore_index`` skipped.
    Logits of another size are resized to the target's first."""
    if target.is_floating_point() or target.is_complex():
        raise ValueError(f"target must hold class indices (an integer tensor, B x H x W), got {target.dtype}")
    if logits.shape[-2:] != target.shape[-2:]:
        logits = _resize(logits, target.shape[-2:])
    # summed, then divided by the counted pixels: 0 (not NaN, as a mean over nothing) when every
    # pixel is ignored, e.g. a crop that holds only void
    loss = F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction="sum")
    return loss / (target != ignore_index).sum().clamp(min=1)
