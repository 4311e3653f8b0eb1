"""In-Place Activated BatchNorm: BatchNorm + activation in one layer that keeps one full-size tensor for
backward: its output, written over its input (InPlaceABN), or its input, the output being rebuilt
where it is needed (RecomputeABN, under enable_recompute).

    >>> import torch
    >>> from inplace_abn import InPlaceABN
    >>> layer = InPlaceABN(16)                       # leaky_relu(0.01) by default
    >>> y = layer(torch.randn(4, 16, 8, 8))
"""

from . import functions
from .conversion import ConversionReport, convert_to_abn, convert_to_batchnorm, fuse_conv_abn
from .distributed import active_group, set_active_group
from .functions import abn, channel_gate, inplace_abn, inplace_abn_sync, recompute_abn
from .modules import ABN, InPlaceABN, InPlaceABNSync, RecomputeABN
from .recompute import disable_recompute, enable_recompute, recompute_scope

#: Convert a model's ABN / InPlaceABN layers to InPlaceABNSync (see docs/distributed.md).
convert_sync_abn = InPlaceABNSync.convert_sync_abn

__version__ = "0.1.0"

__all__ = [
    "ABN",
    "ConversionReport",
    "InPlaceABN",
    "InPlaceABNSync",
    "RecomputeABN",
    "abn",
    "active_group",
    "channel_gate",
    "convert_sync_abn",
    "convert_to_abn",
    "convert_to_batchnorm",
    "disable_recompute",
    "enable_recompute",
    "functions",
    "fuse_conv_abn",
    "inplace_abn",
    "inplace_abn_sync",
    "recompute_abn",
    "recompute_scope",
    "set_active_group",
]
