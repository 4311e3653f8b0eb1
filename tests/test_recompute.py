"""The residual (shortcut) form of the layers, the recompute mode (with BatchNorm's own weight too) and its
saved-tensor hooks, and channel_gate: float64 references, what is stored, and the hooks' own safety checks."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inplace_abn
from inplace_abn import ABN, InPlaceABN, InPlaceABNSync, RecomputeABN, channel_gate, enable_recompute, recompute
from inplace_abn.functions import inplace_abn as inplace_abn_fn, inplace_abn_sync, recompute_abn as recompute_abn_fn
from inplace_abn.activations import ACTIVATIONS, make_activation

from reference import ReferenceABN

PARAMS = {"leaky_relu": 0.1, "elu": 0.7}


def _layer(cls, channels, activation, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = cls(channels, activation=activation, activation_param=PARAMS.get(activation, 0.0), **options).double()
    with torch.no_grad():
        layer.weight.uniform_(-1.5, 1.5)  # negative scales exercise |w| + eps
        if layer.batchnorm_weight:
            layer.weight[0] = 0.0  # a scale of 0: BatchNorm's weight only (|w| + eps >= eps)
        layer.bias.normal_()
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
    return layer


class ConvNormConv(nn.Module):
    """conv -> norm (+ shortcut) -> conv: the next conv saves the norm's output, which the recompute
    mode must rebuild for it."""

    def __init__(self, norm, channels=4):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = norm
        self.conv_out = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, shortcut=None):
        return self.conv_out(self.norm(self.conv_in(x), shortcut))


def _reference_model(model):
    reference = ConvNormConv(ReferenceABN(model.norm, 4)).double()
    reference.conv_in.load_state_dict(model.conv_in.state_dict())
    reference.conv_out.load_state_dict(model.conv_out.state_dict())
    return reference


def _step(model, x, shortcut, grad):
    x = x.clone().requires_grad_()
    shortcut = None if shortcut is None else shortcut.clone().requires_grad_()
    out = model(x, shortcut)
    out.backward(grad)
    grads = [x.grad, None if shortcut is None else shortcut.grad]
    grads += [p.grad.clone() for p in (model.conv_in.weight, model.conv_out.weight, model.conv_out.bias)]
    return out.detach(), grads


def _assert_same_step(model, reference, shape, with_shortcut):
    """One training step of both on the same random input, shortcut and output gradient: outputs and
    every gradient (input, shortcut, the convs' parameters) agree."""
    x = torch.randn(shape, dtype=torch.float64)
    shortcut = torch.randn_like(x) if with_shortcut else None
    grad = torch.randn(shape, dtype=torch.float64)
    out, grads = _step(model, x, shortcut, grad)
    expected, expected_grads = _step(reference, x, shortcut, grad)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)
    for ours, theirs in zip(grads, expected_grads):
        if theirs is not None:
            torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-10)


def _compare_steps(model, reference, with_shortcut):
    for train in (True, False):
        model.train(train), reference.train(train)
        _assert_same_step(model, reference, (3, 4, 5, 4), with_shortcut)
        norm = model.norm
        torch.testing.assert_close(norm.weight.grad, reference.norm.raw_weight.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(norm.bias.grad, reference.norm.bn.bias.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(norm.running_mean, reference.norm.bn.running_mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(norm.running_var, reference.norm.bn.running_var, rtol=1e-9, atol=1e-12)
        for module in (model, reference):
            module.zero_grad()


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("cls, batchnorm_weight", [(InPlaceABN, False), (RecomputeABN, False), (RecomputeABN, True)],
                         ids=["InPlaceABN", "RecomputeABN-abs", "RecomputeABN-batchnorm_weight"])
@pytest.mark.parametrize("with_shortcut", [False, True])
def test_layers_with_shortcut_match_batchnorm_add_activation(monkeypatch, activation, cls, batchnorm_weight,
                                                             with_shortcut):
    """``layer(x, shortcut)`` is ``act(BN(x) + shortcut)`` in outputs, every gradient (the shortcut's too)
    and running statistics, for every activation, in training and eval mode, under the recompute hooks
    (so recompute-mode outputs are rebuilt for the next conv). BatchNorm's weight is ``|w| + eps``, or
    with ``batchnorm_weight`` the layer's own ``w`` (plain nn.BatchNorm: negative and zero weights)."""
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")
    options = {} if cls is InPlaceABN else {"batchnorm_weight": batchnorm_weight}
    norm = _layer(cls, 4, activation, **options)
    model = enable_recompute(ConvNormConv(norm).double())
    _compare_steps(model, _reference_model(model), with_shortcut)


@pytest.mark.parametrize("cls, activation, options", [
    (InPlaceABN, "relu", {}), (InPlaceABN, "hardswish", {}), (InPlaceABNSync, "silu", {"in_place": False}),
    (InPlaceABNSync, "relu", {}), (ABN, "elu", {}),
], ids=["InPlaceABN-relu", "InPlaceABN-hardswish", "InPlaceABNSync-in_place=False", "InPlaceABNSync-relu", "ABN"])
def test_every_layer_that_keeps_its_input_takes_batchnorm_weight(monkeypatch, cls, activation, options):
    """The other layers that do not write in place (a lossy activation, in_place=False, ABN) take
    ``batchnorm_weight=True`` and compute plain BatchNorm (+ shortcut) + activation, train and eval."""
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")
    norm = _layer(cls, 4, activation, batchnorm_weight=True, **options)
    assert norm.batchnorm_weight and "batchnorm_weight=True" in repr(norm)
    model = enable_recompute(ConvNormConv(norm).double())
    _compare_steps(model, _reference_model(model), with_shortcut=True)


@pytest.mark.parametrize("activation", ["relu", "silu", "leaky_relu"])
def test_abn_with_shortcut(monkeypatch, activation):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")
    model = ConvNormConv(_layer(ABN, 4, activation)).double()
    _compare_steps(model, _reference_model(model), with_shortcut=True)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "hardswish", "silu"])
@pytest.mark.parametrize("with_shortcut", [False, True])
def test_compiled_backend_recompute_and_shortcut(monkeypatch, activation, with_shortcut):
    """The compiled backend runs the same functions (shortcut, recompute mode) as one fused graph each."""
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "compiled")
    model = enable_recompute(ConvNormConv(_layer(InPlaceABN, 4, activation)).double())
    reference = _reference_model(model)
    _assert_same_step(model, reference, (2, 4, 6, 3), with_shortcut)


def test_compiled_backend_batchnorm_weight(monkeypatch):
    """The compiled backend specializes its recompute-mode graphs on ``batchnorm_weight``: plain BatchNorm's
    results, zero and negative weights included."""
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "compiled")
    model = enable_recompute(ConvNormConv(_layer(RecomputeABN, 4, "relu")).double())
    assert model.norm.batchnorm_weight and model.norm.weight[0] == 0
    _compare_steps(model, _reference_model(model), with_shortcut=True)


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_batchnorm_weight(monkeypatch, training):
    """With the scale ``w`` itself (no ``|w|`` kink), finite differences agree at ``w = 0`` and ``w < 0`` too."""
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")
    x = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    shortcut = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([0.0, -1.2, 0.3, 2.0], dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    running_mean, running_var = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5

    def layer(x, weight, bias, shortcut):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the recompute mode outside enable_recompute
            return recompute_abn_fn(x, weight, bias, running_mean.clone(), running_var.clone(), training,
                                                    0.1, 1e-5, "elu", 0.7, shortcut=shortcut, batchnorm_weight=True)

    assert torch.autograd.gradcheck(layer, (x, weight, bias, shortcut))


def test_layers_writing_in_place_refuse_batchnorm_weight():
    """In place, backward divides by the scale, which BatchNorm's weight (0, or negative) cannot be."""
    for make in (lambda: InPlaceABN(4, batchnorm_weight=True), lambda: InPlaceABNSync(4, batchnorm_weight=True),
                 lambda: InPlaceABN(4, activation="silu", batchnorm_weight=True)):
        with pytest.raises(ValueError, match="writes over its input.*batchnorm_weight=True needs RecomputeABN"):
            make()
    x, weight, bias = torch.randn(4, 3, 2), torch.ones(3), torch.zeros(3)
    for call in (lambda: inplace_abn_fn(x * 1, weight, bias, None, None, batchnorm_weight=True),
                 lambda: inplace_abn_sync(x * 1, weight, bias, None, None, batchnorm_weight=True)):
        with pytest.raises(ValueError, match="batchnorm_weight=True .* needs a layer that does not write over"):
            call()
    layer = InPlaceABN(3)
    layer.batchnorm_weight = True  # changed after construction: the call still refuses
    with pytest.raises(ValueError, match="does not write over its input"):
        layer(x * 1)
    assert not InPlaceABN(3).batchnorm_weight and not ABN(3).batchnorm_weight and RecomputeABN(3).batchnorm_weight


def test_convert_sync_abn_keeps_batchnorm_weight(monkeypatch):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")
    layers = [_layer(RecomputeABN, 4, "relu"), _layer(RecomputeABN, 4, "relu", batchnorm_weight=False),
              _layer(ABN, 4, "elu", batchnorm_weight=True), _layer(InPlaceABN, 4, "hardswish", batchnorm_weight=True)]
    model = nn.Sequential(*layers)
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the recompute mode outside enable_recompute
        expected = model(x)
        converted = InPlaceABNSync.convert_sync_abn(copy.deepcopy(model))
        assert all(type(layer) is InPlaceABNSync for layer in converted)
        assert [layer.batchnorm_weight for layer in converted] == [True, False, True, True]
        assert [layer.in_place for layer in converted] == [False, False, False, True]
        torch.testing.assert_close(converted(x), expected, rtol=1e-12, atol=1e-12)


def test_batchnorm_state_dict_loads_into_recompute_abn_with_its_meaning(monkeypatch):
    """RecomputeABN is a drop-in for BatchNorm + activation: a BatchNorm state dict (negative and zero
    weights) loads and gives BatchNorm's outputs, gradients and running statistics."""
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")
    bn = nn.BatchNorm2d(4).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([-1.3, 0.0, 0.4, 2.0])), bn.bias.normal_()
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0)
    layer = RecomputeABN(4, activation="relu").double()
    layer.load_state_dict(bn.state_dict())
    for training in (True, False):
        bn.train(training), layer.train(training)
        x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
        inputs = [x.clone().requires_grad_() for _ in range(2)]
        grad = torch.randn_like(x)
        with inplace_abn.recompute_scope():
            out = layer(inputs[0])
        expected = F.relu(bn(inputs[1]))
        out.backward(grad), expected.backward(grad)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        for ours, theirs in ((inputs[0].grad, inputs[1].grad), (layer.weight.grad, bn.weight.grad),
                             (layer.bias.grad, bn.bias.grad)):
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
        layer.zero_grad(), bn.zero_grad()
    for name, buffer in bn.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[name], buffer, rtol=1e-12, atol=0)


class StoredTensors:
    """The activation-sized tensors the recompute hooks store while active (white-box: the hooks' own
    records), by storage; parameters and per-channel statistics (under ``min_bytes``) are left out."""

    def __init__(self, monkeypatch, min_bytes=4096):
        self.storages, self.min_bytes = {}, min_bytes
        pack = recompute._pack

        def counting_pack(tensor):
            saved = pack(tensor)
            if isinstance(saved, recompute._Stored):
                storage = tensor.untyped_storage()
                self.storages[storage.data_ptr()] = storage.nbytes()
            return saved

        monkeypatch.setattr(recompute, "_pack", counting_pack)

    def of(self, model, *inputs):
        """``(number of activation-sized tensors stored, model output)``."""
        self.storages = {}
        out = model(*inputs)
        parameters = {p.untyped_storage().data_ptr() for p in getattr(model, "parameters", list)()}
        return sum(1 for ptr, n in self.storages.items() if n >= self.min_bytes and ptr not in parameters), out


@pytest.mark.parametrize("cls,activation", [(RecomputeABN, "relu"), (InPlaceABN, "hardswish"), (InPlaceABN, "elu"),
                                            (RecomputeABN, "leaky_relu")])
def test_one_stored_tensor_per_layer(monkeypatch, cls, activation):
    """conv -> layer -> conv under the hooks stores two activation-sized tensors (the conv input and the
    layer's input or output) where BatchNorm + activation stores four (conv input, BN input, the
    activation's input or output, the next conv's input)."""
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")
    meter = StoredTensors(monkeypatch)
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    model = enable_recompute(ConvNormConv(_layer(cls, 4, activation)).double())
    stored, _ = meter.of(model, x.clone().requires_grad_())
    assert stored == 2
    standard = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Hardswish(), nn.Conv2d(4, 4, 3, padding=1))
    with inplace_abn.recompute_scope():
        stored, _ = meter.of(standard.double(), x.clone().requires_grad_())
    assert stored == 4


def test_chained_shortcuts_store_every_other_output(monkeypatch):
    """A recompute-mode layer whose shortcut is itself rebuilt stores its own output (rebuilding must not
    chain through a whole stage of residual blocks); the next one is rebuilt again."""
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")
    meter = StoredTensors(monkeypatch)

    class Stage(nn.Module):
        def __init__(self, blocks=3):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(4, 4, 1, bias=False) for _ in range(blocks))
            self.norms = nn.ModuleList(_layer(RecomputeABN, 4, "relu") for _ in range(blocks))

        def forward(self, x):
            for conv, norm in zip(self.convs, self.norms):
                x = norm(conv(x), x)
            return x * 1.5

    stage = enable_recompute(Stage().double())
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    stored, out = meter.of(stage, x.clone().requires_grad_())
    # x, three conv outputs (the norms' inputs), and block 2's output (its shortcut, block 1's, is rebuilt)
    assert stored == 5
    reference = Stage().double()
    reference.load_state_dict(stage.state_dict())
    inputs = [x.clone().requires_grad_() for _ in range(2)]
    grad = torch.randn_like(out)
    stage(inputs[0]).backward(grad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference(inputs[1]).backward(grad)  # no hooks: every output stored
    torch.testing.assert_close(inputs[0].grad, inputs[1].grad, rtol=1e-12, atol=1e-12)


def test_rebuilt_views_and_several_consumers(monkeypatch):
    """Ops that save a view of a rebuilt output, and several ops saving it, get the right values."""
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")
    norm = _layer(RecomputeABN, 4, "hardswish")
    conv = nn.Conv2d(2, 3, 3, padding=1).double()

    def network(x):
        z = norm(x * 1.0)
        return conv(z[:, 1:3]).sum() + (z * z).sum() + z.sigmoid().mul(z).sum()

    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    with inplace_abn.recompute_scope():
        network(x).backward()
    grad_hooked, conv_grad = x.grad.clone(), conv.weight.grad.clone()
    x.grad, conv.weight.grad = None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        network(x).backward()
    torch.testing.assert_close(grad_hooked, x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv_grad, conv.weight.grad, rtol=1e-12, atol=1e-12)


def test_hooks_still_catch_a_saved_tensor_changed_in_place():
    """Autograd skips its version check under saved-tensor hooks; the hooks check instead."""
    x = torch.randn(4, 3, requires_grad=True)
    with inplace_abn.recompute_scope():
        a = x * 2
        b = a * a  # saves a
        a.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation.*version 1; expected version 0"):
        b.sum().backward()


def test_a_rebuilt_output_changed_in_place_before_being_saved_is_stored():
    norm = _layer(RecomputeABN, 3, "relu")
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    with inplace_abn.recompute_scope():
        z = norm(x * 1.0)
        assert recompute.is_recomputed(z)
        z.mul_(2)
        assert not recompute.is_recomputed(z)


def test_enable_recompute_is_idempotent_and_closes_its_scope_on_errors():
    class Failing(nn.Module):
        def forward(self, x):
            assert recompute.active()
            raise KeyError("boom")

    model = enable_recompute(enable_recompute(Failing()))
    assert len(model._forward_pre_hooks) == 1
    with pytest.raises(KeyError):
        model(torch.randn(2))
    assert not recompute.active()


@pytest.mark.parametrize("recomputed", [False, True])
def test_channel_gate(monkeypatch, recomputed):
    """``channel_gate(x, gate)`` is ``x * gate`` in value and gradients; under the hooks the product is
    rebuilt for the op that saved it (x a recompute-mode output: a rebuilt input of a rebuilt product)."""
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")
    meter = StoredTensors(monkeypatch)
    norm = _layer(RecomputeABN if recomputed else InPlaceABN, 4, "relu" if recomputed else "elu")
    conv = nn.Conv2d(4, 4, 1).double()
    fc = nn.Conv2d(4, 4, 1).double()

    def block(x, gate_function):
        z = norm(x * 1.0)
        gate = torch.sigmoid(fc(z.mean((2, 3), keepdim=True)))
        return conv(gate_function(z, gate))

    x = torch.randn(2, 4, 12, 12, dtype=torch.float64)
    inputs = [x.clone().requires_grad_() for _ in range(2)]
    with inplace_abn.recompute_scope():
        stored, out = meter.of(lambda x: block(x, channel_gate), inputs[0])
        assert stored == 1  # the norm's input (recompute) or output (in place): the product is rebuilt
    grad = torch.randn_like(out)
    out.backward(grad)
    grads = [t.grad.clone() for t in (inputs[0], conv.weight, fc.weight)]
    for t in (conv.weight, fc.weight):
        t.grad = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = block(inputs[1], torch.mul)
    expected.backward(grad)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(grads, (inputs[1].grad, conv.weight.grad, fc.weight.grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_shortcut_must_match_the_input():
    layer = InPlaceABN(3)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="shortcut must have the input's shape \\(2, 3, 4, 4\\)"):
        layer(x * 1, torch.randn(2, 3, 4, 1))
    with pytest.raises(TypeError, match="shortcut must be a floating-point tensor"):
        layer(x * 1, torch.ones(2, 3, 4, 4, dtype=torch.long))


def test_activation_kinds():
    assert make_activation("leaky_relu", 0.01).kind == "invertible"
    assert make_activation("leaky_relu", 0.0).kind == "lossy"
    assert make_activation("swish").name == "silu"
    for name in ("relu", "relu6", "hardswish", "hardsigmoid", "sigmoid", "tanh"):
        assert make_activation(name).kind == "lossy"


def test_disable_recompute_removes_the_hooks_also_from_a_copy():
    import copy

    model = enable_recompute(nn.Linear(2, 2))
    copied = copy.deepcopy(model)
    inplace_abn.disable_recompute(copied)
    assert not copied._forward_pre_hooks and not copied._forward_hooks
    assert len(model._forward_pre_hooks) == 1  # the original keeps its own
    assert len(enable_recompute(copied)._forward_pre_hooks) == 1  # and it can be enabled again
