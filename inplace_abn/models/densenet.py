"""DenseNet 121/169/201/264 (growth rate 32, bottleneck and compression), laid out so that every
``norm_act`` reads a fresh concatenation and InPlace-ABN may overwrite it."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .blocks import Backbone, NormAct, conv1x1, conv3x3, imagenet_stem, scaled_channels, stride_schedule
from .norm_act import DEFAULT_NORM_ACT

__all__ = ["DenseNet", "densenet121", "densenet169", "densenet201", "densenet264"]


class DenseLayer(nn.Module):
    """``norm_act -> 1x1 conv -> norm_act -> 3x3 conv`` on the concatenation of all earlier features,
    returning ``growth_rate`` new channels.

    In place: the concatenation is a new tensor that only this layer reads, so the first
    ``norm_act`` may overwrite it; the features it was made of stay untouched in the block's list.
    """

    def __init__(self, in_channels: int, growth_rate: int, bottleneck_channels: int, dilation: int, norm_act: NormAct):
        super().__init__()
        self.layers = nn.Sequential(
            norm_act(in_channels),
            conv1x1(in_channels, bottleneck_channels),
            norm_act(bottleneck_channels),
            conv3x3(bottleneck_channels, growth_rate, dilation=dilation),
        )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.layers(torch.cat(list(features), 1))  # cat always allocates, even for one tensor


class DenseBlock(nn.ModuleList):
    """Dense layers, each reading all features before it; returns the concatenation of all of them."""

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bottleneck_channels: int,
                 dilation: int, norm_act: NormAct):
        super().__init__(
            DenseLayer(in_channels + index * growth_rate, growth_rate, bottleneck_channels, dilation, norm_act)
            for index in range(num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self:
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """``norm_act -> 1x1 conv`` (compression), then 2x2 average pooling unless dilated instead."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm_act: NormAct):
        layers = [norm_act(in_channels), conv1x1(in_channels, out_channels)]
        if stride > 1:
            layers.append(nn.AvgPool2d(stride, stride))
        super().__init__(*layers)


class DenseNet(Backbone):
    """DenseNet-BC: a 7x7 stem (convolution, ``norm_act``, max-pool), dense blocks separated by
    transitions that halve the channels, and a final ``norm_act``.

    Args:
        layers_per_block: dense layers in each of the four blocks.
        growth_rate: channels each dense layer adds; its bottleneck has ``4 * growth_rate``.
        norm_act, num_classes, output_stride, width_multiplier: as :class:`~inplace_abn.models.ResNet`
            (the multiplier scales the growth rate and the stem).
    """

    def __init__(self, layers_per_block: Sequence[int], growth_rate: int = 32, norm_act: Optional[NormAct] = None,
                 num_classes: int = 1000, output_stride: int = 32, width_multiplier: float = 1.0,
                 in_channels: int = 3, dropout: float = 0.0):
        norm_act = DEFAULT_NORM_ACT if norm_act is None else norm_act
        growth_rate = scaled_channels(growth_rate, width_multiplier)
        stem_channels = 2 * growth_rate
        layers = imagenet_stem(in_channels, stem_channels, norm_act)
        # The transition before block i+1 carries block i+1's stride.
        schedule = stride_schedule([1, 2, 2, 2], output_stride, initial_stride=4)
        channels = stem_channels
        for index, num_layers in enumerate(layers_per_block):
            stride, dilation = schedule[index]
            if index > 0:
                layers[f"transition{index}"] = Transition(channels, channels // 2, stride, norm_act)
                channels //= 2
            layers[f"block{index + 1}"] = DenseBlock(num_layers, channels, growth_rate, 4 * growth_rate, dilation,
                                                     norm_act)
            channels += num_layers * growth_rate
        layers["final_norm_act"] = norm_act(channels)
        super().__init__(nn.Sequential(layers), channels, output_stride, num_classes, dropout)


def _densenet(layers_per_block, **kwargs) -> DenseNet:
    return DenseNet(layers_per_block, **kwargs)


def densenet121(**kwargs) -> DenseNet:
    return _densenet([6, 12, 24, 16], **kwargs)


def densenet169(**kwargs) -> DenseNet:
    return _densenet([6, 12, 32, 32], **kwargs)


def densenet201(**kwargs) -> DenseNet:
    return _densenet([6, 12, 48, 32], **kwargs)


def densenet264(**kwargs) -> DenseNet:
    return _densenet([6, 12, 64, 48], **kwargs)
