"""SiLU / GELU / Mish inverted from output + branch bit: accuracy against conditioning bounds,
derivatives against autograd, bit packing, tracing (inplace_abn/piecewise.py)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from inplace_abn import piecewise
from inplace_abn.piecewise import CANCELLATION_FREE, PIECEWISE, pack_bits, unpack_bits

ACTIVATIONS = {**PIECEWISE, **{act.name: act for act in CANCELLATION_FREE.values()}}
NAMES = sorted(ACTIVATIONS)
DTYPES = (torch.float64, torch.float32)
MATH_OF = {"gelu_erfc": "gelu", "gelu_tanh_sigmoid": "gelu_tanh"}  # the function each one computes


def reference_f(name, y):
    """The activation in float64, written independently of the module and without PyTorch's
    cancellations (1 + erf, 1 + tanh for negative y)."""
    name = MATH_OF.get(name, name)
    y = y.double()
    if name == "silu":
        return y * torch.sigmoid(y)
    if name == "gelu":
        return 0.5 * y * torch.special.erfc(-y / math.sqrt(2.0))
    if name == "mish":
        return y * torch.tanh(F.softplus(y))
    if name == "gelu_tanh":  # the gate is 1 or 0 to the last bit beyond |y| = 50; y**3 could overflow
        yc = y.clamp(-50.0, 50.0)
        return y * torch.sigmoid(2.0 * math.sqrt(2.0 / math.pi) * (yc + 0.044715 * yc**3))
    raise KeyError(name)


def reference_slopes(name, y):
    """f'(y) and f''(y) in float64 by autograd of the reference."""
    y = y.double().clone().requires_grad_(True)
    (f1,) = torch.autograd.grad(reference_f(name, y).sum(), y, create_graph=True)
    (f2,) = torch.autograd.grad(f1.sum(), y)
    return f1.detach(), f2


def conditioning_bound(name, y, z_error, dtype):
    """How far the root of f(.) = f(y) + delta lies from y, to second order: the d solving
    |f'| d + |f''| d^2 / 2 = delta (~delta / |f'| away from y_star, ~sqrt(delta / curvature) at it).
    delta is z's error plus what rounding y to dtype does to f(y): eps |y f'(y)|."""
    f1, f2 = reference_slopes(name, y)
    delta = z_error + torch.finfo(dtype).eps * (y.double() * f1).abs()
    return 2.0 * delta / (f1.abs() + torch.sqrt(f1**2 + 2.0 * f2.abs() * delta))


def reference_inverse(name, z, left):
    """y with reference_f(y) == z on the branch, by bisection in float64 (to 2^-72 of the bracket)."""
    act = ACTIVATIONS[name]
    z = z.double()
    lo = torch.where(left, torch.full_like(z, act.y_floor[torch.float64] - 1.0), torch.full_like(z, act.y_star))
    hi = torch.where(left, torch.full_like(z, act.y_star), z.clamp_min(0.0) + 1.0)
    for _ in range(72):
        mid = 0.5 * (lo + hi)
        below = reference_f(name, mid) < z
        move_lo = below != left  # f increases on the right branch, decreases on the left
        lo, hi = torch.where(move_lo, mid, lo), torch.where(move_lo, hi, mid)
    return 0.5 * (lo + hi)


def sample_y(act, dtype, n=1000):
    """Random y over every region: normal, log-uniform wide, next to y_star, huge, down to the floor."""
    g = torch.Generator().manual_seed(1)
    rand = lambda: torch.rand(n, generator=g, dtype=torch.float64)  # noqa: E731
    floor = act.y_floor[dtype]
    big = 1e30 if dtype == torch.float32 else 1e200
    parts = [
        3.0 * torch.randn(n, generator=g, dtype=torch.float64),
        torch.sign(rand() - 0.5) * torch.exp(10.0 * rand() - 5.0),
        act.y_star + (2.0 * rand() - 1.0) * 1e-3,
        act.y_star + (2.0 * rand() - 1.0) * 1e-7,
        torch.exp(rand() * math.log(big)),
        act.y_star - rand() ** 2 * (act.y_star - floor),
    ]
    return torch.cat(parts).to(dtype)


@pytest.mark.parametrize("name", NAMES)
def test_constants_are_the_minimum(name):
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    k = mpmath.sqrt(2 / mpmath.pi)
    f = {
        "silu": lambda y: y / (1 + mpmath.exp(-y)),
        "gelu": lambda y: y * mpmath.erfc(-y / mpmath.sqrt(2)) / 2,
        "gelu_tanh": lambda y: y / (1 + mpmath.exp(-2 * k * (y + mpmath.mpf("0.044715") * y**3))),
        "mish": lambda y: y * mpmath.tanh(mpmath.log1p(mpmath.exp(y))),
    }[MATH_OF.get(name, name)]
    y_star = mpmath.findroot(lambda y: mpmath.diff(f, y), -1.0)
    act = ACTIVATIONS[name]
    assert abs(act.y_star - float(y_star)) <= 2 * math.ulp(act.y_star)
    assert abs(act.z_star - float(f(y_star))) <= 2 * math.ulp(act.z_star)


@pytest.mark.parametrize("name", sorted(PIECEWISE))
def test_forward_and_derivative_are_torchs(name):
    act = ACTIVATIONS[name]
    torch_forward = {
        "silu": F.silu, "gelu": F.gelu, "mish": F.mish,
        "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    }[name]
    y = (torch.randn(1000, dtype=torch.float64) * 4).requires_grad_(True)
    z = torch_forward(y)
    assert torch.equal(act.forward(y.detach()), z.detach())
    grad_z = torch.randn_like(y)
    (autograd_dy,) = torch.autograd.grad(z, y, grad_z, retain_graph=True)
    assert torch.equal(act.derivative(y.detach(), grad_z), autograd_dy)
    (autograd_slope,) = torch.autograd.grad(z.sum(), y)
    assert torch.equal(act.derivative(y.detach()), autograd_slope)
    torch.testing.assert_close(act.derivative(y.detach()), reference_slopes(name, y.detach())[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(CANCELLATION_FREE))
def test_cancellation_free_gelu_is_torchs_gelu_without_its_error(name, dtype):
    """Against the float64 reference it is as accurate as PyTorch's forward where PyTorch's is
    accurate, and far more in the left tail; it differs from PyTorch's by at most PyTorch's error."""
    act = CANCELLATION_FREE[name]
    y = torch.cat([torch.linspace(-40.0, 10.0, 20001, dtype=torch.float64), 5 * torch.randn(5000, dtype=torch.float64)])
    y = y.to(dtype)
    exact = reference_f(name, y)
    torch_z = F.gelu(y, approximate="tanh" if name == "gelu_tanh" else "none").double()
    z = act.forward(y).double()
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    own_error = (z - exact).abs()
    underflow = tiny * y.double().abs().clamp_min(1.0)  # the gate flushes to 0 near its underflow
    assert (own_error <= 8 * eps * exact.abs() + 2 * eps * (y.double() * reference_slopes(name, y)[0]).abs()
            + underflow).all()
    assert ((z - torch_z).abs() <= (torch_z - exact).abs() + own_error + tiny).all()
    assert torch.equal(act.derivative(y), PIECEWISE[name].derivative(y))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_inverse_is_as_accurate_as_the_conditioning(name, dtype):
    """z exactly rounded to dtype: y from `inverse` against a float64 bisection, within a few times
    what rounding z to dtype allows (eps |z| / |f'|; sqrt(eps |z_star| / curvature) next to y_star)."""
    act = ACTIVATIONS[name]
    y = sample_y(act, dtype).double()
    y = y[y >= act.y_floor[dtype]]
    z = reference_f(name, y).to(dtype)
    left = y < act.y_star
    y_ref = reference_inverse(name, z, left)
    y_inv = act.inverse(z, left)
    assert y_inv.dtype == dtype
    z_error = torch.finfo(dtype).eps * z.double().abs() + torch.finfo(dtype).tiny
    ratio = (y_inv.double() - y_ref).abs() / (4.0 * conditioning_bound(name, y_ref, z_error, dtype))
    assert ratio.max() <= 1.0, f"worst at z={z[ratio.argmax()].item()!r}, ratio {ratio.max().item():.2f}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_round_trip_through_torchs_forward(name, dtype):
    """y -> torch forward in dtype -> (z, branch) -> y: within the conditioning of z's actual error
    (measured against the float64 reference; GELU's torch forward cancels in the left tail)."""
    act = ACTIVATIONS[name]
    y = sample_y(act, dtype)
    z, left = act.forward(y), act.branch(y)
    y_back = act.inverse(z, left)
    assert torch.isfinite(y_back).all()
    assert (y_back[left] <= act.y_star).all() and (y_back[~left] >= act.y_star).all()
    resolvable = y.double() >= act.y_floor[dtype]
    z_error = (z.double() - reference_f(name, y)).abs() + 2 * torch.finfo(dtype).eps * z.double().abs()
    bound = conditioning_bound(name, y, z_error + torch.finfo(dtype).tiny, dtype)
    ratio = ((y_back.double() - y.double()).abs() / (8.0 * bound))[resolvable]
    assert ratio.max() <= 1.0, f"worst at y={y[resolvable][ratio.argmax()].item()!r}"
    # Below the floor z carries (next to) no information: y comes back at the floor, the most likely
    # value, or just above it where PyTorch's forward rounded z up to its smallest nonzero level.
    lost = y_back[~resolvable].double()
    floor = torch.tensor(act.y_floor[dtype], dtype=dtype).item()
    assert (lost >= floor).all() and (lost <= floor + 1e-3 * abs(floor)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_well_conditioned_accuracy_targets(name, dtype):
    """The issue's figures: away from y_star (|y - y_star| > 1e-3) 1e-12 relative in float64, the
    float32 analogue; next to it the sqrt(eps) scale."""
    act = ACTIVATIONS[name]
    y = sample_y(act, dtype).double()
    y = y[(y >= act.y_floor[dtype]) & (y > -5.0 if name.startswith("gelu") else True)]  # GELU: tail below
    z = reference_f(name, y).to(dtype)
    error = (act.inverse(z, y < act.y_star).double() - y).abs() / y.abs().clamp_min(1.0)
    far = (y - act.y_star).abs() > 1e-3
    tolerance = 1e-12 if dtype == torch.float64 else 2e-4  # float32: 1e-12 * (eps32 / eps64)^(1/2)..1
    assert error[far].max() <= tolerance
    near_scale = math.sqrt(torch.finfo(dtype).eps * abs(act.z_star) / act.curvature)
    assert error[~far].max() <= 2.0 * near_scale


@pytest.mark.parametrize("name", NAMES)
def test_first_guess_error_and_bfloat16_storage(name):
    """z stored in bfloat16 skips the refinement: the result is the first guess, within GUESS_ERROR
    (relative to max(1, |y|), and to |y - y_star| next to y_star), far below bfloat16's rounding."""
    act = ACTIVATIONS[name]
    y = sample_y(act, torch.float64).double()
    # Where bfloat16 holds z (its underflow edge on the left) and float64 z resolves y (not at y_star).
    edge = act.inverse(torch.tensor([-0.0], dtype=torch.float64), torch.tensor([True]), storage_dtype=torch.bfloat16)
    y = y[(y >= edge.item()) & (y <= 1e30) & ((y - act.y_star).abs() > 1e-4)]
    z = reference_f(name, y)
    guess = act.inverse(z, y < act.y_star, storage_dtype=torch.bfloat16)
    scale = torch.minimum(y.abs().clamp_min(1.0), (y - act.y_star).abs())
    assert ((guess - y).abs() / scale).max() <= piecewise.GUESS_ERROR
    in_float32 = y >= act.y_floor[torch.float32]  # computed in float32 from here on
    y, z = y[in_float32], z[in_float32]
    z_bf16 = z.to(torch.bfloat16).float()
    y_back = act.inverse(z_bf16, y < act.y_star, storage_dtype=torch.bfloat16).double()
    z_error = (z_bf16.double() - z).abs() + torch.finfo(torch.float32).tiny
    bound = conditioning_bound(name, y, z_error, torch.float32)
    scale = torch.minimum(y.abs().clamp_min(1.0), (y - act.y_star).abs())
    assert ((y_back - y).abs() <= 2.0 * bound + piecewise.GUESS_ERROR * scale).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_no_nan_or_inf_for_any_finite_input(name, dtype):
    act = ACTIVATIONS[name]
    info = torch.finfo(dtype)
    specials = torch.tensor([0.0, -0.0, info.max, -info.max, info.tiny, -info.tiny, info.tiny * info.eps,
                             -info.tiny * info.eps, act.z_star, -1.0, 1.0], dtype=dtype)
    wide = torch.sign(torch.randn(2000, dtype=torch.float64)) * torch.exp(torch.rand(2000, dtype=torch.float64)
                                                                          * 2 * math.log(info.max) - math.log(info.max))
    z = torch.cat([specials, wide.to(dtype)])
    for left in (torch.zeros_like(z, dtype=torch.bool), torch.ones_like(z, dtype=torch.bool)):
        y = act.inverse(z, left)
        assert torch.isfinite(y).all()
        assert (y[left] <= act.y_star).all() and (y[~left] >= act.y_star).all()
    # Out-of-range z is clamped into the branch: below z_star -> y_star; z >= 0 on the left -> the floor.
    y = act.inverse(torch.tensor([act.z_star - 0.5, act.z_star - 0.5, 0.0, 3.0], dtype=dtype),
                    torch.tensor([True, False, True, True]))
    expected = torch.tensor([act.y_star, act.y_star, act.y_floor[dtype], act.y_floor[dtype]], dtype=dtype)
    near_scale = math.sqrt(torch.finfo(dtype).eps * abs(act.z_star) / act.curvature)  # z_star is ill-conditioned
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=2 * near_scale)
    # An overflowed store (+inf) comes back as the largest finite y, not as NaN.
    assert act.inverse(torch.tensor([math.inf], dtype=dtype), torch.tensor([False])).item() == info.max


@pytest.mark.parametrize("name", ["silu", "mish"])
def test_storage_dtype_moves_the_floor_to_where_it_rounds_to_zero(name):
    """float16-stored z underflows near y = -20: a stored 0 then means y just below that edge."""
    act = ACTIVATIONS[name]
    y16 = act.inverse(torch.tensor([-0.0]), torch.tensor([True]), storage_dtype=torch.float16)
    half_subnormal = 2.0**-25
    assert reference_f(name, y16).item() == pytest.approx(-half_subnormal, rel=1e-5)
    assert act.inverse(torch.tensor([-0.0]), torch.tensor([True])).item() == pytest.approx(act.y_floor[torch.float32])


def test_inverse_refuses_other_dtypes():
    with pytest.raises(TypeError, match="float32 or float64"):
        piecewise.silu.inverse(torch.zeros(3, dtype=torch.float16), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        piecewise.silu.inverse(torch.zeros(3), torch.zeros(3))


@pytest.mark.parametrize("name", ["silu", "gelu"])  # the other two differ only in their arithmetic
def test_inverse_traces_symbolically(name):
    act = ACTIVATIONS[name]
    y = torch.randn(37) * 3
    traced = make_fx(lambda z, left: act.inverse(z, left), tracing_mode="symbolic")(act.forward(y), act.branch(y))
    y_other = torch.randn(5, 11) * 3  # another size and rank through the same graph
    z, left = act.forward(y_other), act.branch(y_other)
    assert torch.equal(traced(z, left), act.inverse(z, left))
    targets = {str(node.target) for node in traced.graph.nodes if node.op == "call_function"}
    assert not any("item" in t or "nonzero" in t or "index" in t for t in targets), targets


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (8,), (9,), (3, 5, 7), (2, 3, 5, 7), (2, 3, 4, 5, 3)])
def test_pack_unpack_round_trip(shape):
    mask = torch.rand(shape) < 0.5
    layouts = [mask, mask.transpose(0, -1).contiguous().transpose(0, -1)]  # same values, other strides
    if mask.dim() == 4:
        layouts.append(mask.contiguous(memory_format=torch.channels_last))
    if mask.dim() == 5:
        layouts.append(mask.contiguous(memory_format=torch.channels_last_3d))
    for m in layouts:
        packed = pack_bits(m)
        assert packed.dtype == torch.uint8 and packed.shape == ((m.numel() + 7) // 8,)
        # Row-major logical order, zero-padded to 8 planes of m = ceil(n / 8); byte j holds element
        # k * m + j in bit k: numpy's little-endian packbits across the planes.
        nbytes = (mask.numel() + 7) // 8
        padded = np.zeros(8 * nbytes, dtype=bool)
        padded[: mask.numel()] = mask.numpy().reshape(-1)
        expected = np.packbits(padded.reshape(8, nbytes).T, axis=1, bitorder="little").reshape(-1)
        assert np.array_equal(packed.numpy(), expected)
        assert torch.equal(unpack_bits(packed, m.shape), mask)


def test_pack_unpack_trace_and_errors():
    mask = torch.rand(3, 13) < 0.5
    traced_pack = make_fx(pack_bits, tracing_mode="symbolic")(mask)
    other = torch.rand(5, 9) < 0.5
    assert torch.equal(traced_pack(other), pack_bits(other))
    traced_unpack = make_fx(lambda p, m: unpack_bits(p, m.shape), tracing_mode="symbolic")(pack_bits(mask), mask)
    assert torch.equal(traced_unpack(pack_bits(other), other), other)
    with pytest.raises(ValueError, match="do not hold shape"):
        unpack_bits(pack_bits(mask), (3, 14))
    with pytest.raises(TypeError, match="bool"):
        pack_bits(mask.float())
