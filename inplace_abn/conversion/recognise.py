"""What the converter recognises in a traced graph, as lookup tables: normalization modules, activations
(torch modules, functions and tensor methods, and timm's own), residual adds, channel gates' multiplies,
global poolings and nodes that pass their input through. timm is matched by class and function names, so
nothing here imports it."""

from __future__ import annotations

import dataclasses
import operator
import sys
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

_BatchNorm = nn.modules.batchnorm._BatchNorm

# Where timm defines its layers, today and before 0.9 (timm.models.layers).
_TIMM_LAYERS = ("timm.layers", "timm.models.layers")


def _class_key(cls: type) -> tuple[str, str]:
    return cls.__module__, cls.__qualname__


def _timm_keys(submodule: str, *names: str) -> set[tuple[str, str]]:
    return {(f"{package}.{submodule}", name) for package in _TIMM_LAYERS for name in names}


# --- normalization modules -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NormModule:
    """A kind of normalization module the converter takes apart."""

    description: str
    synchronized: bool  #: its statistics are all-reduced over a process group
    with_activation: bool  #: it applies its own ``act`` (and ``drop``) after the normalization


_TIMM_NORM_ACT = _timm_keys("norm_act", "BatchNormAct2d")
_TIMM_SYNC_NORM_ACT = _timm_keys("norm_act", "SyncBatchNormAct")


def norm_module(module: nn.Module) -> Optional[NormModule]:
    """What ``module`` is, if it is a BatchNorm the converter knows the forward of; None otherwise."""
    key = _class_key(type(module))
    if key in _TIMM_NORM_ACT:
        return NormModule("timm BatchNormAct2d (norm + act in one module)", False, True)
    if key in _TIMM_SYNC_NORM_ACT:
        return NormModule("timm SyncBatchNormAct (synchronized norm + act)", True, True)
    if type(module).forward is nn.SyncBatchNorm.forward:
        return NormModule("SyncBatchNorm", True, False)
    if isinstance(module, _BatchNorm) and type(module).forward is _BatchNorm.forward:
        return NormModule(type(module).__name__, False, False)
    return None


def is_batchnorm(module: nn.Module) -> bool:
    """Every BatchNorm module, known or not: one report entry each."""
    return isinstance(module, _BatchNorm)


# --- activations -----------------------------------------------------------------------------------

def _fixed(name: str) -> Callable[[Any], tuple[str, float]]:
    return lambda module_or_node: (name, 0.0)


def _leaky_relu(slope: float) -> tuple[str, float]:
    return ("relu", 0.0) if slope == 0 else ("leaky_relu", slope)  # slope 0 is ReLU exactly


# Exact classes only: a subclass may compute anything.
_TORCH_ACTIVATION_MODULES: dict[type, Callable[[nn.Module], tuple[Optional[str], float]]] = {
    nn.Identity: _fixed("identity"), nn.ReLU: _fixed("relu"), nn.ReLU6: _fixed("relu6"),
    nn.LeakyReLU: lambda m: _leaky_relu(float(m.negative_slope)), nn.ELU: lambda m: ("elu", float(m.alpha)),
    nn.SiLU: _fixed("silu"), nn.Mish: _fixed("mish"), nn.Hardswish: _fixed("hardswish"),
    nn.Hardsigmoid: _fixed("hardsigmoid"), nn.Sigmoid: _fixed("sigmoid"), nn.Tanh: _fixed("tanh"),
    nn.GELU: lambda m: ({"none": "gelu", "tanh": "gelu_tanh"}.get(m.approximate), 0.0),
}
# The way back (tests/test_convert.py holds the two tables to each other). In place where torch can: the
# back-converted activation only ever sees the fresh output of a BatchNorm or of an add.
_STANDARD_MODULES: dict[str, Callable[[float], nn.Module]] = {
    "identity": lambda p: nn.Identity(), "relu": lambda p: nn.ReLU(inplace=True),
    "relu6": lambda p: nn.ReLU6(inplace=True), "leaky_relu": lambda p: nn.LeakyReLU(p, inplace=True),
    "elu": lambda p: nn.ELU(p, inplace=True), "silu": lambda p: nn.SiLU(inplace=True),
    "mish": lambda p: nn.Mish(inplace=True), "hardswish": lambda p: nn.Hardswish(inplace=True),
    "hardsigmoid": lambda p: nn.Hardsigmoid(inplace=True), "sigmoid": lambda p: nn.Sigmoid(),
    "tanh": lambda p: nn.Tanh(), "gelu": lambda p: nn.GELU(), "gelu_tanh": lambda p: nn.GELU(approximate="tanh"),
}

# timm's activation modules and functions (timm/layers/activations*.py) that compute one of the layers'
# activations; timm builds nn.SiLU, nn.Hardswish... where torch has them, these elsewhere.
_TIMM_ACTIVATION_CLASS_NAMES = {
    "Swish": "silu", "SwishMe": "silu", "Mish": "mish", "MishMe": "mish", "Sigmoid": "sigmoid", "Tanh": "tanh",
    "HardSwish": "hardswish", "HardSwishMe": "hardswish", "HardSigmoid": "hardsigmoid",
    "HardSigmoidMe": "hardsigmoid", "GELU": "gelu", "GELUTanh": "gelu_tanh",
}
_TIMM_ACTIVATION_CLASSES = {key: name for cls, name in _TIMM_ACTIVATION_CLASS_NAMES.items()
                            for submodule in ("activations", "activations_me") for key in _timm_keys(submodule, cls)}
_TIMM_ACTIVATION_FUNCTIONS = {
    "swish": "silu", "swish_me": "silu", "mish": "mish", "mish_me": "mish", "sigmoid": "sigmoid", "tanh": "tanh",
    "hard_swish": "hardswish", "hard_swish_me": "hardswish", "hard_sigmoid": "hardsigmoid",
    "hard_sigmoid_me": "hardsigmoid", "gelu": "gelu", "gelu_tanh": "gelu_tanh",
}


def module_activation(module: nn.Module) -> Optional[tuple[str, float]]:
    """``(name, param)`` of an activation module (exact classes only: a subclass may compute anything)."""
    read = _TORCH_ACTIVATION_MODULES.get(type(module))
    if read is not None:
        name, param = read(module)
        return None if name is None else (name, param)
    name = _TIMM_ACTIVATION_CLASSES.get(_class_key(type(module)))
    return None if name is None else (name, 0.0)


def standard_activation_module(name: str, param: float) -> nn.Module:
    """The torch module computing activation ``name`` (in place where torch can: it only sees fresh tensors)."""
    return _STANDARD_MODULES[name](param)


def _argument(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _constant(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _gelu_function(node: fx.Node) -> Optional[tuple[str, float]]:
    approximate = _argument(node, 1, "approximate", "none")
    name = {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate) if isinstance(approximate, str) else None
    return None if name is None else (name, 0.0)


def _parametrized(name: str, keyword: str, default: float) -> Callable[[fx.Node], Optional[tuple[str, float]]]:
    def read(node: fx.Node) -> Optional[tuple[str, float]]:
        param = _constant(_argument(node, 1, keyword, default))
        if param is None:
            return None
        return _leaky_relu(param) if name == "leaky_relu" else (name, param)
    return read


_ACTIVATION_FUNCTIONS: dict[Callable, Callable[[fx.Node], Optional[tuple[str, float]]]] = {
    **{f: _fixed("relu") for f in (F.relu, F.relu_, torch.relu, torch.relu_)},
    F.relu6: _fixed("relu6"), F.hardswish: _fixed("hardswish"), F.hardsigmoid: _fixed("hardsigmoid"),
    F.silu: _fixed("silu"), F.mish: _fixed("mish"), F.gelu: _gelu_function,
    **{f: _fixed("sigmoid") for f in (torch.sigmoid, torch.sigmoid_, F.sigmoid)},
    **{f: _fixed("tanh") for f in (torch.tanh, torch.tanh_, F.tanh)},
    **{f: _parametrized("leaky_relu", "negative_slope", 0.01) for f in (F.leaky_relu, F.leaky_relu_)},
    **{f: _parametrized("elu", "alpha", 1.0) for f in (F.elu, F.elu_)},
}
_ACTIVATION_METHODS = {
    "relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid", "tanh": "tanh", "tanh_": "tanh",
}


def timm_activation_functions() -> list[Callable]:
    """timm's functional activations, where timm is imported: the tracer keeps calls to them as one node."""
    functions = []
    for package in _TIMM_LAYERS:
        for submodule in ("activations", "activations_me"):
            module = sys.modules.get(f"{package}.{submodule}")
            functions += [getattr(module, name) for name in _TIMM_ACTIVATION_FUNCTIONS if hasattr(module, name)]
    return functions


def _timm_function_activation(target: Any) -> Optional[str]:
    module = getattr(target, "__module__", "") or ""
    if module.rpartition(".")[0] not in _TIMM_LAYERS or not module.endswith(("activations", "activations_me")):
        return None
    return _TIMM_ACTIVATION_FUNCTIONS.get(getattr(target, "__name__", ""))


def node_activation(node: fx.Node, modules: dict[str, nn.Module]) -> Optional[tuple[str, float]]:
    """``(name, param)`` of the activation that ``node`` applies to its only tensor input, or None."""
    if len(node.all_input_nodes) != 1 or not node.args or node.args[0] is not node.all_input_nodes[0]:
        return None
    if node.op == "call_module":
        return module_activation(modules[node.target])
    if node.op == "call_function":
        read = _ACTIVATION_FUNCTIONS.get(node.target)
        if read is not None:
            return read(node)
        name = _timm_function_activation(node.target)
        return None if name is None else (name, 0.0)
    if node.op == "call_method" and node.target in _ACTIVATION_METHODS and len(node.args) == 1:
        return _ACTIVATION_METHODS[node.target], 0.0
    return None


# --- adds, multiplies, poolings, pass-through ------------------------------------------------------

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
_MUL_METHODS = {"mul", "mul_"}
IN_PLACE_ARITHMETIC = {operator.iadd, operator.imul}


def _binary(node: fx.Node, functions: set, methods: set) -> Optional[tuple[Any, Any]]:
    """The two operands of a plain binary ``node`` (no ``alpha``, no ``out``), or None."""
    if node.op == "call_function" and node.target in functions or node.op == "call_method" and node.target in methods:
        if len(node.args) == 2 and not node.kwargs:
            return node.args[0], node.args[1]
    return None


def add_operands(node: fx.Node) -> Optional[tuple[Any, Any]]:
    """``(a, b)`` of ``a + b``, ``a += b``, ``torch.add(a, b)``, ``a.add(b)`` or ``a.add_(b)``; else None."""
    return _binary(node, _ADD_FUNCTIONS, _ADD_METHODS)


def mul_operands(node: fx.Node) -> Optional[tuple[Any, Any]]:
    """``(a, b)`` of ``a * b``, ``a *= b``, ``torch.mul(a, b)``, ``a.mul(b)`` or ``a.mul_(b)``; else None."""
    return _binary(node, _MUL_FUNCTIONS, _MUL_METHODS)


def modifies_first_operand(node: fx.Node) -> bool:
    """``a += b``, ``a.add_(b)``...: the node writes its result over its first operand."""
    if node.op == "call_function":
        return node.target in IN_PLACE_ARITHMETIC
    return node.op == "call_method" and node.target.endswith("_")


def _is_all_ones(size: Any) -> bool:
    if isinstance(size, int):
        return size == 1
    return isinstance(size, (tuple, list)) and len(size) > 0 and all(s == 1 for s in size)


def _spatial_dims(dims: Any) -> bool:
    """Dims of a global pooling over (H, W) of an (N, C, H, W) tensor."""
    return isinstance(dims, (tuple, list)) and sorted(dims) in ([2, 3], [-2, -1])


_GLOBAL_POOL_MODULES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                        nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_GLOBAL_POOL_FUNCTIONS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                          F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)


def is_global_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A pooling of its input to one value per (sample, channel) that keeps the input's rank."""
    if node.op == "call_module":
        module = modules[node.target]
        return type(module) in _GLOBAL_POOL_MODULES and _is_all_ones(module.output_size)
    if node.op == "call_function" and node.target in _GLOBAL_POOL_FUNCTIONS:
        return _is_all_ones(_argument(node, 1, "output_size", None))
    is_reduction = (node.op == "call_method" and node.target in ("mean", "amax")
                    or node.op == "call_function" and node.target in (torch.mean, torch.amax))
    if is_reduction:
        return _spatial_dims(_argument(node, 1, "dim", None)) and _argument(node, 2, "keepdim", False) is True
    return False


def is_pass_through(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """``nn.Identity``: its output is its input (timm's unused ``aa``, ``drop_path``, ``attn`` slots)."""
    return node.op == "call_module" and type(modules[node.target]) is nn.Identity


# Modules traced as one node (their forward reads ``self.training`` or is opaque to fx).
_STOCHASTIC_MODULES = _timm_keys("drop", "DropPath", "DropBlock2d") | {("torchvision.ops.stochastic_depth", "StochasticDepth")}


def is_leaf_module(module: nn.Module) -> bool:
    key = _class_key(type(module))
    return (isinstance(module, _BatchNorm) or key in _STOCHASTIC_MODULES or module_activation(module) is not None
            or key in _TIMM_ACTIVATION_CLASSES)
