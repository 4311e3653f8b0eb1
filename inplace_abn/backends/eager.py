"""The layer's math in plain PyTorch ops: the eager backend, and the source the compiled backend compiles.

Every function works per channel (dim 1) on inputs of rank 2 to 5, in any layout, and computes in
float32 (float64 for float64 inputs) whatever the storage dtype. Names follow METHOD.md: ``y`` is the
affine output, ``z = act(y)`` the layer output, ``xhat`` the normalized input.

Transient memory: these ops materialise float32 temporaries of the full size (``x - mean``, ``y``,
``dy``); the compiled and Triton backends fuse them away and allocate nothing full-size but ``dx``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..activations import Activation

Tensor = torch.Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _reduce_dims(x: Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    """View a per-channel vector so that it broadcasts against ``x`` (N, C, ...)."""
    return v.view([1, -1] + [1] * (x.dim() - 2))


def _scale_and_bias(weight: Optional[Tensor], bias: Optional[Tensor], x: Tensor, eps: float):
    """The effective scale ``gamma = |w| + eps`` (1 without affine) and the bias, in the compute dtype."""
    dtype = compute_dtype(x)
    channels = x.shape[1]
    gamma = weight.to(dtype).abs() + eps if weight is not None else x.new_ones(channels, dtype=dtype)
    beta = bias.to(dtype) if bias is not None else x.new_zeros(channels, dtype=dtype)
    return gamma, beta


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x``, in the compute dtype.

    Two passes, the mean and then the mean squared deviation from it, as ATen's CPU BatchNorm: as
    exact as Welford's update, and compiled it runs at memory speed where Welford's dependent
    updates are latency-bound (twice as slow).
    """
    xc = x.to(compute_dtype(x))
    dims = _reduce_dims(x)
    mean = xc.mean(dims)
    var = (xc - _per_channel(mean, x)).square().mean(dims)
    return mean, var


def normalize_activate(x, mean, var, weight, bias, eps: float, activation: Activation) -> Tensor:
    """``act(gamma * (x - mean) / sqrt(var + eps) + b)`` in the dtype of ``x``."""
    gamma, beta = _scale_and_bias(weight, bias, x, eps)
    scale = gamma * torch.rsqrt(var.to(gamma.dtype) + eps)
    shift = beta - mean.to(gamma.dtype) * scale
    y = x.to(gamma.dtype) * _per_channel(scale, x) + _per_channel(shift, x)
    return activation.forward(y).to(x.dtype)


def normalize_activate_(x, mean, var, weight, bias, eps: float, activation: Activation) -> None:
    """:func:`normalize_activate` written over ``x``."""
    x.copy_(normalize_activate(x, mean, var, weight, bias, eps, activation))


def update_running_stats_(running_mean, running_var, mean, var, count, momentum) -> None:
    """BatchNorm's update ``running += momentum * (batch - running)``, with the unbiased batch variance.

    ``count``: elements per channel the statistics came from (an int, or a 0-dim tensor when
    synchronized); ``momentum``: a float or a 0-dim tensor.
    """
    if isinstance(count, Tensor):
        unbiased_var = var * (count / (count - 1).clamp_min(1))
    else:
        # tensor * int / int: a Python float from symbolic ints would not compile (torch 2.14)
        unbiased_var = var * count / torch.sym_max(count - 1, 1)
    # ATen's formula; not lerp_, whose 0-dim tensor weight does not compile for float64 (torch 2.14)
    keep = 1 - momentum
    running_mean.mul_(keep).add_(mean.to(running_mean.dtype) * momentum)
    running_var.mul_(keep).add_(unbiased_var.to(running_var.dtype) * momentum)


def forward_train_(
    x, weight, bias, eps: float, activation: Activation, running_mean=None, running_var=None, momentum=0.0
) -> tuple[Tensor, Tensor]:
    """Batch statistics, then normalize + activate in place; returns (mean, biased var). Given
    running statistics, also updates them (:func:`update_running_stats_`)."""
    mean, var = batch_stats(x)
    if running_mean is not None and running_var is not None:
        update_running_stats_(running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum)
    normalize_activate_(x, mean, var, weight, bias, eps, activation)
    return mean, var


def _grad_and_y(z, grad_z, activation: Activation, dtype: torch.dtype):
    """Invert the activation: ``dL/dy`` and ``y = gamma * xhat + b`` from the output alone."""
    zc = z.to(dtype)
    return activation.grad_input(zc, grad_z.to(dtype)), activation.inverse(zc)


def backward_reduce(z, grad_z, weight, bias, eps: float, activation: Activation) -> tuple[Tensor, Tensor]:
    """Per-channel ``sum(dy)`` and ``sum(dy * xhat)``: the two reductions of the backward pass.

    ``xhat = (y - b) / gamma``; the division by ``gamma`` is taken out of the sum, once per channel.
    """
    gamma, beta = _scale_and_bias(weight, bias, z, eps)
    dy, y = _grad_and_y(z, grad_z, activation, gamma.dtype)
    dims = _reduce_dims(z)
    return dy.sum(dims), (dy * (y - _per_channel(beta, z))).sum(dims) / gamma


def backward_apply(
    z, grad_z, var, weight, bias, sum_dy, sum_dy_xhat, count: Optional[int], eps: float, activation: Activation
) -> Tensor:
    """``dx`` from the two sums. ``count`` is the number of elements per channel the statistics came
    from (global, when synchronized); ``None`` means eval mode, where statistics are constants.

    ``dx = scale * (dy - mean(dy) - xhat * mean(dy * xhat))`` with ``xhat = (y - b) / gamma`` is
    ``scale * dy - y_coef * y + offset`` with per-channel coefficients: two multiply-adds per element.
    """
    gamma, beta = _scale_and_bias(weight, bias, z, eps)
    dy, y = _grad_and_y(z, grad_z, activation, gamma.dtype)
    scale = gamma * torch.rsqrt(var.to(gamma.dtype) + eps)
    if count is None:
        return (dy * _per_channel(scale, z)).to(z.dtype)
    mean_dy = sum_dy.to(gamma.dtype) / count
    y_coef = scale * (sum_dy_xhat.to(gamma.dtype) / count) / gamma
    offset = y_coef * beta - scale * mean_dy
    dx = _per_channel(scale, z) * dy - _per_channel(y_coef, z) * y + _per_channel(offset, z)
    return dx.to(z.dtype)


def times_sign(value: Tensor, weight: Tensor) -> Tensor:
    """``value * sign(weight)`` with ``sign(0) = +1``: the gradient through the scale ``|w| + eps``."""
    return torch.where(weight >= 0, value, -value)


def param_grads(sum_dy, sum_dy_xhat, weight, bias) -> tuple[Tensor, Tensor]:
    """``weight`` and ``bias`` gradients from the two sums, in their dtypes. The scale is ``|w| + eps``,
    so ``dL/dw = sign(w) * sum(dy * xhat)`` with ``sign(0) = +1`` (``abs``'s gradient would be 0
    there). Without a weight (bias) the raw sum is returned."""
    grad_weight = sum_dy_xhat
    if weight is not None:
        grad_weight = times_sign(sum_dy_xhat, weight).to(weight.dtype)
    grad_bias = sum_dy if bias is None else sum_dy.to(bias.dtype)
    return grad_weight, grad_bias


def backward(z, grad_z, var, weight, bias, eps: float, activation: Activation, training: bool):
    """The whole backward on one process: returns ``(dx, grad_weight, grad_bias)`` (:func:`param_grads`)."""
    sum_dy, sum_dy_xhat = backward_reduce(z, grad_z, weight, bias, eps, activation)
    count = z.numel() // z.shape[1] if training else None
    dx = backward_apply(z, grad_z, var, weight, bias, sum_dy, sum_dy_xhat, count, eps, activation)
    return (dx, *param_grads(sum_dy, sum_dy_xhat, weight, bias))
