"""Memory of a piece of training at the allocator level: :class:`MemoryProbe` (peak and value at marks
of the bytes allocated on one device) and :class:`SavedTensorMeter` (bytes autograd saves for backward).

On CPU the probe replays the allocation stream of ``torch.profiler`` (``profile_memory=True``); on CUDA
it reads the caching allocator's counters. Both count tensor memory only, relative to where it starts.
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch._C._autograd import DeviceType

__all__ = ["MemoryProbe", "SavedTensorMeter"]

_MARK_PREFIX = "inplace_abn.memory.mark:"


class MemoryProbe:
    """Bytes allocated on ``device`` while the ``with`` block runs, above what was allocated at its start:
    the peak, the value at each :meth:`mark` and at the end.

        with MemoryProbe("cpu") as probe:
            loss = criterion(model(images), targets)
            probe.mark("forward")
            loss.backward()
        probe.peak_bytes, probe.marks["forward"], probe.end_bytes

    CUDA: ``torch.cuda.reset_peak_memory_stats`` at the start, ``memory_allocated`` at the marks and
    ``max_memory_allocated`` for the peak (blocks as the caching allocator rounds them, to 512 bytes).

    CPU: the block runs under ``torch.profiler.profile(profile_memory=True)``; PyTorch's CPU allocator
    reports every allocation (positive size) and free (negative) to it, and the probe adds them up in
    time order (``prof.profiler.kineto_results.events()``, the events named ``[memory]``; a mark is a
    ``record_function`` range whose start splits the stream). ``prof.events()`` is not used: it folds
    each allocation into the operator that made it, so an operator's own temporaries cancel out there;
    ``prof._memory_profile()`` (``torch.profiler._memory_profiler``) reads the same stream but needs
    ``record_shapes`` and ``with_stack``, which slow the step down.
    Invisible on CPU: tensors freed in the block that were allocated before it (the allocator does not
    know their size then; keep them alive past the block), allocations on threads the profiler does
    not follow (those the block starts itself; autograd's CPU backward runs on the calling thread), and
    memory that does not come from PyTorch's CPU allocator (Python objects, a library's own ``malloc``;
    oneDNN's reordered copies inside a convolution do come from it and are counted).
    """

    def __init__(self, device: Union[str, torch.device] = "cpu"):
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"MemoryProbe measures 'cpu' or 'cuda' memory, got device {self.device}.")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.peak_bytes: Optional[int] = None
        self.end_bytes: Optional[int] = None
        self.marks: dict[str, int] = {}
        self._running = False
        self._profiler = None
        self._start = 0

    def __enter__(self) -> "MemoryProbe":
        if self._running:
            raise RuntimeError("This MemoryProbe is already running; use one probe per with-block.")
        self.peak_bytes = self.end_bytes = None
        self.marks = {}
        self._mark_order: list[str] = []
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True, record_shapes=False
            )
            self._profiler.__enter__()
        self._running = True
        return self

    def mark(self, name: str) -> None:
        """Record the allocated bytes now (above the start) as ``marks[name]``, available after the block."""
        if not self._running:
            raise RuntimeError("MemoryProbe.mark() must be called inside the probe's with-block.")
        if name in self._mark_order:
            raise ValueError(f"Mark {name!r} was already set in this block; give each mark its own name.")
        self._mark_order.append(name)
        if self.device.type == "cuda":
            self.marks[name] = torch.cuda.memory_allocated(self.device) - self._start
        else:
            with torch.profiler.record_function(_MARK_PREFIX + name):
                pass

    def __exit__(self, *exc) -> None:
        self._running = False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            self.end_bytes = torch.cuda.memory_allocated(self.device) - self._start
            return
        self._profiler.__exit__(*exc)
        if exc[0] is None:
            self._replay(self._profiler.profiler.kineto_results.events())
        self._profiler = None

    def _replay(self, events) -> None:
        """Running sum of the CPU allocation stream; marks read it at their start time."""
        stream = []
        for event in events:
            name = event.name()
            if name == "[memory]" and event.device_type() == DeviceType.CPU:
                stream.append((event.start_ns(), 1, event.nbytes()))
            elif name.startswith(_MARK_PREFIX) and event.is_user_annotation():
                stream.append((event.start_ns(), 0, name[len(_MARK_PREFIX):]))
        stream.sort(key=lambda item: (item[0], item[1]))  # a mark goes before an allocation at its instant
        allocated = peak = 0
        for _, kind, value in stream:
            if kind == 0:
                self.marks[value] = allocated
            else:
                allocated += value
                peak = max(peak, allocated)
        missing = [name for name in self._mark_order if name not in self.marks]
        if missing:
            raise RuntimeError(f"The profiler recorded no event for the marks {missing}; was another "
                               "profiler running at the same time?")
        self.peak_bytes, self.end_bytes = peak, allocated


class SavedTensorMeter:
    """Counts the distinct storages autograd keeps for backward during a forward pass (those of
    ``parameters``, e.g. parameters and buffers, excluded): the memory that InPlace-ABN reduces.
    Blind to what a layer keeps by other means (its own hooks, checkpointing's recomputation):
    :class:`MemoryProbe` sees all of it.

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
