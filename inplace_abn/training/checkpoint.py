"""Checkpoints written atomically (a temporary file in the same folder, then ``os.replace``) and read
safely (``torch.load(weights_only=True)``: tensors and plain data only, never code), and the
random-number-generator states, stored as such data, that make a resumed run repeat the uninterrupted one."""

from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
from typing import Any, Dict

import torch


class CheckpointError(ValueError):
    """A checkpoint that is refused (it holds more than tensors and plain data) or cannot be read."""


def plain_numpy_state(state) -> Dict[str, Any]:
    """``numpy.random.get_state()``'s tuple as plain data: the 624-word key as an int64 tensor."""
    name, key, position, has_gauss, cached_gaussian = state
    return {
        "bit_generator": str(name),
        "key": torch.tensor([int(word) for word in key], dtype=torch.int64),
        "pos": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def rng_states() -> Dict[str, Any]:
    """Every generator a training step may draw from: Python, NumPy, torch CPU and CUDA, as tensors,
    numbers and tuples, so that a ``weights_only`` load restores them exactly."""
    version, words, gauss_next = random.getstate()
    states: Dict[str, Any] = {"python": (version, tuple(words), gauss_next), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        states["numpy"] = plain_numpy_state(np.random.get_state())
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Dict[str, Any]) -> None:
    version, words, gauss_next = states["python"]
    random.setstate((version, tuple(words), gauss_next))
    torch.set_rng_state(states["torch"].cpu())
    if "numpy" in states:
        import numpy as np

        numpy_state = states["numpy"]
        key = numpy_state["key"].cpu().numpy().astype(np.uint32)
        np.random.set_state((numpy_state["bit_generator"], key, numpy_state["pos"], numpy_state["has_gauss"],
                             numpy_state["cached_gaussian"]))  # fmt: skip
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])


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


def _refusal(path: str, error: Exception) -> str:
    text = " ".join(str(error).split())
    trusted = (f"If you trust the file (e.g. a checkpoint written by an older version of this package), "
               f"convert it once: inplace-abn convert-checkpoint --trust {path} SAFE_COPY.pt")  # fmt: skip
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return (f"refused to load {path}: it refers to {found.group(1)}, which is neither a tensor nor plain "
                f"data, and loading it could run code hidden in the file. {trusted}")  # fmt: skip
    found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(Check the documentation|$)", text)
    detail = found.group(1) if found else text
    return (f"refused to load {path}: the safe loader (tensors and plain data only) cannot read it ({detail}): "
            f"the file is damaged, not a PyTorch file, or holds objects whose loading could run code. {trusted}")


def load_checkpoint(path: str, map_location="cpu") -> Any:
    """The contents of a checkpoint, read with ``torch.load(weights_only=True)``: tensors, numbers,
    strings and containers of them, and nothing that runs code. A file holding anything else raises
    :class:`CheckpointError` saying why and how to convert a trusted one; so does a damaged file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch file or damaged ({error})") from None
        raise CheckpointError(_refusal(path, error)) from None
    except (EOFError, KeyError, OSError, RuntimeError) as error:  # what torch.load raises for a broken file
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a PyTorch file or damaged ({type(error).__name__}: {error})"
        ) from None
