"""The Triton backend against the float64 eager reference: every function, activation, layout, rank
and dtype, and the layer end to end.

In CI the kernels run in Triton's interpreter on tiny CPU tensors (conftest.py sets TRITON_INTERPRET=1,
and the interpreter's tile sizes are tiny too, so these shapes still span several tiles, splits and
channel blocks, with partial ones at the edges). With INPLACE_ABN_GPU_TESTS=1 on a machine with a GPU,
the same tests run on CUDA tensors with larger shapes that are not multiples of the GPU tile sizes.
"""

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from inplace_abn import InPlaceABN, backends  # noqa: E402
from inplace_abn.activations import Activation  # noqa: E402
from inplace_abn.backends import eager  # noqa: E402
from inplace_abn.backends import triton as triton_backend  # noqa: E402

EPS = 1e-5
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
GPU_TESTS = os.environ.get("INPLACE_ABN_GPU_TESTS") == "1" and torch.cuda.is_available()


_CPU_SKIP = pytest.mark.skipif(not INTERPRETING, reason="CPU tensors need TRITON_INTERPRET=1")
_CUDA_SKIP = pytest.mark.skipif(not GPU_TESTS, reason="CUDA cases need INPLACE_ABN_GPU_TESTS=1 and a GPU")


@pytest.fixture(params=[pytest.param("cpu", marks=_CPU_SKIP), pytest.param("cuda", marks=_CUDA_SKIP)])
def device(request):
    return request.param


ACTIVATIONS = [
    Activation("leaky_relu", 0.01),
    Activation("leaky_relu", 0.3),
    Activation("elu", 1.0),
    Activation("identity"),
]
ACTIVATION_IDS = ["leaky_relu-0.01", "leaky_relu-0.3", "elu-1.0", "identity"]

# layout -> (shape in the interpreter, shape on GPU). "cl" is channels last: channels_last /
# channels_last_3d, or (N, L, C).transpose(1, 2) at rank 3. A rank-2 input is both layouts at once.
SHAPES = {
    "rank2": ((13, 5), (3001, 67)),
    "rank3": ((2, 3, 11), (5, 19, 301)),
    "rank3-cl": ((2, 5, 7), (5, 19, 301)),
    "rank4": ((2, 3, 5, 7), (4, 6, 131, 129)),
    "rank4-cl": ((2, 3, 5, 7), (3, 37, 19, 23)),
    "rank5": ((2, 3, 2, 3, 5), (2, 13, 5, 9, 11)),
    "rank5-cl": ((2, 5, 2, 3, 3), (2, 70, 5, 9, 11)),
}
LAYOUTS = list(SHAPES)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# Outputs are computed in float32 and rounded to the storage dtype: about one unit in the last place.
TOLERANCES = {
    torch.float32: dict(atol=3e-5, rtol=3e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def _shape(layout, device):
    return SHAPES[layout][0 if device == "cpu" else 1]


def _in_layout(x, layout):
    if not layout.endswith("-cl"):
        return x.contiguous()
    if x.dim() == 3:
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def _input(layout, device, dtype, scale=2.0, shift=0.5):
    # Clamped so that elu never saturates to exactly -alpha in bf16, where the inverse is approximate.
    x = torch.randn(_shape(layout, device), device=device).clamp(-3, 3) * scale + shift
    return _in_layout(x.to(dtype), layout)


def _affine(channels, device):
    """float32 weights of both signs (they exercise |w| + eps) away from 0, and a bias."""
    sign = torch.where(torch.rand(channels, device=device) < 0.5, -1.0, 1.0)
    weight = sign * torch.empty(channels, device=device).uniform_(0.5, 1.5)
    bias = torch.empty(channels, device=device).uniform_(-0.5, 0.5)
    return weight, bias


def _double(*tensors):
    return [t.double() if t is not None else None for t in tensors]


def _count(x):
    return x.numel() // x.shape[1]


def _backward_matches_eager(z, grad_z, var, weight, bias, activation, training, tolerance):
    """``triton_backend.backward`` against float64 ``eager.backward``: ``dx``, then the weight and
    bias gradients (without parameters, the raw sums ``sum(dy * xhat)`` and ``sum(dy)``)."""
    result = triton_backend.backward(z, grad_z, var, weight, bias, EPS, activation, training)
    expected = eager.backward(*_double(z, grad_z, var, weight, bias), EPS, activation, training)
    torch.testing.assert_close(result[0].double(), expected[0], **tolerance)
    for ours, reference in zip(result[1:], expected[1:]):
        _assert_sums_close(ours, reference, _count(z))
    return result


def _assert_sums_close(actual, expected, count):
    """Per-channel sums of ``count`` float32 terms of size O(1)."""
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, atol=2e-6 * count**0.5 + 1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_stats(device, layout, dtype):
    x = _input(layout, device, dtype)
    mean, var = triton_backend.batch_stats(x)
    expected_mean, expected_var = eager.batch_stats(x.double())
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean.double(), expected_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var.double(), expected_var, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["rank4", "rank4-cl", "rank2"])
def test_batch_stats_keep_the_variance_of_a_large_mean(device, layout):
    # Sums of squares would cancel here (E[x^2] ~ 1e8, float32 keeps 7 digits); Welford/Chan does not.
    shape = (8, 3, 9, 7) if device == "cpu" else (16, 24, 64, 61)
    x = torch.randn(shape[: 2 if layout == "rank2" else 4], device=device) + 1e4
    x = _in_layout(x, layout)
    mean, var = triton_backend.batch_stats(x)
    expected_mean, expected_var = eager.batch_stats(x.double())
    torch.testing.assert_close(mean.double(), expected_mean, atol=0, rtol=1e-7)
    torch.testing.assert_close(var.double(), expected_var, atol=0, rtol=1e-5)


@pytest.mark.parametrize("stats_dtype", [torch.float32, torch.float16], ids=["fp32-stats", "fp16-stats"])
@pytest.mark.parametrize("layout", ["rank2", "rank4", "rank4-cl"])
def test_forward_train_updates_running_statistics_in_the_merge(device, layout, stats_dtype):
    """The merge kernel's update equals eager.update_running_stats_ (unbiased variance, momentum,
    e.g. the 1/3 of momentum=None at the third step); strided running statistics take the eager ops."""
    x = _input(layout, device, torch.float32)
    weight, bias = _affine(x.shape[1], device)
    channels = x.shape[1]
    for strided in (False, True):
        storage = torch.rand(2 * channels, 2, device=device, dtype=stats_dtype) + 0.5
        running_mean, running_var = (storage[:channels, 0], storage[channels:, 0]) if strided else (
            storage[:channels, 0].contiguous(), storage[channels:, 0].contiguous())
        expected_mean, expected_var = running_mean.double(), running_var.double()
        expected = x.double()
        eager.forward_train_(expected, *_double(weight, bias), EPS, ACTIVATIONS[0], expected_mean, expected_var, 1 / 3)
        triton_backend.forward_train_(x.clone(), weight, bias, EPS, ACTIVATIONS[0], running_mean, running_var, 1 / 3)
        tolerance = TOLERANCES[stats_dtype]
        torch.testing.assert_close(running_mean.double(), expected_mean, **tolerance)
        torch.testing.assert_close(running_var.double(), expected_var, **tolerance)
        assert running_mean.dtype == stats_dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=ACTIVATION_IDS)
def test_forward_train(device, activation, layout, dtype):
    x = _input(layout, device, dtype)
    weight, bias = _affine(x.shape[1], device)
    expected = x.double()
    expected_mean, expected_var = eager.forward_train_(expected, *_double(weight, bias), EPS, activation)

    z = x
    mean, var = triton_backend.forward_train_(z, weight, bias, EPS, activation)
    assert z.data_ptr() == x.data_ptr() and z.stride() == x.stride()  # in place, layout kept
    torch.testing.assert_close(mean.double(), expected_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var.double(), expected_var, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z.double(), expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=ACTIVATION_IDS)
def test_normalize_activate_eval(device, activation, layout, dtype):
    x = _input(layout, device, dtype)
    channels = x.shape[1]
    weight, bias = _affine(channels, device)
    running_mean = torch.randn(channels, device=device) * 0.5 + 0.5
    running_var = torch.rand(channels, device=device) * 3 + 0.5
    expected = x.double()
    eager.normalize_activate_(expected, *_double(running_mean, running_var, weight, bias), EPS, activation)

    triton_backend.normalize_activate_(x, running_mean, running_var, weight, bias, EPS, activation)
    torch.testing.assert_close(x.double(), expected, **TOLERANCES[dtype])


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------


def _backward_inputs(activation, layout, device, dtype, weight, bias):
    """A valid layer output ``z`` in the storage dtype, the variance it was made with, and a gradient."""
    x = _input(layout, device, torch.float64)
    _, var = eager.forward_train_(x, *_double(weight, bias), EPS, activation)
    z = x.to(dtype)  # keeps the layout
    grad_z = _in_layout(torch.randn(z.shape, device=device), layout).to(dtype)
    return z, grad_z, var.float()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=ACTIVATION_IDS)
def test_backward(device, activation, layout, dtype, training):
    weight, bias = _affine(_shape(layout, device)[1], device)
    z, grad_z, var = _backward_inputs(activation, layout, device, dtype, weight, bias)
    dx, grad_weight, grad_bias = _backward_matches_eager(
        z, grad_z, var, weight, bias, activation, training, TOLERANCES[dtype]
    )
    assert dx.dtype == z.dtype and dx.stride() == z.stride()
    assert grad_weight.dtype == weight.dtype and grad_bias.dtype == bias.dtype


def test_weight_gradient_carries_sign_with_sign_of_zero_plus_one(device):
    """The merge kernel writes dL/dw = sign(w) * sum(dy * xhat) with sign(0) = +1, in w's dtype."""
    activation = ACTIVATIONS[0]
    weight = torch.tensor([0.0, -0.7, 0.9], device=device)
    bias = torch.zeros(3, device=device)
    z, grad_z, var = _backward_inputs(activation, "rank4", device, torch.float32, weight, bias)
    _, grad_weight, _ = triton_backend.backward(z, grad_z, var, weight, bias, EPS, activation, True)
    sum_dy_xhat = eager.backward_reduce(*_double(z, grad_z, weight, bias), EPS, activation)[1]
    _assert_sums_close(grad_weight, sum_dy_xhat * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64, device=device), _count(z))


@pytest.mark.parametrize("layout", ["rank4", "rank4-cl"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=ACTIVATION_IDS)
def test_backward_reduce_then_apply(device, activation, layout):
    """The split form used by the synchronized layer: reduce, (all-reduce), apply with a global count."""
    weight, bias = _affine(_shape(layout, device)[1], device)
    z, grad_z, var = _backward_inputs(activation, layout, device, torch.float32, weight, bias)
    sum_dy, sum_dy_xhat = triton_backend.backward_reduce(z, grad_z, weight, bias, EPS, activation)
    expected_sums = eager.backward_reduce(*_double(z, grad_z, weight, bias), EPS, activation)
    _assert_sums_close(sum_dy, expected_sums[0], _count(z))
    _assert_sums_close(sum_dy_xhat, expected_sums[1], _count(z))

    # As if two processes held this batch: twice the sums over twice the count.
    for count, scale in ((3 * _count(z), 3.0), (None, 1.0)):
        dx = triton_backend.backward_apply(
            z, grad_z, var, weight, bias, sum_dy * scale, sum_dy_xhat * scale, count, EPS, activation
        )
        expected_dx = eager.backward_apply(
            *_double(z, grad_z, var, weight, bias, expected_sums[0] * scale, expected_sums[1] * scale),
            count, EPS, activation,
        )
        torch.testing.assert_close(dx.double(), expected_dx, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["rank2", "rank4", "rank5-cl"])
@pytest.mark.parametrize("activation", [ACTIVATIONS[0], ACTIVATIONS[2]], ids=["leaky_relu", "elu"])
def test_without_affine(device, activation, layout, training):
    """weight and bias None: scale 1, bias 0."""
    x = _input(layout, device, torch.float32)
    channels = x.shape[1]
    expected = x.double()
    if training:
        mean, var = triton_backend.forward_train_(x, None, None, EPS, activation)
        expected_mean, expected_var = eager.forward_train_(expected, None, None, EPS, activation)
    else:
        mean, var = torch.randn(channels, device=device), torch.rand(channels, device=device) + 0.5
        triton_backend.normalize_activate_(x, mean, var, None, None, EPS, activation)
        eager.normalize_activate_(expected, *_double(mean, var), None, None, EPS, activation)
    torch.testing.assert_close(x.double(), expected, **TOLERANCES[torch.float32])

    grad_z = torch.randn_like(x)
    _backward_matches_eager(x, grad_z, var, None, None, activation, training, TOLERANCES[torch.float32])


# --------------------------------------------------------------------------------------------------
# Layouts the kernels don't read directly, and float64
# --------------------------------------------------------------------------------------------------


def test_strided_input_is_processed_on_a_copy_and_written_back(device):
    activation = ACTIVATIONS[0]
    base = torch.randn(2, 3, 5, 14, device=device)
    x = base[..., ::2]  # neither contiguous nor channels last
    untouched = base[..., 1::2].clone()
    weight, bias = _affine(3, device)
    expected = x.double()
    eager.forward_train_(expected, *_double(weight, bias), EPS, activation)

    triton_backend.forward_train_(x, weight, bias, EPS, activation)
    torch.testing.assert_close(x.double(), expected, **TOLERANCES[torch.float32])
    torch.testing.assert_close(base[..., 1::2], untouched, atol=0, rtol=0)

    # Backward from a strided z and a channels-last gradient.
    var = torch.rand(3, device=device) + 0.5
    grad_z = torch.randn(x.shape, device=device).contiguous(memory_format=torch.channels_last)
    _backward_matches_eager(x, grad_z, var, weight, bias, activation, True, TOLERANCES[torch.float32])


def test_gradient_in_another_layout_than_the_output(device):
    activation = ACTIVATIONS[2]
    weight, bias = _affine(_shape("rank4-cl", device)[1], device)
    z, grad_z, var = _backward_inputs(activation, "rank4-cl", device, torch.float32, weight, bias)
    grad_z = grad_z.contiguous()  # NCHW gradient for a channels-last output
    dx, _, _ = triton_backend.backward(z, grad_z, var, weight, bias, EPS, activation, True)
    expected_dx, _, _ = eager.backward(*_double(z, grad_z, var, weight, bias), EPS, activation, True)
    torch.testing.assert_close(dx.double(), expected_dx, **TOLERANCES[torch.float32])


def test_float64_takes_the_eager_path(device):
    activation = ACTIVATIONS[1]
    x = torch.randn(3, 4, 5, device=device, dtype=torch.float64)
    weight, bias = _double(*_affine(4, device))
    expected = x.clone()
    expected_stats = eager.forward_train_(expected, weight, bias, EPS, activation)
    stats = triton_backend.forward_train_(x, weight, bias, EPS, activation)
    torch.testing.assert_close(x, expected, atol=0, rtol=0)
    torch.testing.assert_close(stats, expected_stats, atol=0, rtol=0)
    grad_z = torch.randn_like(x)
    result = triton_backend.backward(x, grad_z, stats[1], weight, bias, EPS, activation, True)
    expected_result = eager.backward(x, grad_z, stats[1], weight, bias, EPS, activation, True)
    torch.testing.assert_close(result, expected_result, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------
# The layer, end to end, on the Triton backend
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_inplace_abn_layer_matches_float64_batchnorm(device, monkeypatch, memory_format):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "triton")
    shape = (2, 5, 6, 7) if device == "cpu" else (8, 24, 33, 35)
    channels = shape[1]
    layer = InPlaceABN(channels, activation="leaky_relu", activation_param=0.01).to(device)
    with torch.no_grad():
        layer.weight.copy_(_affine(channels, device)[0])
        layer.bias.uniform_(-0.5, 0.5)
    raw_weight = layer.weight.detach().double().clone().requires_grad_()
    bias = layer.bias.detach().double().clone().requires_grad_()
    running_mean = torch.zeros(channels, device=device, dtype=torch.float64)
    running_var = torch.ones(channels, device=device, dtype=torch.float64)

    for training in (True, True, False):
        layer.train(training)
        x = (torch.randn(shape, device=device) * 2 + 0.5).contiguous(memory_format=memory_format)
        grad = torch.randn(shape, device=device)
        assert backends.select(x) is triton_backend

        x_ours = x.clone().requires_grad_()
        z = layer(x_ours * 1)  # the layer must not get a leaf: it writes over its input
        z.backward(grad)

        x_ref = x.double().requires_grad_()
        y = F.batch_norm(
            x_ref, running_mean, running_var, raw_weight.abs() + EPS, bias, training, momentum=0.1, eps=EPS
        )
        expected = F.leaky_relu(y, 0.01)
        expected.backward(grad.double())

        torch.testing.assert_close(z.double(), expected, atol=3e-5, rtol=3e-5)
        torch.testing.assert_close(x_ours.grad.double(), x_ref.grad, atol=3e-5, rtol=3e-5)
        torch.testing.assert_close(layer.weight.grad.double(), raw_weight.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.bias.grad.double(), bias.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.running_mean.double(), running_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.running_var.double(), running_var, atol=1e-5, rtol=1e-5)
        layer.zero_grad()
        raw_weight.grad = bias.grad = None
