"""The eager math compiled by ``torch.compile`` (Inductor: C++/OpenMP on CPU), fused to the fewest passes.

Forward training becomes one Welford reduction over ``x`` and one elementwise pass that writes ``z``
over ``x``; backward one pass for both sums and one that writes ``dx`` (METHOD.md section 5).
Compiled functions are cached per (function, activation, eps, dtype, rank) and compiled with dynamic
shapes, so a network's many layer shapes share one compilation. Each cache entry gets its own copy of
the function's code object, because ``torch.compile`` keeps its recompilation budget per code object.
"""

from __future__ import annotations

import functools
import shutil
import types
import warnings

import torch

from . import eager

_cache: dict = {}
_broken: list[str] = []  # set once compilation failed: every later call takes the eager path


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether Inductor can build CPU kernels here (it needs a C++ compiler)."""
    try:
        from torch._inductor import cpp_builder

        compiler = cpp_builder.get_cpp_compiler()
    except Exception:  # no compiler found, or an Inductor without cpp_builder
        return False
    return shutil.which(compiler) is not None


def _compiled(fn, x: torch.Tensor, **constants):
    key = (fn.__name__, x.dtype, x.dim(), tuple(sorted(constants.items())))
    compiled = _cache.get(key)
    if compiled is None:
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{len(_cache)}")
        clone = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
        compiled = torch.compile(clone, dynamic=True)
        _cache[key] = compiled
    return compiled


def _plain(value):
    # torch.compile takes the shapes of nn.Parameters as static: a Parameter argument would fix the
    # channel count and recompile for every layer width. A detached tensor is an ordinary input.
    return value.detach() if isinstance(value, torch.nn.Parameter) else value


def _run(fn, x, *args, **constants):
    if _broken:
        return fn(x, *args, **constants)
    args = tuple(_plain(arg) for arg in args)
    try:
        return _compiled(fn, x, **constants)(x, *args, **constants)
    except torch._dynamo.exc.BackendCompilerFailed as error:
        _broken.append(str(error))
        warnings.warn(
            f"inplace_abn: torch.compile failed ({type(error).__name__}); falling back to the eager "
            "backend for the rest of this process. Set INPLACE_ABN_BACKEND=eager to silence this.",
            RuntimeWarning,
        )
        return fn(x, *args, **constants)


def batch_stats(x):
    return _run(eager.batch_stats, x)


def normalize_activate_(x, mean, var, weight, bias, eps, activation):
    _run(eager.normalize_activate_, x, mean, var, weight, bias, eps=eps, activation=activation)


def forward_train_(x, weight, bias, eps, activation):
    return _run(eager.forward_train_, x, weight, bias, eps=eps, activation=activation)


def backward_reduce(z, grad_z, weight, bias, eps, activation):
    return _run(eager.backward_reduce, z, grad_z, weight, bias, eps=eps, activation=activation)


def backward_apply(z, grad_z, var, weight, bias, sum_dy, sum_dy_xhat, count, eps, activation):
    return _run(
        eager.backward_apply, z, grad_z, var, weight, bias, sum_dy, sum_dy_xhat, count, eps=eps, activation=activation
    )


def backward(z, grad_z, var, weight, bias, eps, activation, training):
    return _run(eager.backward, z, grad_z, var, weight, bias, eps=eps, activation=activation, training=training)
