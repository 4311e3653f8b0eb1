"""The eager math compiled by Inductor (C++/OpenMP on CPU), fused to the fewest passes.

Forward training becomes one kernel: the mean and the variance (two reductions over ``x``), the
running-statistics update, and one elementwise pass that writes ``z`` over ``x``. Backward is one
pass for both sums and one that writes ``dx`` (METHOD.md section 5). Nothing full-size is allocated
but ``dx``.

Each function of :mod:`.eager` is traced once per *signature* (dtypes, rank, memory layout, which
dims are 1, and the non-tensor arguments: eps, activation, ...) into an FX graph with symbolic
sizes, and compiled by ``torch._inductor.standalone_compile``. The compiled graph is then called
directly: no Dynamo frame evaluation, guards or recompilation checks on the hot path, which cost
more than the kernels themselves on small layers. Because nothing guards the call, the cache key
carries everything a graph was specialized on, and inputs whose layout is neither contiguous nor
channels_last run the eager math instead.
"""

from __future__ import annotations

import functools
import math
import shutil
import warnings
from typing import Callable, Optional

import torch

from . import eager

_cache: dict = {}
_broken: list[str] = []  # set once compilation failed: every later call takes the eager path

# Sizes of the example tensors a graph is traced with: distinct, so that no two dims share a size
# symbol (a graph traced with H == W would assume square inputs), and >= 2, so none is specialized.
_TRACE_SIZES = (3, 5, 7, 11, 13)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether Inductor can build CPU kernels here (it needs a C++ compiler) and this torch has
    ``torch._inductor.standalone_compile``."""
    try:
        from torch._inductor import cpp_builder, standalone_compile  # noqa: F401

        compiler = cpp_builder.get_cpp_compiler()
    except Exception:  # no compiler found, or an older Inductor
        return False
    return shutil.which(compiler) is not None


def _layout(t: torch.Tensor) -> Optional[str]:
    """The memory layouts the graphs are built for; ``None`` for any other."""
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last"
    return None


def _example(t: torch.Tensor, x: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor to trace with, standing for the argument ``t`` of a call whose input is ``x``."""
    sizes = [1 if size == 1 else _TRACE_SIZES[dim] for dim, size in enumerate(x.shape)]
    if t.dim() == x.dim():  # full-size (x, z, grad_z)
        if layout == "channels_last":
            fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
            return torch.zeros(sizes, dtype=t.dtype).to(memory_format=fmt)
        return torch.zeros(sizes, dtype=t.dtype)
    if t.dtype == torch.uint8:  # packed branch bits: one bit per element of x
        return torch.zeros((math.prod(sizes) + 7) // 8, dtype=t.dtype)
    if t.dim() == 0 or t.numel() == 1:  # a scalar (momentum: one element); per channel when C == 1 too
        return torch.ones(t.shape, dtype=t.dtype)
    return torch.ones(sizes[1], dtype=t.dtype)  # per channel


def _compile(fn: Callable, args: tuple, x: torch.Tensor, layout: str) -> Callable:
    """Trace ``fn`` with the tensors of ``args`` symbolic and everything else fixed, and compile it."""
    from torch.fx.experimental.proxy_tensor import make_fx

    positions = [i for i, arg in enumerate(args) if isinstance(arg, torch.Tensor)]

    returns = []  # what fn returns: None, one tensor, or a tuple of tensors

    def graph(*tensors):
        full = list(args)
        for i, tensor in zip(positions, tensors):
            full[i] = tensor
        out = fn(*full)
        returns.append(type(out))
        return (out,) if isinstance(out, torch.Tensor) else () if out is None else tuple(out)

    examples = [_example(args[i], x, layout) for i in positions]
    with warnings.catch_warnings():  # torch's own deprecation notices from its internals
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        module = make_fx(graph, tracing_mode="symbolic")(*examples)
        artifact = torch._inductor.standalone_compile(module, examples, dynamic_shapes="from_graph")
    kind = returns[0]

    def call(*tensors):
        out = artifact(*tensors)
        return None if kind is type(None) else out[0] if issubclass(kind, torch.Tensor) else tuple(out)

    return call


def _key(fn: Callable, args: tuple, layout: str) -> Optional[tuple]:
    """What a graph for this call is specialized on; ``None`` when no graph fits the arguments."""
    x = args[0]
    rank = x.dim()
    key = [fn, layout, tuple(size == 1 for size in x.shape)]
    for arg in args:
        if isinstance(arg, torch.Tensor):
            dim = arg.dim()
            if dim == rank and arg is not x and _layout(arg) != layout:
                return None
            if dim == 1 and arg.stride(0) != 1 and arg.shape[0] > 1:  # strided per-channel values
                return None
            key.append(arg.dtype)
            key.append(dim)
        else:
            key.append(arg)
    return tuple(key)


def _run(fn: Callable, *args):
    x = args[0]
    layout = _layout(x)
    key = None if _broken or layout is None or x.numel() == 0 else _key(fn, args, layout)
    if key is None:
        return fn(*args)
    compiled = _cache.get(key)
    if compiled is None:
        try:
            compiled = _cache[key] = _compile(fn, args, x, layout)
        except Exception as error:  # any compiler failure: never fail the training step for it
            _broken.append(repr(error))
            warnings.warn(
                f"inplace_abn: compiling the fused CPU kernels failed ({type(error).__name__}: {error}); "
                "falling back to the eager backend for the rest of this process. "
                "Set INPLACE_ABN_BACKEND=eager to silence this.",
                RuntimeWarning,
            )
            return fn(*args)
    tensors = [arg for arg in args if isinstance(arg, torch.Tensor)]
    if torch.is_grad_enabled():  # called outside the autograd Function: record nothing
        with torch.no_grad():
            return compiled(*tensors)
    return compiled(*tensors)


def batch_stats(x):
    return _run(eager.batch_stats, x)


def normalize_activate(x, mean, var, weight, bias, eps, activation, shortcut=None, batchnorm_weight=False):
    return _run(eager.normalize_activate, x, mean, var, weight, bias, eps, activation, shortcut, batchnorm_weight)


def normalize_activate_(x, mean, var, weight, bias, eps, activation, shortcut=None):
    return _run(eager.normalize_activate_, x, mean, var, weight, bias, eps, activation, shortcut)


@functools.lru_cache(maxsize=64)
def _scalar(value: float, dtype: torch.dtype) -> torch.Tensor:
    # One element, not 0-dim: torch 2.14's standalone_compile fails on arithmetic with a 0-dim float64
    # graph input that updates two buffers (TensorifyScalarRestartAnalysis).
    return torch.tensor([value], dtype=dtype)


def _momentum(running_mean, running_var, momentum):
    if running_mean is not None and running_var is not None:
        # A graph input, not a constant: momentum=None (a cumulative average) changes it every step.
        return _scalar(float(momentum), running_mean.dtype)
    return 0.0  # unused: a fixed value, so that it does not enter the graph's key


def forward_train_(x, weight, bias, eps, activation, running_mean=None, running_var=None, momentum=0.0, shortcut=None):
    momentum = _momentum(running_mean, running_var, momentum)
    return _run(eager.forward_train_, x, weight, bias, eps, activation, running_mean, running_var, momentum, shortcut)


def forward_train(x, weight, bias, eps, activation, running_mean=None, running_var=None, momentum=0.0, shortcut=None,
                  batchnorm_weight=False):
    momentum = _momentum(running_mean, running_var, momentum)
    return _run(eager.forward_train, x, weight, bias, eps, activation, running_mean, running_var, momentum, shortcut,
                batchnorm_weight)


def backward_reduce(z, grad_z, weight, bias, eps, activation, shortcut=None, bits=None):
    return _run(eager.backward_reduce, z, grad_z, weight, bias, eps, activation, shortcut, bits)


def backward_apply(z, grad_z, var, weight, bias, sum_dy, sum_dy_xhat, count, eps, activation, shortcut=None, bits=None):
    return _run(eager.backward_apply, z, grad_z, var, weight, bias, sum_dy, sum_dy_xhat, count, eps, activation,
                shortcut, bits)


def backward(z, grad_z, var, weight, bias, eps, activation, training, shortcut=None, bits=None):
    return _run(eager.backward, z, grad_z, var, weight, bias, eps, activation, training, shortcut, bits)


def recompute_backward_reduce(x, grad_z, mean, var, weight, bias, eps, activation, shortcut=None,
                              batchnorm_weight=False):
    return _run(eager.recompute_backward_reduce, x, grad_z, mean, var, weight, bias, eps, activation, shortcut,
                batchnorm_weight)


def recompute_backward_apply(x, grad_z, mean, var, weight, bias, sum_dy, sum_dy_xhat, count, eps, activation,
                             shortcut=None, batchnorm_weight=False):
    return _run(eager.recompute_backward_apply, x, grad_z, mean, var, weight, bias, sum_dy, sum_dy_xhat, count, eps,
                activation, shortcut, batchnorm_weight)


def recompute_backward(x, grad_z, mean, var, weight, bias, eps, activation, training, shortcut=None,
                       batchnorm_weight=False):
    return _run(eager.recompute_backward, x, grad_z, mean, var, weight, bias, eps, activation, training, shortcut,
                batchnorm_weight)
