"""DeepLabV3 for semantic segmentation: a dilated backbone, an atrous spatial pyramid pooling head
with an image-level pooling branch, and bilinear upsampling to the input size."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Backbone, NormAct, conv1x1, conv3x3, initialize_weights, scaled_channels
from .norm_act import DEFAULT_NORM_ACT

__all__ = ["ASPP", "DeepLabV3Head", "DeepLabV3", "deeplabv3"]


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, 3x3 branches at ``rates``, and an image-level
    branch (global average, 1x1 conv, broadcast back), each ending in ``norm_act``; concatenated and
    projected by ``1x1 conv -> norm_act``.

    In place: each ``norm_act`` reads a convolution's output; the backbone features they all share
    are only read by convolutions and the pooling. The image-level branch normalizes a (N, C, 1, 1)
    tensor, so training needs a batch of more than one image (as ``nn.BatchNorm2d`` does).
    """

    def __init__(self, in_channels: int, out_channels: int = 256, rates: Sequence[int] = (6, 12, 18),
                 norm_act: NormAct = DEFAULT_NORM_ACT):
        super().__init__()
        self.branches = nn.ModuleList([nn.Sequential(conv1x1(in_channels, out_channels), norm_act(out_channels))])
        for rate in rates:
            self.branches.append(nn.Sequential(conv3x3(in_channels, out_channels, dilation=rate),
                                               norm_act(out_channels)))
        self.image_pooling = nn.Sequential(conv1x1(in_channels, out_channels), norm_act(out_channels))
        branch_count = len(self.branches) + 1
        self.projection = nn.Sequential(conv1x1(branch_count * out_channels, out_channels), norm_act(out_channels))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        outputs = [branch(features) for branch in self.branches]
        pooled = self.image_pooling(F.adaptive_avg_pool2d(features, 1))
        outputs.append(pooled.expand(-1, -1, *features.shape[-2:]))
        return self.projection(torch.cat(outputs, 1))


class DeepLabV3Head(nn.Sequential):
    """:class:`ASPP` followed by a 1x1 classifier (with bias) producing ``num_classes`` logits."""

    def __init__(self, in_channels: int, num_classes: int, hidden_channels: int = 256,
                 rates: Sequence[int] = (6, 12, 18), norm_act: NormAct = DEFAULT_NORM_ACT):
        super().__init__()
        self.aspp = ASPP(in_channels, hidden_channels, rates, norm_act)
        self.classifier = nn.Conv2d(hidden_channels, num_classes, 1)


class DeepLabV3(nn.Module):
    """Segmentation network: ``backbone`` (a :class:`~inplace_abn.models.blocks.Backbone` built with
    ``num_classes=0``) -> :class:`DeepLabV3Head` -> bilinear upsampling to the input size.

    The ASPP rates are (6, 12, 18) at output stride 16 and twice those at 8, as in DeepLabV3.
    """

    def __init__(self, backbone: Backbone, num_classes: int, hidden_channels: int = 256,
                 norm_act: Optional[NormAct] = None, rates: Optional[Sequence[int]] = None):
        super().__init__()
        norm_act = DEFAULT_NORM_ACT if norm_act is None else norm_act
        if rates is None:
            rates = tuple(rate * 16 // backbone.output_stride for rate in (6, 12, 18))
        self.backbone = backbone
        self.head = DeepLabV3Head(backbone.out_channels, num_classes, hidden_channels, rates, norm_act)
        initialize_weights(self.head)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def deeplabv3(backbone: Callable[..., Backbone], num_classes: int = 19, output_stride: int = 8,
              norm_act: Optional[NormAct] = None, hidden_channels: Optional[int] = None,
              width_multiplier: float = 1.0, **backbone_kwargs) -> DeepLabV3:
    """DeepLabV3 on ``backbone`` (a builder such as ``wider_resnet38_a2``), with the same ``norm_act``
    throughout. ``width_multiplier`` scales the backbone and the head (256 hidden channels at 1);
    other ``backbone_kwargs`` go to the backbone builder."""
    features = backbone(norm_act=norm_act, num_classes=0, output_stride=output_stride,
                        width_multiplier=width_multiplier, **backbone_kwargs)
    if hidden_channels is None:
        hidden_channels = scaled_channels(256, width_multiplier)
    return DeepLabV3(features, num_classes, hidden_channels, norm_act)
