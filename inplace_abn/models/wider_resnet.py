"""WiderResNet 16/20/38 ("Wider or Deeper", model A) and WiderResNet-38-A2, the variant the paper
uses for segmentation: pre-activation blocks, laid out as the original's (``mod1`` ... ``bn_out``)."""

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
    """``mod1``: a 3x3 convolution of 64 channels at full resolution; ``mod2`` ... ``mod7``: blocks of
    :class:`PreActivationBlock` with :data:`MODULE_CHANNELS`; ``bn_out``: a final ``norm_act``. The
    input is halved before each of the first five modules (output stride 32) by the max-pools
    ``pool2`` ... ``pool6``.

    Args:
        blocks_per_module: number of blocks in each of the six modules.
        strided_blocks: the A2 variant: ``pool2`` and ``pool3`` only, the next three halvings are the
            first blocks of ``mod4`` ... ``mod6`` (stride 2), and ``mod6`` / ``mod7`` use spatial
            dropout (0.3, 0.5).
        output_stride: 32, or 16 / 8 by dilating the last modules instead of halving. The original's
            A2 ``dilation=True`` (its Vistas model) is ``output_stride=8``: ``mod5`` dilated by 2,
            ``mod6`` and ``mod7`` by 4.
        norm_act, num_classes, width_multiplier: as :class:`~inplace_abn.models.ResNet`.
    """

    def __init__(self, blocks_per_module: Sequence[int], strided_blocks: bool = False,
                 norm_act: Optional[NormAct] = None, num_classes: int = 1000, output_stride: int = 32,
                 width_multiplier: float = 1.0, in_channels: int = 3, dropout: float = 0.0):
        if len(blocks_per_module) != 6:
            raise ValueError(f"blocks_per_module must have six entries, got {tuple(blocks_per_module)}")
        norm_act = DEFAULT_NORM_ACT if norm_act is None else norm_act
        stem_channels = scaled_channels(64, width_multiplier)
        stages = OrderedDict(mod1=nn.Sequential(OrderedDict(conv1=conv3x3(in_channels, stem_channels))))
        schedule = stride_schedule([2, 2, 2, 2, 2, 1], output_stride, initial_stride=1)
        channels_in = stem_channels
        for index, (num_blocks, (stride, dilation)) in enumerate(zip(blocks_per_module, schedule)):
            pooled = stride > 1 and (not strided_blocks or index < 2)
            if pooled:
                stages[f"pool{index + 2}"] = nn.MaxPool2d(3, stride=2, padding=1)
            block_stride = 1 if pooled else stride
            channels = tuple(scaled_channels(c, width_multiplier) for c in MODULE_CHANNELS[index])
            dropout_layer = None
            if strided_blocks and index >= 4:
                dropout_layer = functools.partial(nn.Dropout2d, 0.3 if index == 4 else 0.5)
            blocks = OrderedDict()
            for block_index in range(num_blocks):
                blocks[f"block{block_index + 1}"] = PreActivationBlock(
                    channels_in, channels, block_stride if block_index == 0 else 1, dilation, norm_act=norm_act,
                    dropout=dropout_layer,
                )
                channels_in = channels[-1]
            stages[f"mod{index + 2}"] = nn.Sequential(blocks)
        stages["bn_out"] = norm_act(channels_in)
        super().__init__(stages, channels_in, output_stride, num_classes, dropout)


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
