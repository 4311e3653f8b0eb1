"""Models read as torch.fx graphs: a tracer that keeps norms, activations and stochastic modules whole and
records ``x += y`` as the in-place op it is; the parts of a model that trace; what a node is and who else
uses its tensor; and rewriting the forward of the smallest submodule that holds a change."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import operator
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import functions
from ..modules import ABN, InPlaceABN
from . import recognise

# --- tracing ---------------------------------------------------------------------------------------

_IN_PLACE_DUNDERS = {
    "__iadd__": operator.iadd, "__isub__": operator.isub, "__imul__": operator.imul,
    "__itruediv__": operator.itruediv, "__ifloordiv__": operator.ifloordiv, "__imod__": operator.imod,
    "__ipow__": operator.ipow, "__imatmul__": operator.imatmul, "__iand__": operator.iand,
    "__ior__": operator.ior, "__ixor__": operator.ixor, "__ilshift__": operator.ilshift,
    "__irshift__": operator.irshift,
}
IN_PLACE_OPERATORS = {*_IN_PLACE_DUNDERS.values(), operator.setitem}


class _Proxy(fx.Proxy):
    """fx's proxy, recording ``x += y`` as ``operator.iadd``: fx's own falls back to ``x = x + y``, which
    hides that x's storage is written over (the generated code writes ``x += y`` again)."""


def _in_place(function):
    return lambda self, other: self.tracer.create_proxy("call_function", function, (self, other), {})


for _dunder, _function in _IN_PLACE_DUNDERS.items():
    setattr(_Proxy, _dunder, _in_place(_function))


def _kept_whole_functions() -> list[Callable]:
    return [*recognise.timm_activation_functions(), functions.channel_gate]


class Tracer(fx.Tracer):
    """Keeps this package's layers, BatchNorms, activations and drop-path modules as single nodes."""

    def __init__(self):
        super().__init__(autowrap_functions=tuple(_kept_whole_functions()))

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, ABN) or recognise.is_leaf_module(module) or super().is_leaf_module(module, qualified_name)


def trace(module: nn.Module, training: bool) -> fx.Graph:
    """The graph of ``module``'s forward as it runs in training (or eval) mode; the modes are restored."""
    modes = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        return Tracer().trace(module)
    finally:
        for m, mode in modes:
            m.training = mode


def _signature(graph: fx.Graph) -> list[tuple]:
    """What a graph computes, node by node, with other nodes named by position."""
    index = {node: i for i, node in enumerate(graph.nodes)}
    return [(node.op, node.target, repr(fx.node.map_arg((node.args, node.kwargs), lambda n: index[n])))
            for node in graph.nodes]


@dataclasses.dataclass
class Region:
    """A part of the model traced as one graph: the whole model, or a submodule where the model did not trace."""

    name: str  # qualified name in the model; "" for the model itself
    module: nn.Module
    graph: fx.Graph  # traced in training mode
    eval_graph: fx.Graph

    @property
    def is_root(self) -> bool:
        return self.name == ""

    def qualified(self, target: str) -> str:
        return f"{self.name}.{target}" if self.name else target


def traced_regions(model: nn.Module, wanted: Callable[[nn.Module], bool], failures: list[str]) -> list[Region]:
    """Trace ``model``; where that fails, trace its children instead, and so on down. Only parts holding a
    module for which ``wanted`` is true are traced; ``failures`` gets one line per part that did not trace."""
    regions = []

    def visit(name: str, module: nn.Module) -> None:
        if not any(wanted(m) for m in module.modules()) or (name and Tracer().is_leaf_module(module, name)):
            return
        try:
            graphs = trace(module, True), trace(module, False)
        except Exception as error:  # fx raises many kinds on data-dependent control flow
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            failures.append(f"{name or type(module).__name__} ({type(module).__name__}): {type(error).__name__}: {message}")
            for child_name, child in module.named_children():
                visit(f"{name}.{child_name}" if name else child_name, child)
            return
        regions.append(Region(name, module, *graphs))

    visit("", model)
    return regions


# --- what a node is --------------------------------------------------------------------------------

# Producers whose output is a fresh tensor that their own backward does not keep: a layer may write over
# it. Anything else (an activation keeps its output; a view shares storage) is not.
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


def describe(node: fx.Node, region: Region, modules: dict[str, nn.Module]) -> str:
    """How a node reads in a message: ``ReLU 'layer1.0.relu'``, ``operator.add``, ``Tensor.relu``..."""
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


def has_fresh_output(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _FRESH_OUTPUT_MODULES)
    if node.op == "call_function":
        return node.target in _FRESH_OUTPUT_FUNCTIONS
    if node.op == "call_method":
        return node.target in _FRESH_OUTPUT_METHODS
    return False


def writes_over(user: fx.Node, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``user`` modifies the tensor of ``node`` in place."""
    if not user.args or user.args[0] is not node:
        return False
    if user.op == "call_method":
        return user.target.endswith("_") and not user.target.endswith("__")
    if user.op == "call_module":
        module = modules[user.target]
        return isinstance(module, InPlaceABN) or bool(getattr(module, "inplace", False))
    if user.op == "call_function":
        if user.target in IN_PLACE_OPERATORS:
            return True
        name = getattr(user.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            return True
        try:  # F.relu(x, True), F.leaky_relu(x, 0.1, inplace=True)...
            bound = inspect.signature(user.target).bind(*user.args, **user.kwargs)
        except (TypeError, ValueError):  # builtins without a signature
            return user.kwargs.get("inplace", False) is True
        return bound.arguments.get("inplace", False) is True
    return False


def modified_in_place_by(node: fx.Node, modules: dict[str, nn.Module]) -> Optional[fx.Node]:
    """A user that writes over ``node``'s tensor, or one of its pass-through aliases; None if none does."""
    for alias in aliases(node, modules):
        for user in alias.users:
            if writes_over(user, alias, modules):
                return user
    return None


def aliases(node: fx.Node, modules: dict[str, nn.Module]) -> list[fx.Node]:
    """``node`` and the ``nn.Identity`` nodes applied to it (the same tensor under other names)."""
    found, pending = [], [node]
    while pending:
        current = pending.pop()
        found.append(current)
        pending += [user for user in current.users if recognise.is_pass_through(user, modules)]
    return found


def only_user(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[Optional[fx.Node], list[fx.Node]]:
    """The one node that uses ``node``'s tensor, looking through single-use ``nn.Identity`` nodes (which
    are returned too); ``(None, [])`` where it has several users or none."""
    passed = []
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not recognise.is_pass_through(user, modules):
            return user, passed
        passed.append(user)
        node = user
    return None, []


# --- rewriting the forward of the smallest submodule that holds a change ---------------------------

@dataclasses.dataclass
class Edit:
    """A change to a region's graph. ``nodes`` are the region nodes it replaces or removes: they decide the
    submodule whose forward is rewritten; ``uses`` are values it reads, which must be visible there.
    ``apply(graph, counterpart)`` makes the change on a fresh trace of that submodule, where
    ``counterpart`` maps a region node to its node there, and returns the region nodes whose value a new
    node now gives (so later edits that read them read the new node)."""

    nodes: tuple[fx.Node, ...]
    apply: Callable[[fx.Graph, Callable[[fx.Node], fx.Node]], dict[fx.Node, fx.Node]]
    uses: tuple[fx.Node, ...] = ()


@dataclasses.dataclass
class _Rewrite:
    scope: str  # the submodule's name in the region ("" for the region itself)
    module: nn.Module
    graph: fx.Graph
    counterpart: dict[fx.Node, fx.Node]
    edits: list[Edit]


def _module_path(node: fx.Node) -> list[str]:
    """Names of the modules whose forward was running when fx recorded ``node``, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [path for path, _ in stack.values()]
    if node.op == "call_module" and paths and paths[-1] == node.target:
        paths = paths[:-1]  # the module called is not where the call happens
    return paths


def _scope(nodes: Iterable[fx.Node]) -> str:
    """The innermost module whose forward recorded all of ``nodes`` ("" for the traced module itself)."""
    paths = [_module_path(node) for node in nodes]
    common = paths[0]
    for path in paths[1:]:
        shared = 0
        while shared < min(len(common), len(path)) and common[shared] == path[shared]:
            shared += 1
        common = common[:shared]
    return common[-1] if common else ""


def _depth(scope: str) -> int:
    return scope.count(".") + 1 if scope else 0


def _inside(scope: str, path: str) -> bool:
    return scope == "" or path == scope or path.startswith(scope + ".")


def _input_nodes(node: fx.Node) -> list[fx.Node]:
    found = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


def _prepare(region: Region, scope: str) -> tuple[Optional[_Rewrite], str]:
    """Trace submodule ``scope`` alone and pair its nodes with the region's; or say why that failed."""
    module = region.module.get_submodule(scope) if scope else region.module
    where = f"'{region.qualified(scope)}'" if region.qualified(scope) else "the model"
    ordered = list(region.graph.nodes)
    inside = [i for i, node in enumerate(ordered) if node.op not in ("placeholder", "output")
              and (scope == "" or scope in [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()])]
    if not inside or (scope and inside != list(range(inside[0], inside[-1] + 1))):
        return None, f"the forward of {where} runs more than once"
    try:
        graph, eval_graph = trace(module, True), trace(module, False)
    except Exception as error:
        return None, f"{where} does not trace on its own ({type(error).__name__})"
    if _signature(graph) != _signature(eval_graph):
        return None, f"the forward of {where} differs between training and eval mode"
    own = [node for node in graph.nodes if node.op not in ("placeholder", "output")]
    if len(own) != len(inside):
        return None, f"{where} traces differently on its own"
    prefix = f"{scope}." if scope else ""
    counterpart: dict[fx.Node, fx.Node] = {}
    for node, twin in zip((ordered[i] for i in inside), own):
        same = node.op == twin.op and (
            node.target == prefix + twin.target if node.op in ("call_module", "get_attr") else node.target == twin.target)
        inputs, twin_inputs = _input_nodes(node), _input_nodes(twin)
        if not same or len(inputs) != len(twin_inputs):
            return None, f"{where} traces differently on its own"
        counterpart[node] = twin
        for value, twin_value in zip(inputs, twin_inputs):
            if counterpart.setdefault(value, twin_value) is not twin_value:
                return None, f"{where} traces differently on its own"
    return _Rewrite(scope, module, graph, counterpart, []), ""


def plan_rewrites(region: Region, edits: list[Edit]) -> tuple[list[_Rewrite], dict[int, str]]:
    """Group ``edits`` by the submodule whose forward they change: the smallest one holding all their
    nodes, merged into an enclosing one that also changes (which, if it cannot be rewritten, lets the inner
    ones go alone). Returns the rewrites and, by edit index, why an edit cannot be made."""
    own = [_scope(edit.nodes) for edit in edits]
    prepared: dict[str, tuple[Optional[_Rewrite], str]] = {}
    while True:
        merged: dict[str, str] = {}
        for scope in sorted({s for s in own if prepared.get(s, (True,))[0] is not None}, key=_depth):
            merged[scope] = next((kept for kept in merged.values() if _inside(kept, scope)), scope)
        new = [scope for scope in set(merged.values()) if scope not in prepared]
        for scope in new:
            prepared[scope] = _prepare(region, scope)
        if all(prepared[scope][0] is not None for scope in new):
            break
    failures: dict[int, str] = {}
    rewrites: list[_Rewrite] = []  # in the order of their first edit
    for i, edit in enumerate(edits):
        rewrite, why = prepared[merged[own[i]]] if own[i] in merged else prepared[own[i]]
        if rewrite is None:
            failures[i] = why
        elif any(node not in rewrite.counterpart for node in (*edit.nodes, *edit.uses)):
            failures[i] = f"a value it uses is not visible in '{region.qualified(rewrite.scope)}' traced alone"
        else:
            rewrite.edits.append(edit)
            if all(rewrite is not kept for kept in rewrites):
                rewrites.append(rewrite)
    return rewrites, failures


def graph_module(module: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """``module`` with ``graph`` as its forward, keeping all of its submodules, parameters, buffers and
    plain attributes (fx keeps only those the graph uses), so state dicts and attribute access still work."""
    graph.lint()
    rewritten = fx.GraphModule(module, graph, class_name=type(module).__name__)
    for name, child in module.named_children():  # the originals, whole (fx copies only the used parts)
        setattr(rewritten, name, child)
    for name, parameter in module.named_parameters(recurse=False):
        if name not in rewritten._parameters:
            rewritten.register_parameter(name, parameter)
    for name, buffer in module.named_buffers(recurse=False):
        if name not in rewritten._buffers:
            rewritten.register_buffer(name, buffer, persistent=name not in module._non_persistent_buffers_set)
    attributes = {name: value for name, value in vars(module).items()
                  if not name.startswith("_") and not hasattr(rewritten, name)}
    for name, value in attributes.items():
        setattr(rewritten, name, value)
    # fx's deepcopy of a GraphModule rebuilds it from its graph and keeps only these of its attributes.
    rewritten.meta.setdefault(fx.graph_module._USER_PRESERVED_ATTRIBUTES_KEY, {}).update(attributes)
    rewritten.training = module.training
    return rewritten


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that shares its process groups: the copy synchronizes over the same ones
    (and a torch.distributed ProcessGroup cannot be copied)."""
    groups = (getattr(m, attribute, None) for m in model.modules() for attribute in ("process_group", "group"))
    return copy.deepcopy(model, memo={id(group): group for group in groups if group is not None})


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def install(model: nn.Module, region: Region, replacement: Optional[nn.Module]) -> nn.Module:
    """``model`` with ``region``'s module replaced by ``replacement`` (``None``: unchanged); the
    replacement itself when the region is the whole model."""
    if replacement is None:
        return model
    if region.is_root:
        return replacement
    set_submodule(model, region.name, replacement)
    return model


def apply_rewrites(region: Region, rewrites: list[_Rewrite]) -> Optional[nn.Module]:
    """Make the planned edits; returns the module that replaces the whole region, if its own forward changed."""
    replacement = None
    for rewrite in rewrites:
        for edit in rewrite.edits:
            rewrite.counterpart.update(edit.apply(rewrite.graph, rewrite.counterpart.__getitem__))
        rewritten = graph_module(rewrite.module, rewrite.graph)
        if rewrite.scope:
            set_submodule(region.module, rewrite.scope, rewritten)
        else:
            replacement = rewritten
    return replacement
