"""DenseNet 121/169/201/264 (growth rate 32, bottleneck and compression), laid out as the original's
(``mod1``, ``mod2``, ``tra2``, ... ``bn_out``) so that every ``norm_act`` reads a fresh concatenation."""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
from torch import nn

from .blocks import Backbone, NormAct, conv1x1, conv3x3, input_stem, scaled_channels, stride_schedule
from .norm_act import DEFAULT_NORM_ACT

__all__ = ["DenseModule", "DenseNet", "densenet121", "densenet169", "densenet201", "densenet264"]


class DenseModule(nn.Module):
    """Dense layers (the original's ``DenseModule``): layer ``i`` is ``convs1[i]`` (``bn``: norm_act,
    ``conv``: 1x1 to ``4 * growth_rate``) then ``convs3[i]`` (``bn``, ``conv``: 3x3 to
    ``growth_rate``), on the concatenation of the input and every earlier layer's output; returns the
    concatenation of all of them.

    In place: each concatenation is a new tensor that only its layer reads, so the first norm may
    overwrite it; the features it was made of stay untouched in the list.
    """

    def __init__(self, in_channels: int, growth_rate: int, num_layers: int, dilation: int = 1,
                 norm_act: NormAct = DEFAULT_NORM_ACT, bottleneck_factor: int = 4):
        super().__init__()
        bottleneck_channels = bottleneck_factor * growth_rate
        self.convs1, self.convs3 = nn.ModuleList(), nn.ModuleList()
        for index in range(num_layers):
            channels = in_channels + index * growth_rate
            self.convs1.append(nn.Sequential(OrderedDict(
                bn=norm_act(channels), conv=conv1x1(channels, bottleneck_channels))))
            self.convs3.append(nn.Sequential(OrderedDict(
                bn=norm_act(bottleneck_channels), conv=conv3x3(bottleneck_channels, growth_rate, dilation=dilation))))
        self.out_channels = in_channels + num_layers * growth_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for convs1, convs3 in zip(self.convs1, self.convs3):
            features.append(convs3(convs1(torch.cat(features, 1))))  # cat always allocates, even for one tensor
        return torch.cat(features, 1)


def transition(in_channels: int, out_channels: int, stride: int, norm_act: NormAct) -> nn.Sequential:
    """``bn`` (norm_act), ``conv`` (1x1, compression), then ``pool`` (2x2 average) unless dilated instead."""
    layers = OrderedDict(bn=norm_act(in_channels), conv=conv1x1(in_channels, out_channels))
    if stride > 1:
        layers["pool"] = nn.AvgPool2d(stride, stride)
    return nn.Sequential(layers)


class DenseNet(Backbone):
    """DenseNet-BC (the original's ``DenseNet``): ``mod1`` (:func:`~inplace_abn.models.blocks.input_stem`
    of ``2 * growth_rate`` channels), dense modules ``mod2`` ... ``mod5`` separated by transitions
    ``tra2`` ... ``tra4`` that halve the channels, and ``bn_out``, a final ``norm_act``.

    Args:
        layers_per_block: dense layers in each of the four modules.
        growth_rate: channels each dense layer adds; its bottleneck has ``4 * growth_rate``.
        input_3x3: three 3x3 convolutions in the stem instead of one 7x7 (the published DenseNet-264).
        norm_act, num_classes, output_stride, width_multiplier: as :class:`~inplace_abn.models.ResNet`
            (the multiplier scales the growth rate, and so the stem).
    """

    def __init__(self, layers_per_block: Sequence[int], growth_rate: int = 32, input_3x3: bool = False,
                 norm_act: Optional[NormAct] = None, num_classes: int = 1000, output_stride: int = 32,
                 width_multiplier: float = 1.0, in_channels: int = 3, dropout: float = 0.0):
        if len(layers_per_block) != 4:
            raise ValueError(f"layers_per_block must have four entries, got {tuple(layers_per_block)}")
        norm_act = DEFAULT_NORM_ACT if norm_act is None else norm_act
        growth_rate = scaled_channels(growth_rate, width_multiplier)
        channels = 2 * growth_rate
        stages = OrderedDict(mod1=input_stem(in_channels, channels, norm_act, input_3x3))
        # The transition before module i+2 carries that module's stride.
        schedule = stride_schedule([1, 2, 2, 2], output_stride, initial_stride=4)
        for index, num_layers in enumerate(layers_per_block):
            stride, dilation = schedule[index]
            if index > 0:
                stages[f"tra{index + 1}"] = transition(channels, channels // 2, stride, norm_act)
                channels //= 2
            module = DenseModule(channels, growth_rate, num_layers, dilation, norm_act)
            stages[f"mod{index + 2}"] = module
            channels = module.out_channels
        stages["bn_out"] = norm_act(channels)
        super().__init__(stages, channels, output_stride, num_classes, dropout)


def densenet121(**kwargs) -> DenseNet:
    return DenseNet([6, 12, 24, 16], **kwargs)


def densenet169(**kwargs) -> DenseNet:
    return DenseNet([6, 12, 32, 32], **kwargs)


def densenet201(**kwargs) -> DenseNet:
    return DenseNet([6, 12, 48, 32], **kwargs)


def densenet264(**kwargs) -> DenseNet:
    """The original's DenseNet-264; the published model adds ``input_3x3=True``."""
    return DenseNet([6, 12, 64, 48], **kwargs)
