"""Functional API: ``abn``, ``inplace_abn`` and ``inplace_abn_sync`` (the positional order of
inplace-abn 1.1.0), ``recompute_abn`` and ``channel_gate``; and the autograd Functions that keep one
full-size tensor per layer: the output (in place) or the input (recompute).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from . import activations, backends, distributed, recompute
from .backends import eager
from .activations import Activation, make_activation, warn_outside_recompute

Tensor = torch.Tensor

__all__ = ["abn", "channel_gate", "inplace_abn", "inplace_abn_sync", "recompute_abn"]


class _EffectiveScale(torch.autograd.Function):
    """``|w| + eps`` whose gradient carries ``sign(w)`` with ``sign(0) = +1`` (``abs`` would give 0)."""

    @staticmethod
    def forward(ctx, weight, eps):
        ctx.save_for_backward(weight)
        return eager.effective_scale(weight, eps)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return eager.times_sign(grad, weight), None


def _forward_stats(backend, x, weight, bias, running_mean, running_var, training, momentum, eps, activation,
                   group, shortcut, in_place: bool, batchnorm_weight: bool = False):
    """The forward of both Functions: ``(z, mean, var, count, bits)``. In place, ``z`` is ``x``; ``mean``
    and ``var`` are the statistics used (the running ones in eval mode), ``count`` the global element
    count when synchronized, ``bits`` the packed branch mask of a piecewise activation in place.
    ``batchnorm_weight`` (out of place only): the scale is ``weight`` itself."""
    count, bits = None, None
    if not training:
        mean, var = running_mean, running_var
        if in_place:
            z, bits = x, backend.normalize_activate_(x, mean, var, weight, bias, eps, activation, shortcut)
        else:
            z = backend.normalize_activate(x, mean, var, weight, bias, eps, activation, shortcut, batchnorm_weight)
    elif group is None:  # the running statistics are updated inside, in the same fused pass
        if in_place:
            z, (mean, var, *rest) = x, backend.forward_train_(x, weight, bias, eps, activation, running_mean,
                                                              running_var, momentum, shortcut)
            bits = rest[0] if rest else None
        else:
            z, mean, var = backend.forward_train(x, weight, bias, eps, activation, running_mean, running_var, momentum,
                                                 shortcut, batchnorm_weight)
    else:  # count: the global count, a 0-dim tensor (reading it back would stall CUDA streams)
        mean, var = backend.batch_stats(x)
        mean, var, count = distributed.global_batch_stats(mean, var, x.numel() // x.shape[1], group)
        if running_mean is not None and running_var is not None:
            eager.update_running_stats_(running_mean, running_var, mean, var, count, momentum)
        if in_place:
            z, bits = x, backend.normalize_activate_(x, mean, var, weight, bias, eps, activation, shortcut)
        else:
            z = backend.normalize_activate(x, mean, var, weight, bias, eps, activation, shortcut, batchnorm_weight)
    return z, mean, var, count, bits


def _set_context(ctx, training, eps, activation, group, count, shortcut) -> None:
    ctx.training, ctx.eps, ctx.activation, ctx.group, ctx.count = training, eps, activation, group, count
    ctx.has_shortcut = shortcut is not None


class InPlaceABNFunction(torch.autograd.Function):
    """BatchNorm (+ shortcut) + invertible or piecewise activation written over the input; saves only
    the output (and the shortcut, and a piecewise activation's branch bits).

    Returns ``z`` (the input, overwritten) alone: autograd allows a Function that modifies a view in
    place only one output, so the running statistics are updated here, not by the caller. With
    ``group`` set, statistics and the backward sums are all-reduced over the process group
    (:mod:`inplace_abn.distributed`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, activation, group,
                shortcut):
        backend = backends.select(x, activation, shortcut)
        _, _, var, count, bits = _forward_stats(backend, x, weight, bias, running_mean, running_var, training,
                                                momentum, eps, activation, group, shortcut, in_place=True)
        ctx.mark_dirty(x)
        _set_context(ctx, training, eps, activation, group, count, shortcut)
        ctx.save_for_backward(x, var, weight, bias, shortcut, bits)
        return x

    @staticmethod
    def backward(ctx, grad_z):
        if torch.is_grad_enabled():  # backward(create_graph=True): results not differentiable again
            return _backward_once_differentiable(ctx, grad_z)
        return _backward(ctx, grad_z)  # the usual case: skips once_differentiable's wrapping (~12 µs)


class RecomputeABNFunction(torch.autograd.Function):
    """BatchNorm (+ shortcut) + any activation, out of place; saves its input and the per-channel
    statistics, and marks its output to be rebuilt from them wherever a later op saves it
    (:mod:`inplace_abn.recompute`). Its own backward needs no output either, and never divides by the
    scale, which may therefore be ``weight`` itself (``batchnorm_weight``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, activation, group,
                shortcut, batchnorm_weight):
        backend = backends.select(x, activation, shortcut, recompute=True)
        z, mean, var, count, _ = _forward_stats(backend, x, weight, bias, running_mean, running_var, training,
                                                momentum, eps, activation, group, shortcut, False, batchnorm_weight)
        if not training:  # the running statistics may change before backward: keep their values
            mean, var = mean.clone(), var.clone()
        _set_context(ctx, training, eps, activation, group, count, shortcut)
        ctx.batchnorm_weight = batchnorm_weight
        ctx.save_for_backward(x, weight, bias, shortcut)
        ctx.mean, ctx.var = mean, var  # per-channel values made here: attributes, not saved tensors
        # A shortcut that is itself rebuilt would make rebuilding chain through the whole stage: the
        # output is then stored (by the ops that save it), which breaks the chain after one link.
        if recompute.active() and (shortcut is None or not recompute.is_recomputed(shortcut)):
            recompute.register_recipe(z, functools.partial(_rebuild_output, ctx))
        return z

    @staticmethod
    def backward(ctx, grad_z):
        if torch.is_grad_enabled():
            return _recompute_backward_once_differentiable(ctx, grad_z)
        return _recompute_backward(ctx, grad_z)


def _rebuild_output(ctx) -> Tensor:
    """A :class:`RecomputeABNFunction`'s output, from what its node keeps (one elementwise pass)."""
    x, weight, bias, shortcut = ctx.saved_tensors
    mean, var = ctx.mean, ctx.var
    backend = backends.select(x, ctx.activation, shortcut, recompute=True)
    with torch.no_grad():
        return backend.normalize_activate(x, mean, var, weight, bias, ctx.eps, ctx.activation, shortcut,
                                          ctx.batchnorm_weight)


def _grads(ctx, dx, grad_weight, grad_bias, grad_shortcut, weight, bias):
    if weight is None or not ctx.needs_input_grad[1]:
        grad_weight = None
    if bias is None or not ctx.needs_input_grad[2]:
        grad_bias = None
    return dx, grad_weight, grad_bias, None, None, None, None, None, None, None, grad_shortcut


def _split(result, has_shortcut: bool):
    """``(dx, grad_shortcut)`` from what a backend's backward_apply returns."""
    return result if has_shortcut else (result, None)


def _backward(ctx, grad_z):
    """The backward of :class:`InPlaceABNFunction`: rebuilds what it needs from ``z`` alone."""
    z, var, weight, bias, shortcut, bits = ctx.saved_tensors
    backend = backends.select(z, ctx.activation, shortcut)
    if grad_z.stride() != z.stride():  # e.g. an expanded gradient from .sum(): match z's layout
        grad_z = torch.empty_like(z).copy_(grad_z)
    if ctx.group is None or not ctx.training:
        dx, grad_weight, grad_bias, *grad_shortcut = backend.backward(
            z, grad_z, var, weight, bias, ctx.eps, ctx.activation, ctx.training, shortcut, bits
        )
        grad_shortcut = grad_shortcut[0] if grad_shortcut else None
    else:
        sum_dy, sum_dy_xhat = backend.backward_reduce(z, grad_z, weight, bias, ctx.eps, ctx.activation, shortcut, bits)
        # Parameter gradients are the local contributions, as nn.SyncBatchNorm: DDP averages them.
        grad_weight, grad_bias = eager.param_grads(sum_dy, sum_dy_xhat, weight, bias)
        sum_dy, sum_dy_xhat = distributed.all_reduce_sums(sum_dy, sum_dy_xhat, ctx.group)
        # Divided here by the global count (a tensor), so the backend sees count 1, a plain int.
        dx, grad_shortcut = _split(backend.backward_apply(
            z, grad_z, var, weight, bias, sum_dy / ctx.count, sum_dy_xhat / ctx.count, 1, ctx.eps, ctx.activation,
            shortcut, bits,
        ), ctx.has_shortcut)
    return _grads(ctx, dx, grad_weight, grad_bias, grad_shortcut, weight, bias)


def _recompute_backward(ctx, grad_z):
    """The backward of :class:`RecomputeABNFunction`: rebuilds what it needs from ``x``."""
    x, weight, bias, shortcut = ctx.saved_tensors
    mean, var = ctx.mean, ctx.var
    backend = backends.select(x, ctx.activation, shortcut, recompute=True)
    if grad_z.stride() != x.stride():
        grad_z = torch.empty_like(x).copy_(grad_z)
    batchnorm_weight = ctx.batchnorm_weight
    if ctx.group is None or not ctx.training:
        dx, grad_weight, grad_bias, *grad_shortcut = backend.recompute_backward(
            x, grad_z, mean, var, weight, bias, ctx.eps, ctx.activation, ctx.training, shortcut, batchnorm_weight
        )
        grad_shortcut = grad_shortcut[0] if grad_shortcut else None
    else:
        sum_dy, sum_dy_xhat = backend.recompute_backward_reduce(
            x, grad_z, mean, var, weight, bias, ctx.eps, ctx.activation, shortcut, batchnorm_weight
        )
        grad_weight, grad_bias = eager.param_grads(sum_dy, sum_dy_xhat, weight, bias, batchnorm_weight)
        sum_dy, sum_dy_xhat = distributed.all_reduce_sums(sum_dy, sum_dy_xhat, ctx.group)
        dx, grad_shortcut = _split(backend.recompute_backward_apply(
            x, grad_z, mean, var, weight, bias, sum_dy / ctx.count, sum_dy_xhat / ctx.count, 1, ctx.eps,
            ctx.activation, shortcut, batchnorm_weight,
        ), ctx.has_shortcut)
    return (*_grads(ctx, dx, grad_weight, grad_bias, grad_shortcut, weight, bias), None)  # + batchnorm_weight


_backward_once_differentiable = torch.autograd.function.once_differentiable(_backward)
_recompute_backward_once_differentiable = torch.autograd.function.once_differentiable(_recompute_backward)


def _check(
    x: Tensor, weight, bias, running_mean, running_var, training: bool, eps: float, in_place: bool,
    synchronized: bool = False, shortcut=None, batchnorm_weight: bool = False,
) -> None:
    if in_place and batchnorm_weight:
        raise ValueError(
            "batchnorm_weight=True (scale by weight itself) needs a layer that does not write over its input: "
            "in place, the backward pass divides by the scale, which must stay positive (|weight| + eps). Use "
            "RecomputeABN or InPlaceABNSync(in_place=False), which keep the input, or batchnorm_weight=False "
            "(inplace_abn.convert_to_abn converts BatchNorm weights for in-place layers).")
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
    if shortcut is not None:
        if not isinstance(shortcut, Tensor) or not shortcut.is_floating_point():
            raise TypeError(f"shortcut must be a floating-point tensor, got {type(shortcut).__name__}")
        if shortcut.shape != x.shape or shortcut.device != x.device:
            raise ValueError(
                f"shortcut must have the input's shape {tuple(x.shape)} on {x.device} (it is added to the "
                f"normalized input before the activation), got {tuple(shortcut.shape)} on {shortcut.device}"
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
            "(conv, linear), or use ABN or RecomputeABN, which do not write over their input."
        )


def _apply(function, args, x: Tensor) -> Tensor:
    if not torch.is_autocast_enabled(x.device.type):
        return function.apply(*args)
    with torch.autocast(x.device.type, enabled=False):  # computes in float32 itself
        return function.apply(*args)


def _inplace_abn(x, weight, bias, running_mean, running_var, training, momentum, eps, activation, group, shortcut=None,
                 batchnorm_weight: bool = False):
    if not activation.in_place:  # a lossy activation: the input is kept instead
        return _recompute_abn(x, weight, bias, running_mean, running_var, training, momentum, eps, activation, group,
                              shortcut, batchnorm_weight)
    if torch.compiler.is_compiling():
        if group is None:
            # Standard ops: under compile AOTAutograd functionalizes the graph and picks what to save
            # and what to recompute itself, and the in-place Function would only add a copy (below).
            return _abn(x, weight, bias, running_mean, running_var, training, momentum, eps, activation, shortcut)
        # torch.compile (2.13) returns a wrong input gradient when an in-place autograd.Function
        # overwrites a graph input (the layer first in a compiled region, e.g. after DDP splits the
        # graph). A copy makes the input an intermediate; Inductor fuses the copy into the kernel.
        x = x.clone()
    args = (x, weight, bias, running_mean, running_var, training, momentum, eps, activation, group, shortcut)
    return _apply(InPlaceABNFunction, args, x)


def _recompute_abn(x, weight, bias, running_mean, running_var, training, momentum, eps, activation, group,
                   shortcut=None, batchnorm_weight: bool = False):
    if torch.compiler.is_compiling():
        if group is None:  # standard ops: the outer compiler picks what to save and what to recompute
            return _abn(x, weight, bias, running_mean, running_var, training, momentum, eps, activation, shortcut,
                        batchnorm_weight)
    elif training and torch.is_grad_enabled() and not recompute.active():
        warn_outside_recompute(activation)
    args = (x, weight, bias, running_mean, running_var, training, momentum, eps, activation, group, shortcut,
            batchnorm_weight)
    return _apply(RecomputeABNFunction, args, x)


def _abn(x, weight, bias, running_mean, running_var, training, momentum, eps, activation: Activation, shortcut=None,
         batchnorm_weight: bool = False):
    scale = weight
    if weight is not None and not batchnorm_weight:
        scale = _EffectiveScale.apply(weight, eps)
    with torch.autocast(x.device.type, enabled=False):
        y = F.batch_norm(x, running_mean, running_var, scale, bias, training, momentum, eps)
    if shortcut is not None:
        y = y + shortcut
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
    shortcut: Optional[Tensor] = None,
    batchnorm_weight: bool = False,
) -> Tensor:
    """The layers' math in standard ops only, out of place: ``F.batch_norm`` with scale ``|w| + eps``
    (``w`` with ``batchnorm_weight``), plus the shortcut, then the activation. What TorchScript,
    ``torch.jit.trace``, ``torch.export`` and ONNX record (the autograd Functions are opaque to them);
    scriptable. Saves no memory, and under it ``weight.grad`` at ``w == 0`` is 0 (``abs``) where the
    layers give ``+1``. ``activation``: a name :func:`~inplace_abn.activations.make_activation` accepts
    (validated when the layer was built).
    """
    scale: Optional[Tensor] = None
    if weight is not None:
        scale = eager.effective_scale(weight, eps, batchnorm_weight)
    y = F.batch_norm(x, running_mean, running_var, scale, bias, training, momentum, eps)
    if shortcut is not None:
        y = y + shortcut
    name = activation.lower()
    if name == "swish":
        name = "silu"
    elif name.startswith("hard_"):  # hard_swish, hard_sigmoid
        name = "hard" + name[5:]
    return activations.activate(y, name, activation_param)


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
    *,
    shortcut: Optional[Tensor] = None,
    batchnorm_weight: bool = False,
) -> Tensor:
    """BatchNorm with scale ``|w| + eps``, plus ``shortcut`` if given, then the activation, out of
    place (keeps ``x``, as BatchNorm + activation do).

    Same math as :func:`inplace_abn`, so the two are interchangeable with the same weights.
    ``batchnorm_weight=True`` scales by ``w`` itself instead, as ``nn.BatchNorm``.
    """
    _check(x, weight, bias, running_mean, running_var, training, eps, in_place=False, shortcut=shortcut)
    act = make_activation(activation, activation_param)
    return _abn(x, weight, bias, running_mean, running_var, training, momentum, eps, act, shortcut, batchnorm_weight)


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
    *,
    shortcut: Optional[Tensor] = None,
    batchnorm_weight: bool = False,
) -> Tensor:
    """In-place activated BatchNorm: writes ``act((|w| + eps) * xhat + b (+ shortcut))`` over ``x`` and
    returns it.

    In training mode the batch statistics are used and the running statistics updated with
    ``momentum`` (unbiased variance); in eval mode the running statistics are used. Only the output
    is kept for backward (with the shortcut, and one bit per element for silu, gelu and mish). ``x``
    must not be needed by anything else afterwards: see the README. With a lossy activation (relu,
    hardswish, ...) this is :func:`recompute_abn`, which keeps ``x`` instead, and only then accepts
    ``batchnorm_weight=True`` (raises ``ValueError`` otherwise).
    """
    act = make_activation(activation, activation_param)
    _check(x, weight, bias, running_mean, running_var, training, eps, in_place=act.in_place, shortcut=shortcut,
           batchnorm_weight=batchnorm_weight)
    return _inplace_abn(x, weight, bias, running_mean, running_var, training, momentum, eps, act, None, shortcut,
                        batchnorm_weight)


def recompute_abn(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "relu",
    activation_param: float = 0.0,
    *,
    shortcut: Optional[Tensor] = None,
    batchnorm_weight: bool = False,
) -> Tensor:
    """:func:`abn`'s result, keeping only ``x`` and per-channel statistics for backward: the output is
    rebuilt (one elementwise pass) wherever a later op saved it, when the model runs under
    :func:`inplace_abn.enable_recompute` (:mod:`inplace_abn.recompute`). ``x`` is not modified, so it may
    be used elsewhere. Exact for any activation. The scale is ``|w| + eps``, or with
    ``batchnorm_weight=True`` ``w`` itself (any sign, zero included), as ``nn.BatchNorm``; the layer
    :class:`~inplace_abn.RecomputeABN` passes ``True`` by default.
    """
    act = make_activation(activation, activation_param)
    _check(x, weight, bias, running_mean, running_var, training, eps, in_place=False, shortcut=shortcut)
    return _recompute_abn(x, weight, bias, running_mean, running_var, training, momentum, eps, act, None, shortcut,
                          batchnorm_weight)


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
    *,
    shortcut: Optional[Tensor] = None,
    in_place: bool = True,
    batchnorm_weight: bool = False,
) -> Tensor:
    """:func:`inplace_abn` (``in_place=False``: :func:`recompute_abn`) with statistics synchronized over
    ``group`` (default: the whole world). ``batchnorm_weight=True`` (scale by ``w`` itself) needs a call
    that does not write in place: ``in_place=False``, or a lossy activation.

    Without an initialized process group, or with one process, it is :func:`inplace_abn`.
    """
    act = make_activation(activation, activation_param)
    group = distributed.group_to_sync(group) if training else None
    in_place = in_place and act.in_place
    _check(x, weight, bias, running_mean, running_var, training, eps, in_place=in_place,
           synchronized=group is not None, shortcut=shortcut, batchnorm_weight=batchnorm_weight)
    run = _inplace_abn if in_place else _recompute_abn
    return run(x, weight, bias, running_mean, running_var, training, momentum, eps, act, group, shortcut,
               batchnorm_weight)


class _ChannelGateFunction(torch.autograd.Function):
    """``x * gate``, saving ``x`` and ``gate`` (``x`` usually a layer output kept anyway) and marking the
    product to be rebuilt from them wherever a later op saves it."""

    @staticmethod
    def forward(ctx, x, gate):
        ctx.save_for_backward(x, gate)
        out = x * gate
        recompute.register_recipe(out, functools.partial(_rebuild_gated, ctx))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, gate = ctx.saved_tensors
        grad_x = grad * gate if ctx.needs_input_grad[0] else None
        grad_gate = (grad * x).sum_to_size(gate.shape) if ctx.needs_input_grad[1] else None
        return grad_x, grad_gate


def _rebuild_gated(ctx) -> Tensor:
    x, gate = ctx.saved_tensors
    with torch.no_grad():
        return x * gate


def channel_gate(x: Tensor, gate: Tensor) -> Tensor:
    """``x * gate`` for a gate that broadcasts against ``x`` (e.g. a squeeze-excitation gate of shape
    ``(N, C, 1, 1)``). Under :func:`inplace_abn.enable_recompute` the product is not stored by the ops
    that save it (the next convolution): it is rebuilt from ``x`` and ``gate`` in backward. Otherwise,
    and under ``torch.compile``, it is the plain product."""
    if torch.compiler.is_compiling() or not recompute.active() or not torch.is_grad_enabled():
        return x * gate
    if torch.broadcast_shapes(x.shape, gate.shape) != x.shape:
        raise ValueError(f"channel_gate: the gate {tuple(gate.shape)} must broadcast to x's shape {tuple(x.shape)}")
    return _ChannelGateFunction.apply(x, gate)
