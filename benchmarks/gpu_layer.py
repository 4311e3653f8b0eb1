"""GPU benchmark of one layer: InPlaceABN on the Triton kernels against BatchNorm2d + leaky_relu.

For each shape, layout (NCHW, channels_last), dtype (float32, bfloat16) and pass (training
forward+backward, training forward, eval forward) it prints the median time of

* ``InPlaceABN-Triton``: :class:`inplace_abn.InPlaceABN` with ``INPLACE_ABN_BACKEND=triton``;
* ``BN + leaky_relu``: eager ``nn.BatchNorm2d`` then ``nn.LeakyReLU``, what users run today;
* ``BN + leaky_relu_``: the same with the in-place ``LeakyReLU(inplace=True)``;
* ``compiled``: ``torch.compile`` of BatchNorm2d + LeakyReLU;
* ``floor``: the bandwidth floor, the passes over the tensor that InPlace-ABN must make (METHOD.md
  section 5: 8 for forward+backward, 3 for the training forward, 2 for eval) at the device-to-device
  copy bandwidth measured here.

Every layer gets its input as a conv would hand it over: a non-leaf tensor that requires grad,
produced without a copy. Times are CUDA-event medians of single calls, with the (input, gradient)
pairs rotated through a pool larger than the L2 cache, so that no call finds its data in L2 from an
earlier call. Parameters are float32, as under autocast; the activations are in the dtype.

Usage::

    python benchmarks/gpu_layer.py [--json results.json] [--shapes 16x64x256x256 ...]
        [--dtypes float32 bfloat16] [--layouts nchw channels_last] [--passes "train fwd+bwd" ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys

import torch
from torch import nn

SHAPES = ["16x64x256x256", "8x256x128x128", "32x512x32x32", "64x2048x7x7", "8x64x32x32"]  # the last fits in L2
PASSES = {"train fwd+bwd": 8, "train fwd": 3, "eval fwd": 2}  # bytes moved at the floor, in tensor passes
COLUMNS = ["InPlaceABN-Triton", "BN + leaky_relu", "BN + leaky_relu_", "compiled"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
SLOPE = 0.01


class _Source(torch.autograd.Function):
    """Hands out a preallocated buffer as a non-leaf tensor that requires grad, as a conv output is,
    without copying it; the gradient that reaches it is dropped."""

    @staticmethod
    def forward(ctx, anchor, buffer):
        return buffer.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad.new_zeros(()), None


def _build(column: str, channels: int, device) -> nn.Module:
    from inplace_abn import InPlaceABN

    if column == "InPlaceABN-Triton":
        return InPlaceABN(channels, activation="leaky_relu", activation_param=SLOPE).to(device)
    layer = nn.Sequential(nn.BatchNorm2d(channels), nn.LeakyReLU(SLOPE, inplace=column == "BN + leaky_relu_"))
    layer = layer.to(device)
    if column == "compiled":
        torch._dynamo.reset()  # a fresh compilation per configuration: no recompile limits in the way
        layer = torch.compile(layer)
    return layer


def _pool(shape, dtype, memory_format, device, l2_bytes: int):
    """(input, gradient) pairs: enough of them to exceed the L2 cache three times over."""
    pair_bytes = 2 * math.prod(shape) * torch.finfo(dtype).bits // 8
    size = max(2, min(64, math.ceil(3 * l2_bytes / pair_bytes)))
    make = lambda: torch.randn(shape, device=device).to(dtype).contiguous(memory_format=memory_format)  # noqa: E731
    return [(make(), make()) for _ in range(size)]


def _step(layer: nn.Module, mode: str, anchor: torch.Tensor):
    """One call of the layer on one (input, gradient) pair, for the pass being timed."""
    if mode == "train fwd+bwd":

        def step(x, grad):
            layer(_Source.apply(anchor, x)).backward(grad)

    else:

        def step(x, grad):
            with torch.no_grad():
                layer(x)

    return step


def _median_us(step, pool, budget_ms: float) -> float:
    """Median over single calls timed with CUDA events, after a warm-up (compilation, autotuning)."""
    for i in range(3):
        step(*pool[i % len(pool)])
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(5):
        step(*pool[i % len(pool)])
    end.record()
    torch.cuda.synchronize()
    repeats = int(min(1000, max(20, budget_ms / max(start.elapsed_time(end) / 5, 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for i, (begin, finish) in enumerate(events):
        begin.record()
        step(*pool[i % len(pool)])
        finish.record()
    torch.cuda.synchronize()
    return 1000 * statistics.median(begin.elapsed_time(finish) for begin, finish in events)


def _copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in bytes/s (each byte copied is read once and written once)."""
    src = torch.empty(2**28, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        begin, finish = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        dst.copy_(src)
        finish.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(finish) / 1000)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def _max_output_difference(channels, x, device) -> float:
    """InPlaceABN against BatchNorm2d (weight |w| + eps) + leaky_relu on one batch: a sanity check."""
    ours = _build("InPlaceABN-Triton", channels, device)
    reference = _build("BN + leaky_relu", channels, device)
    with torch.no_grad():
        ours.weight.uniform_(-1.5, 1.5)
        ours.bias.uniform_(-0.5, 0.5)
        reference[0].weight.copy_(ours.weight.abs() + ours.eps)
        reference[0].bias.copy_(ours.bias)
        expected = reference(x.clone()).float()
        return (ours(x.clone()).float() - expected).abs().max().item()


def _commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="also write the results (and the setup) as JSON")
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="NxCxHxW (default: %(default)s)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--passes", nargs="+", default=list(PASSES), choices=list(PASSES))
    parser.add_argument("--columns", nargs="+", default=COLUMNS, choices=COLUMNS)
    parser.add_argument("--budget-ms", type=float, default=200.0, help="time spent timing each cell")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu_layer.py needs a CUDA GPU (torch.cuda.is_available() is False): nothing measured.")
        return 1
    try:
        import triton
    except ImportError:
        print("benchmarks/gpu_layer.py needs triton for the InPlaceABN-Triton column: pip install triton.")
        return 1
    os.environ["INPLACE_ABN_BACKEND"] = "triton"
    device = torch.device("cuda")
    properties = torch.cuda.get_device_properties(device)
    l2_bytes = getattr(properties, "L2_cache_size", 50 * 2**20)
    bandwidth = _copy_bandwidth(device)
    setup = {
        "device": properties.name,
        "date": datetime.date.today().isoformat(),
        "commit": _commit(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_bandwidth_GBps": round(bandwidth / 1e9, 1),
        "l2_MiB": round(l2_bytes / 2**20, 1),
    }
    print(" | ".join(f"{key}: {value}" for key, value in setup.items()))
    print()
    header = ["shape", "layout", "dtype", "pass", *(f"{c} (us)" for c in args.columns), "floor (us)"]
    header += ["eager / Triton", "floor / Triton"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))

    rows = []
    for shape_text in args.shapes:
        shape = tuple(int(size) for size in shape_text.lower().split("x"))
        channels = shape[1]
        for layout in args.layouts:
            for dtype_name in args.dtypes:
                dtype = DTYPES[dtype_name]
                pool = _pool(shape, dtype, LAYOUTS[layout], device, l2_bytes)
                difference = _max_output_difference(channels, pool[0][0], device)
                if difference > (1e-3 if dtype == torch.float32 else 6e-2):
                    print(f"warning: InPlaceABN differs from BatchNorm2d + leaky_relu by {difference:.3g} "
                          f"at {shape_text} {layout} {dtype_name}", file=sys.stderr)
                layers = {column: _build(column, channels, device) for column in args.columns}
                anchor = torch.zeros((), device=device, requires_grad=True)
                for mode in args.passes:
                    times = {}
                    for column, layer in layers.items():
                        layer.train(mode != "eval fwd")
                        times[column] = _median_us(_step(layer, mode, anchor), pool, args.budget_ms)
                        layer.zero_grad(set_to_none=True)
                    floor = 1e6 * PASSES[mode] * math.prod(shape) * pool[0][0].element_size() / bandwidth
                    ours = times.get("InPlaceABN-Triton")
                    eager = times.get("BN + leaky_relu")
                    speedup = f"{eager / ours:.2f}x" if ours and eager else "-"
                    efficiency = f"{100 * floor / ours:.0f}%" if ours else "-"
                    cells = [shape_text, layout, dtype_name, mode, *(f"{times[c]:.1f}" for c in args.columns)]
                    print("| " + " | ".join(cells + [f"{floor:.1f}", speedup, efficiency]) + " |", flush=True)
                    rows.append(
                        {
                            "shape": shape_text, "layout": layout, "dtype": dtype_name, "pass": mode,
                            "times_us": times, "floor_us": floor, "max_output_difference": difference,
                        }
                    )
                del pool, layers
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"setup": setup, "rows": rows}, file, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
