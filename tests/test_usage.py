"""Dtypes, layouts, torch.compile, state dicts, the 1.1.0 drop-in API, and clear errors on misuse."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inplace_abn
from inplace_abn import ABN, InPlaceABN, InPlaceABNSync
from inplace_abn.functions import inplace_abn as inplace_abn_fn

from reference import torch_activation

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def reference_forward_backward(x, weight, bias, grad, activation="leaky_relu", param=0.01, eps=1e-5):
    """float64 BatchNorm (weight |w|+eps) + activation: output and input/weight/bias gradients."""
    x = x.detach().double().requires_grad_()
    weight = weight.detach().double().requires_grad_()
    bias = bias.detach().double().requires_grad_()
    out = torch_activation(F.batch_norm(x, None, None, weight.abs() + eps, bias, True, 0.1, eps), activation, param)
    out.backward(grad.double())
    return out, x.grad, weight.grad, bias.grad


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_with_float32_parameters(monkeypatch, backend, dtype):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", backend)
    layer = InPlaceABN(6)
    with torch.no_grad():  # |w| not tiny: xhat = (y - b) / |w| from a low-precision y loses digits there
        layer.weight.uniform_(0.5, 2).mul_(torch.randn(6).sign()), layer.bias.normal_()
    x = (torch.randn(4, 6, 5, 3) * 3 + 1).to(dtype)
    grad = torch.randn(x.shape).to(dtype)
    x_ours = x.clone().requires_grad_()
    out = layer(x_ours * 1)
    out.backward(grad)
    ref_out, ref_dx, ref_dw, ref_db = reference_forward_backward(x, layer.weight, layer.bias, grad)
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and x_ours.grad.dtype == dtype
    assert layer.weight.grad.dtype == layer.running_mean.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=tol * 4, rtol=tol)
    torch.testing.assert_close(x_ours.grad.double(), ref_dx, atol=tol * 4, rtol=tol)
    torch.testing.assert_close(layer.weight.grad.double(), ref_dw, atol=tol * 20, rtol=tol)
    torch.testing.assert_close(layer.bias.grad.double(), ref_db, atol=tol * 20, rtol=tol)


def test_autocast_bfloat16(monkeypatch):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")
    model = nn.Sequential(nn.Conv2d(3, 8, 3), InPlaceABN(8), nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 3, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        inner = model[1](model[0](x))
    assert out.dtype == inner.dtype == torch.bfloat16
    out.float().sum().backward()
    assert model[1].weight.grad.dtype == torch.float32 and torch.isfinite(model[1].weight.grad).all()
    assert model[1].running_var.dtype == torch.float32


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("rank", [4, 5])
def test_channels_last_stays_channels_last(monkeypatch, backend, rank):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", backend)
    shape, fmt = ((3, 6, 5, 4), torch.channels_last) if rank == 4 else ((2, 6, 3, 4, 2), torch.channels_last_3d)
    layer = InPlaceABN(6)
    x = torch.randn(shape)
    grad = torch.randn(shape)
    x_cl = x.to(memory_format=fmt).requires_grad_()
    out = layer(x_cl * 1)
    assert out.is_contiguous(memory_format=fmt)
    out.backward(grad.to(memory_format=fmt))
    assert x_cl.grad.is_contiguous(memory_format=fmt)
    ref_out, ref_dx, _, _ = reference_forward_backward(x, layer.weight, layer.bias, grad)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x_cl.grad.double(), ref_dx, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_non_contiguous_input_is_written_in_place(monkeypatch, backend):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", backend)
    layer = InPlaceABN(5).double()
    base = torch.randn(4, 5, 6, 8, dtype=torch.float64)
    view = base.transpose(2, 3)[:, :, ::2]  # non-contiguous, strided view
    expected = torch_activation(F.batch_norm(view, None, None, layer.weight.detach().abs() + 1e-5, layer.bias.detach(), True), "leaky_relu", 0.01)
    out = layer(view)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(base.transpose(2, 3)[:, :, ::2], expected)  # the base sees the new values


def test_expanded_gradient(monkeypatch):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "compiled")
    layer = InPlaceABN(4)
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    layer(x * 1).sum().backward()  # the gradient of .sum() is an expanded (stride 0) tensor
    ref_x = x.detach().double().requires_grad_()
    torch_activation(F.batch_norm(ref_x, None, None, torch.ones(4, dtype=torch.float64) + 1e-5, torch.zeros(4, dtype=torch.float64), True), "leaky_relu", 0.01).sum().backward()
    torch.testing.assert_close(x.grad.double(), ref_x.grad, atol=1e-5, rtol=1e-4)


def test_torch_compile_fullgraph_matches_eager(monkeypatch):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")

    def make():
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(3, 8, 3), InPlaceABN(8), nn.Conv2d(8, 8, 3), InPlaceABN(8, activation="elu", activation_param=1.0), nn.Conv2d(8, 2, 1))

    eager_model, compiled_model = make(), make()
    compiled = torch.compile(compiled_model, fullgraph=True)
    for _ in range(2):
        x = torch.randn(2, 3, 10, 10)
        out_eager, out_compiled = eager_model(x), compiled(x)
        torch.testing.assert_close(out_compiled, out_eager, atol=1e-5, rtol=1e-5)
        out_eager.square().sum().backward()
        out_compiled.square().sum().backward()
    for (name, p_eager), p_compiled in zip(eager_model.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, atol=1e-4, rtol=1e-4, msg=name)
    torch.testing.assert_close(compiled_model[1].running_var, eager_model[1].running_var)
    eager_model.eval(), compiled_model.eval()
    x = torch.randn(2, 3, 10, 10)
    torch.testing.assert_close(compiled(x), eager_model(x), atol=1e-5, rtol=1e-5)


def test_torch_compile_layer_first_in_its_graph(monkeypatch):
    """The layer's input is an input of the compiled graph (computed outside it): gradients must
    still flow right (torch 2.13 mishandles an in-place Function on a graph input; we copy it)."""
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3)
    eager_layer, compiled_layer = InPlaceABN(4), InPlaceABN(4)
    inputs, grad = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 6, 6)
    results = []
    for layer in (eager_layer, torch.compile(compiled_layer, fullgraph=True)):
        conv.zero_grad()
        out = layer(conv(inputs))
        out.backward(grad)
        results.append((out.detach(), conv.weight.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled_layer.weight.grad, eager_layer.weight.grad, atol=1e-4, rtol=1e-4)


# --- the 1.1.0 API --------------------------------------------------------------------------------

def test_public_names_and_functional_positional_order(monkeypatch):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")
    from inplace_abn import ABN, InPlaceABN, InPlaceABNSync, active_group, set_active_group  # noqa: F401
    from inplace_abn.functions import inplace_abn, inplace_abn_sync

    x = torch.randn(4, 3, 5)
    weight, bias = torch.rand(3) + 0.5, torch.randn(3)
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    expected = F.leaky_relu(F.batch_norm(x, None, None, weight.abs() + 1e-5, bias, True), 0.2)
    out = inplace_abn(x.clone(), weight, bias, running_mean, running_var, True, 0.1, 1e-5, "leaky_relu", 0.2)
    torch.testing.assert_close(out, expected)
    out = inplace_abn_sync(x.clone(), weight, bias, running_mean, running_var, True, 0.1, 1e-5, "leaky_relu", 0.2, None)
    torch.testing.assert_close(out, expected)


def test_attributes_repr_and_isinstance():
    layer = InPlaceABNSync(7, eps=1e-3, momentum=0.05, activation="elu", activation_param=0.5)
    assert isinstance(layer, InPlaceABN) and isinstance(layer, ABN)
    assert (layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats) == (7, 1e-3, 0.05, True, True)
    assert (layer.activation, layer.activation_param) == ("elu", 0.5)
    assert "activation=elu[0.5]" in repr(layer) and repr(layer).startswith("InPlaceABNSync(7")
    assert "activation=identity" in repr(InPlaceABN(3, activation="none"))


def test_batchnorm_state_dict_loads():
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(1, 2)
    bn.num_batches_tracked.fill_(7)
    layer = InPlaceABN(5)
    assert list(layer.state_dict()) == list(bn.state_dict())
    layer.load_state_dict(bn.state_dict())
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[key], value)


def test_state_dict_without_num_batches_tracked_loads():
    """inplace-abn 1.1.0 checkpoints have no num_batches_tracked (and version-1 metadata)."""
    state = InPlaceABN(4).state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1
    layer = InPlaceABN(4)
    layer.load_state_dict(state)
    assert int(layer.num_batches_tracked) == 0


# --- clear errors ---------------------------------------------------------------------------------

def test_leaf_input_that_requires_grad_is_refused():
    with pytest.raises(RuntimeError, match="leaf tensor that requires grad.*x.clone()"):
        InPlaceABN(3)(torch.randn(2, 3, 4, requires_grad=True))


def test_wrong_channel_count_names_both():
    with pytest.raises(ValueError, match="input has 4 channels.*weight has 3.*num_features=4"):
        InPlaceABN(3)(torch.randn(2, 4, 5))


def test_one_value_per_channel_in_training():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        InPlaceABN(3)(torch.randn(1, 3))
    InPlaceABN(3).eval()(torch.randn(1, 3))  # fine in eval mode


def test_unknown_activation_and_bad_parameters():
    with pytest.raises(ValueError, match="Unknown activation 'prelu'.*leaky_relu.*silu.*hardswish"):
        InPlaceABN(3, activation="prelu")
    with pytest.raises(ValueError, match="eps must be > 0"):
        InPlaceABN(3, eps=0)
    with pytest.raises(ValueError, match="eps must be > 0"):
        inplace_abn_fn(torch.randn(2, 3), None, None, None, None, True, 0.1, -1.0)
    with pytest.raises(ValueError, match="elu needs alpha > 0"):
        ABN(3, activation="elu", activation_param=0.0)
    with pytest.raises(ValueError, match="rank 2 to 5"):
        InPlaceABN(3)(torch.randn(3))


def test_input_reused_after_overwrite_fails_in_backward(monkeypatch):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")
    conv = nn.Conv2d(3, 4, 1)
    x = conv(torch.randn(2, 3, 4, 4))
    shortcut = x * 2  # "* 2" saves nothing of x, but ...
    product = x * x  # ... this op saves x for its backward, and the layer then overwrites x
    out = InPlaceABN(4)(x)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out + product + shortcut).sum().backward()


@pytest.mark.parametrize("activation,param", [("relu", 0.0), ("leaky_relu", 0.0), ("hardswish", 0.0)])
def test_lossy_activation_recomputes_exactly_and_warns_once_outside_the_hooks(monkeypatch, activation, param):
    """An activation that cannot run in place makes InPlaceABN keep its input (recompute mode): exact
    gradients, a leaf input is fine (it is not modified), and a warning, once, when it trains without
    the recompute hooks (the next layer then keeps its own copy of the output)."""
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")
    from inplace_abn import activations

    activations._warned_outside.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing at construction
        layer = InPlaceABN(3, activation=activation, activation_param=param).double()
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)  # a leaf is fine: nothing in place
    with pytest.warns(UserWarning, match="outside inplace_abn.enable_recompute.*no memory is saved"):
        out = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, and none under the hooks
        layer(x)
        with inplace_abn.recompute_scope():
            layer(x)
    assert torch.equal(x, x.detach()) and x.grad is None
    grad = torch.randn_like(out)
    out.backward(grad)
    ref_x = x.detach().clone().requires_grad_()
    scale, shift = torch.ones(3, dtype=torch.float64) + 1e-5, torch.zeros(3, dtype=torch.float64)
    act = {"hardswish": F.hardswish}.get(activation, F.relu)
    act(F.batch_norm(ref_x, None, None, scale, shift, True)).backward(grad)
    torch.testing.assert_close(x.grad, ref_x.grad)


def test_backend_variable(monkeypatch):
    from inplace_abn import backends

    monkeypatch.setenv("INPLACE_ABN_BACKEND", "fast")
    with pytest.raises(ValueError, match="INPLACE_ABN_BACKEND='fast'.*auto, eager, compiled, triton"):
        InPlaceABN(3)(torch.randn(2, 3))
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "auto")
    assert backends.select(torch.randn(2, 3)) in (backends.compiled, backends.eager)
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backends.select(torch.randn(2, 3))
