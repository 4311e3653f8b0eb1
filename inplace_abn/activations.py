"""The activation table: forward, inverse and gradient-from-output, in one place.

Every backend is held against these definitions (METHOD.md section 3). An activation is
*invertible* when its input can be rebuilt from its output alone; only those may run in place.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import torch
import torch.nn.functional as F

#: Names accepted for ``activation``; ``"none"`` is an alias of ``"identity"`` kept for old code.
ACTIVATIONS = ("leaky_relu", "elu", "relu", "identity")
_ALIASES = {"none": "identity"}


@dataclasses.dataclass(frozen=True)
class Activation:
    """An activation function with its parameter (slope of leaky_relu, alpha of elu)."""

    name: str
    param: float = 0.0

    @property
    def invertible(self) -> bool:
        """Whether ``y`` can be recovered from ``act(y)``, the condition for running in place."""
        if self.name == "relu":
            return False
        if self.name == "leaky_relu":
            return self.param > 0
        return True

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.name == "leaky_relu":
            return F.leaky_relu(y, self.param)
        if self.name == "elu":
            return F.elu(y, self.param)
        if self.name == "relu":
            return F.relu(y)
        return y

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """``y`` from ``z = act(y)``; only for invertible activations."""
        if self.name == "leaky_relu":
            return torch.where(z >= 0, z, z * (1.0 / self.param))  # a product is cheaper than a quotient
        if self.name == "elu":
            # exp(y) - 1 rounds to -1 for y far below zero: clamp so the log stays finite.
            # Such elements have a (numerically) zero gradient dy; only their xhat is approximate.
            ratio = torch.clamp_min(z * (1.0 / self.param), -1.0 + torch.finfo(z.dtype).eps)
            return torch.where(z >= 0, z, torch.log1p(ratio))
        return z

    def grad_input(self, z: torch.Tensor, grad_z: torch.Tensor) -> torch.Tensor:
        """``dL/dy`` from the output ``z`` and ``dL/dz``."""
        if self.name == "leaky_relu":
            return torch.where(z >= 0, grad_z, grad_z * self.param)
        if self.name == "elu":
            return torch.where(z >= 0, grad_z, grad_z * (z + self.param))
        if self.name == "relu":
            return torch.where(z > 0, grad_z, torch.zeros_like(grad_z))
        return grad_z


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
    if canonical in ("relu", "identity"):
        param = 0.0
    return Activation(canonical, param)


_warned_not_invertible: set[Activation] = set()


def warn_not_invertible(activation: Activation) -> None:
    """Warn once per activation that an in-place layer with it keeps its input and saves no memory."""
    if activation in _warned_not_invertible:
        return
    _warned_not_invertible.add(activation)
    what = "relu" if activation.name == "relu" else "leaky_relu with slope 0"
    warnings.warn(
        f"InPlaceABN with {what} is not invertible: the layer keeps its input, as ABN does, so its "
        "gradients stay exact but it saves no memory. Use activation='leaky_relu' with a slope such as "
        "activation_param=0.01 to run in place.",
        UserWarning,
        stacklevel=3,
    )
