"""The paper's networks with a pluggable ``norm_act``, laid out as the original's (so its published
weights load: :func:`load_original`): ResNet, ResNeXt, WiderResNet, DenseNet and DeepLabV3.
Standard BatchNorm + activation, ABN, InPlaceABN and InPlaceABNSync are one argument apart:

    >>> from inplace_abn.models import resnet50, norm_act
    >>> model = resnet50()                                    # InPlace-ABN, leaky_relu(0.01)
    >>> baseline = resnet50(norm_act=norm_act.batchnorm_act())  # BatchNorm2d + LeakyReLU
"""

from __future__ import annotations

from torch import nn

from . import norm_act
from .blocks import Backbone, PostActivationBlock, PreActivationBlock
from .deeplab import ASPP, DeepLabV3, DeepLabV3Head, deeplabv3
from .densenet import DenseModule, DenseNet, densenet121, densenet169, densenet201, densenet264
from .norm_act import BatchNormAct2d, CheckpointedBatchNormAct2d, batchnorm_act, checkpointed_batchnorm_act
from .resnet import (
    ResNet, ResNetV1, resnet18, resnet18_v1, resnet34, resnet34_v1, resnet50, resnet50_v1, resnet101, resnet101_v1,
    resnet152, resnet152_v1, resnext50_32x4d, resnext50_64x2d, resnext101_32x4d, resnext101_64x2d, resnext152_32x4d,
    resnext152_64x2d,
)
from .wider_resnet import WiderResNet, wider_resnet16, wider_resnet20, wider_resnet38, wider_resnet38_a2
from .zoo import OriginalFileError, OriginalWeights, init_from_original, load_original, read_original

#: backbone name -> builder; each takes norm_act, num_classes, output_stride and width_multiplier
BACKBONES = {
    builder.__name__: builder
    for builder in (
        resnet18, resnet34, resnet50, resnet101, resnet152,
        resnet18_v1, resnet34_v1, resnet50_v1, resnet101_v1, resnet152_v1,
        resnext50_32x4d, resnext101_32x4d, resnext152_32x4d, resnext50_64x2d, resnext101_64x2d, resnext152_64x2d,
        wider_resnet16, wider_resnet20, wider_resnet38, wider_resnet38_a2,
        densenet121, densenet169, densenet201, densenet264,
    )
}

SEGMENTATION_PREFIX = "deeplabv3_"

def network_names() -> list[str]:
    """Every name :func:`build` accepts: the backbones (classification) and ``deeplabv3_<backbone>``."""
    return list(BACKBONES) + [SEGMENTATION_PREFIX + name for name in BACKBONES]

def build(name: str, **kwargs) -> nn.Module:
    """The network called ``name`` (see :func:`network_names`); ``kwargs`` go to its builder."""
    if name.startswith(SEGMENTATION_PREFIX) and name[len(SEGMENTATION_PREFIX):] in BACKBONES:
        return deeplabv3(BACKBONES[name[len(SEGMENTATION_PREFIX):]], **kwargs)
    if name not in BACKBONES:
        raise ValueError(f"Unknown network {name!r}: use one of {', '.join(network_names())}.")
    return BACKBONES[name](**kwargs)

__all__ = [
    "ASPP", "BACKBONES", "Backbone", "BatchNormAct2d", "CheckpointedBatchNormAct2d", "DeepLabV3", "DeepLabV3Head",
    "DenseModule", "DenseNet", "OriginalFileError", "OriginalWeights", "PostActivationBlock", "PreActivationBlock",
    "ResNet", "ResNetV1", "WiderResNet", "batchnorm_act", "build", "checkpointed_batchnorm_act", "deeplabv3",
    "densenet121", "densenet169", "densenet201", "densenet264", "init_from_original", "load_original",
    "network_names", "norm_act", "read_original", "resnet18", "resnet18_v1", "resnet34", "resnet34_v1",
    "resnet50", "resnet50_v1", "resnet101", "resnet101_v1", "resnet152", "resnet152_v1", "resnext50_32x4d",
    "resnext50_64x2d", "resnext101_32x4d", "resnext101_64x2d", "resnext152_32x4d", "resnext152_64x2d",
    "wider_resnet16", "wider_resnet20", "wider_resnet38", "wider_resnet38_a2",
]
