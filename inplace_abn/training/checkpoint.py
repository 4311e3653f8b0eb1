"""Checkpoints written atomically (a temporary file in the same folder, then ``os.replace``), and the
random-number-generator states that make a resumed run repeat the uninterrupted one."""

from __future__ import annotations

import os
import random
import tempfile
from typing import Any, Dict

import torch


def rng_states() -> Dict[str, Any]:
    """Every generator a training step may draw from: Python, NumPy, torch CPU and CUDA."""
    states: Dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        states["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Dict[str, Any]) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "numpy" in states:
        import numpy as np

        np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    """Write ``state`` to ``path`` so that ``path`` always holds a whole checkpoint: the old one until
    the new one is completely on disk. A crash mid-write leaves at most a stray temporary file,
    which is removed when the failure is an exception."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found")
    # our own files: they hold RNG states and config dicts, not only tensors
    return torch.load(path, map_location=map_location, weights_only=False)
