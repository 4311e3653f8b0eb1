"""What :func:`~inplace_abn.convert_to_abn` did, one entry per BatchNorm layer, and the measurements behind
its summary: memory kept for backward before and after (saved tensors, and the allocator's view of a
training step), and the largest output difference."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Optional, Union

import torch
from torch import nn

from .. import recompute
from ..memory import MemoryProbe, SavedTensorMeter

#: What a converted layer keeps for backward, by mode (docs/migrating.md shows this table).
IN_PLACE, RECOMPUTE, OUT_OF_PLACE, UNCHANGED = "in place", "recompute", "out of place", "unchanged"
MODES = {
    IN_PLACE: "`InPlaceABN`: writes its output over its input and keeps only that output (plus one bit per "
              "element for silu / gelu / mish, plus the shortcut if it has one): one buffer per norm + act",
    RECOMPUTE: "`RecomputeABN`: keeps its input and the per-channel statistics (plus the shortcut); its output "
               "is rebuilt elementwise in backward wherever the next op kept it (stored instead where its "
               "shortcut is itself rebuilt, so that rebuilding never chains): one buffer, any activation, any "
               "BatchNorm weight (it scales by `weight` itself), and its input may be used elsewhere",
    OUT_OF_PLACE: "`ABN` (`in_place=False`): keeps what BatchNorm + activation kept; scales by `weight` itself",
    UNCHANGED: "left as it was; the report says why",
}

SampleInput = Union[torch.Tensor, tuple]


def modes_table() -> str:
    """The modes as docs/migrating.md shows them (a test keeps the two equal)."""
    return "\n".join(["| mode | what the layer keeps for backward |", "|---|---|",
                      *(f"| {mode} | {stores} |" for mode, stores in MODES.items())])


@dataclasses.dataclass
class LayerConversion:
    """What :func:`~inplace_abn.convert_to_abn` did with one BatchNorm layer."""

    name: str  #: the BatchNorm's qualified name in the model
    norm: str = ""  #: its class, e.g. "BatchNorm2d", "BatchNormAct2d"
    pattern: str = ""  #: the pattern that matched (see :data:`inplace_abn.conversion.PATTERNS`); "" if none
    activation: str = ""  #: the activation merged into it, as found ("" if none was)
    converted_to: str = ""  #: e.g. "InPlaceABN(silu)"; "" if left as it was
    mode: str = UNCHANGED  #: "in place", "recompute", "out of place" or "unchanged"
    shortcut: str = ""  #: the residual add's other operand, now passed as ``shortcut`` ("" if none)
    gate: str = ""  #: the SE multiply of its output that became ``channel_gate`` ("" if none)
    exact: bool = True  #: whether the model computes what it did (False only on request: relu_to, clamping)
    reason: str = ""  #: why unchanged, why not in place, or why not exact
    negated_channels: int = 0  #: channels whose weight sign moved into the layer before
    clamped_channels: int = 0  #: channels with |weight| < eps, which scale by eps instead (clamp_small_weights)

    @property
    def in_place(self) -> bool:
        return self.mode == IN_PLACE

    def __str__(self) -> str:
        if self.mode == UNCHANGED:
            return f"{self.name} ({self.norm}): unchanged: {self.reason}"
        text = f"{self.name} ({self.norm}) [{self.pattern}]"
        if self.activation:
            text += f" + {self.activation}"
        text += f" -> {self.converted_to}, {self.mode}"
        if self.shortcut:
            text += f", shortcut {self.shortcut}"
        if self.gate:
            text += f", gate {self.gate}"
        if self.negated_channels:
            text += f", {self.negated_channels} channel signs moved into the layer before"
        return text + (f" ({self.reason})" if self.reason else "")


@dataclasses.dataclass
class ConversionReport:
    """What :func:`~inplace_abn.convert_to_abn` converted, and what that saves."""

    layers: list[LayerConversion]  #: one entry per BatchNorm layer, in graph order
    rewritten: list[str] = dataclasses.field(default_factory=list)  #: submodules given a new forward ("" = the model)
    untraced: list[str] = dataclasses.field(default_factory=list)  #: parts fx could not trace, and why
    recompute: bool = False  #: :func:`inplace_abn.enable_recompute` was installed on the model
    relu_to: str = "relu"  #: what ReLU became (the ``relu_to`` argument)
    saved_bytes_before: Optional[int] = None  #: see :func:`saved_activation_bytes`; needs ``sample_input``
    saved_bytes_after: Optional[int] = None
    held_bytes_before: Optional[int] = None  #: allocated after a training forward, see :func:`step_memory`
    held_bytes_after: Optional[int] = None
    peak_bytes_before: Optional[int] = None  #: peak of a training forward + backward, see :func:`step_memory`
    peak_bytes_after: Optional[int] = None
    max_output_difference: Optional[float] = None  #: eval mode, on ``sample_input``

    @property
    def converted(self) -> list[LayerConversion]:
        return [layer for layer in self.layers if layer.mode != UNCHANGED]

    @property
    def in_place(self) -> list[LayerConversion]:
        return [layer for layer in self.layers if layer.mode == IN_PLACE]

    @property
    def graph_module(self) -> bool:
        """Whether the model itself came back as an ``fx.GraphModule`` (its own forward had to change)."""
        return "" in self.rewritten

    @property
    def exact(self) -> bool:
        """Whether the converted model computes what the original did."""
        return all(layer.exact for layer in self.converted)

    def counts(self) -> collections.Counter:
        """How many layers each ``(pattern, mode)`` pair has; unchanged layers count as ``("", "unchanged")``."""
        return collections.Counter((layer.pattern if layer.mode != UNCHANGED else "", layer.mode) for layer in self.layers)

    def __str__(self) -> str:
        modes = collections.Counter(layer.mode for layer in self.converted)
        lines = [
            f"{len(self.converted)} of {len(self.layers)} BatchNorm layers converted"
            + (": " + ", ".join(f"{modes[m]} {m}" for m in (IN_PLACE, RECOMPUTE, OUT_OF_PLACE) if modes[m]) if modes else "")
            + f"; {len(self.layers) - len(self.converted)} unchanged"
            + ("" if self.exact else "; some outputs change (see below)")
        ]
        patterns = collections.Counter(layer.pattern for layer in self.converted)
        gates = sum(bool(layer.gate) for layer in self.layers)
        if patterns:
            lines.append("  patterns: " + ", ".join(f"{name} {count}" for name, count in patterns.items())
                         + f"; SE gates fused: {gates}")
        lines += [f"  {layer}" for layer in self.layers]
        kept_relu = sum(layer.mode == RECOMPUTE and "relu is lossy" in layer.reason for layer in self.layers)
        if self.relu_to == "relu" and kept_relu:
            lines.append(f"  {kept_relu} layers keep ReLU exactly, in recompute mode (relu_to='relu', the default); "
                         "relu_to='leaky_relu' runs them in place with leaky_relu, changing the outputs slightly")
        if self.rewritten:
            names = ", ".join(name or "the model itself" for name in self.rewritten)
            lines.append(f"  forwards rewritten (fx.GraphModule, same submodule names): {names}")
        if self.recompute:
            lines.append("  enable_recompute installed: recompute layers rebuild their outputs in backward")
        lines += [f"  not traced: {failure}" for failure in self.untraced]
        for what, before, after in (
            ("saved for backward", self.saved_bytes_before, self.saved_bytes_after),
            ("held after a training forward", self.held_bytes_before, self.held_bytes_after),
            ("peak of a training step", self.peak_bytes_before, self.peak_bytes_after),
        ):
            if before is not None:
                lines.append(f"  {what}: {before:,} bytes before, {after:,} after{_change(before, after)}")
        if self.max_output_difference is not None:
            lines.append(f"  largest output difference on the sample input (eval mode): {self.max_output_difference:.3g}")
        return "\n".join(lines)


def _change(before: int, after: int) -> str:
    if not before:
        return ""
    return f" ({1 - after / before:.0%} less)" if after <= before else f" ({after / before - 1:.0%} more)"


# --- measuring -------------------------------------------------------------------------------------

def as_tuple(sample_input: SampleInput) -> tuple:
    return sample_input if isinstance(sample_input, tuple) else (sample_input,)


def _copies(inputs: tuple) -> tuple:
    return tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x for x in inputs)


class _Preserved:
    """Restores the train/eval flags, buffers (running statistics), gradients and CPU random state of a model."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.modes = [(module, module.training) for module in self.model.modules()]
        self.buffers = [(buffer, buffer.detach().clone()) for buffer in self.model.buffers()]
        self.grads = [(parameter, parameter.grad) for parameter in self.model.parameters()]
        self.rng = torch.random.fork_rng(devices=[])
        self.rng.__enter__()
        return self.model

    def __exit__(self, *exc):
        self.rng.__exit__(*exc)
        with torch.no_grad():
            for buffer, value in self.buffers:
                buffer.copy_(value)
        for module, training in self.modes:
            module.training = training
        for parameter, grad in self.grads:
            parameter.grad = grad
        return False


def saved_activation_bytes(model: nn.Module, sample_input: SampleInput) -> int:
    """Bytes autograd keeps for backward in one training-mode forward of ``model`` on ``sample_input``
    (a tensor or a tuple of inputs): the distinct storages of saved tensors, parameters and buffers not
    counted, nor recompute-mode outputs (rebuilt in backward). The forward runs under
    :func:`~inplace_abn.recompute_scope` (``model.forward`` is called, so the counting sees inside the
    hooks that :func:`~inplace_abn.enable_recompute` puts on the model). The model's modes, running
    statistics and the random state are left as they were."""
    class Meter(SavedTensorMeter):
        def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
            return tensor if recompute.is_recomputed(tensor) else super()._pack(tensor)

    meter = Meter([*model.parameters(), *model.buffers()])
    with _Preserved(model):
        model.train()
        with recompute.recompute_scope(), meter:
            output = model.forward(*_copies(as_tuple(sample_input)))
        del output  # kept alive until here, so no storage was freed and its address reused
    return meter.bytes


@dataclasses.dataclass(frozen=True)
class StepMemory:
    held_after_forward: int  #: bytes allocated after the forward, above those before it (what backward keeps)
    peak: int  #: the most bytes allocated at once during forward and backward, above those before


def step_memory(model: nn.Module, sample_input: SampleInput) -> StepMemory:
    """Memory of one training step of ``model`` on ``sample_input`` (forward, then backward of the sum of
    its outputs), measured at the allocator by :class:`~inplace_abn.memory.MemoryProbe` on the input's
    device: it counts what recompute hooks and in-place writes leave, whatever keeps it. The model's
    modes, running statistics, gradients and the random state are left as they were."""
    inputs = _copies(as_tuple(sample_input))
    device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
    with _Preserved(model):
        model.train()
        with MemoryProbe(device) as probe:
            outputs = model(*inputs)
            probe.mark("forward")
            loss = sum(t.sum() for t in _tensors(outputs) if t.requires_grad)
            if isinstance(loss, torch.Tensor):
                loss.backward()
            del outputs, loss
    return StepMemory(probe.marks["forward"], probe.peak_bytes)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


@torch.no_grad()
def max_output_difference(original: nn.Module, converted: nn.Module, sample_input: SampleInput) -> float:
    inputs = as_tuple(sample_input)
    outputs = []
    for model in (original, converted):
        with _Preserved(model):
            model.eval()
            outputs.append(_tensors(model(*_copies(inputs))))
    differences = [(a.double() - b.double()).abs().max().item() for a, b in zip(*outputs) if a.numel()]
    return max(differences, default=0.0)
