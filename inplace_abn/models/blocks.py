"""Pieces the networks share: the residual blocks (pre- and post-activation), the stems, the
classifier, the backbone base class and the stride-to-dilation schedule for dense prediction.

Module names are those of the original implementation (mapillary/inplace_abn, ``scripts/models``):
``mod1`` ... ``bn_out``, ``classifier.fc``, blocks with ``bn1``, ``convs.conv1``, ``proj_conv``; so
its state dicts load 1:1 (:mod:`inplace_abn.models.zoo`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .norm_act import DEFAULT_NORM_ACT, activate, overwrites_input, without_activation

NormAct = Callable[[int], nn.Module]


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation,
                     groups=groups, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def input_stem(in_channels: int, channels: int, norm_act: NormAct, input_3x3: bool) -> nn.Sequential:
    """The stride-4 stem of the pre-activation networks (ResNeXt, DenseNet): a 7x7 convolution
    (stride 2) and a 3x3 max-pool (stride 2), or with ``input_3x3`` three 3x3 convolutions (the
    first of stride 2) with ``norm_act`` between them, then the pool. No norm after the last
    convolution: the first block normalizes its input."""
    if input_3x3:
        layers = OrderedDict(
            conv1=conv3x3(in_channels, channels, stride=2),
            bn1=norm_act(channels),
            conv2=conv3x3(channels, channels),
            bn2=norm_act(channels),
            conv3=conv3x3(channels, channels),
        )
    else:
        layers = OrderedDict(conv1=nn.Conv2d(in_channels, channels, 7, stride=2, padding=3, bias=False))
    layers["pool"] = nn.MaxPool2d(3, stride=2, padding=1)
    return nn.Sequential(layers)


def scaled_channels(channels: int, width_multiplier: float, divisor: int = 1) -> int:
    """``channels * width_multiplier``, rounded to a multiple of ``divisor`` (at least ``divisor``)."""
    return max(divisor, int(round(channels * width_multiplier / divisor)) * divisor)


def stride_schedule(strides: Sequence[int], output_stride: Optional[int], initial_stride: int) -> list[tuple[int, int]]:
    """``(stride, dilation)`` per stage, for stages with nominal ``strides`` after a stem of stride
    ``initial_stride``: a stride that would take the network past ``output_stride`` becomes dilation,
    for every block of that stage (as in the original's dilated networks)."""
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


def _with_dropout(layers: list, dropout: Optional[Callable[[], nn.Module]]) -> "OrderedDict[str, nn.Module]":
    """The block's layers with dropout before the last convolution (where the original puts it)."""
    if dropout is not None:
        last_conv = max(index for index, (_, layer) in enumerate(layers) if isinstance(layer, nn.Conv2d))
        layers = layers[:last_conv] + [("dropout", dropout())] + layers[last_conv:]
    return OrderedDict(layers)


def _check_channels(channels: Sequence[int], groups: int) -> None:
    if len(channels) not in (2, 3):
        raise ValueError(f"channels must have 2 (basic block) or 3 (bottleneck) entries, got {tuple(channels)}")
    if len(channels) == 2 and groups != 1:
        raise ValueError(f"grouped convolutions (groups={groups}) need a bottleneck block (three channels)")


class PreActivationBlock(nn.Module):
    """Pre-activation ("identity mapping") residual block, the original's ``IdentityResidualBlock``:
    ``bn1`` (norm_act) on the input, then ``convs``: 3x3, norm_act, 3x3 (two ``channels``) or 1x1,
    norm_act, 3x3, norm_act, 1x1 (three), plus the shortcut: the input, or ``proj_conv`` (1x1) of the
    normalized input where the stride or the width changes. The stride is on the first convolution,
    the dilation on the 3x3 ones, ``groups`` on the bottleneck's 3x3 (ResNeXt).

    In place: every ``norm_act`` but ``bn1`` reads a convolution's output, which nothing else keeps.
    With a projection the shortcut is computed from the normalized input, so ``bn1`` may overwrite
    the input. With an identity shortcut the raw input is added at the end, so a ``norm_act`` that
    works in place gets a copy; the copy is the tensor it keeps for backward and the input itself is
    freed at the end of the block, so the saved memory is unchanged (the original does the same).
    """

    def __init__(self, in_channels: int, channels: Sequence[int], stride: int = 1, dilation: int = 1,
                 groups: int = 1, norm_act: NormAct = DEFAULT_NORM_ACT,
                 dropout: Optional[Callable[[], nn.Module]] = None):
        super().__init__()
        _check_channels(channels, groups)
        self.bn1 = norm_act(in_channels)
        if len(channels) == 2:
            layers = [
                ("conv1", conv3x3(in_channels, channels[0], stride, dilation)),
                ("bn2", norm_act(channels[0])),
                ("conv2", conv3x3(channels[0], channels[1], dilation=dilation)),
            ]
        else:
            layers = [
                ("conv1", conv1x1(in_channels, channels[0], stride)),
                ("bn2", norm_act(channels[0])),
                ("conv2", conv3x3(channels[0], channels[1], dilation=dilation, groups=groups)),
                ("bn3", norm_act(channels[1])),
                ("conv3", conv1x1(channels[1], channels[2])),
            ]
        self.convs = nn.Sequential(_with_dropout(layers, dropout))
        if stride != 1 or in_channels != channels[-1]:
            self.proj_conv = conv1x1(in_channels, channels[-1], stride)
        else:
            self.proj_conv = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj_conv is None:
            shortcut = x
            activated = self.bn1(x.clone() if overwrites_input(self.bn1) else x)
        else:
            activated = self.bn1(x)
            shortcut = self.proj_conv(activated)
        out = self.convs(activated)  # ends in a convolution: a fresh tensor, nothing keeps it
        return out.add_(shortcut)


class PostActivationBlock(nn.Module):
    """Post-activation residual block (ResNet v1), the original's ``ResidualBlock``: ``convs``: 3x3,
    norm_act, 3x3, norm (two ``channels``) or 1x1, norm_act, 3x3, norm_act, 1x1, norm (three); the
    shortcut is the input or ``proj_conv`` (1x1) + ``proj_bn``; the sum goes through the activation of
    ``convs.bn1``. The norms before the sum have the identity activation. The stride and ``groups``
    are on the 3x3 convolution that follows ``conv1`` in a bottleneck, on ``conv1`` in a basic block.

    In place: every norm reads a convolution's output; the sum is a fresh tensor, activated in place.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], stride: int = 1, dilation: int = 1,
                 groups: int = 1, norm_act: NormAct = DEFAULT_NORM_ACT,
                 dropout: Optional[Callable[[], nn.Module]] = None):
        super().__init__()
        _check_channels(channels, groups)
        if len(channels) == 2:
            layers = [
                ("conv1", conv3x3(in_channels, channels[0], stride, dilation)),
                ("bn1", norm_act(channels[0])),
                ("conv2", conv3x3(channels[0], channels[1], dilation=dilation)),
                ("bn2", without_activation(norm_act, channels[1])),
            ]
        else:
            layers = [
                ("conv1", conv1x1(in_channels, channels[0])),
                ("bn1", norm_act(channels[0])),
                ("conv2", conv3x3(channels[0], channels[1], stride, dilation, groups)),
                ("bn2", norm_act(channels[1])),
                ("conv3", conv1x1(channels[1], channels[2])),
                ("bn3", without_activation(norm_act, channels[2])),
            ]
        self.convs = nn.Sequential(_with_dropout(layers, dropout))
        bn1 = self.convs.bn1
        if not hasattr(bn1, "activation"):
            raise TypeError(f"post-activation blocks take the activation after the sum from the norm layer's "
                            f"'activation' and 'activation_param' attributes; {type(bn1).__name__} has none")
        self.activation, self.activation_param = bn1.activation, getattr(bn1, "activation_param", 0.0)
        if stride != 1 or in_channels != channels[-1]:
            self.proj_conv = conv1x1(in_channels, channels[-1], stride)
            self.proj_bn = without_activation(norm_act, channels[-1])
        else:
            self.proj_conv = self.proj_bn = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj_conv is None else self.proj_bn(self.proj_conv(x))
        out = self.convs(x) + shortcut
        return activate(out, self.activation, self.activation_param, inplace=True)


class GlobalAvgPool2d(nn.Module):
    """The mean over the spatial dimensions: ``(N, C, H, W) -> (N, C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def classifier(in_channels: int, num_classes: int, dropout: float = 0.0) -> nn.Sequential:
    """``avg_pool`` (global average), optional dropout, and the linear layer ``fc``."""
    layers = OrderedDict(avg_pool=GlobalAvgPool2d())
    if dropout > 0:
        layers["dropout"] = nn.Dropout(dropout)
    layers["fc"] = nn.Linear(in_channels, num_classes)
    return nn.Sequential(layers)


class Backbone(nn.Sequential):
    """A network as a sequence of named stages (the original's names: ``mod1``, ``pool2``, ...,
    ``bn_out``) and, when ``num_classes > 0``, a last stage ``classifier``; with ``num_classes=0``
    it returns its feature map (for dense prediction), ``out_channels`` channels at
    ``1/output_stride`` of the input size."""

    def __init__(self, stages: "OrderedDict[str, nn.Module]", out_channels: int, output_stride: int,
                 num_classes: int, dropout: float = 0.0):
        stages = OrderedDict(stages)
        if num_classes > 0:
            stages["classifier"] = classifier(out_channels, num_classes, dropout)
        super().__init__(stages)
        self.out_channels = out_channels
        self.output_stride = output_stride
        self.num_classes = num_classes
        initialize_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map (everything but the classifier)."""
        for name, stage in self.named_children():
            if name != "classifier":
                x = stage(x)
        return x


def initialize_weights(module: nn.Module) -> None:
    """He initialization for convolutions (the normalization layers initialize themselves)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="leaky_relu", a=0.01)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
