"""Outputs rebuilt in backward instead of stored: the saved-tensor hooks behind the recompute mode
(the paper's "computationally efficient checkpointing", METHOD.md section 8 (c)).

A layer in recompute mode (:class:`~inplace_abn.RecomputeABN`, an :class:`~inplace_abn.InPlaceABN` with a
lossy activation, :func:`~inplace_abn.functions.channel_gate`) keeps its input and marks its output
with a *recipe*: a function that rebuilds it elementwise from what the layer keeps anyway. While the
hooks are active, any op that would save such an output for its own backward (the next convolution,
an SE multiply, a pooling) saves a reference to the recipe instead, and the output is rebuilt, one
elementwise pass, when that op's backward runs. Outside the hooks the outputs are saved as usual:
exact either way, and memory is saved only under the hooks.

    >>> model = inplace_abn.enable_recompute(model)     # hooks active during model's forward
    >>> with inplace_abn.recompute_scope():             # or around any code
    ...     loss = criterion(model(x), y)

Autograd does not check saved tensors for later in-place changes when saved-tensor hooks are active,
so these hooks do it themselves: a tensor changed in place after it was saved raises autograd's error.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable

import torch
from torch import nn

__all__ = ["enable_recompute", "disable_recompute", "recompute_scope", "active", "register_recipe", "is_recomputed"]

_RECIPE = "_inplace_abn_recipe"  # attribute of an output tensor: (rebuild, version at creation)
_state = threading.local()  # saved-tensor hooks are per thread, and so is this depth


def active() -> bool:
    """Whether the hooks are active in this thread (a recompute-mode output is then not stored)."""
    return getattr(_state, "depth", 0) > 0


def register_recipe(output: torch.Tensor, rebuild: Callable[[], torch.Tensor]) -> None:
    """Mark ``output`` as rebuilt by ``rebuild()`` (a fresh tensor of the same values, sizes and
    strides) wherever it is saved for backward while the hooks are active and it is unchanged."""
    setattr(output, _RECIPE, (rebuild, output._version))


def is_recomputed(tensor: torch.Tensor) -> bool:
    """Whether saving ``tensor`` now would store a recipe instead of the tensor."""
    return _recipe_of(tensor) is not None


def _recipe_of(tensor: torch.Tensor):
    base = tensor if tensor._base is None else tensor._base
    recipe = getattr(base, _RECIPE, None)
    if recipe is None or recipe[1] != base._version:  # changed in place since: its values are not the recipe's
        return None
    return recipe[0]


class _Stored:
    """A saved tensor kept as it is, with the version it had when saved."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.version = tensor._version


class _Rebuilt:
    """A saved recompute-mode output: its recipe and where in the output the saved tensor sits."""

    __slots__ = ("rebuild", "view")

    def __init__(self, rebuild: Callable[[], torch.Tensor], tensor: torch.Tensor):
        self.rebuild = rebuild
        self.view = None if tensor._base is None else (tensor.size(), tensor.stride(), tensor.storage_offset())


def _pack(tensor: torch.Tensor):
    rebuild = _recipe_of(tensor)
    if rebuild is None:
        return _Stored(tensor)
    return _Rebuilt(rebuild, tensor)


def _unpack(saved):
    if isinstance(saved, _Rebuilt):
        output = saved.rebuild()
        return output if saved.view is None else output.as_strided(*saved.view)
    tensor = saved.tensor
    if tensor._version != saved.version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an inplace "
            f"operation: [{tensor.type()} {list(tensor.shape)}] is at version {tensor._version}; expected "
            f"version {saved.version} instead. (Checked by inplace_abn's recompute hooks, which were active "
            "when it was saved: an op changed in place a tensor that an earlier op had saved for backward.)"
        )
    return tensor


@contextlib.contextmanager
def recompute_scope():
    """Activate the hooks for the code inside (a no-op under ``torch.compile``, which picks what to save
    itself)."""
    if torch.compiler.is_compiling():
        yield
        return
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _state.depth -= 1


def _enter(module: nn.Module, args) -> None:
    if torch.compiler.is_compiling():
        return
    scope = recompute_scope()
    scope.__enter__()
    # Per thread, last in first out: forwards nest, and each thread has its own hooks (DataParallel).
    _state.__dict__.setdefault("scopes", []).append(scope)


def _exit(module: nn.Module, args, output) -> None:
    if torch.compiler.is_compiling():
        return
    scopes = _state.__dict__.get("scopes")
    if scopes:
        scopes.pop().__exit__(None, None, None)


def enable_recompute(model: nn.Module) -> nn.Module:
    """Activate the hooks during every forward of ``model`` (forward pre- and post-hooks on it; the
    post-hook also runs when the forward raises). Idempotent; returns ``model``. ``torch.jit.script``
    compiles a module's hooks, and these are Python: call :func:`disable_recompute` before scripting
    (``torch.compile``, ``torch.export`` and ONNX export are fine with them)."""
    if not getattr(model, "_inplace_abn_recompute", False):
        model.register_forward_pre_hook(_enter)
        model.register_forward_hook(_exit, always_call=True)
        model._inplace_abn_recompute = True
    return model


def disable_recompute(model: nn.Module) -> nn.Module:
    """Remove what :func:`enable_recompute` put on ``model`` (also on a deep copy of it); returns ``model``."""
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key, hook in list(hooks.items()):
            if hook is _enter or hook is _exit:
                del hooks[key]
                model._forward_hooks_always_called.pop(key, None)
    vars(model).pop("_inplace_abn_recompute", None)
    return model
