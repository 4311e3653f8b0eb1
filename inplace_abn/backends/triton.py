"""The layer's math as fused Triton kernels: the backend for CUDA tensors (and, under
``TRITON_INTERPRET=1``, for CPU tensors in Triton's interpreter, which is how CI tests it).

Same functions and semantics as :mod:`.eager`, in the fewest passes over memory (METHOD.md section 5):

* forward, training: ``batch_stats`` reads ``x`` once, ``normalize_activate_`` reads it again and
  writes ``z`` over it (3 passes);
* backward, training: ``backward_reduce`` reads ``z`` and ``dz`` once for both sums,
  ``backward_apply`` reads them again and writes ``dx`` (5 passes); in eval mode one pass does both.

How the kernels walk a tensor. Per channel the reduction runs over ``N * spatial`` elements. A
contiguous ``(N, C, *spatial)`` tensor is seen as ``N`` blocks of ``S = prod(spatial)`` contiguous
positions per channel; a channels-last one (``channels_last``, ``channels_last_3d``, or any
``(N, *spatial, C)`` memory order) as one ``(N * S, C)`` row-major matrix, so ``N = 1`` and ``S`` counts
rows. Both are walked in tiles of ``BLOCK_S`` positions by ``BLOCK_C`` channels, reading each tensor in
the layout it has: no layout copies. A tensor that is neither (a strided view, a permutation) is
copied to contiguous, processed, and, for the in-place functions, copied back into ``x``.

Reductions are split: the grid is (splits, channel blocks), each program summarises one slice of the
reduction axis for its channels (for the statistics, per-lane sums of the data shifted by the mean
of the channel's first tile, turned into (mean, M2, count); for the backward, plain sums), and a small
second kernel merges the slices (Chan's formula for the statistics). So a layer with few channels
still fills the GPU, and a large mean does not cost the variance its digits. All accumulation is in float32 whatever
the storage dtype; float64 inputs, and what the kernels do not cover, go to :mod:`.eager`.

Tile shapes are autotuned per (N, C, S, dtype) on the first call with a new shape; the in-place
kernel is then run on a saved copy of ``x``, restored after each trial.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..activations import Activation
from . import TRITON_ACTIVATIONS, eager

Tensor = torch.Tensor

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_GRID_Y = 65535  # CUDA's limit on the second grid axis (channel blocks)


# ---------------------------------------------------------------------------------------------------
# Device functions: the math, shared by the kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _activate(y, ACTIVATION: tl.constexpr, param):
    """``z = act(y)``, as :meth:`Activation.forward`."""
    if ACTIVATION == "leaky_relu":
        return tl.where(y >= 0, y, y * param)
    elif ACTIVATION == "elu":
        # exp(y) - 1: libdevice's expm1 does not run in the interpreter. Off by ~1e-7 near 0.
        return tl.where(y >= 0, y, param * (tl.exp(y) - 1.0))
    else:
        return y


@triton.jit
def _invert_activation(z, ACTIVATION: tl.constexpr, param):
    """``y`` from ``z = act(y)``, as :meth:`Activation.inverse` (elu: with its clamp)."""
    if ACTIVATION == "leaky_relu":
        return tl.where(z >= 0, z, z * (1.0 / param))
    elif ACTIVATION == "elu":
        ratio = tl.maximum(z * (1.0 / param), -1.0 + 1.1920928955078125e-07)  # float32 eps
        return tl.where(z >= 0, z, tl.log(1.0 + ratio))  # log1p, as exp(y) - 1 above
    else:
        return z


@triton.jit
def _activation_grad(z, grad_z, ACTIVATION: tl.constexpr, param):
    """``dL/dy`` from ``z`` and ``dL/dz``, as :meth:`Activation.grad_input`."""
    if ACTIVATION == "leaky_relu":
        return tl.where(z >= 0, grad_z, grad_z * param)
    elif ACTIVATION == "elu":
        return tl.where(z >= 0, grad_z, grad_z * (z + param))
    else:
        return grad_z


@triton.jit
def _welford_combine(mean_a, m2_a, count_a, mean_b, m2_b, count_b):
    """Chan's merge of two (mean, M2, count) summaries; either may be empty (count 0)."""
    count = count_a + count_b
    share_b = count_b / tl.maximum(count, 1.0)
    delta = mean_b - mean_a
    return mean_a + delta * share_b, m2_a + m2_b + delta * delta * count_a * share_b, count


@triton.jit
def _scale_and_bias(w_ptr, b_ptr, c, c_mask, eps, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The effective scale ``gamma = |w| + eps`` (1 without weight) and the bias (0 without), per channel."""
    if HAS_WEIGHT:
        gamma = tl.abs(tl.load(w_ptr + c, mask=c_mask, other=1.0).to(tl.float32)) + eps
    else:
        gamma = tl.full(c.shape, 1.0, tl.float32)
    if HAS_BIAS:
        beta = tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    else:
        beta = tl.zeros(c.shape, tl.float32)
    return gamma, beta


@triton.jit
def _tile(tile, c, C, S, CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr):
    """Where tile number ``tile`` lies, for channels ``c``: ``(base, offsets, mask)``, a [BLOCK_S, BLOCK_C]
    block at ``ptr + base + offsets``. The scalar ``base`` is 64-bit so that large tensors don't overflow.

    Tiles run along the reduction axis: ``tile = n * cdiv(S, BLOCK_S) + s_block``.
    """
    s_blocks = tl.cdiv(S, BLOCK_S)
    n = tile // s_blocks
    s_start = (tile % s_blocks) * BLOCK_S
    s = tl.arange(0, BLOCK_S)
    mask = (s_start + s < S)[:, None] & (c < C)[None, :]
    if CHANNELS_LAST:  # rows of C contiguous channels
        base = s_start.to(tl.int64) * C
        offsets = s[:, None] * C + c[None, :]
    else:  # per (n, c), S contiguous positions
        base = n.to(tl.int64) * C * S + s_start
        offsets = c[None, :] * S + s[:, None]
    return base, offsets, mask


@triton.jit
def _split_range(split, N, S, SPLITS, BLOCK_S: tl.constexpr):
    """The tiles ``[first, last)`` that program ``split`` of ``SPLITS`` reduces."""
    tiles = N * tl.cdiv(S, BLOCK_S)
    per_split = tl.cdiv(tiles, SPLITS)
    first = split * per_split
    return first, tl.minimum(first + per_split, tiles)


@triton.jit
def _tile_rows(tile, S, BLOCK_S: tl.constexpr):
    """How many of tile ``tile``'s BLOCK_S positions lie inside the tensor."""
    s_blocks = tl.cdiv(S, BLOCK_S)
    return tl.minimum(S - (tile % s_blocks) * BLOCK_S, BLOCK_S)


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _batch_stats_partial_kernel(
    x_ptr, shift_ptr, mean_ptr, m2_ptr, count_ptr,  # x; per channel shift; per (split, channel) summaries
    N, C, S, SPLITS,
    CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """(mean, M2, count) of ``x - shift`` over one slice of the reduction axis, for a block of channels.

    ``shift`` is the mean of the channel's first tile, the same for every slice: close to the channel's
    mean, so the per-lane sums of ``x - shift`` and of its square keep float32's digits even when the
    mean is large against the spread (1e4 + N(0, 1)), and the merge works on small numbers. That costs
    a few operations per element, where Welford's update needs a division: too slow for bf16 input."""
    split = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    base, offsets, mask = _tile(0, c, C, S, CHANNELS_LAST, BLOCK_S)
    x = tl.load(x_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    shift = tl.sum(x, 0) / tl.maximum(tl.sum(mask.to(tl.float32), 0), 1.0)

    sum_d = tl.zeros((BLOCK_S, BLOCK_C), tl.float32)
    sum_d2 = tl.zeros((BLOCK_S, BLOCK_C), tl.float32)
    first, last = _split_range(split, N, S, SPLITS, BLOCK_S)
    rows = tl.zeros_like(first)  # positions summed, for every channel
    for tile in range(first, last):
        base, offsets, mask = _tile(tile, c, C, S, CHANNELS_LAST, BLOCK_S)
        x = tl.load(x_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - shift[None, :], 0.0)
        sum_d += d
        sum_d2 += d * d
        rows += _tile_rows(tile, S, BLOCK_S)
    count = rows.to(tl.float32)
    sum_d = tl.sum(sum_d, 0)
    mean = sum_d / tl.maximum(count, 1.0)
    m2 = tl.maximum(tl.sum(sum_d2, 0) - sum_d * mean, 0.0)
    out = split * C + c
    tl.store(mean_ptr + out, mean, mask=c < C)
    tl.store(m2_ptr + out, m2, mask=c < C)
    tl.store(count_ptr + out, tl.zeros_like(mean) + count, mask=c < C)
    if split == 0:
        tl.store(shift_ptr + c, shift, mask=c < C)


@triton.jit
def _batch_stats_merge_kernel(
    shift_ptr, part_mean_ptr, part_m2_ptr, part_count_ptr, mean_ptr, var_ptr,
    running_mean_ptr, running_var_ptr, momentum,
    C, SPLITS,
    UPDATE_RUNNING: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merge the per-split summaries of a block of channels (Chan) into the mean and biased variance;
    with ``UPDATE_RUNNING``, also update the running statistics as ``eager.update_running_stats_``
    (``running += momentum * (batch - running)``, unbiased variance), saving four small launches."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mean = tl.zeros((BLOCK_SPLITS, BLOCK_C), tl.float32)
    m2 = tl.zeros((BLOCK_SPLITS, BLOCK_C), tl.float32)
    count = tl.zeros((BLOCK_SPLITS, BLOCK_C), tl.float32)
    for start in range(0, SPLITS, BLOCK_SPLITS):
        row = start + tl.arange(0, BLOCK_SPLITS)
        mask = (row < SPLITS)[:, None] & (c < C)[None, :]
        part = row[:, None] * C + c[None, :]
        mean, m2, count = _welford_combine(
            mean, m2, count,
            tl.load(part_mean_ptr + part, mask=mask, other=0.0),
            tl.load(part_m2_ptr + part, mask=mask, other=0.0),
            tl.load(part_count_ptr + part, mask=mask, other=0.0),
        )
    mean, m2, count = tl.reduce((mean, m2, count), 0, _welford_combine)
    shift = tl.load(shift_ptr + c, mask=c < C, other=0.0)
    mean = shift + mean
    tl.store(mean_ptr + c, mean, mask=c < C)
    tl.store(var_ptr + c, m2 / tl.maximum(count, 1.0), mask=c < C)
    if UPDATE_RUNNING:
        running_mean = tl.load(running_mean_ptr + c, mask=c < C, other=0.0).to(tl.float32)
        running_var = tl.load(running_var_ptr + c, mask=c < C, other=0.0).to(tl.float32)
        unbiased_var = m2 / tl.maximum(count - 1.0, 1.0)
        running_mean += momentum * (mean - running_mean)
        running_var += momentum * (unbiased_var - running_var)
        tl.store(running_mean_ptr + c, running_mean.to(running_mean_ptr.dtype.element_ty), mask=c < C)
        tl.store(running_var_ptr + c, running_var.to(running_var_ptr.dtype.element_ty), mask=c < C)


@triton.jit
def _normalize_activate_kernel(
    x_ptr, mean_ptr, var_ptr, w_ptr, b_ptr,
    N, C, S, eps, act_param,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``x <- act(gamma * (x - mean) / sqrt(var + eps) + b)`` on one tile, in place."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    gamma, beta = _scale_and_bias(w_ptr, b_ptr, c, c_mask, eps, HAS_WEIGHT, HAS_BIAS)
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + c, mask=c_mask, other=1.0).to(tl.float32)
    scale = gamma * tl.rsqrt(var + eps)
    shift = beta - mean * scale

    base, offsets, mask = _tile(tl.program_id(0), c, C, S, CHANNELS_LAST, BLOCK_S)
    x = tl.load(x_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    z = _activate(x * scale[None, :] + shift[None, :], ACTIVATION, act_param)
    tl.store(x_ptr + base + offsets, z.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_reduce_partial_kernel(
    z_ptr, dz_ptr, w_ptr, b_ptr, sum_dy_ptr, sum_dy_xhat_ptr,  # sums: per (split, channel)
    dx_ptr, var_ptr,  # only read / written with EVAL_DX
    N, C, S, SPLITS, eps, act_param,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, EVAL_DX: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``sum(dy)`` and ``sum(dy * xhat)`` over one slice of the reduction axis, with ``y`` and ``dy``
    rebuilt from ``z`` by inverting the activation and ``xhat = (y - b) / gamma``. With ``EVAL_DX``
    it also writes the eval-mode ``dx = dy * gamma / sqrt(var + eps)`` on the way (one pass in all)."""
    split = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    gamma, beta = _scale_and_bias(w_ptr, b_ptr, c, c_mask, eps, HAS_WEIGHT, HAS_BIAS)
    inv_gamma = 1.0 / gamma
    if EVAL_DX:
        scale = gamma * tl.rsqrt(tl.load(var_ptr + c, mask=c_mask, other=1.0).to(tl.float32) + eps)

    sum_dy = tl.zeros((BLOCK_S, BLOCK_C), tl.float32)
    sum_dy_xhat = tl.zeros((BLOCK_S, BLOCK_C), tl.float32)
    first, last = _split_range(split, N, S, SPLITS, BLOCK_S)
    for tile in range(first, last):
        base, offsets, mask = _tile(tile, c, C, S, CHANNELS_LAST, BLOCK_S)
        z = tl.load(z_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
        dz = tl.load(dz_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = _activation_grad(z, dz, ACTIVATION, act_param)  # 0 on masked lanes
        xhat = (_invert_activation(z, ACTIVATION, act_param) - beta[None, :]) * inv_gamma[None, :]
        sum_dy += dy
        sum_dy_xhat += dy * xhat
        if EVAL_DX:
            tl.store(dx_ptr + base + offsets, (dy * scale[None, :]).to(dx_ptr.dtype.element_ty), mask=mask)
    out = split * C + c
    tl.store(sum_dy_ptr + out, tl.sum(sum_dy, 0), mask=c_mask)
    tl.store(sum_dy_xhat_ptr + out, tl.sum(sum_dy_xhat, 0), mask=c_mask)


@triton.jit
def _backward_sums_merge_kernel(
    part_dy_ptr, part_dy_xhat_ptr, sum_dy_ptr, sum_dy_xhat_ptr, w_ptr, grad_w_ptr, grad_b_ptr,
    C, SPLITS,
    PARAM_GRADS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Add up the per-split backward sums of a block of channels; with ``PARAM_GRADS``, also write
    the parameter gradients as ``eager.param_grads`` (``sign(w) * sum(dy * xhat)``, ``sum(dy)``, in the
    parameters' dtypes), saving the small launches that would compute them."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    sum_dy = tl.zeros((BLOCK_SPLITS, BLOCK_C), tl.float32)
    sum_dy_xhat = tl.zeros((BLOCK_SPLITS, BLOCK_C), tl.float32)
    for start in range(0, SPLITS, BLOCK_SPLITS):
        row = start + tl.arange(0, BLOCK_SPLITS)
        mask = (row < SPLITS)[:, None] & (c < C)[None, :]
        part = row[:, None] * C + c[None, :]
        sum_dy += tl.load(part_dy_ptr + part, mask=mask, other=0.0)
        sum_dy_xhat += tl.load(part_dy_xhat_ptr + part, mask=mask, other=0.0)
    sum_dy = tl.sum(sum_dy, 0)
    sum_dy_xhat = tl.sum(sum_dy_xhat, 0)
    tl.store(sum_dy_ptr + c, sum_dy, mask=c < C)
    tl.store(sum_dy_xhat_ptr + c, sum_dy_xhat, mask=c < C)
    if PARAM_GRADS:
        if HAS_WEIGHT:
            w = tl.load(w_ptr + c, mask=c < C, other=0.0)
            grad_w = tl.where(w >= 0, sum_dy_xhat, -sum_dy_xhat)
            tl.store(grad_w_ptr + c, grad_w.to(grad_w_ptr.dtype.element_ty), mask=c < C)
        if HAS_BIAS:
            tl.store(grad_b_ptr + c, sum_dy.to(grad_b_ptr.dtype.element_ty), mask=c < C)


@triton.jit
def _backward_dx_kernel(
    z_ptr, dz_ptr, dx_ptr, var_ptr, w_ptr, b_ptr, sum_dy_ptr, sum_dy_xhat_ptr,
    N, C, S, inv_count, eps, act_param,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, TRAINING: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``dx`` on one tile: ``gamma / sqrt(var + eps) * (dy - mean(dy) - xhat * mean(dy * xhat))`` in
    training, ``gamma / sqrt(var + eps) * dy`` in eval mode (statistics are constants there)."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    gamma, beta = _scale_and_bias(w_ptr, b_ptr, c, c_mask, eps, HAS_WEIGHT, HAS_BIAS)
    inv_gamma = 1.0 / gamma
    scale = gamma * tl.rsqrt(tl.load(var_ptr + c, mask=c_mask, other=1.0).to(tl.float32) + eps)

    base, offsets, mask = _tile(tl.program_id(0), c, C, S, CHANNELS_LAST, BLOCK_S)
    z = tl.load(z_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    dz = tl.load(dz_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = _activation_grad(z, dz, ACTIVATION, act_param)
    if TRAINING:
        mean_dy = tl.load(sum_dy_ptr + c, mask=c_mask, other=0.0) * inv_count
        mean_dy_xhat = tl.load(sum_dy_xhat_ptr + c, mask=c_mask, other=0.0) * inv_count
        xhat = (_invert_activation(z, ACTIVATION, act_param) - beta[None, :]) * inv_gamma[None, :]
        dx = scale[None, :] * (dy - mean_dy[None, :] - xhat * mean_dy_xhat[None, :])
    else:
        dx = scale[None, :] * dy
    tl.store(dx_ptr + base + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Tile sizes: one config per layout in the interpreter (small, so tiny test tensors still span several
# tiles, splits and channel blocks), a few on GPU picked by autotuning per (N, C, S, dtype).
# ---------------------------------------------------------------------------------------------------


def _configs(sizes):
    return [triton.Config({"BLOCK_S": s, "BLOCK_C": c}, num_warps=w) for s, c, w in sizes]


if INTERPRETING:
    _REDUCE_CONFIGS = {False: _configs([(16, 2, 1)]), True: _configs([(8, 4, 1)])}
    _ELEMENTWISE_CONFIGS = _REDUCE_CONFIGS
else:
    # (BLOCK_S, BLOCK_C, num_warps). Contiguous NCHW: long runs along S, few channels; the (64 or
    # 128, 4 to 16) shapes serve small feature maps such as 7x7. Channels last: rows of channels.
    _REDUCE_CONFIGS = {
        False: _configs(
            [(1024, 1, 4), (2048, 1, 4), (4096, 1, 8), (512, 2, 4), (128, 4, 4), (64, 4, 2), (64, 16, 4)]
        ),
        True: _configs([(32, 64, 4), (64, 64, 4), (64, 32, 4), (16, 128, 4), (8, 256, 8)]),
    }
    _ELEMENTWISE_CONFIGS = {
        False: _configs([(1024, 1, 4), (2048, 1, 8), (4096, 1, 8), (128, 8, 4), (64, 16, 4)]),
        True: _configs([(32, 64, 4), (16, 128, 4), (64, 64, 8), (8, 256, 4)]),
    }


# A short benchmark per config: tuning a new shape costs about 0.1 s per kernel, not 1 s.
_tuning_benchmark = functools.partial(triton.testing.do_bench, warmup=5, rep=20)


def _autotuned(kernel, configs, restore_value=None):
    """One autotuner per layout, each choosing among that layout's tile shapes only."""

    def tune(layout_configs):
        return triton.autotune(
            layout_configs, key=["N", "C", "S"], restore_value=restore_value, do_bench=_tuning_benchmark
        )(kernel)

    return {channels_last: tune(configs[channels_last]) for channels_last in (False, True)}


_batch_stats_partial = _autotuned(_batch_stats_partial_kernel, _REDUCE_CONFIGS)
# In place: tuning runs the kernel several times, so x is restored after each trial.
_normalize_activate = _autotuned(_normalize_activate_kernel, _ELEMENTWISE_CONFIGS, restore_value=["x_ptr"])
_backward_reduce_partial = _autotuned(_backward_reduce_partial_kernel, _REDUCE_CONFIGS)
_backward_dx = _autotuned(_backward_dx_kernel, _ELEMENTWISE_CONFIGS)


# ---------------------------------------------------------------------------------------------------
# Launch code
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Walk:
    """How the kernels see a tensor: ``N`` blocks of ``S`` positions for each of ``C`` channels,
    positions contiguous (``channels_last=False``) or channels contiguous (``N = 1``, ``S`` rows)."""

    channels_last: bool
    N: int
    C: int
    S: int

    @property
    def count(self) -> int:
        """Elements per channel."""
        return self.N * self.S


def _walk(x: Tensor) -> Optional[_Walk]:
    """The walk for ``x``'s memory layout, or ``None`` for a layout the kernels don't read directly."""
    n, c = x.shape[:2]
    s = x.numel() // (n * c)
    if s == 1 and x.movedim(1, -1).is_contiguous():  # (N, C): channels are the contiguous rows
        return _Walk(True, 1, c, n)
    if x.is_contiguous():
        return _Walk(False, n, c, s)
    if x.movedim(1, -1).is_contiguous():  # channels_last, channels_last_3d, (N, L, C).transpose(1, 2)
        return _Walk(True, 1, c, n * s)
    return None


def _with_walk(x: Tensor) -> tuple[Tensor, _Walk]:
    """``x`` itself when the kernels can read its layout, else a contiguous copy; and its walk."""
    walk = _walk(x)
    if walk is None:
        x = x.contiguous()
        walk = _walk(x)
    return x, walk


def _like(t: Tensor, reference: Tensor, walk: _Walk) -> Tensor:
    """``t`` (a gradient) in the layout of ``reference``, copied only when its layout differs."""
    if t.shape == reference.shape and _walk(t) == walk:
        return t
    return torch.empty_like(reference).copy_(t)


def _eager_only(x: Tensor) -> bool:
    return (
        x.dtype not in _KERNEL_DTYPES
        or x.numel() == 0
        or x.shape[1] > _MAX_GRID_Y  # even one channel per program must fit the grid
    )


def _covered(x: Tensor, activation: Activation, shortcut=None, bits=None) -> bool:
    """Whether the kernels compute this call: no shortcut or branch bits (the residual form and the
    piecewise activations run the eager math), an activation they implement, a tensor they walk."""
    return shortcut is None and bits is None and activation.name in TRITON_ACTIVATIONS and not _eager_only(x)


def _device(x: Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _target_programs(device: torch.device) -> int:
    """How many programs a reduction should launch: a few per SM, so that enough loads are in flight
    (the loops are not software-pipelined)."""
    if device.type != "cuda" or INTERPRETING:
        return 4  # the interpreter runs programs one by one: few, but more than one split
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(walk: _Walk, device: torch.device) -> int:
    """Slices of the reduction axis: enough programs for the device, yet enough work per program."""
    if walk.channels_last:
        channels_per_program, min_rows = 64, 64
    else:
        channels_per_program, min_rows = 1, 4096
    if INTERPRETING:
        min_rows = 4
    wanted = triton.cdiv(_target_programs(device), triton.cdiv(walk.C, channels_per_program))
    return max(1, min(wanted, triton.cdiv(walk.S * walk.N, min_rows)))


def _affine_args(x, weight, bias) -> tuple[Tensor, Tensor, bool, bool]:
    """Pointers for the kernels (``x`` stands in for a missing tensor, never read) and the flags."""
    return (
        weight.contiguous() if weight is not None else x,
        bias.contiguous() if bias is not None else x,
        weight is not None,
        bias is not None,
    )


def _tiles_grid(walk: _Walk):
    """Elementwise grid: one program per (tile along the reduction axis, channel block)."""
    return lambda meta: (walk.N * triton.cdiv(walk.S, meta["BLOCK_S"]), triton.cdiv(walk.C, meta["BLOCK_C"]))


def _splits_grid(walk: _Walk, splits: int):
    return lambda meta: (splits, triton.cdiv(walk.C, meta["BLOCK_C"]))


def _merge_blocks(splits: int) -> dict:
    """Tile of the merge kernels: all splits of a channel in few loads, as splits are read serially."""
    if INTERPRETING:
        return dict(BLOCK_SPLITS=2, BLOCK_C=4)
    block_splits = min(128, triton.next_power_of_2(splits))
    return dict(BLOCK_SPLITS=block_splits, BLOCK_C=max(16, min(256, 2048 // block_splits)))


def _merge_grid(walk: _Walk, blocks: dict):
    return (triton.cdiv(walk.C, blocks["BLOCK_C"]),)


def _launch_batch_stats(x: Tensor, walk: _Walk, running_mean=None, running_var=None, momentum=0.0):
    """(mean, biased var); updates ``running_mean`` / ``running_var`` in the same launch when given."""
    update_running = running_mean is not None and running_var is not None
    splits = _num_splits(walk, x.device)
    part_mean, part_m2, part_count = torch.empty((3, splits, walk.C), device=x.device, dtype=torch.float32)
    shift, mean, var = (torch.empty(walk.C, device=x.device, dtype=torch.float32) for _ in range(3))
    _batch_stats_partial[walk.channels_last][_splits_grid(walk, splits)](
        x, shift, part_mean, part_m2, part_count, walk.N, walk.C, walk.S, splits, CHANNELS_LAST=walk.channels_last
    )
    blocks = _merge_blocks(splits)
    _batch_stats_merge_kernel[_merge_grid(walk, blocks)](
        shift, part_mean, part_m2, part_count, mean, var,
        running_mean if update_running else mean, running_var if update_running else var, float(momentum),
        walk.C, splits, UPDATE_RUNNING=update_running, **blocks,
    )
    return mean, var


def _launch_normalize_activate(x, walk, mean, var, weight, bias, eps, activation) -> None:
    w, b, has_weight, has_bias = _affine_args(x, weight, bias)
    _normalize_activate[walk.channels_last][_tiles_grid(walk)](
        x, mean.contiguous(), var.contiguous(), w, b, walk.N, walk.C, walk.S, eps, activation.param,
        HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, ACTIVATION=activation.name, CHANNELS_LAST=walk.channels_last,
    )


def _launch_backward_reduce(z, grad_z, walk, weight, bias, eps, activation, eval_dx=None, var=None, param_grads=False):
    """Both backward sums; with ``eval_dx`` (a tensor like ``z``) also writes the eval-mode ``dx``.
    With ``param_grads``, returns ``(sum_dy, sum_dy_xhat, grad_weight, grad_bias)``."""
    splits = _num_splits(walk, z.device)
    part_dy, part_dy_xhat = torch.empty((2, splits, walk.C), device=z.device, dtype=torch.float32)
    w, b, has_weight, has_bias = _affine_args(z, weight, bias)
    _backward_reduce_partial[walk.channels_last][_splits_grid(walk, splits)](
        z, grad_z, w, b, part_dy, part_dy_xhat,
        eval_dx if eval_dx is not None else z, var.contiguous() if var is not None else z,
        walk.N, walk.C, walk.S, splits, eps, activation.param,
        HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, ACTIVATION=activation.name, EVAL_DX=eval_dx is not None,
        CHANNELS_LAST=walk.channels_last,
    )
    sum_dy, sum_dy_xhat = (torch.empty(walk.C, device=z.device, dtype=torch.float32) for _ in range(2))
    grad_weight = sum_dy_xhat if weight is None or not param_grads else w.new_empty(walk.C)
    grad_bias = sum_dy if bias is None or not param_grads else b.new_empty(walk.C)
    blocks = _merge_blocks(splits)
    _backward_sums_merge_kernel[_merge_grid(walk, blocks)](
        part_dy, part_dy_xhat, sum_dy, sum_dy_xhat, w, grad_weight, grad_bias, walk.C, splits,
        PARAM_GRADS=param_grads, HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, **blocks,
    )
    if param_grads:
        return sum_dy, sum_dy_xhat, grad_weight, grad_bias
    return sum_dy, sum_dy_xhat


def _launch_backward_dx(z, grad_z, walk, var, weight, bias, sum_dy, sum_dy_xhat, count, eps, activation):
    dx = torch.empty_like(z)
    w, b, has_weight, has_bias = _affine_args(z, weight, bias)
    training = count is not None
    _backward_dx[walk.channels_last][_tiles_grid(walk)](
        z, grad_z, dx, var.contiguous(), w, b,
        sum_dy.contiguous() if training else z, sum_dy_xhat.contiguous() if training else z,
        walk.N, walk.C, walk.S, 1.0 / count if training else 0.0, eps, activation.param,
        HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, ACTIVATION=activation.name, TRAINING=training,
        CHANNELS_LAST=walk.channels_last,
    )
    return dx


# ---------------------------------------------------------------------------------------------------
# The backend interface (that of eager.py)
# ---------------------------------------------------------------------------------------------------


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x``, in float32."""
    if _eager_only(x):
        return eager.batch_stats(x)
    x, walk = _with_walk(x)
    with _device(x):
        return _launch_batch_stats(x, walk)


def normalize_activate_(x, mean, var, weight, bias, eps: float, activation: Activation, shortcut=None) -> None:
    """``act(gamma * (x - mean) / sqrt(var + eps) + b)`` written over ``x``."""
    if not _covered(x, activation, shortcut):
        return eager.normalize_activate_(x, mean, var, weight, bias, eps, activation, shortcut)
    work, walk = _with_walk(x)
    with _device(x):
        _launch_normalize_activate(work, walk, mean, var, weight, bias, eps, activation)
    if work is not x:
        x.copy_(work)


def forward_train_(
    x, weight, bias, eps: float, activation: Activation, running_mean=None, running_var=None, momentum=0.0,
    shortcut=None,
) -> tuple[Tensor, Tensor]:
    """Batch statistics, then normalize + activate in place; returns (mean, biased var). Given
    running statistics, also updates them."""
    if not _covered(x, activation, shortcut):
        return eager.forward_train_(x, weight, bias, eps, activation, running_mean, running_var, momentum, shortcut)
    work, walk = _with_walk(x)
    with _device(x):
        if running_mean is not None and running_var is not None and not (
            running_mean.is_contiguous() and running_var.is_contiguous()
        ):  # strided views (never the layers' buffers): updated by the eager ops instead
            mean, var = _launch_batch_stats(work, walk)
            eager.update_running_stats_(running_mean, running_var, mean, var, walk.count, momentum)
        else:
            mean, var = _launch_batch_stats(work, walk, running_mean, running_var, momentum)
        _launch_normalize_activate(work, walk, mean, var, weight, bias, eps, activation)
    if work is not x:
        x.copy_(work)
    return mean, var


def backward_reduce(z, grad_z, weight, bias, eps: float, activation: Activation, shortcut=None, bits=None):
    """Per-channel ``sum(dy)`` and ``sum(dy * xhat)``, in float32."""
    if not _covered(z, activation, shortcut, bits):
        return eager.backward_reduce(z, grad_z, weight, bias, eps, activation, shortcut, bits)
    z, walk = _with_walk(z)
    grad_z = _like(grad_z, z, walk)
    with _device(z):
        return _launch_backward_reduce(z, grad_z, walk, weight, bias, eps, activation)


def backward_apply(
    z, grad_z, var, weight, bias, sum_dy, sum_dy_xhat, count: Optional[int], eps: float, activation: Activation,
    shortcut=None, bits=None,
):
    """``dx`` from the two sums; ``count`` elements per channel, ``None`` for eval mode."""
    if not _covered(z, activation, shortcut, bits):
        return eager.backward_apply(z, grad_z, var, weight, bias, sum_dy, sum_dy_xhat, count, eps, activation,
                                    shortcut, bits)
    z, walk = _with_walk(z)
    grad_z = _like(grad_z, z, walk)
    with _device(z):
        return _launch_backward_dx(z, grad_z, walk, var, weight, bias, sum_dy, sum_dy_xhat, count, eps, activation)


def backward(z, grad_z, var, weight, bias, eps: float, activation: Activation, training: bool, shortcut=None,
             bits=None):
    """The whole backward on one process: returns ``(dx, grad_weight, grad_bias)`` (as
    ``eager.backward``). Two passes over ``z`` and ``dz`` in training, one in eval mode."""
    if not _covered(z, activation, shortcut, bits):
        return eager.backward(z, grad_z, var, weight, bias, eps, activation, training, shortcut, bits)
    z, walk = _with_walk(z)
    grad_z = _like(grad_z, z, walk)
    with _device(z):
        if not training:
            dx = torch.empty_like(z)
            _, _, grad_weight, grad_bias = _launch_backward_reduce(
                z, grad_z, walk, weight, bias, eps, activation, eval_dx=dx, var=var, param_grads=True
            )
            return dx, grad_weight, grad_bias
        sum_dy, sum_dy_xhat, grad_weight, grad_bias = _launch_backward_reduce(
            z, grad_z, walk, weight, bias, eps, activation, param_grads=True
        )
        dx = _launch_backward_dx(z, grad_z, walk, var, weight, bias, sum_dy, sum_dy_xhat, walk.count, eps, activation)
        return dx, grad_weight, grad_bias
