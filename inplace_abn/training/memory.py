"""Memory of a training step: bytes kept for backward (any device), the process's peak resident
size (CPU, Linux) and ``torch.cuda.max_memory_allocated`` (GPU)."""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch


def resident_bytes(field: str = "VmRSS") -> Optional[int]:
    """This process's resident size (``VmRSS``) or its peak since the last reset (``VmHWM``)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_resident_peak() -> bool:
    """Restart ``VmHWM`` from the current resident size (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def return_freed_memory() -> None:
    """Have glibc give freed heap back to the OS (otherwise one run's freed heap hides the next run's
    peak). Allocation thresholds stay as they are: forcing large blocks to mmap makes every step fault
    its pages in again, which slows training several times over on a loaded machine."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class SavedTensorMeter:
    """Counts the distinct storages autograd keeps for backward during a forward pass (those of
    ``parameters``, e.g. parameters and buffers, excluded): the memory that InPlace-ABN reduces.

        meter = SavedTensorMeter(model.parameters())
        with meter:
            loss = criterion(model(x), y)
        meter.bytes
    """

    def __init__(self, parameters: Iterable[torch.Tensor]):
        self._parameters = {p.untyped_storage().data_ptr() for p in parameters}
        self._storages = {}
        self._hooks = None

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self._parameters and storage.nbytes():
            self._storages[pointer] = storage.nbytes()
        return tensor

    def __enter__(self) -> "SavedTensorMeter":
        self._storages = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def peak_cuda_bytes(device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))


@contextlib.contextmanager
def nothing():
    yield None
