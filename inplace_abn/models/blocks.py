"""Pieces the networks share: the pre-activation residual block, the classification head, the
backbone base class, and the stride-to-dilation schedule for dense prediction.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .norm_act import DEFAULT_NORM_ACT, overwrites_input

NormAct = Callable[[int], nn.Module]


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation,
                     groups=groups, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def imagenet_stem(in_channels: int, channels: int, norm_act) -> "OrderedDict[str, nn.Module]":
    """The stride-4 stem of ResNet and DenseNet: 7x7 conv (stride 2), norm_act, 3x3 max-pool (stride 2).
    In place is safe: the pool only reads the norm's output."""
    return OrderedDict(
        stem_conv=nn.Conv2d(in_channels, channels, 7, stride=2, padding=3, bias=False),
        stem_norm_act=norm_act(channels),
        stem_pool=nn.MaxPool2d(3, stride=2, padding=1),
    )


def scaled_channels(channels: int, width_multiplier: float, divisor: int = 1) -> int:
    """``channels * width_multiplier``, rounded to a multiple of ``divisor`` (at least ``divisor``)."""
    return max(divisor, int(round(channels * width_multiplier / divisor)) * divisor)


def stride_schedule(strides: Sequence[int], output_stride: Optional[int], initial_stride: int) -> list[tuple[int, int]]:
    """``(stride, dilation)`` per stage, for stages with nominal ``strides`` after a stem of stride
    ``initial_stride``: a stride that would take the network past ``output_stride`` becomes dilation."""
    full_stride = initial_stride
    for stride in strides:
        full_stride *= stride
    output_stride = full_stride if output_stride is None else output_stride
    schedule, current, dilation = [], initial_stride, 1
    for stride in strides:
        if current * stride > output_stride:
            dilation *= stride
            schedule.append((1, dilation))
        else:
            current *= stride
            schedule.append((stride, dilation))
    if current != output_stride:
        reachable = [initial_stride]
        for stride in strides:
            if stride > 1:
                reachable.append(reachable[-1] * stride)
        raise ValueError(f"output_stride must be one of {reachable}, got {output_stride}.")
    return schedule


class PreActivationBlock(nn.Module):
    """Pre-activation residual block: ``norm_act -> conv -> norm_act -> conv [-> norm_act -> conv]``
    plus a shortcut. Two ``channels`` give the basic block (3x3, 3x3), three the bottleneck (1x1,
    3x3, 1x1); ``groups`` makes the 3x3 convolution grouped (ResNeXt).

    In place: every ``norm_act`` but the first reads a convolution's output, which nothing else
    keeps. The first reads the block input. With a projection shortcut the projection reads the
    normalized input, so the input may be overwritten. With an identity shortcut the raw input is
    added at the end, so a ``norm_act`` that works in place gets a copy; the copy is the tensor it
    keeps for backward, and the input itself is freed at the end of the block, so the saved memory
    is unchanged (the paper's identity block does the same).
    """

    def __init__(self, in_channels: int, channels: Sequence[int], stride: int = 1, dilation: int = 1,
                 groups: int = 1, norm_act: NormAct = DEFAULT_NORM_ACT,
                 dropout: Optional[Callable[[], nn.Module]] = None):
        super().__init__()
        if len(channels) not in (2, 3):
            raise ValueError(f"channels must have 2 (basic block) or 3 (bottleneck) entries, got {channels}")
        self.norm_act = norm_act(in_channels)
        if len(channels) == 2:
            layers = [conv3x3(in_channels, channels[0], stride, dilation, groups), norm_act(channels[0])]
            if dropout is not None:
                layers.append(dropout())
            layers.append(conv3x3(channels[0], channels[1], dilation=dilation))
        else:
            layers = [
                conv1x1(in_channels, channels[0]),
                norm_act(channels[0]),
                conv3x3(channels[0], channels[1], stride, dilation, groups),
                norm_act(channels[1]),
            ]
            if dropout is not None:
                layers.append(dropout())
            layers.append(conv1x1(channels[1], channels[2]))
        self.residual = nn.Sequential(*layers)
        out_channels = channels[-1]
        needs_projection = stride != 1 or in_channels != out_channels
        self.projection = conv1x1(in_channels, out_channels, stride) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.projection is None:
            shortcut = x
            activated = self.norm_act(x.clone() if overwrites_input(self.norm_act) else x)
        else:
            activated = self.norm_act(x)
            shortcut = self.projection(activated)
        out = self.residual(activated)  # ends in a convolution: a fresh tensor, nothing keeps it
        return out.add_(shortcut)


class ClassificationHead(nn.Module):
    """Global average pooling, optional dropout, and a linear classifier."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(features, 1), 1)
        return self.classifier(self.dropout(pooled))


class Backbone(nn.Module):
    """A feature extractor ``features`` (ending in a ``norm_act``), with a classification head when
    ``num_classes > 0``; with ``num_classes=0`` the network returns its feature map (for dense
    prediction), ``out_channels`` channels at ``1/output_stride`` of the input size."""

    def __init__(self, features: nn.Sequential, out_channels: int, output_stride: int, num_classes: int,
                 dropout: float = 0.0):
        super().__init__()
        self.features = features
        self.out_channels = out_channels
        self.output_stride = output_stride
        self.head = ClassificationHead(out_channels, num_classes, dropout) if num_classes > 0 else None
        initialize_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        return features if self.head is None else self.head(features)


def initialize_weights(module: nn.Module) -> None:
    """He initialization for convolutions (the normalization layers initialize themselves)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="leaky_relu", a=0.01)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
