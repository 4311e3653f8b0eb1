"""Accuracy and CPU speed of inplace_abn.piecewise: the error table and speed ratios of docs/activations.md.

    python benchmarks/piecewise_inverse.py                 # everything (compiles ~10 Inductor kernels)
    python benchmarks/piecewise_inverse.py --skip-speed    # the error tables only, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from inplace_abn.piecewise import PIECEWISE

# (name, dtype z is computed in, dtype z is stored in)
SETTINGS = [
    ("float64", torch.float64, torch.float64),
    ("float32", torch.float32, torch.float32),
    ("bfloat16 stored", torch.float32, torch.bfloat16),
    ("float16 stored", torch.float32, torch.float16),
]


def accurate_f(name: str, y: torch.Tensor) -> torch.Tensor:
    """float64 forms without PyTorch's cancellations (for the layer reference only)."""
    y = y.double()
    if name == "gelu":
        return 0.5 * y * torch.special.erfc(-y / math.sqrt(2.0))
    return PIECEWISE[name].forward(y)


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
    for name, act in PIECEWISE.items():
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
    for name, act in PIECEWISE.items():
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


def best_time(fn, *args, repeats: int = 20) -> float:
    fn(*args)
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            fn(*args)
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def speed(elements: int) -> list[dict]:
    """Compiled inverse against compiled F.silu on the same float32 elements, and against ATen's
    BatchNorm backward on a (16, C, 32, 32) tensor of that size."""
    y = 3.0 * torch.randn(elements)
    silu_compiled = torch.compile(F.silu, fullgraph=True, dynamic=False)
    silu_time = best_time(silu_compiled, y)
    x = torch.randn(16, elements // (16 * 1024), 32, 32)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    invstd = torch.rsqrt(var + 1e-5)
    weight = torch.ones_like(mean)
    dz = torch.randn_like(x)
    bn_backward = torch.ops.aten.native_batch_norm_backward
    bn_time = best_time(lambda: bn_backward(dz, x, weight, None, None, mean, invstd, True, 1e-5, [True, True, True]))
    rows = []
    for dtype in (torch.float32, torch.float64):
        for name, act in PIECEWISE.items():
            yd = y.to(dtype)
            z, left = act.forward(yd), act.branch(yd)
            inverse = torch.compile(act.inverse, fullgraph=True, dynamic=False)
            torch.testing.assert_close(inverse(z, left), act.inverse(z, left), rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)
            t = best_time(inverse, z, left)
            rows.append(dict(activation=name, dtype=str(dtype).replace("torch.", ""), inverse_ms=1e3 * t,
                             silu_ms=1e3 * silu_time, ratio_to_silu=t / silu_time,
                             bn_backward_ms=1e3 * bn_time, ratio_to_bn_backward=t / bn_time))
            print(f"  {name} {dtype}: {1e3 * t:.2f} ms", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200_000, help="random y per region (default 200000)")
    parser.add_argument("--elements", type=int, default=1 << 20, help="elements for the speed runs (default 2^20)")
    parser.add_argument("--threads", type=int, default=2)
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
        result["speed"] = speed(args.elements)
        print(f"\n{args.elements} elements, {args.threads} threads")
        print("| activation | dtype | compiled inverse (ms) | / compiled F.silu float32 | / ATen BatchNorm backward |")
        print("|---|---|---|---|---|")
        for r in result["speed"]:
            print(f"| {r['activation']} | {r['dtype']} | {r['inverse_ms']:.2f} | {r['ratio_to_silu']:.1f} | "
                  f"{r['ratio_to_bn_backward']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
