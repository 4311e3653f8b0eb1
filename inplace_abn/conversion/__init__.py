"""Moving models onto InPlace-ABN and off it again. :func:`convert_to_abn` replaces each BatchNorm, with
the activation, residual add and SE gate around it, by one layer computing exactly the same function
and keeping less for backward; :func:`convert_to_batchnorm` and :func:`fuse_conv_abn` go back to standard
modules for deployment. What it recognises is the table :data:`PATTERNS` (docs/migrating.md).

    >>> import torch, torchvision
    >>> from inplace_abn import convert_to_abn
    >>> model, report = convert_to_abn(torchvision.models.resnet18(), sample_input=torch.randn(2, 3, 64, 64))
    >>> print(report)   # for every BatchNorm: what it became (or why not), and the memory before and after
"""

from .convert import convert_to_abn
from .deploy import convert_to_batchnorm, fuse_conv_abn
from .patterns import ALL_PATTERNS, GATE, PATTERNS, Pattern, markdown_table
from .report import MODES, ConversionReport, LayerConversion, StepMemory, modes_table, saved_activation_bytes, step_memory

__all__ = [
    "ALL_PATTERNS",
    "ConversionReport",
    "GATE",
    "LayerConversion",
    "MODES",
    "PATTERNS",
    "Pattern",
    "StepMemory",
    "convert_to_abn",
    "convert_to_batchnorm",
    "fuse_conv_abn",
    "markdown_table",
    "modes_table",
    "saved_activation_bytes",
    "step_memory",
]
