"""Move models onto InPlace-ABN and off it again: merge each BatchNorm + activation pair into one ABN or
InPlaceABN layer with the same outputs (weights converted exactly), turn the layers back into standard
BatchNorm + activation modules, and fold eval-mode layers into the convolution before them.

    >>> from inplace_abn import convert_to_abn
    >>> model, report = convert_to_abn(model, sample_input=torch.randn(2, 3, 224, 224))
    >>> print(report)   # what became what, what stayed out of place and why, memory before and after

docs/migrating.md explains the weight conversion.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import inspect
import operator
import warnings
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import fx, nn

from .activations import Activation, make_activation
from .modules import ABN, InPlaceABN, InPlaceABNSync

__all__ = [
    "ConversionReport",
    "LayerConversion",
    "convert_to_abn",
    "convert_to_batchnorm",
    "fuse_conv_abn",
    "saved_activation_bytes",
]

SampleInput = Union[torch.Tensor, tuple]

_BatchNorm = nn.modules.batchnorm._BatchNorm
# Layers whose output channels can absorb a per-channel factor (a sign flip, or a folded normalization).
_CHANNEL_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)

# --- reading the fx graph --------------------------------------------------------------------------

_RELU_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_}
_LEAKY_RELU_FUNCTIONS = {F.leaky_relu, F.leaky_relu_}
_ELU_FUNCTIONS = {F.elu, F.elu_}

# Producers whose output is a fresh tensor that their own backward does not keep: a layer may write
# over it. Anything else (an activation keeps its output; a view shares storage) stays out of place.
_FRESH_OUTPUT_MODULES = (
    nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear, nn.Upsample,
    nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
)
_FRESH_OUTPUT_FUNCTIONS = {
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.linear,
    torch.conv1d, torch.conv2d, torch.conv3d, torch.add, torch.sub, torch.mul, torch.matmul, torch.cat,
    operator.add, operator.sub, operator.mul, operator.matmul, F.interpolate,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d,
}
_FRESH_OUTPUT_METHODS = {"add", "sub", "mul", "matmul"}
_IN_PLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.ipow,
    operator.iand, operator.ior, operator.ixor, operator.setitem,
}


class _Tracer(fx.Tracer):
    """fx's tracer, keeping this library's layers whole (their forward branches in Python)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, ABN) or super().is_leaf_module(module, qualified_name)


@dataclasses.dataclass
class _Region:
    """A part of the model traced as one fx graph: the whole model, or a submodule where it was not."""

    name: str  # qualified name in the model; "" for the model itself
    module: nn.Module
    graph: fx.Graph

    @property
    def is_root(self) -> bool:
        return self.name == ""

    def qualified(self, target: str) -> str:
        return f"{self.name}.{target}" if self.name else target


def _traced_regions(model: nn.Module, wanted: Callable[[nn.Module], bool], failures: list[str]) -> list[_Region]:
    """Trace ``model`` with fx; where that fails, trace its children instead, and so on down. Only parts
    holding a module for which ``wanted`` is true are traced; ``failures`` gets one line per part that
    could not be."""
    regions = []

    def visit(name: str, module: nn.Module) -> None:
        if not any(wanted(m) for m in module.modules()) or (name and _Tracer().is_leaf_module(module, name)):
            return
        try:
            graph = _Tracer().trace(module)
        except Exception as error:  # fx raises many kinds on data-dependent control flow
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            failures.append(f"{name or type(module).__name__} ({type(module).__name__}): {type(error).__name__}: {message}")
            for child_name, child in module.named_children():
                visit(f"{name}.{child_name}" if name else child_name, child)
            return
        regions.append(_Region(name, module, graph))

    visit("", model)
    return regions


def _argument(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _activation_of(node: fx.Node, modules: dict[str, nn.Module]) -> Optional[tuple[str, float]]:
    """``(name, parameter)`` of the activation that ``node`` computes of its only input, or None."""
    if len(node.all_input_nodes) != 1:
        return None
    if node.op == "call_module":
        kind = type(modules[node.target])
        module = modules[node.target]
        if kind is nn.ReLU:
            return "relu", 0.0
        if kind is nn.LeakyReLU:
            return "leaky_relu", float(module.negative_slope)
        if kind is nn.ELU:
            return "elu", float(module.alpha)
        if kind is nn.Identity:
            return "identity", 0.0
    elif node.op == "call_function":
        if node.target in _RELU_FUNCTIONS:
            return "relu", 0.0
        if node.target in _LEAKY_RELU_FUNCTIONS:
            return "leaky_relu", float(_argument(node, 1, "negative_slope", 0.01))
        if node.target in _ELU_FUNCTIONS:
            return "elu", float(_argument(node, 1, "alpha", 1.0))
    elif node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu", 0.0
    return None


def _describe(node: fx.Node, region: _Region, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} '{region.qualified(node.target)}'"
    if node.op == "call_function":
        module = getattr(node.target, "__module__", None) or ""
        module = "operator" if module == "_operator" else module
        return f"{module}.{getattr(node.target, '__name__', node.target)}".lstrip(".")
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "placeholder":
        return f"the input '{node.target}'"
    return node.name


def _has_fresh_output(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _FRESH_OUTPUT_MODULES)
    if node.op == "call_function":
        return node.target in _FRESH_OUTPUT_FUNCTIONS
    if node.op == "call_method":
        return node.target in _FRESH_OUTPUT_METHODS
    return False


def _writes_over(user: fx.Node, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``user`` modifies the tensor of ``node`` in place."""
    if not user.args or user.args[0] is not node:
        return False
    if user.op == "call_method":
        return user.target.endswith("_") and not user.target.endswith("__")
    if user.op == "call_module":
        module = modules[user.target]
        return isinstance(module, InPlaceABN) or bool(getattr(module, "inplace", False))
    if user.op == "call_function":
        if user.target in _IN_PLACE_OPERATORS:
            return True
        name = getattr(user.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            return True
        try:
            bound = inspect.signature(user.target).bind(*user.args, **user.kwargs)
        except (TypeError, ValueError):  # builtins without a signature
            return bool(user.kwargs.get("inplace", False))
        return bool(bound.arguments.get("inplace", False))
    return False


# --- the report ------------------------------------------------------------------------------------

@dataclasses.dataclass
class LayerConversion:
    """What :func:`convert_to_abn` did with one BatchNorm layer."""

    name: str  #: the BatchNorm's qualified name in the model
    activation: str = ""  #: the activation merged into it, as found ("" if none was)
    converted_to: str = ""  #: e.g. "InPlaceABN(leaky_relu[0.01])"; "" if left as it was
    in_place: bool = False  #: whether the new layer writes over its input
    exact: bool = True  #: whether the new layer computes what BatchNorm + activation did
    reason: str = ""  #: why not converted, not in place, or not exact
    negated_channels: int = 0  #: channels whose weight sign moved into the layer before
    clamped_channels: int = 0  #: channels with |weight| < eps, which scale by eps instead

    def __str__(self) -> str:
        if not self.converted_to:
            return f"{self.name}: kept as BatchNorm: {self.reason}"
        text = f"{self.name} + {self.activation} -> {self.converted_to}"
        if self.negated_channels:
            text += f", {self.negated_channels} channel signs moved into the layer before"
        return text + (f" ({self.reason})" if self.reason else "")


@dataclasses.dataclass
class ConversionReport:
    """What :func:`convert_to_abn` converted, and what that saves."""

    layers: list[LayerConversion]  #: one entry per BatchNorm layer found, in graph order
    graph_module: bool = False  #: the model came back as an ``fx.GraphModule`` (see :func:`convert_to_abn`)
    untraced: list[str] = dataclasses.field(default_factory=list)  #: parts fx could not trace, and why
    saved_bytes_before: Optional[int] = None  #: see :func:`saved_activation_bytes`; needs ``sample_input``
    saved_bytes_after: Optional[int] = None
    max_output_difference: Optional[float] = None  #: eval mode, on ``sample_input``

    @property
    def converted(self) -> list[LayerConversion]:
        return [layer for layer in self.layers if layer.converted_to]

    @property
    def in_place(self) -> list[LayerConversion]:
        return [layer for layer in self.layers if layer.in_place]

    @property
    def exact(self) -> bool:
        """Whether every converted layer computes what it replaced (no ReLU changed, no weight clamped)."""
        return all(layer.exact for layer in self.converted)

    def __str__(self) -> str:
        lines = [
            f"{len(self.converted)} of {len(self.layers)} BatchNorm layers converted, {len(self.in_place)} in place"
            + ("" if self.exact else "; some outputs change (see below)")
        ]
        lines += [f"  {layer}" for layer in self.layers]
        if self.graph_module:
            lines.append("  returned as an fx.GraphModule: an activation was a function call or a shared module")
        lines += [f"  not traced: {failure}" for failure in self.untraced]
        if self.saved_bytes_before is not None:
            before, after = self.saved_bytes_before, self.saved_bytes_after
            change = ""
            if before:
                change = f" ({1 - after / before:.0%} less)" if after <= before else f" ({after / before - 1:.0%} more)"
            lines.append(f"  saved for backward: {before:,} bytes before, {after:,} after{change}")
        if self.max_output_difference is not None:
            lines.append(f"  largest output difference on the sample input (eval mode): {self.max_output_difference:.3g}")
        return "\n".join(lines)


# --- weights ---------------------------------------------------------------------------------------

def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


@torch.no_grad()
def _scale_output_channels(layer: nn.Module, factor: torch.Tensor, shift: Optional[torch.Tensor] = None) -> None:
    """Make output channel ``c`` of a conv / linear layer compute ``factor[c] * out_c + shift[c]``."""
    weight = layer.weight
    factor = factor.to(torch.float64)
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):  # weight: (in, out / groups, *kernel)
        groups, per_group = layer.groups, weight.shape[1]
        grouped = weight.double().reshape(groups, weight.shape[0] // groups, per_group, *weight.shape[2:])
        scaled = grouped * factor.reshape(groups, 1, per_group, *([1] * (weight.dim() - 2)))
    else:  # weight: (out, ...)
        scaled = weight.double() * factor.reshape(-1, *([1] * (weight.dim() - 1)))
    weight.copy_(scaled.reshape(weight.shape))
    if layer.bias is not None:
        layer.bias.copy_(layer.bias.double() * factor + (0 if shift is None else shift))
    elif shift is not None:
        layer.bias = nn.Parameter(shift.to(weight.dtype), requires_grad=weight.requires_grad)


def _feeding_layer(bn_node: fx.Node, modules: dict[str, nn.Module], calls: collections.Counter,
                   parameter_uses: collections.Counter) -> Optional[nn.Module]:
    """The conv / linear layer that feeds only this BatchNorm, and whose output channels are its channels
    (so a channel's sign can move into it), or None."""
    source = bn_node.args[0]
    if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
        return None
    layer = modules[source.target]
    if (
        not isinstance(layer, _CHANNEL_LAYERS)
        or calls[source.target] != 1
        or _out_channels(layer) != modules[bn_node.target].num_features
        or any(parameter_uses[id(p)] > 1 for p in layer.parameters(recurse=False))
    ):
        return None
    return layer


def _new_layer(bn: _BatchNorm, activation: str, param: float, in_place: bool, sync: bool) -> ABN:
    reference = next((t for t in (bn.weight, bn.running_mean) if t is not None), None)
    factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    args = (bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, activation, param)
    with warnings.catch_warnings():  # relu under sync warns that it is not in place: the report says so
        warnings.simplefilter("ignore")
        if sync:
            return InPlaceABNSync(*args, in_place=in_place, **factory)
        return InPlaceABN(*args, **factory) if in_place else ABN(*args, **factory)


@torch.no_grad()
def _load_batchnorm(layer: ABN, bn: _BatchNorm, name: str, feeding: Optional[nn.Module], record: LayerConversion) -> None:
    """Give ``layer`` the BatchNorm's state, so that ``|w'| + eps == |w|``; negative weights are made
    positive by negating the channel in ``feeding`` (which must be given when there are any)."""
    layer.train(bn.training)
    negative = None
    if bn.affine:
        weight = bn.weight.double()
        negative = weight < 0
        if negative.any():
            # BN(-x) with weight -w is BN(x) with weight w: batch mean and running mean flip sign, the
            # variance does not, and the bias is untouched.
            _scale_output_channels(feeding, torch.where(negative, -1.0, 1.0).to(weight))
            record.negated_channels = int(negative.sum())
        shifted = weight.abs() - bn.eps
        clamped = shifted < 0
        if clamped.any():
            record.clamped_channels = int(clamped.sum())
            record.exact = False
            smallest = float(weight.abs().min())
            message = (
                f"{record.clamped_channels} channels have |weight| < eps={bn.eps} (smallest {smallest:.3g}); the "
                f"scale |w| + eps cannot go below eps, so they scale by eps instead"
            )
            record.reason = "; ".join(filter(None, [record.reason, message]))
            warnings.warn(
                f"BatchNorm '{name}': {message} (output change at most (eps - |w|) * |x_hat|).", UserWarning, stacklevel=3
            )
        layer.weight.copy_(shifted.clamp_min(0))
        layer.bias.copy_(bn.bias)
        layer.weight.requires_grad_(bn.weight.requires_grad)
        layer.bias.requires_grad_(bn.bias.requires_grad)
    if bn.track_running_stats and bn.running_mean is not None:
        mean = bn.running_mean
        if negative is not None:
            mean = torch.where(negative.to(mean.device), -mean, mean)
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(bn.running_var)
        layer.num_batches_tracked.copy_(bn.num_batches_tracked)


# --- convert_to_abn --------------------------------------------------------------------------------

@dataclasses.dataclass
class _Options:
    in_place: bool
    relu_to: str
    relu_slope: float
    sync: bool


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _convert_region(region: _Region, options: _Options, parameter_uses: collections.Counter,
                    records: list[LayerConversion]) -> Optional[nn.Module]:
    """Convert the pairs of one traced region; returns the GraphModule that replaces it, if one must."""
    modules = dict(region.module.named_modules())
    calls = collections.Counter(node.target for node in region.graph.nodes if node.op == "call_module")
    pairs = []  # (BatchNorm node, activation node, new layer)
    for node in region.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm):
            continue
        bn, name = modules[node.target], region.qualified(node.target)
        record = LayerConversion(name)
        records.append(record)
        act_node = next(iter(node.users)) if len(node.users) == 1 else None
        found = None if act_node is None else _activation_of(act_node, modules)
        if calls[node.target] != 1:
            record.reason = "the module is called more than once"
        elif len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            record.reason = "it is called with more than one input"
        elif any(nn.parameter.is_lazy(t) for t in (bn.weight, bn.running_mean) if t is not None):
            record.reason = "it is lazy and not initialized yet: run the model once first"
        elif not bn.eps > 0:
            record.reason = f"eps={bn.eps}: the layers need eps > 0"
        elif found is None:
            users = ", ".join(_describe(user, region, modules) for user in node.users) or "nothing"
            record.reason = f"its output goes to {users}, not to one ReLU, LeakyReLU, ELU or Identity"
        if record.reason:
            continue
        activation, param = found
        record.activation = _describe(act_node, region, modules)
        if activation == "leaky_relu" and param == 0:
            activation = "relu"
        if (activation == "leaky_relu" and param < 0) or (activation == "elu" and param <= 0):
            record.reason = f"{activation} with parameter {param} is not one of the layers' activations"
            continue
        feeding = _feeding_layer(node, modules, calls, parameter_uses)
        if bn.affine and feeding is None and bool((bn.weight < 0).any()):
            record.reason = (
                f"{int((bn.weight < 0).sum())} channels have a negative weight and no convolution or linear "
                "layer feeds it alone to take the sign: the scale |w| + eps cannot represent them"
            )
            continue
        if activation == "relu" and options.relu_to == "leaky_relu":
            activation, param = "leaky_relu", options.relu_slope
            record.exact = False
            record.reason = f"relu became leaky_relu({param}), which can run in place: outputs change slightly"
        why_not = _why_not_in_place(node, act_node, make_activation(activation, param), region, modules)
        in_place = options.in_place and why_not is None
        if options.in_place and why_not is not None:
            record.reason = "; ".join(filter(None, [record.reason, f"not in place: {why_not}"]))
        layer = _new_layer(bn, activation, param, in_place, options.sync)
        _load_batchnorm(layer, bn, name, feeding, record)
        record.in_place = in_place
        record.converted_to = _summary(layer)
        pairs.append((node, act_node, layer))

    if not pairs:
        return None
    # An activation module called once can become nn.Identity, and the model keeps its class; anything
    # else (a function call, a module used again elsewhere) needs the graph rewritten.
    needs_graph = any(act.op != "call_module" or calls[act.target] != 1 for _, act, _ in pairs)
    for bn_node, act_node, layer in pairs:
        _set_submodule(region.module, bn_node.target, layer)
        if needs_graph:
            act_node.replace_all_uses_with(bn_node)
            region.graph.erase_node(act_node)
        else:
            _set_submodule(region.module, act_node.target, nn.Identity())
    if not needs_graph:
        return None
    region.graph.lint()
    graph_module = fx.GraphModule(region.module, region.graph, class_name=type(region.module).__name__)
    graph_module.training = region.module.training
    return graph_module


def _summary(layer: ABN) -> str:
    """``InPlaceABN(leaky_relu[0.01])``: the class and its activation."""
    activation = make_activation(layer.activation, layer.activation_param)
    param = f"[{activation.param}]" if activation.name in ("leaky_relu", "elu") else ""
    in_place = ", in_place=False" if isinstance(layer, InPlaceABNSync) and not layer.in_place else ""
    return f"{type(layer).__name__}({activation.name}{param}{in_place})"


def _why_not_in_place(bn_node: fx.Node, act_node: fx.Node, activation: Activation, region: _Region,
                      modules: dict[str, nn.Module]) -> Optional[str]:
    """Why the merged layer may not write over its input, or None when it may."""
    if not activation.invertible:
        return f"{activation.name} is not invertible"
    source = bn_node.args[0]
    if source.op == "placeholder":
        owner = f"'{region.name}'" if region.name else "the model"
        return f"its input is {_describe(source, region, modules)} of {owner}, which the caller may still use"
    if len(source.users) > 1:
        others = ", ".join(_describe(user, region, modules) for user in source.users if user is not bn_node)
        return f"its input (the output of {_describe(source, region, modules)}) is also used by {others}"
    if not _has_fresh_output(source, modules):
        producer = _describe(source, region, modules)
        return f"its input comes from {producer}, which may keep it for backward or share its storage"
    for user in act_node.users:
        if user.op == "output" and not region.is_root:
            return f"its output leaves '{region.name}', whose caller could not be traced"
        if _writes_over(user, act_node, modules):
            return f"its output is then modified in place by {_describe(user, region, modules)}"
    return None


def convert_to_abn(
    model: nn.Module,
    *,
    in_place: bool = True,
    relu_to: str = "leaky_relu",
    relu_slope: float = 0.01,
    sync: bool = False,
    sample_input: Optional[SampleInput] = None,
) -> tuple[nn.Module, ConversionReport]:
    """Return a copy of ``model`` in which every BatchNorm followed by a ReLU, LeakyReLU, ELU or Identity
    is one :class:`~inplace_abn.InPlaceABN` (where that is safe) or :class:`~inplace_abn.ABN` layer, and a
    :class:`ConversionReport`. ``model`` itself is not changed.

    The pairs are found with ``torch.fx``: as modules (``nn.Sequential``, or ``self.bn`` then
    ``self.relu`` in a forward, even a ReLU module used again elsewhere) or function calls (``F.relu``,
    ``torch.relu``, ``x.relu()``, ``F.leaky_relu``, ``F.elu``). Where the model cannot be traced, its
    submodules are, one by one. The copy keeps its class when every merged activation was a module
    called once (it becomes ``nn.Identity``); otherwise it is an ``fx.GraphModule`` with the same
    submodule names, so state-dict keys are unchanged either way.

    A layer goes in place only when its input is the fresh output of a convolution, linear, pooling,
    add... that nothing else uses, and nothing later modifies its output in place; elsewhere it stays
    ``ABN``, and the report says why.

    Weights are converted exactly: the layers scale by ``|w'| + eps``, so ``w' = |w| - eps``, and a
    channel with ``w < 0`` is negated in the convolution or linear layer that feeds the BatchNorm
    (weight and bias) and in the running mean, which gives the same outputs in training and eval mode.
    A pair whose BatchNorm has negative weights and no such layer before it is left as it was.
    Channels with ``|w| < eps`` scale by ``eps`` (a warning says so).

    Args:
        in_place: use InPlaceABN where safe (``False``: ABN everywhere).
        relu_to: what a ReLU becomes: ``"leaky_relu"`` (with ``relu_slope``, in place, outputs change
            slightly: fine-tune) or ``"relu"`` (exact, but ReLU is not invertible: ABN, saves nothing).
        relu_slope: the leaky_relu slope that replaces ReLU, > 0.
        sync: make :class:`~inplace_abn.InPlaceABNSync` layers (``in_place=False`` where not safe).
        sample_input: a tensor or tuple of inputs; with it, the report has the bytes saved for backward
            before and after (training mode) and the largest output difference (eval mode). Running
            statistics and random state are left as they were.
    """
    if relu_to not in ("leaky_relu", "relu"):
        raise ValueError(f"relu_to must be 'leaky_relu' or 'relu', got {relu_to!r}.")
    if relu_to == "leaky_relu" and not relu_slope > 0:
        raise ValueError(f"relu_slope must be > 0 to run in place (got {relu_slope}); use relu_to='relu' for exact ReLU.")
    options = _Options(in_place, relu_to, float(relu_slope), sync)
    converted = copy.deepcopy(model)
    parameter_uses = collections.Counter(id(p) for _, p in converted.named_parameters(remove_duplicate=False))
    report = ConversionReport(layers=[])
    for region in _traced_regions(converted, lambda m: isinstance(m, _BatchNorm), report.untraced):
        replacement = _convert_region(region, options, parameter_uses, report.layers)
        if replacement is not None:
            report.graph_module = True
            if region.is_root:
                converted = replacement
            else:
                _set_submodule(converted, region.name, replacement)
    seen = {layer.name for layer in report.layers}
    unseen = "no traced forward reaches it" + (" (see 'not traced')" if report.untraced else "")
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and name not in seen:
            report.layers.append(LayerConversion(name, reason=unseen))
    if sample_input is not None:
        report.saved_bytes_before = saved_activation_bytes(model, sample_input)
        report.saved_bytes_after = saved_activation_bytes(converted, sample_input)
        report.max_output_difference = _max_output_difference(model, converted, sample_input)
    return converted, report


# --- measuring -------------------------------------------------------------------------------------

def _as_tuple(sample_input: SampleInput) -> tuple:
    return sample_input if isinstance(sample_input, tuple) else (sample_input,)


def _copies(inputs: tuple) -> tuple:
    return tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x for x in inputs)


class _Preserved:
    """Restores the train/eval flags, buffers (running statistics) and CPU random state of a model."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.modes = [(module, module.training) for module in self.model.modules()]
        self.buffers = [(buffer, buffer.detach().clone()) for buffer in self.model.buffers()]
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
        return False


def saved_activation_bytes(model: nn.Module, sample_input: SampleInput) -> int:
    """Bytes autograd keeps for backward in one training-mode forward of ``model`` on ``sample_input``
    (a tensor or a tuple of inputs): the distinct storages of saved tensors, parameters and buffers not
    counted. The model's modes, running statistics and the random state are left as they were."""
    from .memory import SavedTensorMeter

    meter = SavedTensorMeter([*model.parameters(), *model.buffers()])
    with _Preserved(model):
        model.train()
        with meter:
            output = model(*_copies(_as_tuple(sample_input)))
        del output  # kept alive until here, so no storage was freed and its address reused
    return meter.bytes


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


@torch.no_grad()
def _max_output_difference(original: nn.Module, converted: nn.Module, sample_input: SampleInput) -> float:
    inputs = _as_tuple(sample_input)
    outputs = []
    for model in (original, converted):
        with _Preserved(model):
            model.eval()
            outputs.append(_tensors(model(*_copies(inputs))))
    differences = [(a.double() - b.double()).abs().max().item() for a, b in zip(*outputs) if a.numel()]
    return max(differences, default=0.0)


# --- back to standard layers, and folding for inference --------------------------------------------

def _activation_module(layer: ABN) -> nn.Module:
    """The standard module of the layer's activation; in place, as it only ever sees a fresh tensor."""
    activation = make_activation(layer.activation, layer.activation_param)
    if activation.name == "leaky_relu":
        return nn.LeakyReLU(activation.param, inplace=True)
    if activation.name == "elu":
        return nn.ELU(activation.param, inplace=True)
    if activation.name == "relu":
        return nn.ReLU(inplace=True)
    return nn.Identity()


@torch.no_grad()
def _standard_layers(layer: ABN, batch_norm: Callable[..., _BatchNorm]) -> nn.Sequential:
    reference = next((t for t in (layer.weight, layer.running_mean) if t is not None), None)
    factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    bn = batch_norm(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats, **factory)
    if layer.affine:
        bn.weight.copy_(layer.weight.abs() + layer.eps)
        bn.bias.copy_(layer.bias)
    if layer.track_running_stats:
        bn.running_mean.copy_(layer.running_mean)
        bn.running_var.copy_(layer.running_var)
        bn.num_batches_tracked.copy_(layer.num_batches_tracked)
    return nn.Sequential(bn, _activation_module(layer)).train(layer.training)


def convert_to_batchnorm(model: nn.Module, batch_norm: Callable[..., _BatchNorm] = nn.BatchNorm2d) -> nn.Module:
    """Return a copy of ``model`` with every ABN, InPlaceABN and InPlaceABNSync layer replaced by
    ``nn.Sequential(batch_norm(...), activation)`` of standard modules computing the same function
    (BatchNorm weight ``|w| + eps``; activation ``nn.LeakyReLU``, ``nn.ELU``, ``nn.ReLU`` or
    ``nn.Identity``), to deploy where this package is not installed. A layer ``name`` becomes
    ``name.0`` (BatchNorm) and ``name.1`` (activation) in the state dict. ``batch_norm`` is the class
    for the inputs' rank: ``nn.BatchNorm2d`` (default), ``nn.BatchNorm1d`` or ``nn.BatchNorm3d``."""
    model = copy.deepcopy(model)
    if isinstance(model, ABN):
        return _standard_layers(model, batch_norm)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ABN):
                setattr(parent, name, _standard_layers(child, batch_norm))
    return model


@torch.no_grad()
def _fold(layer: nn.Module, abn: ABN) -> None:
    """Fold the eval-mode normalization of ``abn`` into the conv / linear ``layer`` before it."""
    invstd = (abn.running_var.double() + abn.eps).rsqrt()
    scale = invstd if abn.weight is None else (abn.weight.double().abs() + abn.eps) * invstd
    shift = -abn.running_mean.double() * scale
    if abn.bias is not None:
        shift = shift + abn.bias.double()
    _scale_output_channels(layer, scale, shift)


def fuse_conv_abn(model: nn.Module) -> nn.Module:
    """Return a copy of an eval-mode ``model`` in which every ABN / InPlaceABN layer that directly follows
    a convolution or linear layer (found with ``torch.fx``, as in :func:`convert_to_abn`) is folded into
    it: the layer's weight becomes ``W * s`` and its bias ``(b_conv - running_mean) * s + bias`` per
    output channel, with ``s = (|w| + eps) / sqrt(running_var + eps)``, and the ABN layer becomes its
    activation alone. Same outputs up to rounding (computed in float64). Layers without running
    statistics, or after anything else, stay as they are. The model keeps its class."""
    if any(isinstance(m, ABN) and m.training for m in model.modules()):
        raise ValueError("fuse_conv_abn folds running statistics, for inference: call model.eval() first.")
    fused = copy.deepcopy(model)
    parameter_uses = collections.Counter(id(p) for _, p in fused.named_parameters(remove_duplicate=False))
    for region in _traced_regions(fused, lambda m: isinstance(m, ABN), []):
        modules = dict(region.module.named_modules())
        calls = collections.Counter(node.target for node in region.graph.nodes if node.op == "call_module")
        for node in region.graph.nodes:
            if node.op != "call_module" or not isinstance(modules[node.target], ABN) or calls[node.target] != 1:
                continue
            abn = modules[node.target]
            layer = _feeding_layer(node, modules, calls, parameter_uses)
            if layer is None or abn.running_mean is None or len(node.args) != 1:
                continue
            _fold(layer, abn)
            _set_submodule(region.module, node.target, _activation_module(abn))
    return fused
