"""The original inplace_abn model zoo (mapillary/inplace_abn): read its published ImageNet and Vistas
checkpoint files, safely (tensors and plain data only), into this package's networks."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

__all__ = ["OriginalFileError", "OriginalWeights", "init_from_original", "load_original", "read_original"]


class OriginalFileError(ValueError):
    """A file that is not one of the original's checkpoints, fits no known network, or would need
    code from the file to load."""


@dataclasses.dataclass
class OriginalWeights:
    """The weights of one original checkpoint, in this package's layout.

    Attributes:
        network: the name :func:`inplace_abn.models.build` takes (``"resnext101_64x2d"``,
            ``"deeplabv3_wider_resnet38_a2"``, ...).
        kwargs: the builder arguments that give the original's network (``num_classes``,
            ``input_3x3``, ``output_stride``, ``pooling_size``, ``width_multiplier``, ...).
        state_dict: parameter and buffer tensors, keyed as in ``build(network, **kwargs)``.
        norm: ``"inplace_abn"`` (scale ``|weight| + eps``, the original's InPlace-ABN layers) or
            ``"batchnorm"`` (scale ``weight``: the original's standard-BN ``ABN``).
        activation, activation_param: the activation of every norm layer (leaky_relu 0.01 in all
            published files).
        description: what the file is, where it is known (a published file recognised by its md5).
    """

    network: str
    kwargs: Dict[str, Any]
    state_dict: Dict[str, torch.Tensor]
    norm: str = "inplace_abn"
    activation: str = "leaky_relu"
    activation_param: float = 0.01
    description: str = ""

    def norm_act(self) -> Callable[[int], nn.Module]:
        """The ``norm_act`` that computes what the original's layers computed with these weights."""
        raise NotImplementedError

    def build(self, norm_act: Optional[Callable[[int], nn.Module]] = None, **overrides) -> nn.Module:
        """The network with these weights in it (``overrides`` replace builder arguments)."""
        raise NotImplementedError


def read_original(path: str, network: Optional[str] = None) -> OriginalWeights:
    """Read an original checkpoint (or one written by ``inplace-abn convert-original``) without
    running code from it; ``network`` (a :func:`~inplace_abn.models.build` name) is inferred from the
    keys and shapes when not given. Raises :class:`OriginalFileError` naming what did not match."""
    raise NotImplementedError


def load_original(path: str, network: Optional[str] = None, *, norm_act=None, **overrides) -> nn.Module:
    """The network of an original checkpoint, with its weights: outputs equal the original's (call
    ``.eval()`` for inference). ``norm_act`` replaces the layers' type (e.g. InPlaceABNSync for
    distributed fine-tuning); ``overrides`` replace builder arguments (e.g. ``pooling_size``)."""
    raise NotImplementedError


def init_from_original(model: nn.Module, path: str) -> List[str]:
    """Load an original checkpoint's weights into ``model``: the same network, or a DeepLabV3 whose
    body is the file's classifier network (the classifier is then skipped). Returns the keys of the
    file that were not loaded; raises :class:`OriginalFileError` where shapes or names do not fit."""
    raise NotImplementedError
