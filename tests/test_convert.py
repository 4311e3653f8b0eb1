"""convert_to_abn on small models built for one case each: every form of every activation, each pattern
of the table with its variants and refusals, what each pattern saves, where writing in place is unsafe,
forwards that depend on the mode, and the way back (convert_to_batchnorm, fuse_conv_abn). Converted
models are held to the originals in float64 (tests/conversion_checks.py); the real networks are in
tests/test_convert_models.py."""

import copy
import operator
import pathlib

import pytest
import timm.layers
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from timm.layers import activations as timm_activations
from timm.layers.activations import gelu_tanh, hard_sigmoid, swish
from timm.models._efficientnet_blocks import SqueezeExcite as TimmSqueezeExcite
from torch import fx, nn

from conversion_checks import assert_converted_exactly, randomize_batchnorms
from inplace_abn import (ABN, InPlaceABN, InPlaceABNSync, RecomputeABN, convert_to_abn, convert_to_batchnorm,
                         fuse_conv_abn)
from inplace_abn.activations import ACTIVATIONS, make_activation
from inplace_abn.conversion import markdown_table, modes_table, saved_activation_bytes
from inplace_abn.conversion import recognise


@pytest.fixture(autouse=True)
def _eager_backend(monkeypatch):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")


def model_and_input(model, shape=(4, 3, 8, 8)):
    torch.manual_seed(0)
    model = randomize_batchnorms(model).double()
    return model, torch.randn(shape, dtype=torch.float64)


def records(report):
    return {layer.name: layer for layer in report.layers}


def mode_of(name, param=0.0, piecewise="recompute"):
    """The mode the converter must choose for a norm reading a fresh conv output nothing else uses: in
    place for an invertible activation (and a piecewise one with ``piecewise="in_place"``)."""
    kind = make_activation(name, param).kind
    return "in place" if kind == "invertible" or (kind == "piecewise" and piecewise == "in_place") else "recompute"


# --- small models shaped like torchvision's ResNet (tests/test_export.py uses them too) -------------

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels, channels, stride=1, downsample=None, act=nn.ReLU):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = act(inplace=True)  # used twice, as in torchvision
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels, channels, stride=1, downsample=None, act=nn.ReLU):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, channels * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels * 4)
        self.relu = act(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, block=BasicBlock, act=nn.ReLU, width=4, num_classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = act(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        out = width * block.expansion
        self.layer1 = nn.Sequential(
            block(width, width, 1, nn.Sequential(nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out)), act),
            block(out, width * 2, 2, nn.Sequential(nn.Conv2d(out, out * 2, 1, 2, bias=False), nn.BatchNorm2d(out * 2)), act),
        )
        self.fc = nn.Linear(out * 2, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --- every form of every activation -----------------------------------------------------------------

class ConvNormAct(nn.Module):
    """conv -> BatchNorm -> ``act`` (a module, or a function of the tensor) -> conv."""

    def __init__(self, act):
        super().__init__()
        self.conv, self.bn, self.out = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)
        if isinstance(act, nn.Module):
            self.act = act
        else:
            self.function = act

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.out(self.act(y) if hasattr(self, "act") else self.function(y))


def _timm(name):
    return getattr(timm_activations, name)


# (how the model applies it, the layers' activation it must become)
ACTIVATION_FORMS = [
    (nn.ReLU(inplace=True), ("relu", 0.0)), (nn.ReLU6(), ("relu6", 0.0)), (nn.Hardswish(), ("hardswish", 0.0)),
    (nn.Hardsigmoid(), ("hardsigmoid", 0.0)), (nn.SiLU(inplace=True), ("silu", 0.0)), (nn.GELU(), ("gelu", 0.0)),
    (nn.GELU(approximate="tanh"), ("gelu_tanh", 0.0)), (nn.Mish(), ("mish", 0.0)), (nn.Sigmoid(), ("sigmoid", 0.0)),
    (nn.Tanh(), ("tanh", 0.0)), (nn.LeakyReLU(0.2), ("leaky_relu", 0.2)), (nn.LeakyReLU(0.0), ("relu", 0.0)),
    (nn.ELU(0.5), ("elu", 0.5)),
    (F.relu, ("relu", 0.0)), (lambda y: F.relu(y, inplace=True), ("relu", 0.0)), (F.relu_, ("relu", 0.0)),
    (torch.relu, ("relu", 0.0)), (F.relu6, ("relu6", 0.0)), (F.hardswish, ("hardswish", 0.0)),
    (F.hardsigmoid, ("hardsigmoid", 0.0)), (F.silu, ("silu", 0.0)), (F.mish, ("mish", 0.0)), (F.gelu, ("gelu", 0.0)),
    (lambda y: F.gelu(y, approximate="tanh"), ("gelu_tanh", 0.0)), (torch.sigmoid, ("sigmoid", 0.0)),
    (torch.tanh, ("tanh", 0.0)), (lambda y: F.leaky_relu(y, 0.3, True), ("leaky_relu", 0.3)),
    (lambda y: F.elu(y, alpha=0.7), ("elu", 0.7)),
    (lambda y: y.relu(), ("relu", 0.0)), (lambda y: y.relu_(), ("relu", 0.0)), (lambda y: y.sigmoid(), ("sigmoid", 0.0)),
    (lambda y: y.tanh(), ("tanh", 0.0)),
    (_timm("Swish")(), ("silu", 0.0)), (_timm("Mish")(), ("mish", 0.0)), (_timm("HardSwish")(), ("hardswish", 0.0)),
    (_timm("GELUTanh")(), ("gelu_tanh", 0.0)),
    (_timm("Sigmoid")(), ("sigmoid", 0.0)), (_timm("Tanh")(), ("tanh", 0.0)),
    # timm's functions, by the global names timm's own code calls them by
    (lambda y: swish(y, inplace=True), ("silu", 0.0)), (lambda y: gelu_tanh(y), ("gelu_tanh", 0.0)),
]
# timm's hard sigmoid is relu6(x + 3) / 6, whose float64 gradient is 1/6; PyTorch's F.hardsigmoid, which
# the layers follow, has 1/6 rounded to float32 in its float64 backward: 3e-8 apart (float32: identical).
HARD_SIGMOID_FORMS = [_timm("HardSigmoid")(), lambda y: hard_sigmoid(y)]


@pytest.mark.parametrize("act, expected, rtol", [
    *((act, expected, 1e-9) for act, expected in ACTIVATION_FORMS),
    *((act, ("hardsigmoid", 0.0), 1e-7) for act in HARD_SIGMOID_FORMS),
], ids=[f"{i}-{e[0]}" for i, (_, e) in enumerate(ACTIVATION_FORMS)] + ["timm-HardSigmoid", "timm-hard_sigmoid"])
def test_every_form_of_every_activation_merges_exactly(act, expected, rtol):
    model, x = model_and_input(ConvNormAct(act), (4, 3, 5, 5))
    converted, report = convert_to_abn(model)
    (layer,) = report.layers
    assert (layer.pattern, layer.mode) == ("norm-act", mode_of(*expected)), layer
    bn = converted.get_submodule("bn")
    assert make_activation(bn.activation, bn.activation_param) == make_activation(*expected)
    # In place, the signs of the negative weights move into the conv; a recompute-mode layer takes them as
    # they are (BatchNorm's weight).
    in_place = layer.mode == "in place"
    assert report.exact and (layer.negated_channels > 0) == in_place and bn.batchnorm_weight != in_place
    assert set(converted.state_dict()) == set(model.state_dict())
    assert_converted_exactly(model, converted, x, rtol)


@pytest.mark.parametrize("act", [nn.SiLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.Mish()], ids=lambda a: repr(a))
def test_piecewise_activations_in_place_on_request(act):
    """``piecewise="in_place"``: silu, gelu and mish layers write over their input and keep one bit per
    element; the inversion holds the float64 model to 1e-9 as well."""
    model, x = model_and_input(ConvNormAct(act), (4, 3, 5, 5))
    converted, report = convert_to_abn(model, piecewise="in_place")
    (layer,) = report.layers
    assert layer.mode == "in place" and isinstance(converted.get_submodule("bn"), InPlaceABN)
    assert report.exact
    assert_converted_exactly(model, converted, x, 1e-9)
    with pytest.raises(ValueError, match="piecewise must be 'recompute'.*or 'in_place'"):
        convert_to_abn(model, piecewise="bits")


class EveryFeedingLayer(nn.Module):
    """Norms fed by a conv with a bias, a grouped conv, a grouped transposed conv, a linear layer, and
    1-d and 3-d convs: each takes the signs of its norm's negative weights (every activation invertible,
    so every layer runs in place, the only mode that moves signs)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, groups=3, bias=False), nn.BatchNorm2d(6)
        self.conv3, self.bn3 = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2), nn.BatchNorm2d(4)
        self.conv4, self.bn4 = nn.Conv1d(4, 4, 3, padding=1), nn.BatchNorm1d(4)
        self.conv5, self.bn5 = nn.Conv3d(1, 2, 3, padding=1), nn.BatchNorm3d(2)
        self.fc, self.bn6 = nn.Linear(4 + 2, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        x = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        x = F.elu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        line = F.elu(self.bn4(self.conv4(x.flatten(2))), 0.5)  # (N, 4, H*W)
        volume = F.leaky_relu(self.bn5(self.conv5(x[:, :1].unsqueeze(1))), 0.2)  # (N, 2, 1, H, W)
        features = torch.cat([line.mean(2), volume.flatten(2).mean(2)], 1)
        return F.leaky_relu(self.bn6(self.fc(features)), 0.3)


def test_signs_move_into_every_kind_of_feeding_layer():
    model, x = model_and_input(EveryFeedingLayer(), (4, 3, 4, 4))
    converted, report = convert_to_abn(model)
    found = records(report)
    assert all(found[f"bn{i}"].negated_channels > 0 for i in range(1, 7)), report
    assert report.exact and {layer.mode for layer in report.layers} == {"in place"}
    assert_converted_exactly(model, converted, x)


def test_activation_tables_agree_both_ways():
    """The module each activation converts back to is read as that activation again."""
    for name in ACTIVATIONS:
        param = {"leaky_relu": 0.2, "elu": 0.5}.get(name, 0.0)
        assert recognise.module_activation(recognise.standard_activation_module(name, param)) == (name, param)


# --- the residual patterns --------------------------------------------------------------------------

class Residual(nn.Module):
    """conv -> BN -> add(shortcut) [-> act], the add written in one of the ways models write it."""

    def __init__(self, add, act=True, project=False):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.drop_path = nn.Identity()
        self.add, self.act = add, nn.ReLU(inplace=True) if act else None
        self.project = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)) if project else None

    def forward(self, x):
        out = self.drop_path(self.bn(self.conv(x)))
        shortcut = x if self.project is None else self.project(x)
        out = self.add(out, shortcut)
        return self.act(out) if self.act is not None else out


def _iadd(a, b):
    a += b
    return a


ADD_FORMS = [operator.add, _iadd, torch.add, lambda a, b: b + a, lambda a, b: a.add_(b), lambda a, b: a.add(b)]


@pytest.mark.parametrize("add", ADD_FORMS, ids=["a+b", "a+=b", "torch.add", "b+a", "a.add_(b)", "a.add(b)"])
@pytest.mark.parametrize("act", [True, False], ids=["norm-add-act", "norm-add"])
def test_residual_add_is_taken_over_in_every_form(add, act):
    model, x = model_and_input(nn.Sequential(nn.Conv2d(3, 4, 1), Residual(add, act), Residual(add, act, project=True)),
                               (2, 3, 6, 6))
    converted, report = convert_to_abn(model)
    found = records(report)
    pattern = "norm-add-act" if act else "norm-add"
    assert (found["1.bn"].pattern, found["2.bn"].pattern, found["2.project.1"].pattern) == (pattern, pattern, "norm")
    assert found["1.bn"].shortcut == "Conv2d '0'" and found["2.bn"].shortcut == "BatchNorm2d '2.project.1'"
    assert all(layer.mode == mode_of("relu" if act else "identity") for layer in (found["1.bn"], found["2.bn"]))
    assert found["2.project.1"].mode == "in place"  # the shortcut it gives is kept, in place, by that layer
    assert type(converted) is nn.Sequential and sorted(report.rewritten) == ["1", "2"]
    for block in converted[1:]:  # the add (and ReLU) became the layer's call with a shortcut
        assert not any(recognise.add_operands(node) for node in block.graph.nodes)
        assert [len(node.args) for node in block.graph.nodes if node.target == "bn"] == [2]
    assert_converted_exactly(model, converted, x)


class WritesOverShortcut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        s = x * 2
        s += self.bn(self.conv(x))  # the sum goes into the shortcut's storage: not a fresh output
        return F.relu(s)


def test_an_add_that_writes_over_the_shortcut_is_not_taken_over():
    model, x = model_and_input(nn.Sequential(nn.Conv2d(3, 4, 1), WritesOverShortcut()), (2, 3, 4, 4))
    converted, report = convert_to_abn(model)
    layer = records(report)["1.bn"]
    assert layer.pattern == "norm" and "writes the sum over its other operand" in layer.reason
    assert_converted_exactly(model, converted, x)


def _stack(block, depth, channels=4):
    layers = [nn.Conv2d(channels, channels, 1, bias=False)]
    for _ in range(depth):
        layers.append(block())
    return nn.Sequential(*layers, nn.Conv2d(channels, channels, 1, bias=False))


class LinearBottleneck(nn.Module):
    """An inverted residual's end: conv -> BN (no activation) -> + input; with ``norm`` given, that layer
    instead of BatchNorm, and the add left as it is."""

    def __init__(self, norm=nn.BatchNorm2d):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), norm(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + x


def test_norm_add_saves_one_buffer_per_block_where_an_identity_layer_alone_saves_none():
    """What the norm-add pattern's entry says: BatchNorm + add keeps two full-size tensors per block (the
    conv input and the norm input), an identity InPlaceABN before the add also two (its output, and the
    sum the next conv keeps), the fused layer one (the sum, written over the conv output)."""
    depth, x = 3, torch.randn(2, 4, 6, 6)
    activation = x.numel() * x.element_size()  # every activation has the input's size
    torch.manual_seed(0)
    original = _stack(LinearBottleneck, depth)
    unfused = _stack(lambda: LinearBottleneck(lambda c: InPlaceABN(c, activation="identity")), depth)
    converted, report = convert_to_abn(original)
    assert [layer.pattern for layer in report.layers] == ["norm-add"] * depth and not report.recompute
    # In activations; the per-channel statistics add less than one. All three: the model input and the
    # first block's input (kept by the convs). Then per block: the norm input and the sum (BatchNorm); the
    # identity layer's output and the sum (unfused); the sum only, written over the norm input (fused).
    assert saved_activation_bytes(original, x) // activation == 2 + 2 * depth
    assert saved_activation_bytes(unfused, x) // activation == 2 + 2 * depth
    assert saved_activation_bytes(converted, x) // activation == 2 + depth


def test_norm_add_act_saves_the_buffers_of_the_add_and_the_activation():
    """A post-activation block: BatchNorm keeps its input and ReLU its output (which the next conv keeps
    too); the fused layer in recompute mode keeps only its input, the output is rebuilt, except where
    its shortcut is itself rebuilt (the core then stores the output, so that rebuilding never chains
    through a stage): every second block of a chain of identity shortcuts."""
    depth, x = 3, torch.randn(2, 4, 6, 6)
    activation = x.numel() * x.element_size()
    torch.manual_seed(0)
    original = _stack(lambda: Residual(operator.add), depth)
    converted, report = convert_to_abn(original)
    assert [layer.mode for layer in report.layers] == ["recompute"] * depth and report.recompute
    # Both: the model input and the first block's input. Then per block, before: the norm input and the
    # block output (kept by ReLU and the next conv); after: the norm input, and the output of blocks 2, 4...
    assert saved_activation_bytes(original, x) // activation == 2 + 2 * depth
    assert saved_activation_bytes(converted, x) // activation == 2 + depth + depth // 2


# --- squeeze-excitation gates ----------------------------------------------------------------------

class SqueezeExcite(nn.Module):
    def __init__(self, channels, order):
        super().__init__()
        self.reduce, self.expand, self.order = nn.Conv2d(channels, 2, 1), nn.Conv2d(2, channels, 1), order

    def forward(self, x):
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        if self.order == "x*gate":
            return x * gate
        if self.order == "gate*x":
            return gate * x
        x *= gate
        return x


@pytest.mark.parametrize("order, act", [
    ("x*gate", nn.LeakyReLU(0.1)), ("gate*x", nn.LeakyReLU(0.1)), ("x*=gate", nn.LeakyReLU(0.1)),
    ("x*gate", nn.ReLU()), ("gate*x", nn.ReLU()),  # ReLU keeps its output: `x *= gate` would break the original
], ids=["x*gate-in-place", "gate*x-in-place", "x*=gate-in-place", "x*gate-recompute", "gate*x-recompute"])
def test_se_gate_becomes_channel_gate(order, act):
    model, x = model_and_input(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), copy.deepcopy(act), SqueezeExcite(4, order), nn.Conv2d(4, 4, 1),
    ), (2, 3, 5, 5))
    converted, report = convert_to_abn(model)
    (layer,) = report.layers
    assert layer.gate and report.recompute and report.rewritten == ["3"]
    assert "channel_gate" in converted[3].code
    assert_converted_exactly(model, converted, x)


@pytest.mark.parametrize("se", [
    lambda: timm.layers.SEModule(4, rd_channels=2), lambda: timm.layers.EffectiveSEModule(4),
    lambda: timm.layers.EffectiveSEModule(4, add_maxpool=True),
    lambda: TimmSqueezeExcite(4, rd_channels=2),
], ids=["SEModule", "EffectiveSEModule", "EffectiveSEModule-maxpool", "SqueezeExcite"])
def test_timm_squeeze_excitation_modules_become_channel_gates(se):
    model, x = model_and_input(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.SiLU(), se(), nn.Conv2d(4, 4, 1)), (2, 3, 5, 5))
    converted, report = convert_to_abn(model)
    assert report.layers[0].gate and report.rewritten == ["3"]
    assert_converted_exactly(model, converted, x)


def test_se_gate_keeps_no_product():
    """conv -> BN -> leaky_relu -> SE -> conv: the first conv, BatchNorm, the activation, the multiply and
    the next conv keep five full-size tensors (the model input, the norm's input and output, the
    activation's output, the product); converted, the model input and the layer's output are left."""
    x = torch.randn(2, 4, 6, 6)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.LeakyReLU(0.1),
                          SqueezeExcite(4, "x*gate"), nn.Conv2d(4, 4, 1))
    converted, report = convert_to_abn(model)
    activation = x.numel() * x.element_size()
    assert saved_activation_bytes(model, x) // activation == 5
    assert saved_activation_bytes(converted, x) // activation == 2


def test_a_product_that_is_not_a_gate_stays():
    class Square(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.other = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = F.relu(self.bn(self.conv(x)))
            return y * self.other(x) + y * F.avg_pool2d(y, 3, 1, 1).sigmoid()  # full-size factors

    model, x = model_and_input(Square(), (2, 3, 4, 4))
    converted, report = convert_to_abn(model)
    assert not report.layers[0].gate and "channel_gate" not in converted.code
    assert_converted_exactly(model, converted, x)


# --- timm's norm + act module ------------------------------------------------------------------------

def test_timm_batchnormact_with_a_drop_or_an_unknown_act_stays():
    def net(**kwargs):
        return nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4, **kwargs), nn.Conv2d(4, 4, 1))

    model, x = model_and_input(net(act_layer=nn.SiLU, drop_layer=lambda: timm.layers.DropBlock2d(0.1)), (2, 3, 4, 4))
    converted, report = convert_to_abn(model)
    assert report.layers[0].mode == "unchanged" and "its drop (DropBlock2d)" in report.layers[0].reason
    model, x = model_and_input(net(act_layer=nn.PReLU), (2, 3, 4, 4))
    converted, report = convert_to_abn(model)
    assert report.layers[0].mode == "unchanged" and "its act (PReLU)" in report.layers[0].reason
    model, x = model_and_input(net(act_layer=nn.ELU), (2, 3, 4, 4))
    converted, report = convert_to_abn(model)
    assert report.layers[0].converted_to == "InPlaceABN(elu[1.0])" and type(converted) is nn.Sequential
    assert_converted_exactly(model, converted, x)


# --- where writing in place is unsafe ---------------------------------------------------------------

class Shared(nn.Module):
    """Places where writing over the input (or keeping the output) would break something."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn_input, self.bn_shared, self.bn_after_act, self.bn_modified = (nn.BatchNorm2d(c) for c in (3, 4, 4, 4))
        self.conv2, self.conv3 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        a = F.leaky_relu(self.bn_input(x), 0.1)  # the model's input: the caller may still use it
        y = self.conv(x)
        b = F.leaky_relu(self.bn_shared(y), 0.1) + y  # y is used again
        c = F.leaky_relu(self.bn_after_act(F.leaky_relu(b)), 0.1)  # leaky_relu keeps what it returns
        d = F.leaky_relu(self.bn_modified(self.conv2(c)), 0.1)
        d.mul_(2)  # the output is then modified in place, and saved by conv3 as modified
        return a.sum() + self.conv3(d)


def test_unsafe_places_recompute_and_say_why():
    model, x = model_and_input(Shared(), (4, 3, 5, 5))
    with torch.no_grad():
        for bn in (model.bn_input, model.bn_shared, model.bn_after_act):
            bn.weight.abs_()  # no convolution feeds these alone to take a negative sign
    converted, report = convert_to_abn(model)
    found = records(report)
    assert not report.in_place and {layer.mode for layer in report.layers} == {"recompute"}
    assert "the input 'x'" in found["bn_input"].reason
    assert "also used by operator.add" in found["bn_shared"].reason
    assert "torch.nn.functional.leaky_relu" in found["bn_after_act"].reason and "keep it for backward" in found["bn_after_act"].reason
    assert "modified in place by Tensor.mul_" in found["bn_modified"].reason
    assert all(type(converted.get_submodule(name)) is RecomputeABN for name in found)
    assert_converted_exactly(model, converted, x)


def test_negative_weights_without_a_feeding_layer_recompute():
    """After an add, no conv takes the sign of a negative weight, which an in-place layer needs: the norm
    runs in recompute mode with BatchNorm's weight as it is, exactly; in place once the weights are positive."""
    class AfterAdd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return F.leaky_relu(self.bn(self.a(x) + self.b(x)), 0.1)

    model, x = model_and_input(AfterAdd(), (4, 3, 5, 5))
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([1.0, -1.0, 0.5, 2.0]))
    converted, report = convert_to_abn(model)
    (layer,) = report.layers
    assert layer.mode == "recompute" and report.exact and report.recompute
    assert "recompute: 1 channels have a negative weight" in layer.reason and "writing in place" in layer.reason
    assert type(converted.bn) is RecomputeABN and converted.bn.batchnorm_weight
    assert_converted_exactly(model, converted, x)
    with torch.no_grad():
        model.bn.weight.abs_()
    converted, report = convert_to_abn(model)
    assert report.layers[0].in_place  # the sum is a fresh tensor that nothing else uses
    assert_converted_exactly(model, converted, x)


def test_weights_below_eps_recompute_unless_clamping_is_asked_for():
    """|w| < eps (an exact zero too) cannot be an in-place layer's scale |w'| + eps: the norm runs in recompute
    mode with BatchNorm's weight, exactly; clamp_small_weights=True runs it in place with scale eps there."""
    torch.manual_seed(0)
    model = randomize_batchnorms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, eps=1e-3), nn.ELU())).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, -2e-4, 0.0, 0.5]))
    converted, report = convert_to_abn(model)
    (layer,) = report.layers
    assert layer.mode == "recompute" and report.exact and layer.clamped_channels == 0
    assert "recompute: 2 channels have |w| < eps=0.001" in layer.reason and "clamp_small_weights=True" in layer.reason
    assert type(converted[1]) is RecomputeABN and torch.equal(converted[1].weight, model[1].weight)
    assert_converted_exactly(model, converted, torch.randn(4, 3, 5, 5, dtype=torch.float64))
    converted, report = convert_to_abn(model, clamp_small_weights=True)
    (layer,) = report.layers
    assert layer.mode == "in place" and layer.clamped_channels == 2 and not layer.exact and not report.exact
    torch.testing.assert_close(converted[1].weight.abs() + 1e-3, torch.tensor([1.0, 1e-3, 1e-3, 0.5], dtype=torch.float64))


class DenseLayer(nn.Module):
    """DenseNet's layer (torchvision's _DenseLayer, shortened): norm -> act -> conv on the concatenation of
    every earlier feature map, so no conv feeds the norm alone."""

    def __init__(self, channels, growth, act):
        super().__init__()
        self.norm1, self.act = nn.BatchNorm2d(channels), copy.deepcopy(act)
        self.conv1 = nn.Conv2d(channels, growth, 3, padding=1)

    def forward(self, features):
        return self.conv1(self.act(self.norm1(torch.cat(features, 1))))


class DenseBlock(nn.Module):
    def __init__(self, act, layers=2, channels=4, growth=3):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.layers = nn.ModuleList(DenseLayer(channels + i * growth, growth, act) for i in range(layers))
        self.norm5 = nn.BatchNorm2d(channels + layers * growth)

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(features))
        return F.relu(self.norm5(torch.cat(features, 1)))


@pytest.mark.parametrize("act", [nn.ReLU(), nn.LeakyReLU(0.1)], ids=["relu", "leaky_relu"])
def test_densenet_norms_after_a_concatenation_convert_exactly(act):
    """Negative weights of a norm after a concatenation have no conv to move into: every such norm becomes
    a recompute-mode layer with BatchNorm's weight, for relu (lossy anyway) and for leaky_relu (the weights
    alone keep it from running in place, and the report says so)."""
    model, x = model_and_input(DenseBlock(act), (2, 3, 6, 6))
    converted, report = convert_to_abn(model)
    assert [layer.name for layer in report.layers] == ["layers.0.norm1", "layers.1.norm1", "norm5"]
    assert {layer.mode for layer in report.layers} == {"recompute"} and report.exact
    found = records(report)
    for name in ("layers.0.norm1", "layers.1.norm1"):
        expected = "relu is lossy" if isinstance(act, nn.ReLU) else "channels have a negative weight"
        assert expected in found[name].reason and found[name].negated_channels == 0, found[name]
    assert all(converted.get_submodule(layer.name).batchnorm_weight for layer in report.layers)
    assert_converted_exactly(model, converted, x)


def _zero_init_last(model):
    """timm's ``zero_init_last``: each residual block's last norm starts with weight 0."""
    for block in model.modules():
        if isinstance(block, (BasicBlock, Bottleneck)):
            nn.init.zeros_(block.bn3.weight if isinstance(block, Bottleneck) else block.bn2.weight)
    return model


def test_zero_initialized_residual_norms_convert_exactly():
    """A residual block's zero-initialized last norm (|w| < eps in every channel) cannot be an in-place layer's
    scale: with leaky_relu it runs in recompute mode with BatchNorm's weight, exactly; the other norms in place."""
    model, x = model_and_input(TinyResNet(Bottleneck, act=lambda inplace: nn.LeakyReLU(0.1, inplace=inplace)))
    model = _zero_init_last(model)
    converted, report = convert_to_abn(model)
    zeroed = {"layer1.0.bn3", "layer1.1.bn3"}
    assert {layer.name for layer in report.layers if layer.mode == "recompute"} == zeroed
    assert {layer.mode for layer in report.layers if layer.name not in zeroed} == {"in place"}
    found = records(report)
    assert all(f"{converted.get_submodule(name).num_features} channels have |w| < eps" in found[name].reason
               and found[name].shortcut for name in zeroed)
    assert report.exact and not any(layer.clamped_channels for layer in report.layers)
    assert_converted_exactly(model, converted, x)


def test_relu_to_leaky_relu_clamps_zero_initialized_norms():
    """relu_to="leaky_relu" changes the function anyway, so small weights clamp by default: the zero-initialized
    norms run in place with scale eps, computing the leaky model whose zero weights are eps;
    clamp_small_weights=False keeps them exact, in recompute mode."""
    model, x = model_and_input(TinyResNet(Bottleneck))
    model = _zero_init_last(model)
    converted, report = convert_to_abn(model, relu_to="leaky_relu", relu_slope=0.1)
    assert {layer.mode for layer in report.layers} == {"in place"} and not report.recompute
    clamped = {layer.name: layer.clamped_channels for layer in report.layers if layer.clamped_channels}
    assert clamped == {"layer1.0.bn3": 16, "layer1.1.bn3": 32}
    expected = copy.deepcopy(model)
    for parent in list(expected.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, name, nn.LeakyReLU(0.1, inplace=True))
    with torch.no_grad():
        for name in clamped:
            expected.get_submodule(name).weight.fill_(expected.get_submodule(name).eps)
    assert_converted_exactly(expected, converted, x)
    _, report = convert_to_abn(model, relu_to="leaky_relu", relu_slope=0.1, clamp_small_weights=False)
    assert {layer.name for layer in report.layers if layer.mode == "recompute"} == set(clamped)


def test_untraceable_model_converts_the_parts_that_trace():
    class Branching(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LeakyReLU(0.1), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.LeakyReLU(0.1)
            )

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
                return self.features(x)
            return -self.features(x)

    model, x = model_and_input(Branching(), (4, 3, 7, 7))
    converted, report = convert_to_abn(model)
    assert type(converted) is Branching and report.untraced and "Branching" in report.untraced[0]
    found = records(report)
    assert found["features.1"].in_place
    assert found["features.4"].mode == "recompute" and "leaves 'features'" in found["features.4"].reason
    assert_converted_exactly(model, converted, x)


# --- forwards that depend on the mode, and what a rewrite keeps --------------------------------------

class ModeDependent(nn.Module):
    def __init__(self, between):
        super().__init__()
        self.conv, self.bn, self.between = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), between

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.training and self.between:
            y = y * 0.5  # only in training, between the norm and its activation
        y = F.relu(y)
        if self.training and not self.between:
            y = y + 1  # only in training, after the activation
        return y


def test_a_forward_that_depends_on_the_mode():
    model, x = model_and_input(nn.Sequential(nn.Conv2d(3, 3, 1), ModeDependent(between=True)), (2, 3, 4, 4))
    converted, report = convert_to_abn(model)
    layer = report.layers[0]
    assert layer.mode == "unchanged" and "differs between training and eval mode" in layer.reason
    # Elsewhere in the forward: the norm still converts, but that forward cannot be rewritten, so F.relu
    # stays a call of its own and the layer takes the norm alone.
    model, x = model_and_input(nn.Sequential(nn.Conv2d(3, 3, 1), ModeDependent(between=False)), (2, 3, 4, 4))
    converted, report = convert_to_abn(model)
    layer = report.layers[0]
    assert layer.pattern == "norm" and "differs between training and eval mode" in layer.reason and not report.rewritten
    assert_converted_exactly(model, converted, x)


def test_a_rewritten_block_keeps_its_class_name_state_and_attributes():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.unused = nn.Linear(2, 2)  # not called by forward: fx alone would drop it
            self.register_buffer("scale", torch.ones(1))
            self.stride = 1

        def forward(self, x):
            return F.relu(self.bn(self.conv(x))) * self.scale

    model, _ = model_and_input(nn.Sequential(Block()))
    converted, report = convert_to_abn(model)
    assert report.rewritten == ["0"] and isinstance(converted[0], fx.GraphModule)
    assert type(converted[0]).__name__ == "Block"
    for copy_of_it in (converted, copy.deepcopy(converted)):
        assert copy_of_it[0].stride == 1 and isinstance(copy_of_it[0].unused, nn.Linear)
        assert set(copy_of_it.state_dict()) == set(model.state_dict())


# --- options: memory report, sync, out of place -----------------------------------------------------

def test_memory_report_counts_saved_storages_and_leaves_the_model_alone():
    torch.manual_seed(0)
    depth, x = 3, torch.randn(2, 4, 6, 6)
    layers = []
    for _ in range(depth):
        layers += [nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.LeakyReLU(0.01)]
    model = nn.Sequential(*layers, nn.Conv2d(4, 4, 3, padding=1, bias=False))
    state = copy.deepcopy(model.state_dict())
    converted, report = convert_to_abn(model, sample_input=x)
    activation = x.numel() * x.element_size()  # every activation has the input's size
    # Before: each conv's input, each BatchNorm's input, each LeakyReLU's input (the BatchNorm output).
    # After: each conv's input only; the InPlaceABN output lives in its input's storage. Both plus the
    # small per-channel tensors that BatchNorm and InPlaceABN keep (less than one activation).
    assert report.saved_bytes_before // activation == 3 * depth + 1
    assert report.saved_bytes_after // activation == depth + 1
    assert saved_activation_bytes(converted, x) == report.saved_bytes_after
    # The allocator agrees: after the forward, two full-size tensors fewer per layer are alive (the
    # input was allocated before the measured forward, the output is alive in both).
    freed = report.held_bytes_before - report.held_bytes_after
    assert abs(freed - 2 * depth * activation) < activation / 2
    assert report.peak_bytes_after < report.peak_bytes_before
    assert report.max_output_difference < 1e-5
    assert "saved for backward" in str(report) and "3 in place" in str(report)
    for key, value in model.state_dict().items():  # the original's running statistics are untouched
        torch.testing.assert_close(value, state[key])
    assert converted.training and int(converted[1].num_batches_tracked) == 0


def test_sync_layers_keep_the_in_place_decision_and_sync_batchnorm_keeps_its_group():
    model, x = model_and_input(Shared(), (4, 3, 5, 5))
    with torch.no_grad():
        for bn in (model.bn_input, model.bn_shared, model.bn_after_act):
            bn.weight.abs_()
    converted, report = convert_to_abn(model, sync=True)
    assert all(isinstance(converted.get_submodule(layer.name), InPlaceABNSync) for layer in report.converted)
    assert all(not converted.get_submodule(layer.name).in_place for layer in report.converted)
    assert_converted_exactly(model, converted, x)
    group = object()  # any process group object: the layer only keeps it here
    sequential = randomize_batchnorms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4, process_group=group), nn.ELU()))
    converted, report = convert_to_abn(sequential)
    assert type(converted[1]) is InPlaceABNSync and converted[1].in_place and converted[1].group is group
    assert report.layers[0].converted_to == "InPlaceABNSync(elu[1.0])"


def test_in_place_false_gives_abn_everywhere():
    model, x = model_and_input(TinyResNet(act=lambda inplace: nn.ELU(inplace=inplace)))
    converted, report = convert_to_abn(model, in_place=False)
    assert report.converted and {layer.mode for layer in report.layers} == {"out of place"}
    assert all(type(converted.get_submodule(layer.name)) is ABN for layer in report.converted)
    assert_converted_exactly(model, converted, x)


def test_bad_options_say_what_to_pass():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.raises(ValueError, match="relu_slope must be > 0"):
        convert_to_abn(model, relu_to="leaky_relu", relu_slope=0.0)
    with pytest.raises(ValueError, match="relu_to must be 'relu'"):
        convert_to_abn(model, relu_to="gelu")


def test_the_documented_tables_are_the_converters():
    docs = (pathlib.Path(__file__).parent.parent / "docs" / "migrating.md").read_text()
    assert markdown_table() in docs and modes_table() in docs


# --- convert_to_batchnorm and fuse_conv_abn --------------------------------------------------------

def abn_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, bias=False), InPlaceABN(6),
        nn.Conv2d(6, 6, 3, groups=2), ABN(6, activation="elu", activation_param=0.7),
        nn.ConvTranspose2d(6, 4, 2, stride=2), InPlaceABNSync(4, activation="identity"),
        nn.Conv2d(4, 4, 1), RecomputeABN(4, activation="relu"),
        nn.Conv2d(4, 4, 1), ABN(4, affine=False),
        nn.Conv2d(4, 4, 1), InPlaceABN(4, activation="silu"),
    ).double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ABN):
                if module.affine:
                    module.weight.normal_(), module.bias.normal_()
                module.running_mean.normal_(), module.running_var.uniform_(0.5, 2)
        assert model[7].batchnorm_weight  # RecomputeABN scales by its weight itself: a zero too
        model[7].weight[0] = 0.0
    return model


def test_convert_to_batchnorm_gives_standard_layers_with_the_same_outputs():
    model = abn_model()
    standard = convert_to_batchnorm(model)
    assert not any(isinstance(m, ABN) for m in standard.modules())
    assert [type(standard[i][1]) for i in (1, 3, 5, 7, 9, 11)] == [nn.LeakyReLU, nn.ELU, nn.Identity, nn.ReLU, nn.LeakyReLU, nn.SiLU]
    assert "1.0.weight" in standard.state_dict() and "9.0.running_var" in standard.state_dict()
    assert torch.equal(standard[7][0].weight, model[7].weight)  # batchnorm_weight: BatchNorm's weight as it is
    x = torch.randn(4, 3, 7, 7, dtype=torch.float64)
    for training in (True, False):
        model.train(training), standard.train(training)
        with torch.no_grad():
            torch.testing.assert_close(standard(x.clone()), model(x.clone()), atol=1e-10, rtol=0)


@pytest.mark.parametrize("act", [nn.ReLU, lambda inplace: nn.SiLU(inplace=inplace)], ids=["relu", "silu"])
def test_to_abn_and_back_is_exact_with_shortcuts_and_gates(act):
    """A residual network with SE gates, converted (shortcuts fused, gates as channel_gate) and back:
    standard modules and standard ops only, computing what the original did."""
    torch.manual_seed(0)
    se = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), act(inplace=False), SqueezeExcite(4, "x*gate"))
    model, x = model_and_input(nn.Sequential(se, TinyResNet(act=act).layer1), (2, 3, 8, 8))
    converted, report = convert_to_abn(model)
    assert any(layer.shortcut for layer in report.layers) and any(layer.gate for layer in report.layers)
    back = convert_to_batchnorm(converted)
    assert not any(isinstance(m, ABN) for m in back.modules())
    converted_layers = {layer.name for layer in report.converted}
    code = "\n".join(m.code for m in back.modules() if isinstance(m, fx.GraphModule))
    assert "channel_gate" not in code and "inplace_abn" not in code
    assert converted._forward_pre_hooks and not back._forward_pre_hooks and not back._forward_hooks  # recompute's

    def rename(key):  # each layer became Sequential(BatchNorm, activation)
        module, _, attribute = key.rpartition(".")
        return f"{module}.0.{attribute}" if module in converted_layers else key

    assert set(back.state_dict()) == {rename(key) for key in model.state_dict()}
    assert_converted_exactly(model, back, x, rename=rename)


def test_convert_to_batchnorm_says_where_it_cannot_rewrite():
    class Mine(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.layer = nn.Conv2d(4, 4, 1), InPlaceABN(4)

        def forward(self, x):
            y = self.layer(self.conv(x), x)
            return y * 2 if self.training else y

    with pytest.raises(ValueError, match="the call of 'layer' with a shortcut: the forward of the model differs "
                                         "between training and eval mode.*act\\(BatchNorm\\(x\\) \\+ shortcut\\)"):
        convert_to_batchnorm(Mine())


def test_fuse_conv_abn_folds_into_every_kind_of_layer():
    model = abn_model().eval()
    head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 5), ABN(5, activation="elu")).double().eval()
    with torch.no_grad():
        head[2].weight.normal_(), head[2].running_mean.normal_(), head[2].running_var.uniform_(0.5, 2)
    model.append(head)
    fused = fuse_conv_abn(model)
    assert not any(isinstance(m, ABN) for m in fused.modules())
    assert type(fused) is nn.Sequential
    assert [type(fused[i]) for i in (1, 3, 5, 7, 9, 11)] == [nn.LeakyReLU, nn.ELU, nn.Identity, nn.ReLU, nn.LeakyReLU, nn.SiLU]
    assert fused[0].bias is not None and type(fused[12][2]) is nn.ELU
    x = torch.randn(3, 3, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="model.eval()"):
        fuse_conv_abn(model.train())


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
@pytest.mark.parametrize("act", [lambda inplace: nn.LeakyReLU(0.1, inplace=inplace), nn.ReLU],
                         ids=["leaky_relu", "relu"])
def test_fuse_after_convert_matches_the_batchnorm_model(block, act):
    """In place (leaky_relu) the folded scale is |w'| + eps; in recompute mode (relu), BatchNorm's weight."""
    model, x = model_and_input(TinyResNet(block, act=act))
    converted, report = convert_to_abn(model)
    assert any(layer.shortcut for layer in report.layers)
    assert any(layer.mode == "recompute" for layer in report.layers) == (act is nn.ReLU)
    fused = fuse_conv_abn(converted.eval())
    assert not any(isinstance(m, ABN) for m in fused.modules())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model.eval()(x), atol=1e-10, rtol=0)
