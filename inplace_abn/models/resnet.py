"""Pre-activation ResNet 18-152 and ResNeXt 50/101/152 (32x4d, and the original's 64x2d), and ResNet
v1 18-152 (post-activation, the original's published ResNet*v1), laid out as the original's (``mod1``
... ``mod5``, ``bn_out``, ``classifier.fc``); a builder per depth on one constructor per layout."""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

from torch import nn

from .blocks import (
    Backbone, NormAct, PostActivationBlock, PreActivationBlock, input_stem, scaled_channels, stride_schedule,
)
from .norm_act import DEFAULT_NORM_ACT

__all__ = [
    "ResNet", "ResNetV1", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x4d", "resnext152_32x4d", "resnext50_64x2d", "resnext101_64x2d",
    "resnext152_64x2d", "resnet18_v1", "resnet34_v1", "resnet50_v1", "resnet101_v1", "resnet152_v1",
]


def _stages(stages: "OrderedDict[str, nn.Module]", block, blocks_per_stage, base_channels, channels_in, schedule,
            norm_act, groups=1, divisor=1, width_multiplier=1.0) -> int:
    """Adds ``mod2`` ... ``mod5`` to ``stages``, doubling ``base_channels`` from one to the next;
    returns the channels out."""
    if len(blocks_per_stage) != 4:
        raise ValueError(f"blocks_per_stage must have four entries, got {tuple(blocks_per_stage)}")
    for index, (num_blocks, (stride, dilation)) in enumerate(zip(blocks_per_stage, schedule)):
        channels = [scaled_channels(c * 2**index, width_multiplier, divisor) for c in base_channels[:-1]]
        channels.append(scaled_channels(base_channels[-1] * 2**index, width_multiplier))
        blocks = OrderedDict()
        for block_index in range(num_blocks):
            blocks[f"block{block_index + 1}"] = block(channels_in, channels, stride if block_index == 0 else 1,
                                                      dilation, groups, norm_act)
            channels_in = channels[-1]
        stages[f"mod{index + 2}"] = nn.Sequential(blocks)
    return channels_in


class ResNet(Backbone):
    """Pre-activation ResNet / ResNeXt, the original's ``ResNeXt`` layout: ``mod1``
    (:func:`~inplace_abn.models.blocks.input_stem`), four stages ``mod2`` ... ``mod5`` of
    :class:`PreActivationBlock`, and ``bn_out``, a final ``norm_act``.

    Args:
        blocks_per_stage: number of blocks in each of the four stages.
        bottleneck: bottleneck blocks (1x1, 3x3, 1x1, expansion 4) instead of basic ones (3x3, 3x3).
        groups: cardinality of the bottleneck's 3x3 convolutions (ResNeXt), with ``width_per_group``
            channels each in ``mod2``: 32 x 4 is "32x4d"; 64 x 2, the original's default, is its
            published ResNeXt-101/152.
        input_3x3: three 3x3 convolutions in the stem instead of one 7x7 (the published models).
        norm_act: ``norm_act(num_features)`` makes the normalization + activation layers.
        num_classes: classifier outputs; 0 returns the feature map.
        output_stride: 32 (classification), or 16 / 8 by dilating the last stages (dense prediction).
        width_multiplier: scales every channel count (small models for tests and quick benchmarks);
            a grouped block's first two stay multiples of ``groups``.
    """

    def __init__(self, blocks_per_stage: Sequence[int], bottleneck: bool, groups: int = 1, width_per_group: int = 64,
                 norm_act: Optional[NormAct] = None, num_classes: int = 1000, output_stride: int = 32,
                 width_multiplier: float = 1.0, in_channels: int = 3, dropout: float = 0.0, input_3x3: bool = False):
        norm_act = DEFAULT_NORM_ACT if norm_act is None else norm_act
        stem_channels = scaled_channels(64, width_multiplier)
        stages = OrderedDict(mod1=input_stem(in_channels, stem_channels, norm_act, input_3x3))
        inner = groups * width_per_group
        base_channels = (inner, inner, 256) if bottleneck else (inner, inner)
        schedule = stride_schedule([1, 2, 2, 2], output_stride, initial_stride=4)
        channels_out = _stages(stages, PreActivationBlock, blocks_per_stage, base_channels, stem_channels, schedule,
                               norm_act, groups, groups, width_multiplier)
        stages["bn_out"] = norm_act(channels_out)
        super().__init__(stages, channels_out, output_stride, num_classes, dropout)


class ResNetV1(Backbone):
    """ResNet v1, the original's ``ResNet`` (of its "ResNet*v1" ImageNet models): ``mod1`` (7x7
    convolution of stride 2, ``norm_act``, 3x3 max-pool of stride 2), four stages ``mod2`` ...
    ``mod5`` of :class:`PostActivationBlock`, no final norm. The same network as torchvision's ResNet.

    Args:
        blocks_per_stage, bottleneck, num_classes, output_stride, width_multiplier: as :class:`ResNet`.
        norm_act: as :class:`ResNet`; it must take ``activation="identity"`` too (the norms before
            each residual sum). Only half of the norms have an activation of their own: InPlace-ABN
            saves less memory here than in the pre-activation networks.
    """

    def __init__(self, blocks_per_stage: Sequence[int], bottleneck: bool, norm_act: Optional[NormAct] = None,
                 num_classes: int = 1000, output_stride: int = 32, width_multiplier: float = 1.0,
                 in_channels: int = 3, dropout: float = 0.0):
        norm_act = DEFAULT_NORM_ACT if norm_act is None else norm_act
        stem_channels = scaled_channels(64, width_multiplier)
        stages = OrderedDict(mod1=nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(in_channels, stem_channels, 7, stride=2, padding=3, bias=False),
            bn1=norm_act(stem_channels),
            pool1=nn.MaxPool2d(3, stride=2, padding=1),
        )))
        base_channels = (64, 64, 256) if bottleneck else (64, 64)
        schedule = stride_schedule([1, 2, 2, 2], output_stride, initial_stride=4)
        channels_out = _stages(stages, PostActivationBlock, blocks_per_stage, base_channels, stem_channels, schedule,
                               norm_act, width_multiplier=width_multiplier)
        super().__init__(stages, channels_out, output_stride, num_classes, dropout)


def _resnet(blocks_per_stage, bottleneck, groups=1, width_per_group=64, **kwargs) -> ResNet:
    return ResNet(blocks_per_stage, bottleneck, groups, width_per_group, **kwargs)


def resnet18(**kwargs) -> ResNet:
    return _resnet([2, 2, 2, 2], bottleneck=False, **kwargs)


def resnet34(**kwargs) -> ResNet:
    return _resnet([3, 4, 6, 3], bottleneck=False, **kwargs)


def resnet50(**kwargs) -> ResNet:
    return _resnet([3, 4, 6, 3], bottleneck=True, **kwargs)


def resnet101(**kwargs) -> ResNet:
    return _resnet([3, 4, 23, 3], bottleneck=True, **kwargs)


def resnet152(**kwargs) -> ResNet:
    return _resnet([3, 8, 36, 3], bottleneck=True, **kwargs)


def resnext50_32x4d(**kwargs) -> ResNet:
    return _resnet([3, 4, 6, 3], bottleneck=True, groups=32, width_per_group=4, **kwargs)


def resnext101_32x4d(**kwargs) -> ResNet:
    return _resnet([3, 4, 23, 3], bottleneck=True, groups=32, width_per_group=4, **kwargs)


def resnext152_32x4d(**kwargs) -> ResNet:
    return _resnet([3, 8, 36, 3], bottleneck=True, groups=32, width_per_group=4, **kwargs)


def resnext50_64x2d(**kwargs) -> ResNet:
    """The original's ResNeXt-50 (its ``net_resnext50``)."""
    return _resnet([3, 4, 6, 3], bottleneck=True, groups=64, width_per_group=2, **kwargs)


def resnext101_64x2d(**kwargs) -> ResNet:
    """The original's ResNeXt-101 (its ``net_resnext101``); the published models add ``input_3x3=True``."""
    return _resnet([3, 4, 23, 3], bottleneck=True, groups=64, width_per_group=2, **kwargs)


def resnext152_64x2d(**kwargs) -> ResNet:
    """The original's ResNeXt-152 (its ``net_resnext152``); the published model adds ``input_3x3=True``."""
    return _resnet([3, 8, 36, 3], bottleneck=True, groups=64, width_per_group=2, **kwargs)


def resnet18_v1(**kwargs) -> ResNetV1:
    return ResNetV1([2, 2, 2, 2], bottleneck=False, **kwargs)


def resnet34_v1(**kwargs) -> ResNetV1:
    """The original's ResNet-34 (its ``net_resnet34``, the published "ResNet34v1")."""
    return ResNetV1([3, 4, 6, 3], bottleneck=False, **kwargs)


def resnet50_v1(**kwargs) -> ResNetV1:
    """The original's ResNet-50 (its ``net_resnet50``, the published "ResNet50v1")."""
    return ResNetV1([3, 4, 6, 3], bottleneck=True, **kwargs)


def resnet101_v1(**kwargs) -> ResNetV1:
    """The original's ResNet-101 (its ``net_resnet101``, the published "ResNet101v1")."""
    return ResNetV1([3, 4, 23, 3], bottleneck=True, **kwargs)


def resnet152_v1(**kwargs) -> ResNetV1:
    return ResNetV1([3, 8, 36, 3], bottleneck=True, **kwargs)
