"""SiLU, GELU (erf and tanh forms) and Mish rebuilt from their output plus one bit per element.

Each is monotonic on both sides of its minimum ``y_star`` (METHOD.md section 8b): the bit says the
side, and third-order steps from a close first guess invert it there (docs/activations.md).
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# The activations' math is written once, for both Python floats (the constants and the first-guess
# fits computed at import) and tensors (the refinement steps of `inverse`): these are the only functions
# the formulas call besides arithmetic.
_FLOAT_OPS = SimpleNamespace(exp=math.exp, erfc=math.erfc, clamp=lambda x, lo, hi: min(max(x, lo), hi))
_TENSOR_OPS = SimpleNamespace(exp=torch.exp, erfc=torch.erfc, clamp=torch.clamp)

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_CUBIC = 0.044715  # the constant of PyTorch's approximate="tanh"


# Each `_*_terms(y, ops)` returns (f, f', f'') of the activation, in forms that stay accurate where
# PyTorch's own forward cancels (1 + erf and 1 + tanh for negative y) and that neither overflow nor
# produce NaN for any finite y: the gates are evaluated at a clamped `yc`, outside which they are
# constant to the last bit, and products with y use `yc` where the true term is zero.

def _silu_terms(y, ops):
    e = ops.exp(-y)
    gate = 1.0 / (1.0 + e)
    gate_complement = e * gate  # 1 - sigmoid(y) without cancellation
    f1 = gate * (1.0 + y * gate_complement)
    f2 = gate * gate_complement * (2.0 + y * (gate_complement - gate))
    return y * gate, f1, f2


def _gelu_terms(y, ops):
    yc = ops.clamp(y, -40.0, 40.0)
    cdf = 0.5 * ops.erfc(y * -math.sqrt(0.5))  # Phi(y), accurate in the left tail
    pdf = ops.exp(-0.5 * yc * yc) * (1.0 / math.sqrt(2.0 * math.pi))
    return y * cdf, cdf + yc * pdf, pdf * (2.0 - yc * yc)


def _exp_limit(y) -> float:
    """The largest argument whose exp is finite, with margin, in y's dtype (Python floats: float64)."""
    return 88.0 if isinstance(y, Tensor) and y.dtype == torch.float32 else 709.0


def _gelu_tanh_terms(y, ops):
    # 0.5 * (1 + tanh(u)) == sigmoid(2u), which does not cancel for negative u.
    yc = ops.clamp(y, -1e4, 1e4)  # keeps yc**3 finite
    limit = _exp_limit(y)
    two_u = ops.clamp(2.0 * _SQRT_2_OVER_PI * (yc + _GELU_TANH_CUBIC * yc * yc * yc), -limit, limit)
    d_two_u = 2.0 * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_CUBIC * yc * yc)
    e = ops.exp(-two_u)
    gate = 1.0 / (1.0 + e)
    spread = gate * (e * gate)  # gate * (1 - gate)
    g1 = d_two_u * spread
    g2 = (12.0 * _SQRT_2_OVER_PI * _GELU_TANH_CUBIC * yc) * spread + d_two_u * g1 * (e * gate - gate)
    return y * gate, gate + yc * g1, 2.0 * g1 + yc * g2


def _mish_terms(y, ops):
    # tanh(softplus(y)) = n / (n + 2) with n = w (w + 2), w = exp(y); q = 1 - tanh(softplus(y)).
    yc = ops.clamp(y, -1000.0, 40.0)
    w = ops.exp(yc)
    n = w * (w + 2.0)
    q = 2.0 / (n + 2.0)
    gate = 0.5 * n * q
    p = q * w * (w + 1.0)
    g1 = q * p
    g2 = q * (p + q * w * w - 2.0 * p * p)
    return y * gate, gate + yc * g1, 2.0 * g1 + yc * g2


# --- import-time constants and first-guess fits (Python floats) -------------------------------------

def _critical_point(terms) -> float:
    """The minimum ``y_star`` of the activation: Newton's method on f'(y) = 0 from -1."""
    y = -1.0
    for _ in range(50):
        _, f1, f2 = terms(y, _FLOAT_OPS)
        step = f1 / f2
        y -= step
        if abs(step) <= 1e-17 * abs(y):
            break
    return y


def _solve_monotonic(fn: Callable[[float], tuple], target: float, lo: float, hi: float) -> float:
    """``y`` in [lo, hi] with value == target, where ``fn(y) = (value, slope)`` is monotonic there:
    Newton's method, with a bisection step wherever Newton's would leave the bracket or would not
    halve the previous step (as "rtsafe" does), so it converges also on exponential tails."""
    increasing = fn(hi)[0] > fn(lo)[0]
    y, last_step = 0.5 * (lo + hi), hi - lo
    for _ in range(200):
        value, slope = fn(y)
        if (value < target) == increasing:
            lo = y
        else:
            hi = y
        step = (value - target) / slope if slope else math.inf
        if not lo < y - step < hi or abs(step) > 0.5 * abs(last_step):
            step = y - 0.5 * (lo + hi)
        if step == 0.0 or abs(step) <= 1e-16 * abs(y):
            return y - step
        y, last_step = y - step, step
    return y


def _chebyshev_monomials(fn: Callable[[float], float], lo: float, hi: float, degree: int) -> list:
    """Interpolate fn at the Chebyshev nodes of [lo, hi]; return the coefficients in the local
    variable ``x = (v - mid) / half`` in [-1, 1], highest power first (for Horner)."""
    n = degree + 1
    mid, half = 0.5 * (lo + hi), 0.5 * (hi - lo)
    angles = [math.pi * (k + 0.5) / n for k in range(n)]
    values = [fn(mid + half * math.cos(a)) for a in angles]
    cheb = [2.0 / n * sum(v * math.cos(j * a) for v, a in zip(values, angles)) for j in range(n)]
    cheb[0] *= 0.5
    # Monomial coefficients of T_j by the recurrence T_{j+1} = 2x T_j - T_{j-1}.
    basis = [[1.0], [0.0, 1.0]]
    while len(basis) < n:
        t_cur, t_prev = basis[-1] + [0.0], basis[-2] + [0.0, 0.0]
        basis.append([(2.0 * t_cur[k - 1] if k else 0.0) - t_prev[k] for k in range(len(t_cur))])
    monomials = [sum(c * basis[j][k] for j, c in enumerate(cheb) if k < len(basis[j])) for k in range(n)]
    return monomials[::-1]


class _BranchGuess:
    """First guess on one branch: ``y = y_star + sign * v * Q(v)``, Q a piecewise polynomial.

    ``v`` is a variable in which the inverse is smooth and ~linear at the minimum (so the guess is
    accurate relative to ``|y - y_star|``, as the refinement needs next to the double root):
    ``t = sqrt(z - z_star)`` on the right branch, ``sqrt(log(z_star / z))`` on the left one.
    """

    DEGREE = 6

    def __init__(self, exact_inverse: Callable[[float], float], y_star: float, sign: float,
                 breakpoints: Sequence[float]):
        self.y_star, self.sign = y_star, sign
        self.pieces = []
        for lo, hi in zip(breakpoints[:-1], breakpoints[1:]):
            coefficients = _chebyshev_monomials(
                lambda v: (exact_inverse(v) - y_star) / (sign * v), lo, hi, self.DEGREE
            )
            self.pieces.append((lo, hi, coefficients))
        self.upper = breakpoints[-1]

    def __call__(self, v: Tensor) -> Tensor:
        """The guess at v in [0, upper]. One Horner evaluation whose coefficients are selected per
        element (a blend per coefficient and piece boundary), cheaper than evaluating every piece."""
        # (scale, offset) of x = v * scale + offset in [-1, 1], then the coefficients, per piece.
        constants = [[2.0 / (hi - lo), -(hi + lo) / (hi - lo)] + coefficients for lo, hi, coefficients in self.pieces]
        selected = constants[-1]
        for (_, hi, _), piece_constants in zip(reversed(self.pieces[:-1]), reversed(constants[:-1])):
            in_piece = v < hi
            selected = [torch.where(in_piece, c, s) for c, s in zip(piece_constants, selected)]
        if len(self.pieces) == 1:
            selected = [torch.full_like(v, c) for c in selected]
        selected = [s.to(v.dtype) for s in selected]  # where(mask, float, float) has the default dtype
        scale, offset, first, *rest = selected
        x = v * scale + offset
        q = first * x + rest[0]
        for c in rest[1:]:
            q = q * x + c
        return self.y_star + self.sign * v * q


_RIGHT_BREAKPOINTS = (0.0, 1.5, 4.0)  # in t; beyond t = 4 (z > 15.7) y = z to within 3e-6
_LEFT_BREAKPOINTS = (0.0, 2.0, 6.0)  # in sqrt(log(z_star / z)), continued to the float64 floor

#: The first guess's largest error, relative to max(1, |y|) and, next to y_star, to |y - y_star|
#: (measured; tests/test_piecewise.py holds it).
GUESS_ERROR = 4e-4

#: Third-order steps (Chebyshev's method, Halley's sibling) after the first guess, by the dtype z
#: is computed in, or stored in when coarser: each step cubes the guess error, so one reaches
#: float32's rounding and two float64's; bfloat16's rounding (eps 8e-3) is 20x the guess error
#: already, so z stored in bfloat16 needs none. float16's (eps 1e-3) does need one.
REFINEMENT_STEPS = {torch.float64: 2, torch.float32: 1, torch.float16: 1, torch.bfloat16: 0}
COMPUTE_DTYPES = (torch.float32, torch.float64)


class PiecewiseActivation:
    """An activation with one minimum, inverted from its output ``z`` and the side ``y < y_star``.

    Attributes ``y_star`` and ``z_star = f(y_star)`` are float64 Python floats.
    """

    def __init__(self, name: str, terms, forward: Callable[[Tensor], Tensor],
                 derivative: Callable[[Tensor, Tensor], Tensor], resolution_limited: bool):
        self.name = name
        self._terms = terms
        self._forward = forward
        self._derivative = derivative
        self.y_star = _critical_point(terms)
        self.z_star = self._f(self.y_star)
        self.curvature = 0.5 * terms(self.y_star, _FLOAT_OPS)[2]  # f = z_star + curvature (y - y_star)^2 + ...
        # Left-branch floor per dtype: below it z is either rounded away by PyTorch's forward (GELU's
        # 1 + erf(y / sqrt 2) is 0 or a multiple of eps / 2: `resolution_limited`) or so small that the
        # gate underflows to subnormals (SiLU, Mish). z on the left is clamped to at most f(y_floor).
        self.y_floor = {}
        for dtype in COMPUTE_DTYPES:
            info = torch.finfo(dtype)
            gate_floor = info.eps / 4 if resolution_limited else info.tiny
            self.y_floor[dtype] = _solve_monotonic(self._gate, gate_floor, -709.0, -2.0)
        left_end = math.sqrt(math.log(self.z_star / self._f(self.y_floor[torch.float64])))
        self._right_guess = _BranchGuess(
            lambda t: self._exact_inverse(self.z_star + t * t, left=False), self.y_star, 1.0, _RIGHT_BREAKPOINTS
        )
        self._left_guess = _BranchGuess(
            lambda lam: self._exact_inverse(self.z_star * math.exp(-lam * lam), left=True), self.y_star, -1.0,
            [b for b in _LEFT_BREAKPOINTS if b < left_end - 0.5] + [left_end],
        )

    def __repr__(self) -> str:
        return f"PiecewiseActivation({self.name!r}, y_star={self.y_star!r}, z_star={self.z_star!r})"

    def _f(self, y: float) -> float:
        return self._terms(y, _FLOAT_OPS)[0]

    def _value_slope(self, y: float) -> tuple:
        return self._terms(y, _FLOAT_OPS)[:2]

    def _gate(self, y: float) -> tuple:
        """(f(y) / y, its derivative): the factor that multiplies y, for y < 0."""
        f, f1, _ = self._terms(y, _FLOAT_OPS)
        return f / y, (f1 - f / y) / y

    def _exact_inverse(self, z: float, left: bool) -> float:
        if left:
            return _solve_monotonic(self._value_slope, z, max(self.y_floor[torch.float64] - 1.0, -709.0), self.y_star)
        return _solve_monotonic(self._value_slope, z, self.y_star, max(z, 0.0) + 1.0)

    # --- the public math ------------------------------------------------------------------------------

    def forward(self, y: Tensor) -> Tensor:
        """``z = f(y)``: PyTorch's own functional, bit for bit."""
        return self._forward(y)

    def derivative(self, y: Tensor, grad: Optional[Tensor] = None) -> Tensor:
        """``f'(y)``, or ``grad * f'(y)`` computed exactly as autograd does (ATen's backward op)."""
        return self._derivative(torch.ones_like(y) if grad is None else grad, y)

    def branch(self, y: Tensor) -> Tensor:
        """The bit that makes ``z`` invertible: ``y < y_star`` (the left, decreasing branch)."""
        return y < self.y_star

    def inverse(self, z: Tensor, left: Tensor, storage_dtype: Optional[torch.dtype] = None) -> Tensor:
        """``y`` from ``z = f(y)`` and ``left = branch(y)``, in z's dtype (float32 or float64).

        ``z`` outside the branch's range (rounding can give ``z < z_star``, or ``z >= 0`` on the left)
        is clamped into it. Where the left branch's ``z`` is 0 or too small to resolve, ``y`` is the
        edge of what the data allows: ``y_floor[z.dtype]``, or where ``storage_dtype`` (the dtype z was
        stored in, if coarser, e.g. float16) rounds to zero; z stored in bfloat16 skips the refinement
        (REFINEMENT_STEPS). Traceable: elementwise ops only, a fixed number of steps.
        """
        if z.dtype not in COMPUTE_DTYPES:
            raise TypeError(f"inverse computes in float32 or float64; got z of dtype {z.dtype}: upcast "
                            "float16/bfloat16 with z.float() and pass storage_dtype=z's original dtype.")
        if left.dtype != torch.bool:
            raise TypeError(f"left must be a bool tensor (the branch bits); got dtype {left.dtype}")
        dtype = z.dtype
        y_star, z_star = self.y_star, self.z_star
        z_upper_left = self._f(self.y_floor[dtype])
        steps = REFINEMENT_STEPS[dtype]
        if storage_dtype is not None:
            info = torch.finfo(storage_dtype)
            z_upper_left = min(z_upper_left, -0.5 * info.tiny * info.eps)  # half the smallest subnormal
            steps = min(steps, REFINEMENT_STEPS.get(storage_dtype, steps))

        z_right = torch.clamp(z, z_star, torch.finfo(dtype).max)  # +inf (an overflowed store) -> max
        t = torch.sqrt(z_right - z_star)
        upper = self._right_guess.upper
        guess_right = torch.where(t < upper, self._right_guess(torch.clamp_max(t, upper)), z_right)
        z_left = torch.clamp(z, z_star, z_upper_left)
        lam = torch.sqrt(torch.clamp_min(-torch.log(z_left * (1.0 / z_star)), 0.0))
        y_floor = self.y_floor[dtype]

        def onto_branch(y):
            return torch.where(left, torch.clamp(y, y_floor, y_star), torch.clamp_min(y, y_star))

        y = torch.where(left, self._left_guess(lam), guess_right)
        z_target = torch.where(left, z_left, z_right)

        # Next to y_star, f' ~ 0 and f(y) - z is rounding noise of size eps |z_star|: a floor on |f'|
        # there keeps a step from amplifying that noise beyond the sqrt(eps) the data allows.
        eps = torch.finfo(dtype).eps
        slope_floor = math.sqrt(self.curvature * eps * abs(z_star))
        for _ in range(steps):
            f, f1, f2 = self._terms(y, _TENSOR_OPS)
            near = (y - y_star).abs() < 1.0
            floor = torch.where(near, torch.full_like(y, slope_floor), torch.zeros_like(y))
            f1 = torch.where(left, torch.minimum(f1, -floor), torch.maximum(f1, floor))
            inv_f1 = 1.0 / f1
            newton = (f - z_target) * inv_f1
            # Chebyshev's form of a third-order step: newton * (1 + newton f'' / 2f'), one division.
            correction = torch.clamp(0.5 * newton * f2 * inv_f1, -0.5, 0.5)
            y = onto_branch(y - newton * (1.0 + correction))
        return y


silu = PiecewiseActivation("silu", _silu_terms, F.silu, torch.ops.aten.silu_backward, resolution_limited=False)
gelu = PiecewiseActivation(
    "gelu", _gelu_terms, F.gelu, lambda g, y: torch.ops.aten.gelu_backward(g, y, approximate="none"),
    resolution_limited=True,
)
gelu_tanh = PiecewiseActivation(
    "gelu_tanh", _gelu_tanh_terms, lambda y: F.gelu(y, approximate="tanh"),
    lambda g, y: torch.ops.aten.gelu_backward(g, y, approximate="tanh"), resolution_limited=True,
)
mish = PiecewiseActivation("mish", _mish_terms, F.mish, torch.ops.aten.mish_backward, resolution_limited=False)

#: The piecewise-invertible activations by name, with PyTorch's forward.
PIECEWISE = {a.name: a for a in (silu, gelu, gelu_tanh, mish)}


def _gelu_erfc_forward(y: Tensor) -> Tensor:
    return 0.5 * y * torch.erfc(y * -math.sqrt(0.5))


def _gelu_tanh_sigmoid_forward(y: Tensor) -> Tensor:
    return y * torch.sigmoid(2.0 * _SQRT_2_OVER_PI * (y + _GELU_TANH_CUBIC * y * y * y))


# PyTorch computes GELU as y/2 * (1 + erf(y / sqrt 2)) (and 1 + tanh(u) for approximate="tanh"):
# below y ~ -4 (float32) / -6 (float64) the sum cancels, z keeps a few bits or none, and y cannot be
# rebuilt from it. The same functions computed without the cancellation are as accurate as
# PyTorch's everywhere else (they differ from it by less than its own error) and stay invertible
# down to the gate's underflow: the forward to use where the layer must be exact in the left tail.
gelu_erfc = PiecewiseActivation(
    "gelu_erfc", _gelu_terms, _gelu_erfc_forward, gelu._derivative, resolution_limited=False,
)
gelu_tanh_sigmoid = PiecewiseActivation(
    "gelu_tanh_sigmoid", _gelu_tanh_terms, _gelu_tanh_sigmoid_forward, gelu_tanh._derivative, resolution_limited=False,
)

#: GELU's two forms computed without cancellation, keyed by the PyTorch activation they evaluate.
CANCELLATION_FREE = {"gelu": gelu_erfc, "gelu_tanh": gelu_tanh_sigmoid}


# --- one bit per element ----------------------------------------------------------------------------
# Layout: the mask, flattened in its logical (row-major) order and zero-padded to 8 m elements
# (m = ceil(n / 8) bytes), is cut into 8 planes of m; bit k of byte j is element k * m + j. Element i
# thus sits in byte i % m: contiguous elements read contiguous bytes, which a compiler vectorizes
# (with 8 consecutive elements per byte, element i reads byte i // 8: a gather that Inductor's CPU
# kernels run scalar, 20x slower fused with a consumer). Bit arithmetic is in int32 for the same
# reason (uint8 arithmetic is not vectorized there either).

def pack_bits(mask: Tensor) -> Tensor:
    """Pack a bool tensor, any shape and layout, into ``ceil(numel / 8)`` uint8 bytes (layout above)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_bits takes a bool mask; got dtype {mask.dtype}")
    flat = mask.reshape(-1).to(torch.int32)
    count = flat.numel()
    planes = F.pad(flat, (0, (-count) % 8)).view(8, -1)
    packed = planes[0]
    for k in range(1, 8):
        packed = packed | (planes[k] << k)
    return packed.to(torch.uint8)


def unpack_bits(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """The bool tensor of ``shape`` (contiguous) that :func:`pack_bits` packed into ``packed``."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"unpack_bits takes the 1-D uint8 tensor of pack_bits; got {packed.dtype}, "
                        f"{packed.dim()}-D")
    count = math.prod(shape)
    if packed.numel() != (count + 7) // 8:
        raise ValueError(f"{packed.numel()} packed bytes do not hold shape {tuple(shape)}: that needs "
                         f"{(count + 7) // 8} bytes ({count} bits)")
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device).view(8, 1)
    bits = torch.bitwise_and(torch.bitwise_right_shift(packed.to(torch.int32).view(1, -1), shifts), 1)
    return bits.reshape(-1)[:count].reshape(shape) != 0
