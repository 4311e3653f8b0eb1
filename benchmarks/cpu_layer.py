"""CPU benchmark of one layer: InPlaceABN (compiled and eager backends) against eager BatchNorm2d +
leaky_relu, training-mode forward + backward, float32. Prints a markdown table; ``--json FILE``.

Each step starts from ``leaf.clone()`` (the layer needs a non-leaf input, as a conv output is) for
every variant alike. Variants run interleaved, round after round, and the table gives medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

DEFAULT_SHAPES = ["8x64x32x32", "4x128x64x64", "32x256x14x14"]


def _variants(channels: int):
    from inplace_abn import InPlaceABN

    batchnorm = torch.nn.BatchNorm2d(channels)
    inplace = InPlaceABN(channels, activation="leaky_relu", activation_param=0.01)

    def batchnorm_leaky_relu(x):
        return F.leaky_relu(batchnorm(x), 0.01)

    def batchnorm_inplace_leaky_relu(x):
        return F.leaky_relu(batchnorm(x), 0.01, inplace=True)

    def with_backend(name):
        def run(x):
            os.environ["INPLACE_ABN_BACKEND"] = name
            return inplace(x)

        return run

    return {
        "BatchNorm2d + leaky_relu": batchnorm_leaky_relu,
        "BatchNorm2d + leaky_relu_": batchnorm_inplace_leaky_relu,
        "InPlaceABN (compiled)": with_backend("compiled"),
        "InPlaceABN (eager)": with_backend("eager"),
    }


def _step(fn, leaf, grad):
    out = fn(leaf.clone())
    out.backward(grad)


def bench_shape(shape, rounds: int, steps: int, warmup: int, progress, channels_last: bool = False) -> dict:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    leaf = torch.randn(shape).to(memory_format=fmt).requires_grad_()
    grad = torch.randn(shape).to(memory_format=fmt)
    variants = _variants(shape[1])
    for name, fn in variants.items():
        progress(f"  warming up {name}")
        for _ in range(warmup):
            _step(fn, leaf, grad)
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(steps):
                _step(fn, leaf, grad)
            times[name].append((time.perf_counter() - start) / steps * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="NxCxHxW shapes (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds; the table gives medians")
    parser.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (the compiled backend compiles then)")
    parser.add_argument("--channels-last", action="store_true", help="inputs and gradients in channels_last")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    baseline = "BatchNorm2d + leaky_relu"

    def progress(message):
        print(message, file=sys.stderr, flush=True)

    results = []
    for text in args.shapes:
        shape = tuple(int(v) for v in text.lower().split("x"))
        progress(f"shape {text}")
        medians = bench_shape(shape, args.rounds, args.steps, args.warmup, progress, args.channels_last)
        results.append({"shape": text, "median_ms": medians,
                        "ratio_vs_batchnorm": {name: t / medians[baseline] for name, t in medians.items()}})

    names = list(results[0]["median_ms"])
    layout = "channels_last" if args.channels_last else "contiguous (NCHW)"
    print(f"\nforward + backward, training, float32, {layout}, {args.threads} threads, median of {args.rounds} interleaved rounds "
          f"x {args.steps} steps; torch {torch.__version__}, {platform.processor() or platform.machine()}, commit {_commit()}\n")
    print("| shape | " + " | ".join(names) + " | InPlaceABN (compiled) / BN+act |")
    print("|---|" + "---|" * (len(names) + 1))
    for row in results:
        cells = [f"{row['median_ms'][name]:.3f} ms" for name in names]
        print(f"| {row['shape']} | " + " | ".join(cells) + f" | **{row['ratio_vs_batchnorm']['InPlaceABN (compiled)']:.2f}** |")
    if args.json:
        meta = {"torch": torch.__version__, "channels_last": args.channels_last, "threads": args.threads, "rounds": args.rounds, "steps": args.steps, "commit": _commit()}
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "results": results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
