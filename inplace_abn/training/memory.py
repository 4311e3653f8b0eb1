"""Memory of a training step: the process's resident size and its peak (CPU, Linux) and
``torch.cuda.max_memory_allocated`` (GPU); ``SavedTensorMeter`` lives in :mod:`inplace_abn.memory`."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ..memory import SavedTensorMeter  # noqa: F401  (imported from here before it moved)


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


def peak_cuda_bytes(device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))


@contextlib.contextmanager
def nothing():
    yield None
