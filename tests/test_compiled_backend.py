"""The compiled backend's own graph cache: graphs are called without guards, so every shape and layout
that shares a graph must still get the eager math's results (held against float64 eager)."""

import pytest
import torch

from inplace_abn.activations import make_activation
from inplace_abn.backends import compiled, eager

LEAKY = make_activation("leaky_relu", 0.1)


def _params(channels):
    weight = torch.empty(channels).uniform_(-1.5, 1.5)
    return weight, torch.randn(channels)


def _check_forward_backward(x):
    """forward_train_ and backward of the compiled backend against float64 eager, on ``x``'s layout."""
    weight, bias = _params(x.shape[1])
    grad = torch.randn_like(x)
    z, z64 = x.clone(), x.double()
    mean, var = compiled.forward_train_(z, weight, bias, 1e-5, LEAKY)
    mean64, var64 = eager.forward_train_(z64, weight.double(), bias.double(), 1e-5, LEAKY)
    torch.testing.assert_close(z.double(), z64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var.double(), var64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean.double(), mean64, atol=1e-5, rtol=1e-5)
    assert z.stride() == x.stride()
    dx, grad_weight, grad_bias = compiled.backward(z, grad, var, weight, bias, 1e-5, LEAKY, True)
    ref = eager.backward(z64, grad.double(), var64, weight.double(), bias.double(), 1e-5, LEAKY, True)
    for ours, expected in zip((dx, grad_weight, grad_bias), ref):
        torch.testing.assert_close(ours.double(), expected, atol=1e-4, rtol=1e-4)
    assert dx.stride() == x.stride()


def test_one_graph_serves_every_shape_of_a_rank():
    # Non-square, N == C, odd sizes: a graph that had assumed H == W or N == C would be wrong here.
    shapes = [(4, 6, 5, 5), (4, 6, 5, 9), (6, 6, 3, 2), (2, 3, 17, 4), (5, 8, 2, 2)]
    _check_forward_backward(torch.randn(shapes[0]) * 2 + 1)
    compiled_before = len(compiled._cache)
    for shape in shapes[1:]:
        _check_forward_backward(torch.randn(shape) * 2 + 1)
    assert len(compiled._cache) == compiled_before, "same rank, dtype and layout must reuse the graphs"


@pytest.mark.parametrize("shape", [(1, 6, 4, 3), (3, 6, 1, 1), (5, 1, 2, 3), (9, 4)])
def test_dims_of_size_one(shape):
    _check_forward_backward(torch.randn(shape) * 2 + 1)


def test_channels_last_and_odd_layouts():
    # 6, 20 and 40 channels: channels_last kernels vectorize over C in blocks of 16, with a tail.
    for shape in [(3, 6, 5, 4), (2, 20, 3, 5), (3, 40, 2, 3)]:
        _check_forward_backward((torch.randn(shape) * 2 + 1).to(memory_format=torch.channels_last))
    _check_forward_backward((torch.randn(2, 20, 3, 2, 4) * 2 + 1).to(memory_format=torch.channels_last_3d))
    # A layout with no graph (here a transposed view) runs the eager math on the same memory.
    base = torch.randn(3, 6, 4, 5) * 2 + 1
    _check_forward_backward(base.transpose(2, 3))


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(compiled, "_compile", broken)
    monkeypatch.setattr(compiled, "_cache", {})
    monkeypatch.setattr(compiled, "_broken", [])
    x = torch.randn(4, 3, 2, 2)
    weight, bias = _params(3)
    z, z_eager = x.clone(), x.clone()
    with pytest.warns(RuntimeWarning, match="no compiler today.*falling back to the eager backend"):
        mean, var = compiled.forward_train_(z, weight, bias, 1e-5, LEAKY)
    expected = eager.forward_train_(z_eager, weight, bias, 1e-5, LEAKY)
    torch.testing.assert_close(z, z_eager)
    torch.testing.assert_close((mean, var), expected)
    assert compiled._broken


def test_split_passes_of_the_synchronized_path():
    """batch_stats, normalize_activate_, backward_reduce and backward_apply: the passes that
    InPlaceABNSync runs with collectives in between."""
    x = torch.randn(4, 5, 3, 6) * 2 + 1
    weight, bias = _params(5)
    grad = torch.randn_like(x)
    for ours, expected in zip(compiled.batch_stats(x), eager.batch_stats(x.double())):
        torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=1e-5)
    mean, var = eager.batch_stats(x)
    z, z64 = x.clone(), x.double()
    assert compiled.normalize_activate_(z, mean, var, weight, bias, 1e-5, LEAKY) is None
    eager.normalize_activate_(z64, mean.double(), var.double(), weight.double(), bias.double(), 1e-5, LEAKY)
    torch.testing.assert_close(z.double(), z64, atol=1e-5, rtol=1e-5)
    sums = compiled.backward_reduce(z, grad, weight, bias, 1e-5, LEAKY)
    sums64 = eager.backward_reduce(z64, grad.double(), weight.double(), bias.double(), 1e-5, LEAKY)
    for ours, expected in zip(sums, sums64):
        torch.testing.assert_close(ours.double(), expected, atol=1e-4, rtol=1e-4)
    count = x.numel() // x.shape[1]
    dx = compiled.backward_apply(z, grad, var, weight, bias, *sums, count, 1e-5, LEAKY)
    dx64 = eager.backward_apply(z64, grad.double(), var.double(), weight.double(), bias.double(),
                                *(s.double() for s in sums), count, 1e-5, LEAKY)
    torch.testing.assert_close(dx.double(), dx64, atol=1e-4, rtol=1e-4)


def test_momentum_none_does_not_recompile(monkeypatch):
    """momentum=None (a cumulative average) changes the update factor every step: it is a graph
    input, so the steps share one graph, and the running statistics still match BatchNorm's."""
    from inplace_abn import InPlaceABN

    monkeypatch.setenv("INPLACE_ABN_BACKEND", "compiled")
    layer, reference = InPlaceABN(4, momentum=None), torch.nn.BatchNorm2d(4, momentum=None)
    for step in range(4):
        x = torch.randn(3, 4, 5, 2) * 2 + step
        layer(x.clone())
        reference(x)
        if step == 0:
            compiled_after_first_step = len(compiled._cache)
    assert len(compiled._cache) == compiled_after_first_step
    torch.testing.assert_close(layer.running_mean, reference.running_mean)
    torch.testing.assert_close(layer.running_var, reference.running_var)


def test_view_with_storage_offset_is_written_in_place():
    base = torch.randn(5, 6, 4, 3) * 2 + 1
    before = base.clone()
    view = base[2:4]  # contiguous, but starts inside its storage
    _check_forward_backward(view)  # on a copy; then in place on the view itself:
    weight, bias = _params(6)
    expected = view.double()
    eager.forward_train_(expected, weight.double(), bias.double(), 1e-5, LEAKY)
    compiled.forward_train_(view, weight, bias, 1e-5, LEAKY)
    torch.testing.assert_close(base[2:4].double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(base[:2], before[:2]) and torch.equal(base[4:], before[4:])


def test_momentum_without_running_statistics_does_not_recompile():
    x, (weight, bias) = torch.randn(4, 3, 5, 2), _params(3)
    compiled.forward_train_(x.clone(), weight, bias, 1e-5, LEAKY, None, None, 0.1)
    compiled_before = len(compiled._cache)
    for momentum in (0.2, 0.5, 1 / 7):  # unused without running statistics
        compiled.forward_train_(x.clone(), weight, bias, 1e-5, LEAKY, None, None, momentum)
    assert len(compiled._cache) == compiled_before
