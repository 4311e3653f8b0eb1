"""The layer's math in plain PyTorch ops: the eager backend, and the source the compiled backend compiles.

Every function works per channel (dim 1) on inputs of rank 2 to 5, in any layout, and computes in
float32 (float64 for float64 inputs) whatever the storage dtype. Names follow METHOD.md: ``x`` is the
normalization's input, ``xhat`` the normalized input, ``y = gamma * xhat + b`` the affine output,
``u = y + shortcut`` (``y`` without a shortcut) the activation's input and ``z = act(u)`` the output.

Two ways to keep what backward needs, each a family of functions here:

* in place (``forward_train_``, ``backward``...): ``z`` is written over ``x`` and backward rebuilds
  ``u`` from ``z`` by inverting the activation (with the one-bit branch mask of a piecewise one);
* recompute (``forward_train``, ``recompute_backward``...): ``x`` is kept and backward rebuilds ``u``
  from it, for any activation. It never divides by the scale, so it also takes ``batchnorm_weight=True``:
  the scale is ``weight`` itself, of any sign or zero, as in ``nn.BatchNorm`` (:func:`effective_scale`).

Transient memory: these ops materialise float32 temporaries of the full size; the compiled and Triton
backends fuse them away and allocate nothing full-size but what they return.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import piecewise
from ..activations import Activation

Tensor = torch.Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _reduce_dims(x: Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    """View a per-channel vector so that it broadcasts against ``x`` (N, C, ...)."""
    return v.view([1, -1] + [1] * (x.dim() - 2))


def effective_scale(weight: Tensor, eps: float, batchnorm_weight: bool = False) -> Tensor:
    """The per-channel scale ``gamma``: ``|w| + eps``, always positive, so that the in-place backward can
    divide by it; with ``batchnorm_weight``, ``w`` itself, as ``nn.BatchNorm`` (the recompute mode only,
    which never divides by it)."""
    return weight if batchnorm_weight else weight.abs() + eps


def _scale_and_bias(weight: Optional[Tensor], bias: Optional[Tensor], x: Tensor, eps: float,
                    batchnorm_weight: bool = False):
    """The scale :func:`effective_scale` (1 without affine) and the bias, in the compute dtype."""
    dtype = compute_dtype(x)
    channels = x.shape[1]
    if weight is not None:
        gamma = effective_scale(weight.to(dtype), eps, batchnorm_weight)
    else:
        gamma = x.new_ones(channels, dtype=dtype)
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


def _activation_input(x, mean, var, weight, bias, eps: float, shortcut, batchnorm_weight: bool = False) -> Tensor:
    """``u = gamma * (x - mean) / sqrt(var + eps) + b (+ shortcut)``, in the compute dtype."""
    gamma, beta = _scale_and_bias(weight, bias, x, eps, batchnorm_weight)
    scale = gamma * torch.rsqrt(var.to(gamma.dtype) + eps)
    shift = beta - mean.to(gamma.dtype) * scale
    u = x.to(gamma.dtype) * _per_channel(scale, x) + _per_channel(shift, x)
    return u if shortcut is None else u + shortcut.to(gamma.dtype)


def normalize_activate(x, mean, var, weight, bias, eps: float, activation: Activation, shortcut=None,
                       batchnorm_weight: bool = False) -> Tensor:
    """``z = act(gamma * (x - mean) / sqrt(var + eps) + b (+ shortcut))`` in the dtype of ``x``."""
    u = _activation_input(x, mean, var, weight, bias, eps, shortcut, batchnorm_weight)
    return activation.forward(u).to(x.dtype)


def normalize_activate_(x, mean, var, weight, bias, eps: float, activation: Activation, shortcut=None):
    """:func:`normalize_activate` written over ``x``. A piecewise activation also returns the packed
    branch bits of its input (``None`` otherwise)."""
    u = _activation_input(x, mean, var, weight, bias, eps, shortcut)
    x.copy_(activation.forward_in_place(u).to(x.dtype))
    if activation.kind == "piecewise":
        return piecewise.pack_bits(activation.branch(u))
    return None


def update_running_stats_(running_mean, running_var, mean, var, count, momentum) -> None:
    """BatchNorm's update ``running = (1 - momentum) * running + momentum * batch``, with the unbiased
    batch variance.

    ``count``: elements per channel the statistics came from (an int, or a 0-dim tensor when
    synchronized); ``momentum``: a float or a one-element tensor.
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


def _batch_stats_updating(x, running_mean, running_var, momentum) -> tuple[Tensor, Tensor]:
    mean, var = batch_stats(x)
    if running_mean is not None and running_var is not None:
        update_running_stats_(running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum)
    return mean, var


def forward_train_(
    x, weight, bias, eps: float, activation: Activation, running_mean=None, running_var=None, momentum=0.0,
    shortcut=None,
):
    """Batch statistics, then normalize + activate in place; returns ``(mean, biased var)``, and the
    branch bits for a piecewise activation. Given running statistics, also updates them
    (:func:`update_running_stats_`)."""
    mean, var = _batch_stats_updating(x, running_mean, running_var, momentum)
    bits = normalize_activate_(x, mean, var, weight, bias, eps, activation, shortcut)
    return (mean, var) if bits is None else (mean, var, bits)


def forward_train(
    x, weight, bias, eps: float, activation: Activation, running_mean=None, running_var=None, momentum=0.0,
    shortcut=None, batchnorm_weight: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`forward_train_` out of place, for the recompute mode: returns ``(z, mean, biased var)``."""
    mean, var = _batch_stats_updating(x, running_mean, running_var, momentum)
    return normalize_activate(x, mean, var, weight, bias, eps, activation, shortcut, batchnorm_weight), mean, var


# --- backward ------------------------------------------------------------------------------------
#
# Both modes reduce to the same per-element pair: ``du = dL/du`` and a centered tensor ``t`` with
# ``xhat = t * a`` for a per-channel ``a``: ``t = y - b`` and ``a = 1 / gamma`` in place (``y`` rebuilt
# from ``z``), ``t = x - mean`` and ``a = invstd`` in the recompute mode. Then
#     sum_dy = sum(du),  sum_dy_xhat = a * sum(du * t)
#     dx = scale * (du - sum_dy / m - xhat * sum_dy_xhat / m) = scale * du - (scale * a * sum_dy_xhat / m) * t - scale * sum_dy / m
# with ``scale = gamma * invstd``: two multiply-adds per element. The shortcut's gradient is ``du``.


def _from_output(z, grad_z, weight, bias, eps: float, activation: Activation, shortcut, bits):
    """In place: ``(du, t = y - b, a = 1 / gamma, gamma)`` rebuilt from the output ``z``."""
    gamma, beta = _scale_and_bias(weight, bias, z, eps)
    zc, grad = z.to(gamma.dtype), grad_z.to(gamma.dtype)
    if activation.kind == "piecewise":
        storage_dtype = z.dtype if z.dtype != zc.dtype else None
        u = activation.inverse(zc, piecewise.unpack_bits(bits, z.shape), storage_dtype)
        du = activation.grad_from_input(u, grad)
    else:
        u = activation.inverse(zc)
        du = activation.grad_input(zc, grad)
    y = u if shortcut is None else u - shortcut.to(gamma.dtype)
    return du, y - _per_channel(beta, z), 1.0 / gamma, gamma


def _from_input(x, grad_z, mean, var, weight, bias, eps: float, activation: Activation, shortcut,
                batchnorm_weight: bool):
    """Recompute mode: ``(du, t = x - mean, a = invstd, gamma)`` rebuilt from the input ``x``."""
    gamma, beta = _scale_and_bias(weight, bias, x, eps, batchnorm_weight)
    invstd = torch.rsqrt(var.to(gamma.dtype) + eps)
    u = _activation_input(x, mean, var, weight, bias, eps, shortcut, batchnorm_weight)
    du = activation.grad_from_input(u, grad_z.to(gamma.dtype))
    return du, x.to(gamma.dtype) - _per_channel(mean.to(gamma.dtype), x), invstd, gamma


def _reduce(du, t, a) -> tuple[Tensor, Tensor]:
    dims = _reduce_dims(du)
    return du.sum(dims), (du * t).sum(dims) * a


def _apply(du, t, a, gamma, var, sum_dy, sum_dy_xhat, count, eps: float, like: Tensor, shortcut):
    """``dx`` (and the shortcut's gradient ``du``, given a shortcut) from the elementwise pair and the sums;
    ``count`` None: eval mode, where the statistics are constants."""
    scale = gamma * torch.rsqrt(var.to(gamma.dtype) + eps)
    if count is None:
        dx = du * _per_channel(scale, like)
    else:
        t_coef = scale * a * (sum_dy_xhat.to(gamma.dtype) / count)
        offset = scale * (sum_dy.to(gamma.dtype) / count)
        dx = _per_channel(scale, like) * du - _per_channel(t_coef, like) * t - _per_channel(offset, like)
    if shortcut is None:
        return dx.to(like.dtype)
    return dx.to(like.dtype), du.to(shortcut.dtype)


def backward_reduce(z, grad_z, weight, bias, eps: float, activation: Activation, shortcut=None, bits=None):
    """In place: per-channel ``sum(dy)`` and ``sum(dy * xhat)``, the two reductions of the backward pass."""
    du, t, a, _ = _from_output(z, grad_z, weight, bias, eps, activation, shortcut, bits)
    return _reduce(du, t, a)


def backward_apply(
    z, grad_z, var, weight, bias, sum_dy, sum_dy_xhat, count: Optional[int], eps: float, activation: Activation,
    shortcut=None, bits=None,
):
    """In place: ``dx`` from the two sums (and the shortcut's gradient, given a shortcut). ``count`` is
    the number of elements per channel the statistics came from (global, when synchronized); ``None``
    means eval mode."""
    du, t, a, gamma = _from_output(z, grad_z, weight, bias, eps, activation, shortcut, bits)
    return _apply(du, t, a, gamma, var, sum_dy, sum_dy_xhat, count, eps, z, shortcut)


def backward(z, grad_z, var, weight, bias, eps: float, activation: Activation, training: bool, shortcut=None, bits=None):
    """In place, the whole backward on one process: ``(dx, grad_weight, grad_bias)`` (:func:`param_grads`),
    and the shortcut's gradient last, given a shortcut."""
    du, t, a, gamma = _from_output(z, grad_z, weight, bias, eps, activation, shortcut, bits)
    sum_dy, sum_dy_xhat = _reduce(du, t, a)
    count = z.numel() // z.shape[1] if training else None
    dx = _apply(du, t, a, gamma, var, sum_dy, sum_dy_xhat, count, eps, z, shortcut)
    grads = param_grads(sum_dy, sum_dy_xhat, weight, bias)
    return (dx, *grads) if shortcut is None else (dx[0], *grads, dx[1])


def recompute_backward_reduce(x, grad_z, mean, var, weight, bias, eps: float, activation: Activation, shortcut=None,
                              batchnorm_weight: bool = False):
    """Recompute mode: :func:`backward_reduce` from the input ``x``."""
    du, t, a, _ = _from_input(x, grad_z, mean, var, weight, bias, eps, activation, shortcut, batchnorm_weight)
    return _reduce(du, t, a)


def recompute_backward_apply(
    x, grad_z, mean, var, weight, bias, sum_dy, sum_dy_xhat, count: Optional[int], eps: float,
    activation: Activation, shortcut=None, batchnorm_weight: bool = False,
):
    """Recompute mode: :func:`backward_apply` from the input ``x``."""
    du, t, a, gamma = _from_input(x, grad_z, mean, var, weight, bias, eps, activation, shortcut, batchnorm_weight)
    return _apply(du, t, a, gamma, var, sum_dy, sum_dy_xhat, count, eps, x, shortcut)


def recompute_backward(
    x, grad_z, mean, var, weight, bias, eps: float, activation: Activation, training: bool, shortcut=None,
    batchnorm_weight: bool = False,
):
    """Recompute mode: :func:`backward` from the input ``x``."""
    du, t, a, gamma = _from_input(x, grad_z, mean, var, weight, bias, eps, activation, shortcut, batchnorm_weight)
    sum_dy, sum_dy_xhat = _reduce(du, t, a)
    count = x.numel() // x.shape[1] if training else None
    dx = _apply(du, t, a, gamma, var, sum_dy, sum_dy_xhat, count, eps, x, shortcut)
    grads = param_grads(sum_dy, sum_dy_xhat, weight, bias, batchnorm_weight)
    return (dx, *grads) if shortcut is None else (dx[0], *grads, dx[1])


def times_sign(value: Tensor, weight: Tensor) -> Tensor:
    """``value * sign(weight)`` with ``sign(0) = +1``: the gradient through the scale ``|w| + eps``."""
    return torch.where(weight >= 0, value, -value)


def param_grads(sum_dy, sum_dy_xhat, weight, bias, batchnorm_weight: bool = False) -> tuple[Tensor, Tensor]:
    """``weight`` and ``bias`` gradients from the two sums, in their dtypes. The scale is ``|w| + eps``,
    so ``dL/dw = sign(w) * sum(dy * xhat)`` with ``sign(0) = +1`` (``abs``'s gradient would be 0
    there); with ``batchnorm_weight`` it is ``w``, and ``dL/dw = sum(dy * xhat)``. Without a weight
    (bias) the raw sum is returned."""
    grad_weight = sum_dy_xhat
    if weight is not None:
        signed = sum_dy_xhat if batchnorm_weight else times_sign(sum_dy_xhat, weight)
        grad_weight = signed.to(weight.dtype)
    grad_bias = sum_dy if bias is None else sum_dy.to(bias.dtype)
    return grad_weight, grad_bias
