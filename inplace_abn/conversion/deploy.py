"""Off InPlace-ABN again, for deployment: :func:`convert_to_batchnorm` gives standard BatchNorm +
activation modules, :func:`fuse_conv_abn` folds eval-mode layers into the convolution before them. Layers
called with a shortcut and ``channel_gate`` calls become standard ops in the rewritten forwards."""

from __future__ import annotations

import collections
import operator
from typing import Callable, Optional

from torch import fx, nn

from .. import functions, recompute
from ..activations import make_activation
from ..modules import ABN
from .graph import Edit, apply_rewrites, copy_model, install, plan_rewrites, set_submodule, traced_regions
from .recognise import standard_activation_module
from .weights import feeding_layer, fold, standard_batchnorm

_BatchNorm = nn.modules.batchnorm._BatchNorm


def _activation_module(layer: ABN) -> nn.Module:
    activation = make_activation(layer.activation, layer.activation_param)
    return standard_activation_module(activation.name, activation.param)


def _shortcut(node: fx.Node) -> Optional[fx.Node]:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("shortcut")


def _is_gate(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is functions.channel_gate


def _has_layers_or_gates(module: nn.Module) -> bool:
    return isinstance(module, ABN) or (isinstance(module, fx.GraphModule) and any(_is_gate(n) for n in module.graph.nodes))


def _gate_as_product(node: fx.Node) -> Edit:
    def apply(graph: fx.Graph, twin) -> None:
        call = twin(node)
        with graph.inserting_before(call):
            product = graph.call_function(operator.mul, call.args)
        call.replace_all_uses_with(product)
        graph.erase_node(call)
        return {node: product}

    return Edit((node,), apply, tuple(node.all_input_nodes))


def _layer_call_as(node: fx.Node, build: Callable[[fx.Graph, str, fx.Node, fx.Node], fx.Node]) -> Edit:
    """Replace ``layer(x, shortcut)`` by the nodes that ``build(graph, target, x, shortcut)`` makes."""
    x, shortcut = node.args[0], _shortcut(node)

    def apply(graph: fx.Graph, twin) -> None:
        call = twin(node)
        with graph.inserting_before(call):
            result = build(graph, call.target, twin(x), twin(shortcut))
        call.replace_all_uses_with(result)
        graph.erase_node(call)
        return {node: result}

    return Edit((node,), apply, (x, shortcut))


def _norm_add_act(graph: fx.Graph, target: str, x: fx.Node, shortcut: fx.Node) -> fx.Node:
    total = graph.call_function(operator.add, (graph.call_module(f"{target}.0", (x,)), shortcut))
    return graph.call_module(f"{target}.1", (total,))


def _add_act(graph: fx.Graph, target: str, x: fx.Node, shortcut: fx.Node) -> fx.Node:
    return graph.call_module(target, (graph.call_function(operator.add, (x, shortcut)),))


def convert_to_batchnorm(model: nn.Module, batch_norm: Callable[..., _BatchNorm] = nn.BatchNorm2d) -> nn.Module:
    """Return a copy of ``model`` with every ABN, InPlaceABN, RecomputeABN and InPlaceABNSync layer replaced
    by ``nn.Sequential(batch_norm(...), activation)`` of standard modules computing the same function
    (BatchNorm weight ``|w| + eps``, or ``w`` as it is for a layer with ``batchnorm_weight``; the
    activation's torch module), to deploy where this package is not
    installed. A layer ``name`` becomes ``name.0`` (BatchNorm) and ``name.1`` (activation) in the state
    dict. Where a rewritten forward calls a layer with a shortcut, it calls ``name.0``, adds the shortcut
    and calls ``name.1``; ``channel_gate(x, gate)`` becomes ``x * gate``. ``batch_norm`` is the class for
    the inputs' rank: ``nn.BatchNorm2d`` (default), ``nn.BatchNorm1d`` or ``nn.BatchNorm3d``.

    Raises ``ValueError`` where a layer called with a shortcut, or a ``channel_gate`` call, sits in a
    forward that cannot be rewritten."""
    model = copy_model(model)
    if isinstance(model, ABN):
        return _standard_layers(model, batch_norm)
    planned = []
    for region in traced_regions(model, _has_layers_or_gates, []):
        modules = dict(region.module.named_modules())
        edits = []
        for node in region.graph.nodes:
            if node.op == "call_module" and isinstance(modules[node.target], ABN) and _shortcut(node) is not None:
                edits.append(_layer_call_as(node, _norm_add_act))
            elif _is_gate(node):
                edits.append(_gate_as_product(node))
        rewrites, failures = plan_rewrites(region, edits)
        if failures:
            index, why = next(iter(failures.items()))
            node = edits[index].nodes[0]
            call = "a channel_gate call" if _is_gate(node) else f"the call of '{region.qualified(node.target)}' with a shortcut"
            raise ValueError(
                f"convert_to_batchnorm cannot rewrite the forward that holds {call}: {why}. Convert that part "
                "by hand: layer(x, shortcut) is act(BatchNorm(x) + shortcut), channel_gate(x, gate) is x * gate.")
        planned.append((region, rewrites))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ABN):
                setattr(parent, name, _standard_layers(child, batch_norm))
    for region, rewrites in planned:
        model = install(model, region, apply_rewrites(region, rewrites))
    # Standard layers need no recompute hooks, and without them the model loads where this package is not
    # installed.
    return recompute.disable_recompute(model)


def _standard_layers(layer: ABN, batch_norm: Callable[..., _BatchNorm]) -> nn.Sequential:
    return nn.Sequential(standard_batchnorm(layer, batch_norm), _activation_module(layer)).train(layer.training)


def fuse_conv_abn(model: nn.Module) -> nn.Module:
    """Return a copy of an eval-mode ``model`` in which every ABN-family layer that directly follows a
    convolution or linear layer (found with ``torch.fx``, as in :func:`convert_to_abn`) is folded into it:
    the layer's weight becomes ``W * s`` and its bias ``(b_conv - running_mean) * s + bias`` per output
    channel, with ``s = (|w| + eps) / sqrt(running_var + eps)`` (``w / sqrt(running_var + eps)`` for a layer
    with ``batchnorm_weight``), and the ABN layer becomes its activation
    alone (called on ``x + shortcut`` where it had a shortcut); ``channel_gate`` calls become products. Same
    outputs up to rounding (computed in float64). Layers without running statistics, or after anything
    else, stay as they are."""
    if any(isinstance(m, ABN) and m.training for m in model.modules()):
        raise ValueError("fuse_conv_abn folds running statistics, for inference: call model.eval() first.")
    fused = copy_model(model)
    parameter_uses = collections.Counter(id(p) for _, p in fused.named_parameters(remove_duplicate=False))
    for region in traced_regions(fused, _has_layers_or_gates, []):
        modules = dict(region.module.named_modules())
        calls = collections.Counter(node.target for node in region.graph.nodes if node.op == "call_module")
        edits, folds = [], []  # folds: (node, conv, layer, index of its edit or None)
        for node in region.graph.nodes:
            if _is_gate(node):
                edits.append(_gate_as_product(node))
            if node.op != "call_module" or not isinstance(modules[node.target], ABN) or calls[node.target] != 1:
                continue
            layer = modules[node.target]
            conv = feeding_layer(node, modules, calls, parameter_uses)
            if conv is None or layer.running_mean is None:
                continue
            edit = None
            if _shortcut(node) is not None:
                edit = len(edits)
                edits.append(_layer_call_as(node, _add_act))
            folds.append((node, conv, layer, edit))
        rewrites, failures = plan_rewrites(region, edits)  # a gate that stays computes the same product
        for node, conv, layer, edit in folds:
            if edit not in failures:
                fold(conv, layer)
                set_submodule(region.module, node.target, _activation_module(layer))
        fused = install(fused, region, apply_rewrites(region, rewrites))
    return fused
