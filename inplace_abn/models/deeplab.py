"""DeepLabV3 for semantic segmentation: a dilated backbone (``body``), the paper's head (``head``) or
the textbook ASPP, a 1x1 classifier (``cls``), and bilinear upsampling to the input size."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Backbone, NormAct, conv1x1, conv3x3, initialize_weights, scaled_channels
from .norm_act import DEFAULT_NORM_ACT

__all__ = ["ASPP", "DeepLabV3", "DeepLabV3Head", "HEADS", "deeplabv3"]

PoolingSize = Optional[Union[int, Tuple[int, int]]]


def default_rates(output_stride: int) -> Tuple[int, ...]:
    """The atrous rates of DeepLabV3: (6, 12, 18) at output stride 16, twice those at 8."""
    return tuple(rate * 16 // output_stride for rate in (6, 12, 18))


class DeepLabV3Head(nn.Module):
    """The paper's DeepLabV3 head (the original's ``DeeplabV3`` module, of its Vistas model).

    ``map_convs`` (a 1x1 and a 3x3 at each of ``rates``, ``hidden_channels`` each) are concatenated,
    normalized by one ``map_bn`` and reduced by ``red_conv`` (1x1) to ``out_channels``; the image
    pooling branch (``global_pooling_conv``, ``global_pooling_bn``, ``pool_red_conv``) is *added*;
    ``red_bn`` follows. In training, and in eval with ``pooling_size=None``, the pooling is the
    global average; in eval with ``pooling_size`` it is a sliding average over that window (in
    feature-map pixels, clipped to the map; 84x84 for the Vistas model), padded by replication to the
    map's size.

    In place: ``map_bn`` reads a fresh concatenation, the other norms read convolutions' outputs, and
    the pooling branch is added to ``red_conv``'s output, which nothing else keeps. The pooling
    branch normalizes a (N, C, 1, 1) tensor in training, so training needs a batch of more than one
    image (as ``nn.BatchNorm2d`` does).
    """

    def __init__(self, in_channels: int, out_channels: int = 256, hidden_channels: int = 256,
                 rates: Sequence[int] = (12, 24, 36), norm_act: NormAct = DEFAULT_NORM_ACT,
                 pooling_size: PoolingSize = None):
        super().__init__()
        self.pooling_size = None if pooling_size is None else tuple(_pair(pooling_size))
        self.map_convs = nn.ModuleList([conv1x1(in_channels, hidden_channels)])
        self.map_convs.extend(conv3x3(in_channels, hidden_channels, dilation=rate) for rate in rates)
        self.map_bn = norm_act(hidden_channels * len(self.map_convs))
        self.global_pooling_conv = conv1x1(in_channels, hidden_channels)
        self.global_pooling_bn = norm_act(hidden_channels)
        self.red_conv = conv1x1(hidden_channels * len(self.map_convs), out_channels)
        self.pool_red_conv = conv1x1(hidden_channels, out_channels)
        self.red_bn = norm_act(out_channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        maps = self.map_bn(torch.cat([conv(features) for conv in self.map_convs], 1))
        out = self.red_conv(maps)
        sliding = not self.training and self.pooling_size is not None
        pooled = self._sliding_average(features) if sliding else features.mean(dim=(2, 3), keepdim=True)
        pooled = self.pool_red_conv(self.global_pooling_bn(self.global_pooling_conv(pooled)))
        if sliding:
            # The branch is pointwise after the average, so padding its output equals padding its input.
            pooled = self._pad_to(pooled, features.shape[-2:])
        return self.red_bn(out.add_(pooled))  # a (N, C, 1, 1) branch broadcasts over the map

    def _window(self, size) -> Tuple[int, int]:
        return min(self.pooling_size[0], size[0]), min(self.pooling_size[1], size[1])

    def _sliding_average(self, features: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(features, self._window(features.shape[-2:]), stride=1)

    def _pad_to(self, pooled: torch.Tensor, size) -> torch.Tensor:
        window = self._window(size)
        # (window - 1) positions are missing; the extra one of an even window goes to the right / bottom.
        left, top = (window[1] - 1) // 2, (window[0] - 1) // 2
        padding = (left, window[1] - 1 - left, top, window[0] - 1 - top)
        return F.pad(pooled, padding, mode="replicate")

    def extra_repr(self) -> str:
        return f"pooling_size={self.pooling_size}"


class ASPP(nn.Module):
    """The textbook atrous spatial pyramid pooling: a 1x1 branch, 3x3 branches at ``rates``, and an
    image-level branch (global average, 1x1 conv, broadcast back), each ending in ``norm_act``;
    concatenated and projected by ``1x1 conv -> norm_act``.

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


#: ``head`` values of :class:`DeepLabV3`
HEADS = ("paper", "aspp")


class DeepLabV3(nn.Module):
    """Segmentation network: ``body`` (a :class:`~inplace_abn.models.blocks.Backbone` built with
    ``num_classes=0``) -> ``head`` -> ``cls`` (1x1 convolution with bias, ``num_classes`` logits) ->
    bilinear upsampling to the input size. The names are the original's (its Vistas snapshot holds
    ``body``, ``head`` and ``cls``).

    Args:
        head: ``"paper"`` (:class:`DeepLabV3Head`, the default) or ``"aspp"`` (:class:`ASPP`).
        rates: the atrous rates; default (6, 12, 18) at output stride 16 and twice those at 8.
        pooling_size: the paper's head in eval mode: sliding-average window (see :class:`DeepLabV3Head`).
    """

    def __init__(self, body: Backbone, num_classes: int, hidden_channels: int = 256,
                 norm_act: Optional[NormAct] = None, rates: Optional[Sequence[int]] = None,
                 head: str = "paper", pooling_size: PoolingSize = None):
        super().__init__()
        norm_act = DEFAULT_NORM_ACT if norm_act is None else norm_act
        rates = default_rates(body.output_stride) if rates is None else tuple(rates)
        self.body = body
        if head == "paper":
            self.head = DeepLabV3Head(body.out_channels, hidden_channels, hidden_channels, rates, norm_act,
                                      pooling_size)
        elif head == "aspp":
            if pooling_size is not None:
                raise ValueError("pooling_size is an option of the paper's head (head='paper'), not of ASPP")
            self.head = ASPP(body.out_channels, hidden_channels, rates, norm_act)
        else:
            raise ValueError(f"Unknown head {head!r}: use one of {', '.join(HEADS)}.")
        self.cls = nn.Conv2d(hidden_channels, num_classes, 1)
        initialize_weights(self.head)
        initialize_weights(self.cls)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.cls(self.head(self.body(images)))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def deeplabv3(backbone: Callable[..., Backbone], num_classes: int = 19, output_stride: int = 8,
              norm_act: Optional[NormAct] = None, hidden_channels: Optional[int] = None,
              width_multiplier: float = 1.0, head: str = "paper", pooling_size: PoolingSize = None,
              rates: Optional[Sequence[int]] = None, **backbone_kwargs) -> DeepLabV3:
    """DeepLabV3 on ``backbone`` (a builder such as ``wider_resnet38_a2``), with the same ``norm_act``
    throughout. ``width_multiplier`` scales the backbone and the head (256 hidden channels at 1);
    other ``backbone_kwargs`` go to the backbone builder."""
    body = backbone(norm_act=norm_act, num_classes=0, output_stride=output_stride,
                    width_multiplier=width_multiplier, **backbone_kwargs)
    if hidden_channels is None:
        hidden_channels = scaled_channels(256, width_multiplier)
    return DeepLabV3(body, num_classes, hidden_channels, norm_act, rates, head, pooling_size)


def _pair(value) -> Tuple[int, int]:
    if isinstance(value, int):
        return value, value
    height, width = value
    return int(height), int(width)
