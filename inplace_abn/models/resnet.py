"""ResNet 18/34/50/101/152 and ResNeXt 50/101/152 (32x4d), in the pre-activation form that runs
InPlace-ABN in place, with a builder per depth on one constructor."""

from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from .blocks import Backbone, NormAct, PreActivationBlock, imagenet_stem, scaled_channels, stride_schedule
from .norm_act import DEFAULT_NORM_ACT

__all__ = [
    "ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x4d", "resnext152_32x4d",
]


class ResNet(Backbone):
    """Pre-activation ResNet / ResNeXt: a 7x7 stem (convolution, ``norm_act``, max-pool), four stages
    of :class:`PreActivationBlock`, and a final ``norm_act``.

    Args:
        blocks_per_stage: number of blocks in each of the four stages.
        bottleneck: bottleneck blocks (1x1, 3x3, 1x1, expansion 4) instead of basic ones (3x3, 3x3).
        groups: cardinality of the 3x3 convolutions (ResNeXt), with ``width_per_group`` channels each
            in the first stage.
        norm_act: ``norm_act(num_features)`` makes the normalization + activation layers.
        num_classes: classifier outputs; 0 returns the feature map.
        output_stride: 32 (classification), or 16 / 8 by dilating the last stages (dense prediction).
        width_multiplier: scales every channel count (small models for tests and quick benchmarks).
    """

    def __init__(self, blocks_per_stage: Sequence[int], bottleneck: bool, groups: int = 1, width_per_group: int = 64,
                 norm_act: Optional[NormAct] = None, num_classes: int = 1000, output_stride: int = 32,
                 width_multiplier: float = 1.0, in_channels: int = 3, dropout: float = 0.0):
        norm_act = DEFAULT_NORM_ACT if norm_act is None else norm_act
        stem_channels = scaled_channels(64, width_multiplier)
        layers = imagenet_stem(in_channels, stem_channels, norm_act)
        schedule = stride_schedule([1, 2, 2, 2], output_stride, initial_stride=4)
        channels_in = stem_channels
        for index, (num_blocks, (stride, dilation)) in enumerate(zip(blocks_per_stage, schedule)):
            inner = scaled_channels(groups * width_per_group * 2**index, width_multiplier, groups)
            if bottleneck:
                channels = (inner, inner, scaled_channels(256 * 2**index, width_multiplier))
            else:
                channels = (inner, inner)
            blocks = []
            for block_index in range(num_blocks):
                blocks.append(PreActivationBlock(channels_in, channels, stride if block_index == 0 else 1, dilation,
                                                 groups, norm_act))
                channels_in = channels[-1]
            layers[f"stage{index + 1}"] = nn.Sequential(*blocks)
        layers["final_norm_act"] = norm_act(channels_in)
        super().__init__(nn.Sequential(layers), channels_in, output_stride, num_classes, dropout)


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
