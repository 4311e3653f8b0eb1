"""Functional API: ``abn``, ``inplace_abn`` and ``inplace_abn_sync``, with the positional order of
inplace-abn 1.1.0, and the autograd Function that keeps one activation per layer.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import backends, distributed
from .backends import eager
from .activations import Activation, make_activation, warn_not_invertible

IDENTITY = Activation("identity")

Tensor = torch.Tensor

__all__ = ["abn", "inplace_abn", "inplace_abn_sync"]


class _EffectiveScale(torch.autograd.Function):
    """``|w| + eps`` whose gradient carries ``sign(w)`` with ``sign(0) = +1`` (``abs`` would give 0)."""

    @staticmethod
    def forward(ctx, weight, eps):
        ctx.save_for_backward(weight)
        return weight.abs() + eps

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return eager.times_sign(grad, weight), None


class InPlaceABNFunction(torch.autograd.Function):
    """BatchNorm + invertible activation written over the input; saves only the output.

    Returns ``z`` (the input, overwritten) alone: autograd allows a Function that modifies a view in
    place only one output, so the running statistics are updated here, not by the caller. With
    ``group`` set, statistics and the backward sums are all-reduced over the process group
    (:mod:`inplace_abn.distributed`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, activation, group):
        backend = backends.select(x)
        count = None
        if not training:
            var = running_var
            backend.normalize_activate_(x, running_mean, running_var, weight, bias, eps, activation)
        elif group is None:  # the running statistics are updated inside, in the same fused pass
            _, var = backend.forward_train_(x, weight, bias, eps, activation, running_mean, running_var, momentum)
        else:  # count: the global count, a 0-dim tensor (reading it back would stall CUDA streams)
            mean, var = backend.batch_stats(x)
            mean, var, count = distributed.global_batch_stats(mean, var, x.numel() // x.shape[1], group)
            if running_mean is not None and running_var is not None:
                eager.update_running_stats_(running_mean, running_var, mean, var, count, momentum)
            backend.normalize_activate_(x, mean, var, weight, bias, eps, activation)
        ctx.mark_dirty(x)
        ctx.training, ctx.eps, ctx.activation, ctx.group, ctx.count = training, eps, activation, group, count
        ctx.save_for_backward(x, var, weight, bias)
        return x

    @staticmethod
    def backward(ctx, grad_z):
        if torch.is_grad_enabled():  # backward(create_graph=True): results not differentiable again
            return _backward_once_differentiable(ctx, grad_z)
        return _backward(ctx, grad_z)  # the usual case: skips once_differentiable's wrapping (~12 µs)


def _backward(ctx, grad_z):
    """The backward of :class:`InPlaceABNFunction`: rebuilds what it needs from ``z`` alone."""
    z, var, weight, bias = ctx.saved_tensors
    backend = backends.select(z)
    if grad_z.stride() != z.stride():  # e.g. an expanded gradient from .sum(): match z's layout
        grad_z = torch.empty_like(z).copy_(grad_z)
    if ctx.group is None or not ctx.training:
        dx, grad_weight, grad_bias = backend.backward(
            z, grad_z, var, weight, bias, ctx.eps, ctx.activation, ctx.training
        )
    else:
        sum_dy, sum_dy_xhat = backend.backward_reduce(z, grad_z, weight, bias, ctx.eps, ctx.activation)
        # Parameter gradients are the local contributions, as nn.SyncBatchNorm: DDP averages them.
        grad_weight, grad_bias = eager.param_grads(sum_dy, sum_dy_xhat, weight, bias)
        sum_dy, sum_dy_xhat = distributed.all_reduce_sums(sum_dy, sum_dy_xhat, ctx.group)
        # Divided here by the global count (a tensor), so the backend sees count 1, a plain int.
        dx = backend.backward_apply(
            z, grad_z, var, weight, bias, sum_dy / ctx.count, sum_dy_xhat / ctx.count, 1, ctx.eps, ctx.activation
        )
    if weight is None or not ctx.needs_input_grad[1]:
        grad_weight = None
    if bias is None or not ctx.needs_input_grad[2]:
        grad_bias = None
    return dx, grad_weight, grad_bias, None, None, None, None, None, None, None


_backward_once_differentiable = torch.autograd.function.once_differentiable(_backward)


def _check(
    x: Tensor, weight, bias, running_mean, running_var, training: bool, eps: float, in_place: bool, synchronized: bool = False
) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a tensor input, got {type(x).__name__}")
    if not 2 <= x.dim() <= 5:
        raise ValueError(
            f"expected an input of rank 2 to 5 (N, C, *spatial), got shape {tuple(x.shape)} (rank {x.dim()})"
        )
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point input, got {x.dtype}")
    channels = x.shape[1]
    for name, tensor in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if tensor is not None and tensor.numel() != channels:
            raise ValueError(
                f"input has {channels} channels (dim 1 of shape {tuple(x.shape)}) but {name} has "
                f"{tensor.numel()} values: build the layer with num_features={channels}, or check the layer order."
            )
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (got {eps}): the scale |w| + eps must stay positive to be invertible.")
    # A synchronized shard may hold one value per channel (or none): the global batch counts, and
    # raising on one rank would leave the others waiting in the collective.
    if training and not synchronized and x.numel() // max(channels, 1) <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input of shape {tuple(x.shape)}: "
            "use a batch larger than 1, or eval mode."
        )
    if not training and (running_mean is None or running_var is None):
        raise ValueError("eval mode needs running_mean and running_var (or training=True to use batch statistics).")
    if in_place and x.requires_grad and x.is_leaf:
        raise RuntimeError(
            "InPlaceABN overwrites its input, but the input is a leaf tensor that requires grad (its original "
            "values are needed for its .grad). Pass x.clone(), or feed the layer the output of another op "
            "(conv, linear), or use ABN, which does not work in place."
        )


def _inplace_abn(x, weight, bias, running_mean, running_var, training, momentum, eps, activation, group):
    if not activation.invertible:
        # Exact but not in place: normalize a copy of x, then apply the activation out of place.
        if not torch.compiler.is_compiling():
            warn_not_invertible(activation)
        y = _inplace_abn(x.clone(), weight, bias, running_mean, running_var, training, momentum, eps, IDENTITY, group)
        return activation.forward(y)
    if torch.compiler.is_compiling():
        # torch.compile (2.13) returns a wrong input gradient when an in-place autograd.Function
        # overwrites a graph input (the layer first in a compiled region, e.g. after DDP splits the
        # graph). A copy makes the input an intermediate. Under compile, AOTAutograd functionalizes
        # the graph and picks what to save anyway; Inductor fuses the copy into the kernel.
        x = x.clone()
    args = (x, weight, bias, running_mean, running_var, training, momentum, eps, activation, group)
    if not torch.is_autocast_enabled(x.device.type):
        return InPlaceABNFunction.apply(*args)
    with torch.autocast(x.device.type, enabled=False):  # computes in float32 itself
        return InPlaceABNFunction.apply(*args)


def _abn(x, weight, bias, running_mean, running_var, training, momentum, eps, activation: Activation):
    scale = _EffectiveScale.apply(weight, eps) if weight is not None else None
    with torch.autocast(x.device.type, enabled=False):
        y = F.batch_norm(x, running_mean, running_var, scale, bias, training, momentum, eps)
    # Out of place, as BatchNorm + activation: ABN is the safe layer where the output is later
    # modified in place (an in-place activation would have autograd keep the output).
    return activation.forward(y)


def batch_norm_act(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
    activation: str,
    activation_param: float,
) -> Tensor:
    """The layers' math in standard ops only, out of place: ``F.batch_norm`` with scale ``|w| + eps``,
    then the activation. What TorchScript, ``torch.jit.trace``, ``torch.export`` and ONNX record (the
    in-place autograd Function is opaque to them); scriptable. Saves no memory, and under it
    ``weight.grad`` at ``w == 0`` is 0 (``abs``) where the layers give ``+1``.
    """
    scale: Optional[Tensor] = None
    if weight is not None:
        scale = weight.abs() + eps
    y = F.batch_norm(x, running_mean, running_var, scale, bias, training, momentum, eps)
    name = activation.lower()
    if name == "leaky_relu":
        return F.leaky_relu(y, activation_param)
    if name == "elu":
        return F.elu(y, activation_param)
    if name == "relu":
        return F.relu(y)
    return y  # identity (alias "none"); names were validated when the layer was built


def abn(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "leaky_relu",
    activation_param: float = 0.01,
) -> Tensor:
    """BatchNorm with scale ``|w| + eps`` followed by the activation, out of place (keeps ``x``).

    Same math as :func:`inplace_abn`, so the two are interchangeable with the same weights; supports
    ``relu`` too.
    """
    _check(x, weight, bias, running_mean, running_var, training, eps, in_place=False)
    return _abn(x, weight, bias, running_mean, running_var, training, momentum, eps, make_activation(activation, activation_param))


def inplace_abn(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "leaky_relu",
    activation_param: float = 0.01,
) -> Tensor:
    """In-place activated BatchNorm: writes ``act(|w|+eps) * xhat + b)`` over ``x`` and returns it.

    In training mode the batch statistics are used and the running statistics updated with
    ``momentum`` (unbiased variance); in eval mode the running statistics are used. Only the output
    is kept for backward. ``x`` must not be needed by anything else afterwards: see the README.
    """
    act = make_activation(activation, activation_param)
    _check(x, weight, bias, running_mean, running_var, training, eps, in_place=act.invertible)
    return _inplace_abn(x, weight, bias, running_mean, running_var, training, momentum, eps, act, None)


def inplace_abn_sync(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "leaky_relu",
    activation_param: float = 0.01,
    group=None,
) -> Tensor:
    """:func:`inplace_abn` with statistics synchronized over ``group`` (default: the whole world).

    Without an initialized process group, or with one process, it is :func:`inplace_abn`.
    """
    act = make_activation(activation, activation_param)
    group = distributed.group_to_sync(group) if training else None
    _check(x, weight, bias, running_mean, running_var, training, eps, in_place=act.invertible, synchronized=group is not None)
    return _inplace_abn(x, weight, bias, running_mean, running_var, training, momentum, eps, act, group)
