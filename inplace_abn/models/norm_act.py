"""The ``norm_act`` callables the networks take: ``norm_act(num_features)`` returns a normalization +
activation layer. InPlace-ABN (the default), and the standard BatchNorm + activation pairs it replaces.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..activations import make_activation
from ..modules import ABN, InPlaceABN


def inplace_abn(activation: str = "leaky_relu", activation_param: float = 0.01):
    """``norm_act`` making :class:`~inplace_abn.InPlaceABN` layers (the networks' default)."""
    return functools.partial(InPlaceABN, activation=activation, activation_param=activation_param)


def abn(activation: str = "leaky_relu", activation_param: float = 0.01):
    """``norm_act`` making :class:`~inplace_abn.ABN` layers: InPlace-ABN's math, out of place."""
    return functools.partial(ABN, activation=activation, activation_param=activation_param)


_ACTIVATIONS = ("leaky_relu", "elu", "relu", "identity", "none")


def activate(y: torch.Tensor, activation: str, activation_param: float, inplace: bool = False) -> torch.Tensor:
    """``activation`` applied to ``y`` (over ``y`` itself with ``inplace``, where PyTorch has such a form)."""
    if activation == "leaky_relu":
        return F.leaky_relu(y, activation_param, inplace=inplace)
    if activation == "elu":
        return F.elu(y, activation_param, inplace=inplace)
    if activation == "relu":
        return F.relu(y, inplace=inplace)
    if activation in ("identity", "none"):
        return y
    return make_activation(activation, activation_param).forward(y)


class BatchNormAct2d(nn.BatchNorm2d):
    """Standard ``BatchNorm2d`` followed by an activation, as ``nn.Sequential(BatchNorm2d, LeakyReLU)``.

    Keeps BatchNorm's state-dict keys. With ``inplace_activation`` the activation writes over the
    BatchNorm output (which autograd allows: the output is a fresh tensor), saving one buffer of three.
    """

    overwrites_input = False

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, activation: str = "leaky_relu", activation_param: float = 0.01,
                 inplace_activation: bool = False, **factory):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **factory)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"Unknown activation {activation!r}: use one of {', '.join(_ACTIVATIONS)}.")
        self.activation = activation
        self.activation_param = activation_param
        self.inplace_activation = inplace_activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activate(super().forward(x), self.activation, self.activation_param, self.inplace_activation)

    def extra_repr(self) -> str:
        inplace = ", inplace_activation=True" if self.inplace_activation else ""
        return f"{super().extra_repr()}, activation={self.activation}[{self.activation_param}]{inplace}"


class CheckpointedBatchNormAct2d(BatchNormAct2d):
    """:class:`BatchNormAct2d` under ``torch.utils.checkpoint``: keeps only its input for backward and
    recomputes BatchNorm + activation there (the paper's "checkpointing" baseline).

    The recomputation normalizes with batch statistics but leaves the running statistics alone, so
    they are updated once per step, as without checkpointing.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        first_run = True

        def norm_act(inp: torch.Tensor) -> torch.Tensor:
            nonlocal first_run
            if first_run:
                first_run = False
                y = nn.BatchNorm2d.forward(self, inp)
            else:
                # Recomputation in backward: the same batch statistics, without a second running-stats
                # update (throw-away copies keep the saved tensors those of the first run).
                running_mean = None if self.running_mean is None else self.running_mean.clone()
                running_var = None if self.running_var is None else self.running_var.clone()
                y = F.batch_norm(inp, running_mean, running_var, self.weight, self.bias, True, 0.0, self.eps)
            return activate(y, self.activation, self.activation_param, inplace=True)

        return checkpoint(norm_act, x, use_reentrant=False)


def batchnorm_act(activation: str = "leaky_relu", activation_param: float = 0.01, inplace_activation: bool = False):
    """``norm_act`` making standard BatchNorm + activation layers (:class:`BatchNormAct2d`)."""
    return functools.partial(BatchNormAct2d, activation=activation, activation_param=activation_param,
                             inplace_activation=inplace_activation)


def checkpointed_batchnorm_act(activation: str = "leaky_relu", activation_param: float = 0.01):
    """``norm_act`` making :class:`CheckpointedBatchNormAct2d` layers."""
    return functools.partial(CheckpointedBatchNormAct2d, activation=activation, activation_param=activation_param)


DEFAULT_NORM_ACT = inplace_abn()


def overwrites_input(norm_act: nn.Module) -> bool:
    """Whether the layer may write its output over its input. A block whose input is still needed
    afterwards (an identity shortcut) hands such a layer a copy. Unknown layers are assumed to.

    A layer may declare it with a class attribute ``overwrites_input``.
    """
    declared = getattr(norm_act, "overwrites_input", None)
    if declared is not None:
        return bool(declared)
    if isinstance(norm_act, InPlaceABN):
        return True
    if isinstance(norm_act, (ABN, nn.modules.batchnorm._NormBase)):
        return False
    if isinstance(norm_act, nn.Sequential) and len(norm_act) > 0:
        return overwrites_input(norm_act[0])
    return True


def without_activation(norm_act, num_features: int) -> nn.Module:
    """A layer from ``norm_act`` with the identity activation: the norm before a residual addition,
    whose activation comes after the sum. ``norm_act`` must take an ``activation`` keyword, as every
    ``norm_act`` of this module does (functools.partial lets a call override a bound keyword)."""
    try:
        return norm_act(num_features, activation="identity")
    except TypeError as error:
        raise TypeError(
            f"post-activation blocks need a norm_act that accepts activation='identity' (the norm before "
            f"the residual addition has no activation of its own); {norm_act!r} does not: {error}"
        ) from error
