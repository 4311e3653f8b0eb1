"""WiderResNet 16/20/38 ("Wider or Deeper", model A) and WiderResNet-38-A2, the variant the paper
uses for segmentation, built from pre-activation blocks."""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Optional, Sequence

from torch import nn

from .blocks import Backbone, NormAct, PreActivationBlock, conv3x3, scaled_channels, stride_schedule
from .norm_act import DEFAULT_NORM_ACT

__all__ = ["WiderResNet", "wider_resnet16", "wider_resnet20", "wider_resnet38", "wider_resnet38_a2"]

#: block channels of the six modules after the stem (two entries: basic block, three: bottleneck)
MODULE_CHANNELS = ((128, 128), (256, 256), (512, 512), (512, 1024), (512, 1024, 2048), (1024, 2048, 4096))


class WiderResNet(Backbone):
    """A 3x3 stem of 64 channels at full resolution, then six modules of :class:`PreActivationBlock`
    with :data:`MODULE_CHANNELS`, and a final ``norm_act``. The input is halved before each of the
    first five modules (output stride 32).

    Args:
        blocks_per_module: number of blocks in each of the six modules.
        strided_blocks: the A2 variant: the first two halvings are max-pools and the next three are
            strided first blocks (instead of max-pools everywhere), and modules 6 and 7 use spatial
            dropout (0.3, 0.5).
        norm_act, num_classes, output_stride, width_multiplier: as :class:`~inplace_abn.models.ResNet`.
    """

    def __init__(self, blocks_per_module: Sequence[int], strided_blocks: bool = False,
                 norm_act: Optional[NormAct] = None, num_classes: int = 1000, output_stride: int = 32,
                 width_multiplier: float = 1.0, in_channels: int = 3, dropout: float = 0.0):
        norm_act = DEFAULT_NORM_ACT if norm_act is None else norm_act
        stem_channels = scaled_channels(64, width_multiplier)
        layers = OrderedDict(stem_conv=conv3x3(in_channels, stem_channels))
        schedule = stride_schedule([2, 2, 2, 2, 2, 1], output_stride, initial_stride=1)
        channels_in = stem_channels
        for index, (num_blocks, (stride, dilation)) in enumerate(zip(blocks_per_module, schedule)):
            name = f"mod{index + 2}"
            pooled = stride > 1 and (not strided_blocks or index < 2)
            if pooled:
                layers[f"pool{index + 2}"] = nn.MaxPool2d(3, stride=2, padding=1)
            block_stride = 1 if pooled else stride
            channels = tuple(scaled_channels(c, width_multiplier) for c in MODULE_CHANNELS[index])
            dropout_layer = None
            if strided_blocks and index >= 4:
                dropout_layer = functools.partial(nn.Dropout2d, 0.3 if index == 4 else 0.5)
            blocks = []
            for block_index in range(num_blocks):
                blocks.append(PreActivationBlock(channels_in, channels, block_stride if block_index == 0 else 1,
                                                 dilation, norm_act=norm_act, dropout=dropout_layer))
                channels_in = channels[-1]
            layers[name] = nn.Sequential(*blocks)
        layers["final_norm_act"] = norm_act(channels_in)
        super().__init__(nn.Sequential(layers), channels_in, output_stride, num_classes, dropout)


def _wider_resnet(blocks_per_module, strided_blocks=False, **kwargs) -> WiderResNet:
    return WiderResNet(blocks_per_module, strided_blocks, **kwargs)


def wider_resnet16(**kwargs) -> WiderResNet:
    return _wider_resnet([1, 1, 1, 1, 1, 1], **kwargs)


def wider_resnet20(**kwargs) -> WiderResNet:
    return _wider_resnet([1, 1, 1, 3, 1, 1], **kwargs)


def wider_resnet38(**kwargs) -> WiderResNet:
    return _wider_resnet([3, 3, 6, 3, 1, 1], **kwargs)


def wider_resnet38_a2(**kwargs) -> WiderResNet:
    return _wider_resnet([3, 3, 6, 3, 1, 1], strided_blocks=True, **kwargs)
