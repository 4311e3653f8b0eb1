"""``convert_to_abn``: find every BatchNorm's pattern, choose the layer that keeps the model's function
exactly and the least memory, and put it in, with weights converted and forwards rewritten where needed."""

from __future__ import annotations

import collections
import dataclasses
from typing import Optional

from torch import fx, nn

from .. import functions
from ..activations import Activation, describe as describe_activation, make_activation
from ..recompute import enable_recompute
from . import recognise
from .graph import (Edit, Region, aliases, apply_rewrites, copy_model, describe, has_fresh_output,
                    install, modified_in_place_by, plan_rewrites, set_submodule, traced_regions)
from .patterns import NORM_ACT, GateMatch, Match, find_gate, is_gate_product, match
from .report import (IN_PLACE, OUT_OF_PLACE, RECOMPUTE, ConversionReport, LayerConversion, SampleInput,
                     max_output_difference, saved_activation_bytes, step_memory)
from .weights import feeding_layer, load_batchnorm, negative_channels, new_layer, small_channels


@dataclasses.dataclass(frozen=True)
class _Options:
    in_place: bool
    relu_to: str
    relu_slope: float
    sync: bool
    clamp_small_weights: bool
    piecewise: str


@dataclasses.dataclass
class _Context:
    """One traced region and what the decisions read from it."""

    region: Region
    modules: dict[str, nn.Module]
    calls: collections.Counter
    eval_norms: dict[str, fx.Node]  # the same norms in the eval-mode graph
    eval_calls: collections.Counter
    parameter_uses: collections.Counter
    options: _Options
    claimed: dict[fx.Node, str] = dataclasses.field(default_factory=dict)  # node -> the norm taking it over
    eval_claimed: dict[fx.Node, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Plan:
    """One BatchNorm's conversion, decided but not made yet."""

    record: LayerConversion
    match: Match
    eval_match: Match
    activation: Activation
    mode: str
    feeding: Optional[nn.Module]
    sync: bool
    group: object = None
    gate: Optional[GateMatch] = None


def _refusal(node: fx.Node, context: _Context) -> str:
    """Why the BatchNorm of ``node`` cannot be converted at all ("" when it can)."""
    bn = context.modules[node.target]
    kind = recognise.norm_module(bn)
    if kind is None:
        return f"a BatchNorm subclass ({type(bn).__name__}) with its own forward: what it computes is not known"
    if context.calls[node.target] != 1:
        return "the module is called more than once"
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return "it is called with more than one input"
    if any(nn.parameter.is_lazy(t) for t in (bn.weight, bn.running_mean) if t is not None):
        return "it is lazy and not initialized yet: run the model once first"
    if not bn.eps > 0:
        return f"eps={bn.eps}: the layers need eps > 0"
    if kind.with_activation:
        if type(bn.drop) is not nn.Identity:
            return (f"its drop ({type(bn.drop).__name__}) runs between the norm and its act: only nn.Identity "
                    "there can be fused")
        if recognise.module_activation(bn.act) is None:
            return f"its act ({type(bn.act).__name__}) is not one of the layers' activations"
    if node.target not in context.eval_norms:
        return "it is not called in eval mode"
    return ""


def _why_not_in_place(found: Match, region: Region, modules: dict[str, nn.Module]) -> Optional[str]:
    """Why the layer of ``found`` may not write over its input (None when it may)."""
    source = found.norm.args[0]
    if source.op == "placeholder":
        owner = f"'{region.name}'" if region.name else "the model"
        return f"its input is {describe(source, region, modules)} of {owner}, which the caller may still use"
    if len(source.users) > 1:
        others = ", ".join(describe(user, region, modules) for user in source.users if user is not found.norm)
        return f"its input (the output of {describe(source, region, modules)}) is also used by {others}"
    if not has_fresh_output(source, modules) or is_gate_product(source, modules):
        return f"its input comes from {describe(source, region, modules)}, which may keep it for backward or share its storage"
    writer = modified_in_place_by(found.output, modules)
    if writer is not None:
        return f"its output is then modified in place by {describe(writer, region, modules)}"
    if not region.is_root and any(user.op == "output" for alias in aliases(found.output, modules) for user in alias.users):
        return f"its output leaves '{region.name}', whose caller could not be traced"
    return None


def _same_structure(a: Match, b: Match) -> bool:
    def shape(m: Match):
        shortcut = None if m.shortcut is None else (m.shortcut.op, str(m.shortcut.target))
        return m.pattern.name, m.activation, [(n.op, str(n.target)) for n in m.taken_over], shortcut
    return shape(a) == shape(b)


def _decide(node: fx.Node, context: _Context, record: LayerConversion, rewrite_failure: Optional[str] = None) -> Optional[_Plan]:
    """Match ``node``'s pattern and choose its layer; None (with ``record.reason``) where it stays as it was."""
    region, modules, options = context.region, context.modules, context.options
    bn = modules[node.target]
    found = match(node, region, modules, context.calls, context.claimed, rewrite_failure)
    eval_node = context.eval_norms[node.target]
    eval_found = match(eval_node, region, modules, context.eval_calls, context.eval_claimed, rewrite_failure)
    if not _same_structure(found, eval_found):
        record.reason = "what follows it differs between training and eval mode"
        return None
    name, param = found.activation
    notes, exact = list(found.notes), True
    if name == "relu" and options.relu_to == "leaky_relu":
        name, param, exact = "leaky_relu", options.relu_slope, False
        notes.append(f"relu became leaky_relu({param}) (relu_to='leaky_relu'): outputs change slightly")
    try:
        activation = make_activation(name, param)
    except ValueError as error:
        record.reason = f"its activation is not one the layers have: {error}"
        return None
    feeding = feeding_layer(node, modules, context.calls, context.parameter_uses)
    mode = _mode(found, eval_found, activation, context, notes)
    if mode == IN_PLACE:  # the only mode that scales by |w'| + eps: the other layers take BatchNorm's weight
        why = _why_weights_not_in_place(bn, feeding, options.clamp_small_weights)
        small = small_channels(bn)
        if why is not None:
            mode = RECOMPUTE
            notes.append(f"recompute: {why}")
        elif small:
            exact = False
            record.clamped_channels = small
            notes.append(f"{small} channels with |weight| < eps={bn.eps} scale by eps instead (clamp_small_weights)")
    kind = recognise.norm_module(bn)
    sync = options.sync or kind.synchronized
    group = getattr(bn, "process_group", None)
    record.pattern = found.pattern.name
    record.activation = found.activation_found
    record.exact = exact
    record.shortcut = "" if found.shortcut is None else describe(found.shortcut, region, modules)
    record.reason = "; ".join(notes)
    _claim(context, found, eval_found, record.name)
    return _Plan(record, found, eval_found, activation, mode, feeding, sync, group)


def _why_weights_not_in_place(bn: nn.Module, feeding: Optional[nn.Module], clamp_small_weights: bool) -> Optional[str]:
    """Why a layer writing in place, whose scale is ``|w'| + eps``, cannot take ``bn``'s weights exactly
    (None when it can)."""
    negative = negative_channels(bn)
    if negative and feeding is None:
        return (f"{negative} channels have a negative weight and no convolution or linear layer feeds the norm "
                "alone to take the sign, which a layer writing in place (scale |w| + eps) needs")
    small = small_channels(bn)
    if small and not clamp_small_weights:
        smallest = bn.weight.detach().abs().min().item()
        return (f"{small} channels have |w| < eps={bn.eps} (smallest {smallest:.3g}), which a layer writing in place "
                "cannot scale by (its scale is |w'| + eps >= eps; clamp_small_weights=True runs it in place with "
                "scale eps there, not exactly)")
    return None


def _claim(context: _Context, found: Match, eval_found: Match, name: Optional[str]) -> None:
    """Mark the nodes a plan takes over as its own (``name=None``: give them back)."""
    for claimed, nodes in ((context.claimed, found.taken_over), (context.eval_claimed, eval_found.taken_over)):
        for node in nodes:
            if name is None:
                claimed.pop(node, None)
            else:
                claimed[node] = name


def _mode(found: Match, eval_found: Match, activation: Activation, context: _Context, notes: list[str]) -> str:
    if not context.options.in_place:
        return OUT_OF_PLACE
    if activation.kind == "lossy":
        why = f"{activation.name} is lossy (its input cannot be rebuilt from its output)"
    elif activation.kind == "piecewise" and context.options.piecewise == "recompute":
        why = f"{activation.name}: rebuilding the output is faster than inverting it (piecewise='in_place' inverts)"
    else:
        why = (_why_not_in_place(found, context.region, context.modules)
               or _why_not_in_place(eval_found, context.region, context.modules))
    if why is None:
        return IN_PLACE
    notes.append(f"recompute: {why}")
    return RECOMPUTE


def _norm_edit(found: Match) -> Edit:
    """The forward change that makes the new layer take over the nodes after the norm."""
    uses = (found.norm.args[0],) + (() if found.shortcut is None else (found.shortcut,))

    def apply(graph: fx.Graph, twin) -> None:
        last = twin(found.output)
        with graph.inserting_before(last):
            call = graph.call_module(twin(found.norm).target, tuple(twin(n) for n in uses))
        last.replace_all_uses_with(call)
        for node in reversed([found.norm, *found.taken_over]):
            graph.erase_node(twin(node))
        return {found.output: call}

    return Edit((found.norm, *found.taken_over), apply, uses)


def _gate_edit(gate: GateMatch) -> Edit:
    def apply(graph: fx.Graph, twin) -> None:
        mul = twin(gate.mul)
        with graph.inserting_before(mul):
            call = graph.call_function(functions.channel_gate, (twin(gate.x), twin(gate.gate)))
        mul.replace_all_uses_with(call)
        graph.erase_node(mul)
        return {gate.mul: call}

    return Edit((gate.mul,), apply, (gate.x, gate.gate))


def _convert_region(region: Region, options: _Options, parameter_uses: collections.Counter,
                    report: ConversionReport) -> Optional[nn.Module]:
    """Convert the norms of one traced region; returns the module that replaces the region, if one must."""
    modules = dict(region.module.named_modules())
    calls = collections.Counter(n.target for n in region.graph.nodes if n.op == "call_module")
    eval_calls = collections.Counter(n.target for n in region.eval_graph.nodes if n.op == "call_module")
    eval_norms = {n.target: n for n in region.eval_graph.nodes
                  if n.op == "call_module" and recognise.is_batchnorm(modules[n.target])}
    context = _Context(region, modules, calls, eval_norms, eval_calls, parameter_uses, options)
    plans: list[_Plan] = []
    for node in region.graph.nodes:
        if node.op != "call_module" or not recognise.is_batchnorm(modules[node.target]):
            continue
        record = LayerConversion(region.qualified(node.target), type(modules[node.target]).__name__)
        report.layers.append(record)
        record.reason = _refusal(node, context)
        plan = None if record.reason else _decide(node, context, record)
        if plan is not None:
            plans.append(plan)
    for plan in plans:
        plan.gate = find_gate(plan.match.output, modules)

    # Forward changes can fail (a block that traces differently alone, or by mode): such a norm is decided
    # again with the patterns that only swap modules, and everything is planned again.
    while True:
        edits, owners = [], []
        for plan in plans:
            if plan.match.needs_rewrite:
                edits.append(_norm_edit(plan.match))
                owners.append((plan, "norm"))
            if plan.gate is not None:
                edits.append(_gate_edit(plan.gate))
                owners.append((plan, "gate"))
        rewrites, failures = plan_rewrites(region, edits)
        if not failures:
            break
        for index, why in failures.items():
            plan, part = owners[index]
            if part == "gate":
                plan.gate = None
                plan.record.reason = "; ".join(filter(None, [plan.record.reason, f"SE gate not fused: {why}"]))
            elif plan in plans:
                plans.remove(plan)
                _claim(context, plan.match, plan.eval_match, None)
                record = plan.record  # already in the report: start it again
                vars(record).update(vars(LayerConversion(record.name, record.norm)))
                again = _decide(plan.match.norm, context, record, rewrite_failure=why)
                if again is not None:
                    plans.append(again)

    for plan in plans:
        _make(plan, region, modules)
    replacement = apply_rewrites(region, rewrites)
    report.rewritten += [region.qualified(rewrite.scope) for rewrite in rewrites]
    return replacement


def _make(plan: _Plan, region: Region, modules: dict[str, nn.Module]) -> None:
    """Build the planned layer, load the weights and put it into the model."""
    node = plan.match.norm
    bn = modules[node.target]
    layer = new_layer(bn, plan.activation.name, plan.activation.param, plan.mode, plan.sync, plan.group)
    record = plan.record
    record.negated_channels = load_batchnorm(layer, bn, plan.feeding)
    record.mode = plan.mode
    record.converted_to = summary(layer)
    if plan.gate is not None:
        record.gate = f"{describe(plan.gate.mul, region, modules)} -> channel_gate"
    set_submodule(region.module, node.target, layer)
    act = plan.match.activation_node
    if plan.match.pattern is NORM_ACT and not plan.match.needs_rewrite and act is not None:
        set_submodule(region.module, act.target, nn.Identity())


def summary(layer: nn.Module) -> str:
    """``InPlaceABN(leaky_relu[0.01])``: the class and its activation."""
    activation = describe_activation(make_activation(layer.activation, layer.activation_param))
    in_place = ", in_place=False" if hasattr(layer, "in_place") and not layer.in_place else ""
    return f"{type(layer).__name__}({activation}{in_place})"


def convert_to_abn(
    model: nn.Module,
    *,
    relu_to: str = "relu",
    relu_slope: float = 0.01,
    in_place: bool = True,
    sync: bool = False,
    clamp_small_weights: Optional[bool] = None,
    piecewise: str = "recompute",
    sample_input: Optional[SampleInput] = None,
) -> tuple[nn.Module, ConversionReport]:
    """Return a copy of ``model`` in which every BatchNorm is one layer of this package together with the
    activation, residual add and SE gate around it, computing exactly what the model computed; and a
    :class:`ConversionReport` saying, for every BatchNorm, what it became or why it stayed. ``model``
    itself is not changed.

    The model is read with ``torch.fx`` (where it does not trace, its submodules are, one by one), and
    each BatchNorm is matched against :data:`inplace_abn.conversion.PATTERNS`: BatchNorm -> add(shortcut)
    -> activation (ResNet blocks), BatchNorm -> add(shortcut) (inverted residuals), BatchNorm ->
    activation (any module, shared module, function or method; timm's BatchNormAct2d), BatchNorm alone;
    and an SE product of the output, ``x * gate``, becomes ``channel_gate(x, gate)``.

    Which layer: an invertible activation (leaky_relu, elu, identity) whose input is a fresh tensor
    nothing else uses -> :class:`~inplace_abn.InPlaceABN`, which writes over its input; a lossy activation
    (relu, relu6, hardswish, hardsigmoid, sigmoid, tanh), a piecewise-invertible one (silu, gelu, mish;
    see ``piecewise``) or an input used elsewhere -> ``RecomputeABN``, which keeps its input and rebuilds
    its output in backward (the model then gets :func:`~inplace_abn.enable_recompute`). Either way one
    full-size tensor per layer. Where the model's function cannot be kept
    exactly, the BatchNorm stays as it was and the report says why.

    Only forwards that change are rewritten, each in the smallest submodule holding the change (an
    ``fx.GraphModule`` named after its class, with the same submodules, attributes and state-dict keys);
    the model keeps its class unless its own forward changed (``report.rewritten`` lists them).

    Weights are converted exactly. A layer writing in place scales by ``|w'| + eps``, so ``w' = |w| - eps``,
    and a channel with ``w < 0`` is negated in the convolution or linear layer that feeds the BatchNorm
    (weight and bias) and in the running mean (docs/migrating.md). Every other layer (recompute mode, out of
    place) scales by ``weight`` itself (``batchnorm_weight=True``) and takes BatchNorm's weight unchanged.
    Where only the weights keep a norm from running in place (negative weights with no such layer to
    take the sign, as after a concatenation or an add; ``|w| < eps``, as timm's zero-initialized residual
    norms), it runs in recompute mode: every BatchNorm converts exactly.

    Args:
        relu_to: ``"relu"`` (default): ReLU stays ReLU, exactly (recompute mode). ``"leaky_relu"``: ReLU
            becomes ``leaky_relu(relu_slope)``, which runs in place; outputs change slightly (fine-tune),
            and the report marks those layers not exact.
        relu_slope: the leaky_relu slope that replaces ReLU, > 0.
        in_place: ``False`` gives :class:`~inplace_abn.ABN` everywhere (keeps what BatchNorm did).
        sync: make :class:`~inplace_abn.InPlaceABNSync` layers (``in_place=False`` where not in place).
            ``nn.SyncBatchNorm`` and timm's SyncBatchNormAct always become InPlaceABNSync, with their group.
        clamp_small_weights: where a norm could run in place but has channels with ``|w| < eps``, run it
            in place all the same, scaling those channels by eps (not exact); ``False``: such a norm runs in
            recompute mode, exactly. ``None`` (default): ``True`` with ``relu_to="leaky_relu"``, which is
            not exact anyway (so zero-initialized residual norms run in place too), else ``False``.
        piecewise: how silu, gelu, gelu_tanh and mish layers keep what backward needs: ``"recompute"``
            (default: the input, the output rebuilt by one forward pass; exact) or ``"in_place"`` (the
            output over the input and one bit per element, inverted by Newton steps: the same memory,
            2-4x slower on CPU than recompute, float64 error ~1e-13, docs/activations.md).
        sample_input: a tensor or tuple of inputs; with it, the report has the memory before and after
            (training mode: bytes saved for backward, bytes held after the forward and the peak of a
            step, the last two from :class:`~inplace_abn.memory.MemoryProbe`) and the largest output
            difference (eval mode). Running statistics, gradients and random state are left as they were.
    """
    if relu_to not in ("leaky_relu", "relu"):
        raise ValueError(f"relu_to must be 'relu' (exact, the default) or 'leaky_relu', got {relu_to!r}.")
    if relu_to == "leaky_relu" and not relu_slope > 0:
        raise ValueError(f"relu_slope must be > 0 to run in place (got {relu_slope}); relu_to='relu' keeps ReLU exactly.")
    if piecewise not in ("recompute", "in_place"):
        raise ValueError(f"piecewise must be 'recompute' (the default) or 'in_place', got {piecewise!r}.")
    if clamp_small_weights is None:
        clamp_small_weights = relu_to == "leaky_relu"
    options = _Options(in_place, relu_to, float(relu_slope), sync, bool(clamp_small_weights), piecewise)
    converted = copy_model(model)
    parameter_uses = collections.Counter(id(p) for _, p in converted.named_parameters(remove_duplicate=False))
    report = ConversionReport(layers=[], relu_to=relu_to)
    for region in traced_regions(converted, recognise.is_batchnorm, report.untraced):
        converted = install(converted, region, _convert_region(region, options, parameter_uses, report))
    seen = {layer.name for layer in report.layers}
    unseen = "no traced forward reaches it" + (" (see 'not traced')" if report.untraced else "")
    for name, module in model.named_modules():
        if recognise.is_batchnorm(module) and name not in seen:
            report.layers.append(LayerConversion(name, type(module).__name__, reason=unseen))
    if any(layer.mode == RECOMPUTE or layer.gate for layer in report.layers):
        enable_recompute(converted)
        report.recompute = True
    if sample_input is not None:
        report.saved_bytes_before = saved_activation_bytes(model, sample_input)
        report.saved_bytes_after = saved_activation_bytes(converted, sample_input)
        before, after = step_memory(model, sample_input), step_memory(converted, sample_input)
        report.held_bytes_before, report.held_bytes_after = before.held_after_forward, after.held_after_forward
        report.peak_bytes_before, report.peak_bytes_after = before.peak, after.peak
        report.max_output_difference = max_output_difference(model, converted, sample_input)
    return converted, report
