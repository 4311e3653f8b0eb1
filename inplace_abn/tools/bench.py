"""``inplace-abn bench``: memory and time of a network's training step with standard BatchNorm +
activation, in-place activation, checkpointing and InPlace-ABN, side by side (the paper's Table 1 in kind).

Also importable: :func:`run_benchmark` returns the measurements of one network and input.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import platform
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..models import build, network_names, norm_act
from ..training.memory import SavedTensorMeter, reset_resident_peak, resident_bytes

GIB = 1024**3
MIB = 1024**2


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    label: str
    make_norm_act: Callable[[], Callable]
    compiled: bool = False


VARIANTS = {
    variant.name: variant
    for variant in (
        Variant("standard", "BatchNorm + act", norm_act.batchnorm_act),
        Variant("inplace_activation", "BatchNorm + in-place act",
                lambda: norm_act.batchnorm_act(inplace_activation=True)),
        Variant("checkpoint", "checkpointed BatchNorm + act", norm_act.checkpointed_batchnorm_act),
        Variant("inplace_abn", "InPlace-ABN", norm_act.inplace_abn),
        Variant("compiled", "torch.compile(BatchNorm + act)", norm_act.batchnorm_act, compiled=True),
    )
}
DEFAULT_VARIANTS = ("standard", "inplace_activation", "checkpoint", "inplace_abn")
BASELINE = "standard"


@dataclasses.dataclass(frozen=True)
class Case:
    """One network at one input size: ``batch_size`` square images of side ``crop``; the network's
    channels scaled by ``width_multiplier``."""

    network: str
    batch_size: int
    crop: int
    width_multiplier: float = 1.0


#: per device type: the paper's networks at their sizes on a GPU. On a CPU, a quick look in a couple
#: of minutes on two cores: small inputs, and thinner networks, so that activations and not weights
#: make most of the memory, as they do at full size.
DEFAULT_CASES = {
    "cuda": (Case("deeplabv3_wider_resnet38_a2", 4, 512), Case("resnext101_32x4d", 32, 224)),
    "cpu": (Case("deeplabv3_wider_resnet38_a2", 2, 128, 0.25), Case("resnext101_32x4d", 2, 64, 0.5)),
}


@dataclasses.dataclass
class VariantResult:
    """Measurements of one variant. Memory in bytes, times in seconds; ``None`` where not measured."""

    variant: str
    label: str
    network: str
    batch_size: int
    crop: int
    width_multiplier: float
    device: str
    step_time_s: Optional[float] = None  # median wall-clock training step, on the device measured
    peak_step_bytes: Optional[float] = None  # peak during a step above the resting weights, grads, optimizer
    peak_total_bytes: Optional[float] = None  # GPU: max_memory_allocated; CPU: process peak resident size
    saved_bytes: Optional[float] = None  # distinct storages autograd keeps for backward, parameters excluded
    memory_ratio: Optional[float] = None  # peak_step_bytes / that of the baseline
    saved_ratio: Optional[float] = None
    time_ratio: Optional[float] = None
    max_batch_size: Optional[int] = None  # GPU, within the memory budget, at this crop
    max_crop: Optional[int] = None  # GPU, within the memory budget, at this batch size
    error: Optional[str] = None


# --------------------------------------------------------------------------------------------------
# Memory probes


def _return_freed_memory_to_os() -> None:
    """Give freed heap memory back to the OS (glibc), and have large blocks given back as soon as they
    are freed, so that the resident size follows the live tensors: otherwise a step's peak can hide
    in memory that was freed earlier but kept by the allocator."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 128 * 1024)
        libc.mallopt(m_trim_threshold, 1024 * 1024)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def saved_tensor_bytes(model, images) -> int:
    """Bytes of the distinct storages the forward pass keeps for backward, parameters excluded."""
    with SavedTensorMeter(model.parameters()) as meter:
        out = model(images)
    del out
    return meter.bytes


# --------------------------------------------------------------------------------------------------
# Training steps


def _is_segmentation(network: str) -> bool:
    return network.startswith("deeplabv3_")


def _batch(network: str, batch_size: int, crop: int, num_classes: int, device):
    images = torch.randn(batch_size, 3, crop, crop, device=device)
    shape = (batch_size, crop, crop) if _is_segmentation(network) else (batch_size,)
    return images, torch.randint(0, num_classes, shape, device=device)


def _build(variant: Variant, network: str, num_classes: int, width_multiplier: float, device):
    model = build(network, norm_act=variant.make_norm_act(), num_classes=num_classes,
                  width_multiplier=width_multiplier).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    step_model = torch.compile(model) if variant.compiled else model
    return model, step_model, optimizer


def _train_step(model, optimizer, images, targets) -> None:
    loss = F.cross_entropy(model(images), targets)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: part of the resting memory


def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _largest_fitting(fits: Callable[[int], bool], start: int, unit: int, limit: int) -> Optional[int]:
    """The largest multiple of ``unit`` up to ``limit`` for which ``fits`` holds (assumed monotone):
    doubling from ``start``, then bisection."""
    start = max(unit, start // unit * unit)
    if not fits(start):
        low, high = 0, start
    else:
        low, high = start, None
        while high is None:
            candidate = min(low * 2, limit)
            if candidate == low:
                return low
            if fits(candidate):
                low = candidate
            else:
                high = candidate
    while high - low > unit:
        middle = (low + high) // 2 // unit * unit
        if middle <= low:
            break
        if fits(middle):
            low = middle
        else:
            high = middle
    return low or None


def _fits_in_budget(variant, network, num_classes, width_multiplier, device, budget_bytes):
    """``fits(batch_size, crop)``: whether training steps stay within ``budget_bytes`` of GPU memory.
    The allocator is capped at the budget meanwhile; the second step is the one measured, when the
    optimizer state exists and cuDNN has chosen its algorithms."""

    def fits(batch_size: int, crop: int) -> bool:
        _free(device)
        model = step_model = optimizer = images = targets = None
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), device)
        try:
            model, step_model, optimizer = _build(variant, network, num_classes, width_multiplier, device)
            images, targets = _batch(network, batch_size, crop, num_classes, device)
            _train_step(step_model, optimizer, images, targets)
            _synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            _train_step(step_model, optimizer, images, targets)
            _synchronize(device)
            return torch.cuda.max_memory_allocated(device) <= budget_bytes
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
            if not _is_out_of_memory(error):
                raise
            return False
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            del model, step_model, optimizer, images, targets
            _free(device)

    return fits


# --------------------------------------------------------------------------------------------------
# The benchmark


def _describe(case) -> str:
    width = "" if case.width_multiplier == 1 else f", width x{case.width_multiplier:g}"
    return f"{case.network}{width}, batch {case.batch_size} x {case.crop}x{case.crop}"


def _progress_to_stderr(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _measure_variant(variant, case, num_classes, device, steps, warmup, progress):
    result = VariantResult(variant.name, variant.label, case.network, case.batch_size, case.crop,
                           case.width_multiplier, str(device))
    model, step_model, optimizer = _build(variant, case.network, num_classes, case.width_multiplier, device)
    images, targets = _batch(case.network, case.batch_size, case.crop, num_classes, device)
    for index in range(warmup):
        progress(f"  {variant.label}: warm-up step {index + 1}/{warmup}")
        _train_step(step_model, optimizer, images, targets)
    _synchronize(device)

    # Peak memory of a step above the resting state: weights, gradients and optimizer state.
    _free(device)
    if device.type == "cuda":
        resting = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _return_freed_memory_to_os()
        resting = resident_bytes()
        peak_reset = reset_resident_peak()
    times = []
    for index in range(steps):
        progress(f"  {variant.label}: step {index + 1}/{steps}")
        start = time.perf_counter()
        _train_step(step_model, optimizer, images, targets)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    result.step_time_s = statistics.median(times)
    if device.type == "cuda":
        result.peak_total_bytes = torch.cuda.max_memory_allocated(device)
        result.peak_step_bytes = result.peak_total_bytes - resting
    else:
        result.peak_total_bytes = resident_bytes("VmHWM")
        if peak_reset and resting is not None and result.peak_total_bytes is not None:
            result.peak_step_bytes = result.peak_total_bytes - resting

    try:
        result.saved_bytes = saved_tensor_bytes(step_model, images)
    except Exception as error:  # e.g. saved-tensor hooks under torch.compile
        progress(f"  {variant.label}: saved-for-backward bytes not measured ({type(error).__name__})")
    del model, step_model, optimizer, images, targets
    _free(device)
    return result


def default_case(device, network: Optional[str] = None, batch_size: Optional[int] = None,
                 crop: Optional[int] = None, width_multiplier: Optional[float] = None) -> Case:
    """The case to run: what is given, the rest from :data:`DEFAULT_CASES` for the device (those of
    the same network, else of the first default network)."""
    defaults = DEFAULT_CASES["cuda" if torch.device(device).type == "cuda" else "cpu"]
    network = network or defaults[0].network
    default = next((case for case in defaults if case.network == network), defaults[0])
    return Case(network, batch_size or default.batch_size, crop or default.crop,
                default.width_multiplier if width_multiplier is None else width_multiplier)


def run_benchmark(
    network: Optional[str] = None,
    batch_size: Optional[int] = None,
    crop: Optional[int] = None,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    *,
    width_multiplier: Optional[float] = None,
    device=None,
    steps: int = 3,
    warmup: int = 2,
    num_classes: Optional[int] = None,
    memory_budget_gib: Optional[float] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> list[VariantResult]:
    """Train ``network`` for ``warmup + steps`` steps with each variant and return the measurements.

    ``device`` defaults to CUDA when available; the network and sizes not given are the device's
    first default case (:func:`default_case`). On a GPU with ``memory_budget_gib``, also searches the
    largest batch size (at ``crop``) and the largest crop (a multiple of 32, at ``batch_size``) whose
    training step fits in the budget. Ratios are relative to the ``standard`` variant when it runs.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    case = default_case(device, network, batch_size, crop, width_multiplier)
    network, batch_size, crop, width_multiplier = case.network, case.batch_size, case.crop, case.width_multiplier
    progress = progress or (lambda message: None)
    num_classes = num_classes or (19 if _is_segmentation(network) else 1000)
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        raise ValueError(f"Unknown variant(s) {unknown}: use {', '.join(VARIANTS)}.")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    results = []
    for index, name in enumerate(variants):
        variant = VARIANTS[name]
        progress(f"{_describe(case)} on {device}: [{index + 1}/{len(variants)}] {variant.label}")
        try:
            result = _measure_variant(variant, case, num_classes, device, steps, warmup, progress)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
            if not _is_out_of_memory(error):
                raise
            result = VariantResult(name, variant.label, network, batch_size, crop, width_multiplier, str(device),
                                   error="out of memory")
        _free(device)  # here, once the traceback of an out-of-memory error has let go of its tensors
        if device.type == "cuda" and memory_budget_gib and not variant.compiled:
            fits = _fits_in_budget(variant, network, num_classes, width_multiplier, device, memory_budget_gib * GIB)
            progress(f"  {variant.label}: largest batch size within {memory_budget_gib:g} GiB")
            result.max_batch_size = _largest_fitting(lambda value: fits(value, crop), batch_size, 1, 4096)
            progress(f"  {variant.label}: largest crop within {memory_budget_gib:g} GiB")
            result.max_crop = _largest_fitting(lambda value: fits(batch_size, value), crop, 32, 8192)
        results.append(result)
    _add_ratios(results)
    return results


def _add_ratios(results: list[VariantResult]) -> None:
    baseline = next((r for r in results if r.variant == BASELINE and r.error is None), None)
    if baseline is None:
        return

    def ratio(value, reference):
        return value / reference if value is not None and reference else None

    for result in results:
        result.memory_ratio = ratio(result.peak_step_bytes, baseline.peak_step_bytes)
        result.saved_ratio = ratio(result.saved_bytes, baseline.saved_bytes)
        result.time_ratio = ratio(result.step_time_s, baseline.step_time_s)


# --------------------------------------------------------------------------------------------------
# Output


def _case_of(result: VariantResult) -> Case:
    return Case(result.network, result.batch_size, result.crop, result.width_multiplier)


def _by_case(results: Sequence[VariantResult]) -> dict:
    """``{(case, device): [results]}`` in the order the cases were run."""
    groups: dict = {}
    for result in results:
        groups.setdefault((_case_of(result), result.device), []).append(result)
    return groups


def _mib(value) -> str:
    return "-" if value is None else f"{value / MIB:,.1f}"


def _relative(ratio) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x ({(ratio - 1) * 100:+.0f}%)"


def format_table(results: Sequence[VariantResult]) -> str:
    """A text table per network and input."""
    lines = []
    for (case, device), rows in _by_case(results).items():
        on_gpu = device.startswith("cuda")
        header = ["variant", "peak MiB" if on_gpu else "peak RSS MiB", "vs std", "saved MiB", "vs std",
                  "step ms" if on_gpu else "step ms (CPU)", "vs std"]
        if on_gpu:
            header += ["max batch", "max crop"]
        table = [header]
        for r in rows:
            if r.error:
                table.append([r.label, r.error] + [""] * (len(header) - 2))
                continue
            row = [r.label, _mib(r.peak_step_bytes), _relative(r.memory_ratio), _mib(r.saved_bytes),
                   _relative(r.saved_ratio), "-" if r.step_time_s is None else f"{r.step_time_s * 1000:,.0f}",
                   _relative(r.time_ratio)]
            if on_gpu:
                row += [str(r.max_batch_size or "-"), str(r.max_crop or "-")]
            table.append(row)
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        lines.append(f"{_describe(case)}, {device}")
        for index, row in enumerate(table):
            lines.append("  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                                   for i, (cell, width) in enumerate(zip(row, widths))))
            if index == 0:
                lines.append("  ".join("-" * width for width in widths))
        resting = "weights, gradients, optimizer state"
        if on_gpu:
            lines.append(f"  peak: max_memory_allocated during a step, above the resting {resting}")
        else:
            lines.append(f"  peak RSS: process resident size during a step, above the resting {resting}; "
                         "times are CPU times")
        lines.append(f"  saved: tensors kept for backward (parameters excluded); vs std: relative to {BASELINE}")
        lines.append("")
    return "\n".join(lines)


def to_json(results: Sequence[VariantResult], settings: dict) -> dict:
    return {
        "settings": settings,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "cpu_threads": torch.get_num_threads(),
        },
        "results": [dataclasses.asdict(result) for result in results],
    }


def plot(results: Sequence[VariantResult], path: str) -> None:
    """Bar charts of peak memory and step time relative to the standard variant (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _by_case(results)
    names = [_describe(case).replace(", batch", "\nbatch") for case, _ in groups]
    variants = list(dict.fromkeys(result.variant for result in results))
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    metrics = [("memory_ratio", "peak training memory vs standard"),
               ("saved_ratio", "saved-for-backward memory vs standard"),
               ("time_ratio", "time per step vs standard")]
    bar_width = 0.8 / max(len(variants), 1)
    for axis, (field, title) in zip(axes, metrics):
        for index, variant in enumerate(variants):
            values = []
            for rows in groups.values():
                match = [r for r in rows if r.variant == variant]
                values.append((getattr(match[0], field) if match else None) or 0.0)
            offset = (index - (len(variants) - 1) / 2) * bar_width
            axis.bar([position + offset for position in range(len(names))], values, bar_width,
                     label=VARIANTS[variant].label)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks(range(len(names)))
        axis.set_xticklabels(names, fontsize=7)
        axis.set_title(title, fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8)
    figure.tight_layout(rect=(0, 0, 1, 0.93))
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --------------------------------------------------------------------------------------------------
# Command line


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--network", action="append", choices=network_names(), metavar="NAME",
                        help="network to measure (repeatable; deeplabv3_<backbone> or a backbone); default: "
                             "WiderResNet-38-A2 + DeepLabV3 and ResNeXt-101, at 512 and 224 on a GPU, "
                             "thinner and at small inputs on a CPU")
    parser.add_argument("--batch-size", type=int, help="images per step (default: per network and device)")
    parser.add_argument("--crop", type=int, help="side of the square input (default: per network and device)")
    parser.add_argument("--width-multiplier", type=float, help="scale every channel count (default: per "
                                                               "network and device)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(DEFAULT_VARIANTS),
                        help=f"variants to compare (default: {' '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--compile", action="store_true",
                        help="also run the 'compiled' variant: torch.compile of BatchNorm + act")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--steps", type=int, help="timed training steps per variant (default: 5 on a GPU, 2 on a CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 3 on a GPU, 2 on a CPU)")
    parser.add_argument("--memory-budget", type=float, default=12.0, metavar="GIB",
                        help="GPU: search the largest batch size and crop within this budget (default: 12; "
                             "0 skips the search)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the ratios (needs matplotlib)")


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    networks = args.network or [case.network for case in DEFAULT_CASES["cuda" if device.type == "cuda" else "cpu"]]
    cases = [default_case(device, network, args.batch_size, args.crop, args.width_multiplier) for network in networks]
    variants = list(dict.fromkeys(list(args.variants) + (["compiled"] if args.compile else [])))
    on_gpu = device.type == "cuda"
    steps = args.steps if args.steps is not None else (5 if on_gpu else 2)
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 2)
    budget = args.memory_budget if on_gpu else None
    results = []
    for case in cases:
        case_results = run_benchmark(case.network, case.batch_size, case.crop, variants,
                                     width_multiplier=case.width_multiplier, device=device, steps=steps,
                                     warmup=warmup, memory_budget_gib=budget, progress=_progress_to_stderr)
        print(format_table(case_results), flush=True)
        results += case_results
    if args.json:
        settings = {"cases": [dataclasses.asdict(case) for case in cases], "variants": variants,
                    "steps": steps, "warmup": warmup, "memory_budget_gib": budget, "device": str(device)}
        with open(args.json, "w") as file:
            json.dump(to_json(results, settings), file, indent=2)
    if args.plot:
        plot(results, args.plot)
    return 0
