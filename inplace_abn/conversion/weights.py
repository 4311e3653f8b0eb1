"""BatchNorm weights into the layers and back, exactly: a layer writing in place scales by ``|w| + eps``,
so a negative weight's sign moves into the conv or linear layer that feeds the norm (docs/migrating.md);
every other layer takes BatchNorm's weight as it is; eval-mode normalizations fold into the layer before them."""

from __future__ import annotations

import collections
from typing import Optional

import torch
from torch import fx, nn

from ..backends.eager import effective_scale
from ..modules import ABN, InPlaceABN, InPlaceABNSync, RecomputeABN
from .report import IN_PLACE, RECOMPUTE

_BatchNorm = nn.modules.batchnorm._BatchNorm
# Layers whose output channels can absorb a per-channel factor (a sign flip, or a folded normalization):
# torch's own forwards only, as a subclass may transform its weight first (timm's StdConv2d standardizes it).
_CHANNEL_FORWARDS = {cls.forward for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                                             nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)}


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


@torch.no_grad()
def scale_output_channels(layer: nn.Module, factor: torch.Tensor, shift: Optional[torch.Tensor] = None) -> None:
    """Make output channel ``c`` of a conv / linear layer compute ``factor[c] * out_c + shift[c]``."""
    weight = layer.weight
    factor = factor.to(torch.float64)
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):  # weight: (in, out / groups, *kernel)
        groups, per_group = layer.groups, weight.shape[1]
        grouped = weight.double().reshape(groups, weight.shape[0] // groups, per_group, *weight.shape[2:])
        scaled = grouped * factor.reshape(groups, 1, per_group, *([1] * (weight.dim() - 2)))
    else:  # weight: (out, ...)
        scaled = weight.double() * factor.reshape(-1, *([1] * (weight.dim() - 1)))
    weight.copy_(scaled.reshape(weight.shape))
    if layer.bias is not None:
        layer.bias.copy_(layer.bias.double() * factor + (0 if shift is None else shift))
    elif shift is not None:
        layer.bias = nn.Parameter(shift.to(weight.dtype), requires_grad=weight.requires_grad)


def feeding_layer(norm_node: fx.Node, modules: dict[str, nn.Module], calls: collections.Counter,
                  parameter_uses: collections.Counter) -> Optional[nn.Module]:
    """The conv / linear layer that feeds only this norm, and whose output channels are its channels (so a
    channel's sign can move into it), or None."""
    source = norm_node.args[0]
    if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
        return None
    layer = modules[source.target]
    if (
        type(layer).forward not in _CHANNEL_FORWARDS
        or calls[source.target] != 1
        or _out_channels(layer) != modules[norm_node.target].num_features
        or any(parameter_uses[id(p)] > 1 for p in layer.parameters(recurse=False))
    ):
        return None
    return layer


def negative_channels(bn: _BatchNorm) -> int:
    return int((bn.weight < 0).sum()) if bn.affine else 0


def small_channels(bn: _BatchNorm) -> int:
    """Channels with ``|w| < eps``: the scale ``|w'| + eps`` cannot go below eps, so they change."""
    return int((bn.weight.abs() < bn.eps).sum()) if bn.affine else 0


def new_layer(bn: _BatchNorm, activation: str, param: float, mode: str, sync: bool, group=None) -> ABN:
    """The layer replacing ``bn``, on its device and in its dtype (state not loaded yet). Only a layer that
    writes in place divides by its scale: every other one scales by BatchNorm's own weight."""
    reference = next((t for t in (bn.weight, bn.running_mean) if t is not None), None)
    factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    args = (bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, activation, param)
    in_place = mode == IN_PLACE
    if sync:
        return InPlaceABNSync(*args, group, in_place=in_place, batchnorm_weight=not in_place, **factory)
    if in_place:
        return InPlaceABN(*args, **factory)
    if mode == RECOMPUTE:
        return RecomputeABN(*args, batchnorm_weight=True, **factory)
    return ABN(*args, batchnorm_weight=True, **factory)


@torch.no_grad()
def load_batchnorm(layer: ABN, bn: _BatchNorm, feeding: Optional[nn.Module]) -> int:
    """Give ``layer`` the BatchNorm's state: as it is where the layer has ``batchnorm_weight``; else so that
    ``|w'| + eps == |w|`` (``w' = 0`` where ``|w| < eps``), negative weights made positive by negating the
    channel in ``feeding`` (which must be given when there are any). Returns the number of channels negated."""
    layer.train(bn.training)
    negative = None
    if bn.affine:
        if layer.batchnorm_weight:
            layer.weight.copy_(bn.weight)
        else:
            weight = bn.weight.double()
            negative = weight < 0
            if negative.any():
                # BN(-x) with weight -w is BN(x) with weight w: batch mean and running mean flip sign, the
                # variance does not, and the bias is untouched.
                scale_output_channels(feeding, torch.where(negative, -1.0, 1.0).to(weight))
            layer.weight.copy_((weight.abs() - bn.eps).clamp_min(0))
        layer.bias.copy_(bn.bias)
        layer.weight.requires_grad_(bn.weight.requires_grad)
        layer.bias.requires_grad_(bn.bias.requires_grad)
    if bn.track_running_stats and bn.running_mean is not None:
        mean = bn.running_mean
        if negative is not None:
            mean = torch.where(negative.to(mean.device), -mean, mean)
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(bn.running_var)
        layer.num_batches_tracked.copy_(bn.num_batches_tracked)
    return 0 if negative is None else int(negative.sum())


@torch.no_grad()
def standard_batchnorm(layer: ABN, batch_norm: type) -> _BatchNorm:
    """A ``batch_norm`` module computing the normalization of ``layer`` (weight: the layer's scale, ``|w| + eps``
    or, with ``batchnorm_weight``, ``w``)."""
    reference = next((t for t in (layer.weight, layer.running_mean) if t is not None), None)
    factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    bn = batch_norm(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats, **factory)
    if layer.affine:
        bn.weight.copy_(effective_scale(layer.weight, layer.eps, layer.batchnorm_weight))
        bn.bias.copy_(layer.bias)
    if layer.track_running_stats:
        bn.running_mean.copy_(layer.running_mean)
        bn.running_var.copy_(layer.running_var)
        bn.num_batches_tracked.copy_(layer.num_batches_tracked)
    return bn.train(layer.training)


@torch.no_grad()
def fold(layer: nn.Module, abn: ABN) -> None:
    """Fold the eval-mode normalization of ``abn`` into the conv / linear ``layer`` before it."""
    invstd = (abn.running_var.double() + abn.eps).rsqrt()
    scale = invstd
    if abn.weight is not None:
        scale = effective_scale(abn.weight.double(), abn.eps, abn.batchnorm_weight) * invstd
    shift = -abn.running_mean.double() * scale
    if abn.bias is not None:
        shift = shift + abn.bias.double()
    scale_output_channels(layer, scale, shift)
