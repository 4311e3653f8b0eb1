"""Backends: interchangeable implementations of the same per-channel primitives.

Each backend module provides ``batch_stats``, ``normalize_activate_``, ``forward_train_``,
``backward_reduce``, ``backward_apply`` and ``backward`` with the signatures of :mod:`.eager`, the
reference they are all tested against. :func:`select` picks one per call from the tensor and the
environment variable ``INPLACE_ABN_BACKEND`` = ``auto`` (default) | ``eager`` | ``compiled`` | ``triton``.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from . import compiled, eager

BACKENDS = ("auto", "eager", "compiled", "triton")
ENV_VAR = "INPLACE_ABN_BACKEND"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton():
    from . import triton as triton_backend  # imported lazily: importing triton is slow

    return triton_backend


def requested() -> str:
    """The backend named by ``INPLACE_ABN_BACKEND``; raises ``ValueError`` for an unknown name."""
    return _parse(os.environ.get(ENV_VAR))


@functools.lru_cache(maxsize=16)  # read on every call of every layer; the variable may change any time
def _parse(value) -> str:
    choice = (value or "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={choice!r} is not a backend: use one of {', '.join(BACKENDS)}.")
    return choice


def _triton_runs(activation, shortcut, recompute: bool) -> bool:
    """Whether the Triton kernels cover the call: in place, no shortcut, an activation they implement;
    the rest runs the eager math."""
    return not recompute and shortcut is None and (activation is None or activation.name in TRITON_ACTIVATIONS)


#: activations the Triton kernels implement (their ``_activate``); the others run the eager math on CUDA
TRITON_ACTIVATIONS = ("leaky_relu", "elu", "identity")


def select(x: torch.Tensor, activation=None, shortcut=None, recompute: bool = False):
    """The backend module that runs the layer on ``x`` (with this activation, shortcut and mode)."""
    if torch.compiler.is_compiling():
        # Inside the user's torch.compile: trace the plain ops and let the outer compiler fuse them.
        return eager
    choice = requested()
    if choice == "eager":
        return eager
    if choice == "compiled":
        return compiled
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV_VAR}=triton, but triton is not installed: pip install triton.")
        if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"{ENV_VAR}=triton needs a CUDA tensor, or TRITON_INTERPRET=1 (set before triton is first "
                f"imported) to run the kernels on {x.device.type} tensors in Triton's interpreter."
            )
        return _triton() if _triton_runs(activation, shortcut, recompute) else eager
    # auto
    if x.device.type == "cuda" and x.dtype != torch.float64 and triton_available():
        return _triton() if _triton_runs(activation, shortcut, recompute) else eager
    if x.device.type == "cpu" and compiled.available():
        return compiled
    return eager
