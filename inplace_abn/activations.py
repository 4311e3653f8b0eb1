"""The activation table: forward, gradient, inverse and branch of every activation, in one place.

Every backend is held against these definitions (METHOD.md sections 3 and 8). An activation has one
of three *kinds*, which decide how a layer may store it for backward:

* ``invertible``: its input is rebuilt from its output alone (leaky_relu with slope > 0, elu,
  identity): the layer runs in place and keeps only its output.
* ``piecewise``: monotonic on each side of one minimum (silu, gelu, gelu_tanh, mish): in place too,
  with one bit per element that says which side an input was on (:mod:`inplace_abn.piecewise`).
* ``lossy``: information is lost (relu, relu6, hardswish, hardsigmoid, sigmoid and tanh, whose
  saturation rounds away the input): the layer keeps its input instead and rebuilds the output
  where backward needs it (:mod:`inplace_abn.recompute`).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from . import piecewise

Tensor = torch.Tensor
aten = torch.ops.aten

#: Names accepted for ``activation``, by kind; ``activation_param`` is leaky_relu's slope, elu's alpha.
INVERTIBLE = ("leaky_relu", "elu", "identity")
PIECEWISE = ("silu", "gelu", "gelu_tanh", "mish")
LOSSY = ("relu", "relu6", "hardswish", "hardsigmoid", "sigmoid", "tanh")
ACTIVATIONS = INVERTIBLE + PIECEWISE + LOSSY
_ALIASES = {"none": "identity", "swish": "silu", "hard_swish": "hardswish", "hard_sigmoid": "hardsigmoid"}
_PARAMETRIZED = ("leaky_relu", "elu")


def activate(y: Tensor, name: str, param: float) -> Tensor:
    """``z = act(y)`` by canonical name (the standard ops); TorchScript compiles it too (the layers'
    export path, :func:`inplace_abn.functions.batch_norm_act`)."""
    if name == "leaky_relu":
        return F.leaky_relu(y, param)
    if name == "elu":
        return F.elu(y, param)
    if name == "relu":
        return F.relu(y)
    if name == "relu6":
        return F.relu6(y)
    if name == "hardswish":
        return F.hardswish(y)
    if name == "hardsigmoid":
        return F.hardsigmoid(y)
    if name == "silu":
        return F.silu(y)
    if name == "gelu":
        return F.gelu(y)
    if name == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if name == "mish":
        return F.mish(y)
    if name == "sigmoid":
        return torch.sigmoid(y)
    if name == "tanh":
        return torch.tanh(y)
    return y  # identity


@dataclasses.dataclass(frozen=True)
class Activation:
    """An activation function with its parameter (slope of leaky_relu, alpha of elu; else 0)."""

    name: str
    param: float = 0.0

    @property
    def kind(self) -> str:
        """``"invertible"``, ``"piecewise"`` or ``"lossy"`` (see the module docstring)."""
        if self.name == "leaky_relu":
            return "invertible" if self.param > 0 else "lossy"
        if self.name in INVERTIBLE:
            return "invertible"
        if self.name in PIECEWISE:
            return "piecewise"
        return "lossy"

    @property
    def invertible(self) -> bool:
        """Whether ``y`` can be recovered from ``act(y)`` alone."""
        return self.kind == "invertible"

    @property
    def in_place(self) -> bool:
        """Whether a layer with this activation can write its output over its input and keep only the
        output (and, for a piecewise activation, one bit per element)."""
        return self.kind != "lossy"

    def forward(self, y: Tensor) -> Tensor:
        return activate(y, self.name, self.param)

    def grad_from_input(self, y: Tensor, grad_z: Tensor) -> Tensor:
        """``dL/dy`` from the input ``y`` and ``dL/dz``: autograd's own formulas (ATen's backward ops),
        so a layer that rebuilds ``y`` gives the gradients of the standard ops."""
        name = self.name
        if name == "leaky_relu":
            return aten.leaky_relu_backward(grad_z, y, self.param, False)
        if name == "elu":
            return aten.elu_backward(grad_z, self.param, 1.0, 1.0, False, y)
        if name == "relu":
            return aten.threshold_backward(grad_z, y, 0)
        if name == "relu6":
            return aten.hardtanh_backward(grad_z, y, 0.0, 6.0)
        if name == "hardswish":
            return aten.hardswish_backward(grad_z, y)
        if name == "hardsigmoid":
            return aten.hardsigmoid_backward(grad_z, y)
        if name == "silu":
            return aten.silu_backward(grad_z, y)
        if name == "gelu":
            return aten.gelu_backward(grad_z, y)
        if name == "gelu_tanh":
            return aten.gelu_backward(grad_z, y, approximate="tanh")
        if name == "mish":
            return aten.mish_backward(grad_z, y)
        if name == "sigmoid":
            return aten.sigmoid_backward(grad_z, torch.sigmoid(y))
        if name == "tanh":
            return aten.tanh_backward(grad_z, torch.tanh(y))
        return grad_z

    # --- in place: from the output --------------------------------------------------------------

    def forward_in_place(self, y: Tensor) -> Tensor:
        """The output an in-place layer stores: :meth:`forward`, except for GELU, computed without
        PyTorch's cancellation in ``1 + erf`` (``1 + tanh``), which would leave the left tail's output
        without the digits its input is rebuilt from (it differs from ``F.gelu`` by less than
        ``F.gelu``'s own rounding error; docs/activations.md)."""
        if self.name in piecewise.CANCELLATION_FREE:
            return piecewise.CANCELLATION_FREE[self.name].forward(y)
        return self.forward(y)

    def _piecewise(self):
        return piecewise.CANCELLATION_FREE.get(self.name) or piecewise.PIECEWISE[self.name]

    def branch(self, y: Tensor) -> Tensor:
        """Piecewise activations: the side of the minimum each element of ``y`` is on (True: left)."""
        return self._piecewise().branch(y)

    def inverse(self, z: Tensor, left: Optional[Tensor] = None, storage_dtype: Optional[torch.dtype] = None) -> Tensor:
        """``y`` from ``z = act(y)`` (the :meth:`forward_in_place` output); a piecewise activation also
        needs the :meth:`branch` mask, and ``storage_dtype``, the dtype ``z`` was stored in when coarser
        than its dtype here (float16, bfloat16)."""
        if self.name == "leaky_relu":
            return torch.where(z >= 0, z, z * (1.0 / self.param))  # a product is cheaper than a quotient
        if self.name == "elu":
            # exp(y) - 1 rounds to -1 for y far below zero: clamp so the log stays finite.
            # Such elements have a (numerically) zero gradient dy; only their xhat is approximate.
            ratio = torch.clamp_min(z * (1.0 / self.param), -1.0 + torch.finfo(z.dtype).eps)
            return torch.where(z >= 0, z, torch.log1p(ratio))
        if self.kind == "piecewise":
            return self._piecewise().inverse(z, left, storage_dtype)
        if self.name == "identity":
            return z
        raise ValueError(f"{self.name} is not invertible: its input cannot be rebuilt from its output")

    def grad_input(self, z: Tensor, grad_z: Tensor) -> Tensor:
        """``dL/dy`` from the output ``z`` and ``dL/dz``, for invertible activations (and relu)."""
        if self.name == "leaky_relu":
            return torch.where(z >= 0, grad_z, grad_z * self.param)
        if self.name == "elu":
            return torch.where(z >= 0, grad_z, grad_z * (z + self.param))
        if self.name == "relu":
            return torch.where(z > 0, grad_z, torch.zeros_like(grad_z))
        if self.name == "identity":
            return grad_z
        raise ValueError(f"the gradient of {self.name} is not a function of its output alone")


def make_activation(name: str, param: float = 0.0) -> Activation:
    """Validate ``name`` and ``param`` and return the :class:`Activation`; raises a clear ``ValueError``."""
    if not isinstance(name, str):
        raise TypeError(f"activation must be a string, one of {ACTIVATIONS}; got {type(name).__name__}")
    if torch.compiler.is_compiling():  # traced once by torch.compile: no cache (Dynamo warns about one)
        return _make_activation.__wrapped__(name, param)
    return _make_activation(name, param)


@functools.lru_cache(maxsize=64)  # layers call this on every forward
def _make_activation(name: str, param) -> Activation:
    canonical = _ALIASES.get(name.lower(), name.lower())
    if canonical not in ACTIVATIONS:
        raise ValueError(
            f"Unknown activation {name!r}: use one of {', '.join(ACTIVATIONS)} (or 'none' for identity)."
        )
    param = float(param) if param is not None else 0.0
    if canonical == "leaky_relu" and param < 0:
        raise ValueError(
            f"leaky_relu needs a slope >= 0 (got activation_param={param}); a negative slope is not "
            "invertible. Use a small positive slope such as 0.01."
        )
    if canonical == "elu" and param <= 0:
        raise ValueError(f"elu needs alpha > 0 (got activation_param={param}); the usual value is 1.0.")
    if canonical == "leaky_relu" and param == 0:
        canonical = "relu"  # the same function; one name, so one compiled graph and one code path
    if canonical not in _PARAMETRIZED:
        param = 0.0
    return Activation(canonical, param)


def describe(activation: Activation) -> str:
    """``leaky_relu[0.01]``, ``silu``: the name, with the parameter where it has one."""
    if activation.name in _PARAMETRIZED:
        return f"{activation.name}[{activation.param}]"
    return activation.name


_warned_outside: set[Activation] = set()


def warn_outside_recompute(activation: Activation) -> None:
    """Warn once per activation that a recompute-mode layer ran without the recompute hooks."""
    if activation in _warned_outside:
        return
    _warned_outside.add(activation)
    warnings.warn(
        f"A recompute-mode layer ({describe(activation)}: RecomputeABN, or InPlaceABN with an activation that "
        "cannot run in place) was trained outside inplace_abn.enable_recompute(model): it is exact, but the "
        "next layer stores its own copy of the output, so no memory is saved. Call "
        "inplace_abn.enable_recompute(model) once (convert_to_abn does), or wrap the forward in "
        "inplace_abn.recompute_scope().",
        UserWarning,
        stacklevel=4,
    )
