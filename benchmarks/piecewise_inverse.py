"""Accuracy and CPU speed of inplace_abn.piecewise: the error table and speed ratios of docs/activations.md.

    python benchmarks/piecewise_inverse.py                 # everything (compiles 9 graphs: minutes)
    python benchmarks/piecewise_inverse.py --skip-speed    # the error tables only, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time

import torch
import torch.nn.functional as F

from inplace_abn.piecewise import CANCELLATION_FREE, PIECEWISE, pack_bits, unpack_bits

#: Every activation of the module: PyTorch's forwards and GELU's cancellation-free forms.
ACTIVATIONS = {**PIECEWISE, **{act.name: act for act in CANCELLATION_FREE.values()}}

# (name, dtype z is computed in, dtype z is stored in)
SETTINGS = [
    ("float64", torch.float64, torch.float64),
    ("float32", torch.float32, torch.float32),
    ("bfloat16 stored", torch.float32, torch.bfloat16),
    ("float16 stored", torch.float32, torch.float16),
]


def regions(act, compute_dtype, storage_dtype):
    """Where y is drawn from; the left region ends where z stops carrying information (act.y_floor
    of the compute dtype, or where the storage dtype rounds z to zero), the right one before the
    storage dtype overflows."""
    floor = act.inverse(torch.tensor([-0.0], dtype=compute_dtype), torch.tensor([True]),
                        storage_dtype=storage_dtype).item()
    top = min(1e30, torch.finfo(storage_dtype).max / 2)
    return {
        "abs(y - y*) < 1e-3": (act.y_star - 1e-3, act.y_star + 1e-3),
        "left, floor to y* - 1e-3": (floor, act.y_star - 1e-3),
        "right, y* + 1e-3 to 20": (act.y_star + 1e-3, 20.0),
        f"right, 20 to {top:.0e}": (20.0, top),
    }


def sample(lo: float, hi: float, n: int, g: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, generator=g, dtype=torch.float64)
    if lo > 0 and hi / lo > 100:  # log-uniform over wide positive ranges
        return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    return lo + u * (hi - lo)


def error_table(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, act in ACTIVATIONS.items():
        for setting, compute, storage in SETTINGS:
            for region, (lo, hi) in regions(act, compute, storage).items():
                y = sample(lo, hi, n, g).to(compute)
                y = torch.cat([y, torch.tensor([lo, hi], dtype=compute)])  # the ends too
                z = act.forward(y).to(storage).to(compute)
                storage_dtype = storage if storage != compute else None
                y_back = act.inverse(z, act.branch(y), storage_dtype=storage_dtype)
                error = (y_back.double() - y.double()).abs()
                relative = error / y.double().abs().clamp_min(1.0)
                worst = int(relative.argmax())
                rows.append(dict(activation=name, dtype=setting, region=region, max_abs=error.max().item(),
                                 max_rel=relative.max().item(), worst_y=y[worst].item(),
                                 finite=bool(torch.isfinite(y_back).all())))
    return rows


def layer_gradient_error(n: int) -> list[dict]:
    """dx of one BatchNorm + activation channel from the reconstructed y against the exact y:
    dx = gamma / sigma * (dy - mean(dy) - xhat * mean(dy * xhat)), dy = f'(y) dz (METHOD.md section 3)."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for name, act in ACTIVATIONS.items():
        for setting, compute, storage in SETTINGS:
            for spread in (1.0, 3.0):
                xhat = torch.randn(n, generator=g, dtype=torch.float64)
                xhat = (xhat - xhat.mean()) / xhat.std(unbiased=False)
                gamma, beta = spread, 0.0
                dz = torch.randn(n, generator=g, dtype=torch.float64)

                def dx_from(y, xh):
                    dy = act.derivative(y) * dz
                    return gamma * (dy - dy.mean() - xh * (dy * xh).mean())

                y_exact = gamma * xhat + beta
                dx_exact = dx_from(y_exact, xhat)
                y_c = y_exact.to(compute)
                z = act.forward(y_c).to(storage).to(compute)
                y_back = act.inverse(z, act.branch(y_c), storage_dtype=storage if storage != compute else None).double()
                dx_back = dx_from(y_back, (y_back - beta) / gamma)
                rows.append(dict(activation=name, dtype=setting, gamma=gamma,
                                 rel_norm=((dx_back - dx_exact).norm() / dx_exact.norm()).item(),
                                 rel_max=((dx_back - dx_exact).abs().max() / dx_exact.abs().max()).item()))
    return rows


def min_times(functions: dict, rounds: int) -> dict:
    """The fastest of `rounds` single calls of each function, called in shuffled order: on a shared,
    loaded machine the minimum is the figure least disturbed by other work."""
    for fn, args in functions.values():
        fn(*args)
    best = {key: math.inf for key in functions}
    keys = list(functions)
    for _ in range(rounds):
        random.shuffle(keys)
        for key in keys:
            fn, args = functions[key]
            start = time.perf_counter()
            fn(*args)
            best[key] = min(best[key], time.perf_counter() - start)
    return best


def layer_backward(act, z, grad_z, packed, gamma, beta, invstd):
    """dx of an in-place BatchNorm + act layer (N, C, H, W) from its output, the packed branch bits
    and per-channel statistics (METHOD.md section 3): what the layer backends will run."""
    y = act.inverse(z, unpack_bits(packed, z.shape))
    dy = act.derivative(y, grad_z)
    per_channel = lambda v: v.view(1, -1, 1, 1)  # noqa: E731
    xhat = (y - per_channel(beta)) / per_channel(gamma)
    count = z.numel() // z.shape[1]
    mean_dy = dy.sum((0, 2, 3)) / count
    mean_dy_xhat = (dy * xhat).sum((0, 2, 3)) / count
    scale = per_channel(gamma * invstd)
    return scale * (dy - per_channel(mean_dy) - xhat * per_channel(mean_dy_xhat))


def speed(elements: int, rounds: int) -> list[dict]:
    """Compiled (Inductor) against F.silu compiled and against ATen's BatchNorm + activation
    backward, on a (16, C, 32, 32) float32 tensor of `elements` elements."""
    shape = (16, elements // (16 * 1024), 32, 32)
    x = torch.randn(shape)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    invstd = torch.rsqrt(var + 1e-5)
    gamma, beta = torch.rand(shape[1]) + 0.5, 0.1 * torch.randn(shape[1])
    y = (x - mean.view(1, -1, 1, 1)) * (invstd * gamma).view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
    grad_z = torch.randn(shape)
    compile_ = lambda fn: torch.compile(fn, fullgraph=True, dynamic=False)  # noqa: E731
    functions = {"F.silu": (compile_(F.silu), (y,))}
    for name, act in PIECEWISE.items():
        z, packed = act.forward(y), pack_bits(act.branch(y))
        functions[f"{name} inverse"] = (compile_(lambda z, p, act=act: act.inverse(z, unpack_bits(p, z.shape))), (z, packed))
        z_bf16 = z.to(torch.bfloat16)
        functions[f"{name} inverse, bfloat16 z"] = (compile_(lambda z, p, act=act: act.inverse(
            z.float(), unpack_bits(p, z.shape), storage_dtype=torch.bfloat16)), (z_bf16, packed))
        functions[f"{name} in-place backward"] = (
            compile_(lambda *a, act=act: layer_backward(act, *a)), (z, grad_z, packed, gamma, beta, invstd))

        def aten_backward(act=act, y=y):  # what BatchNorm2d + act's autograd runs, from the saved x and y
            dy = act.derivative(y, grad_z)
            return torch.ops.aten.native_batch_norm_backward(dy, x, gamma, None, None, mean, invstd, True, 1e-5,
                                                             [True, True, True])
        functions[f"{name} ATen backward"] = (aten_backward, ())
    print(f"timing {len(functions)} compiled functions ...", flush=True)
    best = min_times(functions, rounds)
    rows = []
    for name in PIECEWISE:
        rows.append(dict(activation=name, elements=elements, silu_ms=1e3 * best["F.silu"],
                         inverse_ms=1e3 * best[f"{name} inverse"],
                         inverse_bf16_ms=1e3 * best[f"{name} inverse, bfloat16 z"],
                         inplace_backward_ms=1e3 * best[f"{name} in-place backward"],
                         aten_backward_ms=1e3 * best[f"{name} ATen backward"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200_000, help="random y per region (default 200000)")
    parser.add_argument("--elements", type=int, default=1 << 20, help="elements for the speed runs (default 2^20)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=200, help="timed calls of each function (default 200)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--json", help="write every number to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"errors": error_table(args.samples), "layer": layer_gradient_error(args.samples)}
    print("| activation | dtype | region | max abs error | max error / max(1, abs(y)) | finite |")
    print("|---|---|---|---|---|---|")
    for r in result["errors"]:
        print(f"| {r['activation']} | {r['dtype']} | {r['region']} | {r['max_abs']:.1e} | {r['max_rel']:.1e} | {r['finite']} |")
    print("\n| activation | dtype | gamma | dx error (norm, relative) | dx error (max / max abs(dx)) |")
    print("|---|---|---|---|---|")
    for r in result["layer"]:
        print(f"| {r['activation']} | {r['dtype']} | {r['gamma']:g} | {r['rel_norm']:.1e} | {r['rel_max']:.1e} |")
    if not args.skip_speed:
        result["speed"] = speed(args.elements, args.rounds)
        print(f"\nfloat32, {args.elements} elements, {args.threads} threads, compiled by Inductor (fastest of {args.rounds})")
        print(f"F.silu: {result['speed'][0]['silu_ms']:.3f} ms")
        print("| activation | inverse (ms) | / F.silu | inverse of bfloat16 z (ms) | in-place layer backward (ms) "
              "| ATen BatchNorm + act backward (ms) |")
        print("|---|---|---|---|---|---|")
        for r in result["speed"]:
            print(f"| {r['activation']} | {r['inverse_ms']:.2f} | {r['inverse_ms'] / r['silu_ms']:.1f} | "
                  f"{r['inverse_bf16_ms']:.2f} | {r['inplace_backward_ms']:.2f} | {r['aten_backward_ms']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
