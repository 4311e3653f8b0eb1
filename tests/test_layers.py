"""InPlaceABN / ABN against float64 torch BatchNorm + activation, on every backend that runs on CPU."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import inplace_abn
from inplace_abn import ABN, InPlaceABN, InPlaceABNSync
from inplace_abn.functions import inplace_abn as inplace_abn_fn

from reference import ReferenceABN

ACTIVATIONS = [("leaky_relu", 0.01), ("leaky_relu", 0.5), ("elu", 1.0), ("identity", 0.0), ("relu", 0.0), ("leaky_relu", 0.0)]
SHAPES = {2: (7, 5), 3: (3, 5, 6), 4: (2, 5, 4, 3), 5: (2, 5, 3, 2, 3)}


def _layer(cls, channels, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the not-invertible warning has its own test
        layer = cls(channels, **kwargs).double()
    if layer.affine:
        with torch.no_grad():
            layer.weight.uniform_(-1.5, 1.5)  # negative scales exercise |w| + eps and sign(w)
            layer.bias.normal_()
    return layer


def _compare(layer, shape, steps=2, train=True, atol=1e-10):
    """Run ``layer`` and the float64 reference side by side for a few steps; compare everything."""
    reference = ReferenceABN(layer, len(shape))
    layer.train(train), reference.train(train)
    for _ in range(steps):
        x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
        x_ours = x.clone().requires_grad_()
        x_ref = x.clone().requires_grad_()
        grad = torch.randn(shape, dtype=torch.float64)
        out = layer(x_ours * 1)  # "* 1": in-place layers must not receive a leaf
        expected = reference(x_ref)
        torch.testing.assert_close(out, expected, atol=atol, rtol=1e-9)
        out.backward(grad)
        expected.backward(grad)
        torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=atol, rtol=1e-9)
        if layer.affine:
            torch.testing.assert_close(layer.weight.grad, reference.raw_weight.grad, atol=atol, rtol=1e-9)
            torch.testing.assert_close(layer.bias.grad, reference.bn.bias.grad, atol=atol, rtol=1e-9)
            layer.zero_grad(), reference.zero_grad()
    if layer.track_running_stats:
        torch.testing.assert_close(layer.running_mean, reference.bn.running_mean, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(layer.running_var, reference.bn.running_var, atol=1e-12, rtol=1e-10)
        assert int(layer.num_batches_tracked) == int(reference.bn.num_batches_tracked)


@pytest.mark.parametrize("cls", [ABN, InPlaceABN])
@pytest.mark.parametrize("activation,param", ACTIVATIONS)
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("train", [True, False])
def test_matches_batchnorm_eager(monkeypatch, cls, activation, param, rank, train):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")
    layer = _layer(cls, 5, activation=activation, activation_param=param)
    if not train:  # non-trivial running statistics
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2)
    _compare(layer, SHAPES[rank], train=train)


@pytest.mark.parametrize("cls", [ABN, InPlaceABN])
@pytest.mark.parametrize(
    "options",
    [dict(momentum=None), dict(affine=False), dict(track_running_stats=False), dict(momentum=0.3, eps=1e-3)],
    ids=["momentum_none", "no_affine", "no_running_stats", "momentum_eps"],
)
@pytest.mark.parametrize("train", [True, False])
def test_options_match_batchnorm(monkeypatch, cls, options, train):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")
    layer = _layer(cls, 5, **options)
    _compare(layer, SHAPES[4], steps=3, train=train)


@pytest.mark.parametrize(
    "activation,param,rank",
    [("leaky_relu", 0.01, 4), ("elu", 1.0, 4), ("identity", 0.0, 4), ("relu", 0.0, 4),
     ("leaky_relu", 0.01, 2), ("leaky_relu", 0.01, 3), ("leaky_relu", 0.01, 5)],
)
@pytest.mark.parametrize("train", [True, False])
def test_compiled_backend_matches_batchnorm(monkeypatch, activation, param, rank, train):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "compiled")
    layer = _layer(InPlaceABN, 5, activation=activation, activation_param=param)
    _compare(layer, SHAPES[rank], train=train)


def test_compiled_backend_options(monkeypatch):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "compiled")
    _compare(_layer(InPlaceABN, 5, affine=False, momentum=None), (4, 5, 3, 3), steps=2)


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_gradcheck(monkeypatch, backend):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", backend)
    x = torch.randn(3, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    # negative weights exercise |w|; w = 0 (|w|'s kink) has its own test below
    weight = torch.tensor([0.7, -1.2, 0.3, 2.0], dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    for activation, param in [("leaky_relu", 0.2), ("elu", 0.7), ("identity", 0.0)]:
        def layer(x, weight, bias):
            return inplace_abn_fn(x.clone(), weight, bias, None, None, True, 0.1, 1e-5, activation, param)

        assert torch.autograd.gradcheck(layer, (x, weight, bias))

        def eval_layer(x, weight, bias):
            running_mean, running_var = torch.zeros(4, dtype=torch.float64), torch.full((4,), 1.5, dtype=torch.float64)
            return inplace_abn_fn(x.clone(), weight, bias, running_mean, running_var, False, 0.1, 1e-5, activation, param)

        assert torch.autograd.gradcheck(eval_layer, (x, weight, bias))


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_weight_gradient_sign_of_zero_is_plus_one(monkeypatch, backend):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", backend)
    layer = InPlaceABN(3, activation="identity").double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.0, -0.5, 0.5], dtype=torch.float64))
    x = torch.randn(6, 3, dtype=torch.float64)
    grad = torch.randn(6, 3, dtype=torch.float64)
    layer(x.clone()).backward(grad)
    x_hat = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + layer.eps)
    expected = (grad * x_hat).sum(0) * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(layer.weight.grad, expected)


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_create_graph_gives_first_order_gradients_and_refuses_the_second(monkeypatch, backend):
    """backward(create_graph=True) (gradient penalties) works through the layer; differentiating
    its gradients again raises instead of returning a silently wrong second derivative."""
    monkeypatch.setenv("INPLACE_ABN_BACKEND", backend)
    layer = _layer(InPlaceABN, 3)
    reference = ReferenceABN(layer, 4)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    # A loss whose gradient depends on x, so that the incoming gradient itself requires grad.
    (dx,) = torch.autograd.grad(layer(x * 1).square().sum(), x, create_graph=True)
    (expected,) = torch.autograd.grad(reference(x_ref).square().sum(), x_ref)
    torch.testing.assert_close(dx, expected)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dx.sum().backward()
