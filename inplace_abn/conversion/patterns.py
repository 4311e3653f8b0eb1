"""The structures the converter recognises, as data: each one declared once with what it becomes and why,
one matcher that walks a traced graph against the table, and the markdown table docs/migrating.md shows.
Adding a structure is one entry here (and a test)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from torch import fx, nn

from . import recognise
from .graph import Region, aliases, describe, modified_in_place_by, only_user


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A structure of the traced graph around a BatchNorm, and what the converter puts in its place."""

    name: str  #: what the report calls it
    structure: str  #: what the graph shows
    becomes: str  #: what replaces it
    why: str  #: why that is what to do, in memory kept for backward
    steps: tuple[str, ...] = ()  #: what follows the norm, in order: "add" (a residual add), "act"


NORM_ADD_ACT = Pattern(
    "norm-add-act",
    "BatchNorm -> add(shortcut) -> activation: the post-activation residual of torchvision's and timm's "
    "BasicBlock and Bottleneck (`out += identity; relu(out)`, timm's `drop_path(x) + shortcut; act3(x)`), "
    "`nn.Identity` drop-path or attention slots in between",
    "one layer called as `layer(x, shortcut)`, computing `act(BN(x) + shortcut)`",
    "The block's largest tensors sit here. BatchNorm keeps its input, the activation its input or output: "
    "two buffers, where the fused layer keeps one (its output in place, or its input in recompute mode) and "
    "the shortcut, which the block keeps anyway (its input, kept by its first conv, or the projection's "
    "output, kept in place by the projection's own layer).",
    ("add", "act"),
)
NORM_ADD = Pattern(
    "norm-add",
    "BatchNorm -> add(shortcut), nothing after: the linear bottleneck of MobileNetV2/V3 and EfficientNet "
    "inverted residuals (`result += input`, timm's `drop_path(x) + shortcut`)",
    "one layer with the identity activation called as `layer(x, shortcut)`, computing `BN(x) + shortcut`",
    "Without the add, an identity layer keeps its output and the add makes a second full-size tensor, which "
    "the next block's conv keeps: two buffers. Fused, the sum is written over the conv output and is what "
    "the next conv keeps: one buffer, plus the shortcut, the block's input, which its first conv keeps "
    "anyway (tests/test_convert.py measures both).",
    ("add",),
)
NORM_ACT = Pattern(
    "norm-act",
    "BatchNorm -> activation: a module (also one shared by several calls, as torchvision's `self.relu`), a "
    "function (`F.relu`, `torch.sigmoid`, timm's `swish`...), a tensor method (`x.relu()`), in place or not; "
    "`nn.Identity` slots in between; torchvision's `Conv2dNormActivation` and timm's `ConvNormAct` are "
    "this inside; timm's `BatchNormAct2d` is this in one module (its `act`; its `drop` must be `nn.Identity`)",
    "one layer with that activation",
    "BatchNorm keeps its input and the activation its input (or output, which the next conv keeps too): two "
    "buffers where the layer keeps one.",
    ("act",),
)
NORM_ALONE = Pattern(
    "norm",
    "BatchNorm followed by anything else (a projection shortcut's BatchNorm, a conv, a concatenation, an "
    "activation that another op also reads the input of)",
    "one layer with the identity activation",
    "In place, the layer keeps its output in the storage of its input, where BatchNorm kept its input: no "
    "more memory, and one buffer less where the next op keeps its input (a conv), or is a fused layer's "
    "shortcut. In recompute mode it keeps what BatchNorm kept.",
)
GATE = Pattern(
    "gate",
    "`x * gate` where x is a converted layer's output and the gate is computed from a global pooling of x "
    "alone: squeeze-excitation (torchvision's `SqueezeExcitation`, timm's `SqueezeExcite`, `SEModule`, "
    "`EffectiveSEModule`), either operand order, `*=` included",
    "`inplace_abn.functions.channel_gate(x, gate)`",
    "The product is as large as x and the next conv keeps it; `channel_gate` has it rebuilt from x (kept by "
    "the layer anyway) and the small gate when backward needs it.",
)

#: Tried in this order for each BatchNorm, the longest first; the gate is looked for after any of them.
PATTERNS = (NORM_ADD_ACT, NORM_ADD, NORM_ACT, NORM_ALONE)
ALL_PATTERNS = (*PATTERNS, GATE)

IDENTITY = ("identity", 0.0)


@dataclasses.dataclass
class Match:
    """Where a pattern matched: the norm's node, what the new layer takes over, and its inputs."""

    pattern: Pattern
    norm: fx.Node
    activation: tuple[str, float] = IDENTITY
    activation_found: str = ""  #: how the activation appeared in the model
    taken_over: list[fx.Node] = dataclasses.field(default_factory=list)  #: nodes after the norm, in order
    shortcut: Optional[fx.Node] = None
    needs_rewrite: bool = False  #: the forward holding it must change (else modules are swapped only)
    notes: list[str] = dataclasses.field(default_factory=list)  #: why a longer pattern did not match

    @property
    def output(self) -> fx.Node:
        """The node whose value the new layer gives."""
        return self.taken_over[-1] if self.taken_over else self.norm

    @property
    def activation_node(self) -> Optional[fx.Node]:
        return self.taken_over[-1] if self.pattern.steps and self.pattern.steps[-1] == "act" and self.taken_over else None


@dataclasses.dataclass
class GateMatch:
    mul: fx.Node
    x: fx.Node
    gate: fx.Node


def inner_activation(module: nn.Module) -> Optional[tuple[str, float]]:
    """The activation a norm+act module (timm's BatchNormAct2d) applies itself; None if not recognised."""
    return recognise.module_activation(module.act)


def match(node: fx.Node, region: Region, modules: dict[str, nn.Module], calls: dict[str, int],
          claimed: dict[fx.Node, str], rewrite_failure: Optional[str] = None) -> Match:
    """The first pattern of :data:`PATTERNS` that the graph shows after BatchNorm ``node`` (at worst
    :data:`NORM_ALONE`), taking over no node in ``claimed`` (node -> the name of the norm that took it;
    both norms of a projection block feed one add). Given ``rewrite_failure`` (why the forward around it
    could not be rewritten), only patterns that swap modules without changing a forward."""
    module = modules[node.target]
    kind = recognise.norm_module(module)
    if kind is not None and kind.with_activation and inner_activation(module) != IDENTITY:
        # Its activation is inside: nothing after it can join (an add after an activation is not a residual
        # of the normalization).
        found = f"its own act ({type(module.act).__name__})"
        return Match(NORM_ACT, node, inner_activation(module), found)
    declined: dict[str, list[str]] = {}  # why -> the patterns it ruled out, in order

    def decline(pattern: Pattern, why: str) -> None:
        declined.setdefault(why, []).append(pattern.name)

    for pattern in PATTERNS:
        found = _match_steps(pattern, node, region, modules, calls, decline)
        taken = next((claimed[n] for n in found.taken_over if n in claimed), None) if found is not None else None
        if taken is not None:
            decline(pattern, f"'{taken}' takes that over")
        elif found is not None and (rewrite_failure is None or not found.needs_rewrite):
            found.notes = [f"not {' or '.join(names)}: {why}" for why, names in declined.items()]
            return found
        elif found is not None:
            decline(pattern, rewrite_failure)
    raise AssertionError("NORM_ALONE matches every norm")


def _match_steps(pattern: Pattern, node: fx.Node, region: Region, modules: dict[str, nn.Module],
                 calls: dict[str, int], decline) -> Optional[Match]:
    found = Match(pattern, node)
    value = node
    for step in pattern.steps:
        user, passed = only_user(value, modules)
        if user is None:
            return None
        operand = passed[-1] if passed else value
        if step == "add":
            operands = recognise.add_operands(user)
            if operands is None or operand not in operands or operands[0] is operands[1]:
                return None
            other = operands[1] if operands[0] is operand else operands[0]
            if not isinstance(other, fx.Node):
                return None
            if recognise.modifies_first_operand(user) and operands[0] is not operand:
                decline(pattern, f"{describe(user, region, modules)} writes the sum over its other operand")
                return None
            writer = modified_in_place_by(other, modules)
            if writer is not None and writer is not user:
                decline(pattern, f"the shortcut ({describe(other, region, modules)}) is modified in place by "
                                 f"{describe(writer, region, modules)}")
                return None
            found.shortcut = other
            found.needs_rewrite = True
        else:
            activation = recognise.node_activation(user, modules)
            if activation is None:
                return None
            found.activation = activation
            found.activation_found = describe(user, region, modules)
            if user.op != "call_module" or calls[user.target] != 1:
                found.needs_rewrite = True
        found.taken_over += [*passed, user]
        value = user
    return found


def find_gate(output: fx.Node, modules: dict[str, nn.Module]) -> Optional[GateMatch]:
    """An SE-style ``x * gate`` of the layer output ``output``, where the gate depends on x only through
    global poolings (so it has one value per sample and channel, and broadcasts over x)."""
    names = aliases(output, modules)
    for x in names:
        for user in x.users:
            operands = recognise.mul_operands(user)
            if operands is None or x not in operands or operands[0] is operands[1]:
                continue
            gate = operands[1] if operands[0] is x else operands[0]
            if not isinstance(gate, fx.Node) or not _pooled_from(gate, set(names), modules):
                continue
            if recognise.modifies_first_operand(user) and (operands[0] is not x or _used_after(x, user)):
                continue  # writing over x: fine only where nothing reads x after the product
            return GateMatch(user, x, gate)
    return None


def is_gate_product(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` is an SE-style product (structurally, whatever its x is)."""
    operands = recognise.mul_operands(node)
    if operands is None or not all(isinstance(o, fx.Node) for o in operands):
        return False
    a, b = operands
    return _pooled_from(b, set(aliases(a, modules)), modules) or _pooled_from(a, set(aliases(b, modules)), modules)


def _pooled_from(gate: fx.Node, x: set[fx.Node], modules: dict[str, nn.Module]) -> bool:
    """Whether every path from ``gate`` back to the graph's inputs runs through a global pooling of x."""
    seen, pending, pooled = set(), [gate], False
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in x or node.op in ("placeholder", "get_attr"):
            return False  # x itself at full size, or a tensor of unknown shape
        if recognise.is_global_pool(node, modules):
            source = node.args[0] if node.args else None
            if source not in x:
                return False
            pooled = True
            continue
        pending += node.all_input_nodes
    return pooled


def _used_after(x: fx.Node, node: fx.Node) -> bool:
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return any(order[user] > order[node] for user in x.users)


def markdown_table() -> str:
    """The pattern table as docs/migrating.md shows it (a test keeps the two equal)."""
    lines = ["| pattern | what the graph shows | what it becomes | why |", "|---|---|---|---|"]
    for pattern in ALL_PATTERNS:
        lines.append(f"| `{pattern.name}` | {pattern.structure} | {pattern.becomes} | {pattern.why} |")
    return "\n".join(lines)
