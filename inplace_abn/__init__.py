"""In-Place Activated BatchNorm: BatchNorm + invertible activation in one layer that overwrites its
input and keeps only its output for backward.

    >>> import torch
    >>> from inplace_abn import InPlaceABN
    >>> layer = InPlaceABN(16)                       # leaky_relu(0.01) by default
    >>> y = layer(torch.randn(4, 16, 8, 8))
"""

from . import functions
from .conversion import ConversionReport, convert_to_abn, convert_to_batchnorm, fuse_conv_abn
from .distributed import active_group, set_active_group
from .functions import abn, inplace_abn, inplace_abn_sync
from .modules import ABN, InPlaceABN, InPlaceABNSync

#: Convert a model's ABN / InPlaceABN layers to InPlaceABNSync (see docs/distributed.md).
convert_sync_abn = InPlaceABNSync.convert_sync_abn

__version__ = "0.1.0"

__all__ = [
    "ABN",
    "ConversionReport",
    "InPlaceABN",
    "InPlaceABNSync",
    "abn",
    "active_group",
    "convert_sync_abn",
    "convert_to_abn",
    "convert_to_batchnorm",
    "functions",
    "fuse_conv_abn",
    "inplace_abn",
    "inplace_abn_sync",
    "set_active_group",
]
