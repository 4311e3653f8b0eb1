"""Memory and step time of real torchvision / timm / segmentation_models_pytorch models, as built and
after ``inplace_abn.convert_to_abn`` (issue #11): a markdown table on stdout, ``--json FILE``.

Models by name, randomly initialised (nothing is downloaded):

    torchvision:NAME        torchvision.models.get_model(NAME, weights=None), e.g. torchvision:resnet50
    timm:NAME               timm.create_model(NAME, pretrained=False), e.g. timm:efficientnet_b0
    smp:ARCH:ENCODER        segmentation_models_pytorch.create_model(ARCH, encoder_name=ENCODER,
                            encoder_weights=None, classes=--classes), e.g. smp:Unet:resnet34

A model whose output is (N, K) logits trains with cross-entropy on random labels; one whose output is
(N, K, H, W) (smp, torchvision's segmentation models) with per-pixel cross-entropy on a random dense
target. A training step is ``zero_grad`` (in place), forward, loss, backward, ``SGD(momentum=0.9).step``.

Variants, each its own copy of the same initial weights:

    original        the model as built
    converted       convert_to_abn(model, relu_to="relu"), the default: exact conversion (ReLU kept, so
                    those layers run in recompute mode)
    leaky           convert_to_abn(model, relu_to="leaky_relu"): ReLU becomes leaky_relu(0.01), in place
                    (zero-initialized norms too, scaling by eps: clamp_small_weights' default there)
    checkpointed    the whole original model under one non-reentrant torch.utils.checkpoint that saves
                    only convolution outputs (selective checkpointing) and recomputes the rest; its
                    in-place activations run out of place (a saved output must not change)
    NAME+compile    with --compile: torch.compile of original / converted / leaky

Memory (``inplace_abn.memory.MemoryProbe``: on CPU the allocation stream of torch.profiler, on CUDA
``max_memory_allocated``) is counted above the resting state, which is the state after the warm-up
steps: parameters, their ``.grad`` buffers (allocated, zeroed in place) and the optimizer's momentum.
"peak" is the highest allocation over one whole step, "held" what is allocated right after the loss
(before backward). Step time: the median over interleaved rounds (variants alternate, their order
rotating each round) of the mean step time in a round; warm-up steps first; threads fixed.

    python benchmarks/real_models.py torchvision:resnet18 smp:Unet:resnet34 --json real_models.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import gc
import inspect
import json
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from inplace_abn import convert_to_abn
from inplace_abn.memory import MemoryProbe

DEFAULT_MODELS = [
    "torchvision:resnet18", "torchvision:resnet50", "torchvision:mobilenet_v3_large",
    "timm:efficientnet_b0", "timm:resnet50", "timm:regnety_016", "smp:Unet:resnet34",
]
MIB = 1024**2


# --- models ----------------------------------------------------------------------------------------

def _require(package: str):
    try:
        return __import__(package)
    except ImportError as error:
        pip_name = {"segmentation_models_pytorch": "segmentation-models-pytorch"}.get(package, package)
        raise RuntimeError(f"{package} is not installed: pip install {pip_name}") from error


def build_model(spec: str, classes: int = 19) -> nn.Module:
    """The randomly initialised model named by ``spec`` (see the module docstring); ``classes`` is the
    number of classes of an smp model (classifiers keep their library's default head)."""
    library, _, name = spec.partition(":")
    if library == "torchvision" and name:
        models = _require("torchvision").models
        try:
            builder = models.get_model_builder(name)
        except ValueError as error:
            raise ValueError(f"{spec}: {error}") from None
        no_download = {"weights": None}
        if "weights_backbone" in inspect.signature(builder).parameters:  # segmentation and detection models
            no_download["weights_backbone"] = None
        return builder(**no_download)
    if library == "timm" and name:
        timm = _require("timm")
        if not timm.is_model(name):
            raise ValueError(f"{spec}: timm has no model {name!r} (timm.list_models() names them)")
        return timm.create_model(name, pretrained=False)
    if library == "smp" and name.count(":") == 1:
        smp = _require("segmentation_models_pytorch")
        architecture, encoder = name.split(":")
        return smp.create_model(architecture, encoder_name=encoder, encoder_weights=None, classes=classes)
    raise ValueError(f"model {spec!r}: expected torchvision:NAME, timm:NAME or smp:ARCH:ENCODER "
                     "(e.g. torchvision:resnet50, timm:efficientnet_b0, smp:Unet:resnet34)")


def logits_of(output) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, torchvision segmentation's ``["out"]``, or
    an output object's ``.logits``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "out" in output:
        return output["out"]
    if hasattr(output, "logits"):
        return output.logits
    raise TypeError(f"cannot find the logits in a model output of type {type(output).__name__}: "
                    "expected a tensor, a dict with 'out', or an object with .logits")


def random_targets(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Random class indices shaped as the model's output asks: (N,) for (N, K) logits, (N, H, W) for
    (N, K, H, W)."""
    with torch.no_grad():
        was_training = model.training
        logits = logits_of(model.eval()(images))
        model.train(was_training)
    if logits.dim() not in (2, 4):
        raise ValueError(f"model output of shape {tuple(logits.shape)}: expected (N, K) logits or (N, K, H, W)")
    shape = (logits.shape[0],) + tuple(logits.shape[2:])
    return torch.randint(logits.shape[1], shape, device=images.device)


# --- variants --------------------------------------------------------------------------------------

_save_convolution_outputs = functools.partial(create_selective_checkpoint_contexts, [torch.ops.aten.convolution.default])


class SelectivelyCheckpointed(nn.Module):
    """``model`` under one non-reentrant checkpoint that keeps only the outputs of convolutions; the
    backward recomputes everything else, all of it as soon as it starts."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images):
        return checkpoint(self.model, images, use_reentrant=False, context_fn=_save_convolution_outputs)


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    description: str
    # relu_to is passed explicitly (the default is "relu", exact; it used to be "leaky_relu"), so each
    # variant means the same thing whatever the default.
    convert_options: Optional[dict] = None  # None: not converted
    checkpointed: bool = False


VARIANTS = {
    variant.name: variant
    for variant in (
        Variant("original", "the model as built"),
        Variant("converted", "convert_to_abn(relu_to='relu'): exact", convert_options={"relu_to": "relu"}),
        Variant("leaky", "convert_to_abn(relu_to='leaky_relu')", convert_options={"relu_to": "leaky_relu"}),
        Variant("checkpointed", "whole model checkpointed, convolution outputs saved", checkpointed=True),
    )
}
DEFAULT_VARIANTS = ("original", "converted", "leaky", "checkpointed")
COMPILE_SUFFIX = "+compile"


def _prepare(variant: Variant, base: nn.Module, images: torch.Tensor) -> tuple[nn.Module, dict]:
    """The variant's own copy of ``base`` and what its conversion report says."""
    info: dict = {}
    if variant.convert_options is not None:
        model, report = convert_to_abn(base, sample_input=images, **variant.convert_options)
        info = {
            "batchnorm_layers": len(report.layers),
            "converted_layers": len(report.converted),
            "in_place_layers": len(report.in_place),
            "exact": report.exact,
            "saved_bytes_before": report.saved_bytes_before,
            "saved_bytes_after": report.saved_bytes_after,
            "max_output_difference": report.max_output_difference,
            "untraced": list(report.untraced),
        }
    else:
        model = copy.deepcopy(base)
        if variant.checkpointed:
            # A tensor saved by selective checkpointing must not change afterwards, and some models apply
            # an in-place activation to a convolution output (timm's squeeze-excite gates): out of place.
            for module in model.modules():
                if isinstance(getattr(module, "inplace", None), bool):
                    module.inplace = False
                    info["out_of_place_activations"] = info.get("out_of_place_activations", 0) + 1
            model = SelectivelyCheckpointed(model)
    return model.train(), info


@dataclasses.dataclass
class _Runner:
    """One variant ready to train: its model (compiled or not), optimizer and step."""

    name: str
    model: nn.Module
    step_model: Callable
    optimizer: torch.optim.Optimizer
    info: dict

    def step(self, images, targets, probe: Optional[MemoryProbe] = None) -> None:
        self.optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: part of the resting state
        loss = F.cross_entropy(logits_of(self.step_model(images)), targets)
        if probe is not None:
            probe.mark("forward")
        loss.backward()
        del loss
        self.optimizer.step()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _resting_bytes(runner: _Runner) -> int:
    tensors = {}
    for parameter in runner.model.parameters():
        for tensor in (parameter, parameter.grad, *runner.optimizer.state.get(parameter, {}).values()):
            if isinstance(tensor, torch.Tensor):
                tensors[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    for buffer in runner.model.buffers():
        tensors[buffer.untyped_storage().data_ptr()] = buffer.untyped_storage().nbytes()
    return sum(tensors.values())


def _measure_memory(runner: _Runner, images, targets, device) -> dict:
    gc.collect()
    gc.disable()  # a collection inside the probe would free tensors allocated before it: invisible on CPU
    try:
        _synchronize(device)
        with MemoryProbe(device) as probe:
            runner.step(images, targets, probe)
    finally:
        gc.enable()
    return {"peak_bytes": probe.peak_bytes, "held_after_forward_bytes": probe.marks["forward"],
            "end_bytes": probe.end_bytes}


def _error_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def measure_model(spec: Union[str, nn.Module], variants=DEFAULT_VARIANTS, compile_: bool = False, batch_size: int = 4,
                  size: tuple[int, int] = (96, 96), classes: int = 19, warmup: int = 2, rounds: int = 7,
                  steps: int = 2, device="cpu", progress: Callable[[str], None] = lambda message: None) -> dict:
    """Memory and step time of every variant of one model (a name, or a module to copy from); ratios
    against ``original`` (``original+compile`` for compiled variants). A failing variant gets ``error``."""
    device = torch.device(device)
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    variants = ["original", *[name for name in variants if name != "original"]]
    torch.manual_seed(0)
    if isinstance(spec, nn.Module):
        base, spec = copy.deepcopy(spec), type(spec).__name__
    else:
        progress(f"{spec}: building")
        base = build_model(spec, classes)
    base = base.to(device).train()
    images = torch.randn(batch_size, 3, *size, device=device)
    targets = random_targets(base, images)
    names = list(variants)
    if compile_:
        names += [name + COMPILE_SUFFIX for name in variants if not VARIANTS[name].checkpointed]

    results: dict[str, dict] = {}
    runners: dict[str, _Runner] = {}
    prepared: dict[str, tuple[nn.Module, dict]] = {}
    for name in names:
        variant_name, compiled = name.removesuffix(COMPILE_SUFFIX), name.endswith(COMPILE_SUFFIX)
        try:
            if variant_name not in prepared:
                progress(f"{spec}: preparing {variant_name}")
                prepared[variant_name] = _prepare(VARIANTS[variant_name], base, images)
            model, info = prepared[variant_name]
            if compiled:  # its own copy: a compiled and an eager variant must not share weights
                model = copy.deepcopy(model)
            runner = _Runner(name, model, torch.compile(model) if compiled else model,
                             torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9), info)
            progress(f"{spec}: warming up {name}" + (" (compiling)" if compiled else ""))
            for _ in range(warmup):
                runner.step(images, targets)
            _synchronize(device)
            results[name] = {"info": info, "resting_bytes": _resting_bytes(runner),
                             **_measure_memory(runner, images, targets, device)}
            runners[name] = runner
        except Exception as error:  # one variant failing (a conversion, a compilation) leaves the others
            progress(f"{spec}: {name} failed: {_error_line(error)}")
            results[name] = {"error": _error_line(error)}
    del prepared

    times = {name: [] for name in runners}
    order = list(runners)
    for index in range(rounds):
        progress(f"{spec}: timing round {index + 1}/{rounds}")
        for name in order[index % len(order):] + order[:index % len(order)]:
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                runners[name].step(images, targets)
            _synchronize(device)
            times[name].append((time.perf_counter() - start) / steps * 1e3)
    for name, values in times.items():
        if values:  # --rounds 0: memory only
            results[name]["step_ms"] = statistics.median(values)
            results[name]["step_ms_rounds"] = values

    for name, result in results.items():
        reference = results.get("original" + COMPILE_SUFFIX if name.endswith(COMPILE_SUFFIX) else "original", {})
        for key, ratio in (("peak_bytes", "peak_ratio"), ("held_after_forward_bytes", "held_ratio"), ("step_ms", "time_ratio")):
            if key in result and reference.get(key):
                result[ratio] = result[key] / reference[key]
    parameters = sum(p.numel() for p in base.parameters())
    return {"model": spec, "batch_size": batch_size, "size": list(size), "parameters": parameters,
            "task": "segmentation" if targets.dim() == 3 else "classification", "variants": results}


# --- output ----------------------------------------------------------------------------------------

def _layers_cell(info: dict) -> str:
    if "converted_layers" not in info:
        return "-"
    return f"{info['converted_layers']} ({info['in_place_layers']}) / {info['batchnorm_layers']}"


def _ratio(result: dict, key: str) -> str:
    return f"{result[key]:.2f}" if key in result else "-"


def _number(result: dict, key: str) -> str:
    return f"{result[key]:.1f}" if key in result else "-"


def format_table(models: list[dict]) -> str:
    lines = [
        "| model | variant | BN layers: converted (in place) / all | peak MiB | peak vs original "
        "| held after forward MiB | held vs original | step ms | time vs original |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in models:
        label = f"{entry['model']}" + (f" ({entry['error']})" if "error" in entry else "")
        for name, result in entry.get("variants", {}).items():
            if "error" in result:
                lines.append(f"| {label} | {name} | failed: {result['error']} | | | | | | |")
                continue
            lines.append(
                f"| {label} | {name} | {_layers_cell(result['info'])} | {result['peak_bytes'] / MIB:.1f} "
                f"| {_ratio(result, 'peak_ratio')} | {result['held_after_forward_bytes'] / MIB:.1f} "
                f"| {_ratio(result, 'held_ratio')} | {_number(result, 'step_ms')} | {_ratio(result, 'time_ratio')} |"
            )
        if "variants" not in entry:
            lines.append(f"| {label} | | | | | | | | |")
    return "\n".join(lines)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _size(text: str) -> tuple[int, int]:
    parts = [int(value) for value in text.lower().split("x")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected S or HxW, e.g. 96 or 128x256")
    return parts[0], parts[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=DEFAULT_MODELS, help="model names (default: the issue's seven)")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS),
                        help="variants to run; original is always run, as the reference (default: all)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile each variant but checkpointed (slow)")
    parser.add_argument("--batch", type=int, default=4, help="batch size (default: %(default)s)")
    parser.add_argument("--size", type=_size, default=(96, 96), help="image side S or HxW (default: 96)")
    parser.add_argument("--classes", type=int, default=19, help="classes of smp models (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default: %(default)s: on a shared machine, OpenMP's barriers turn "
                             "other processes' load into steps 10-100x slower at 2 threads)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds; 0: memory only (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=2, help="steps per variant per round (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    def progress(message):
        print(message, file=sys.stderr, flush=True)

    models = []
    for spec in args.models:
        try:
            models.append(measure_model(spec, args.variants, args.compile, args.batch, args.size, args.classes,
                                        args.warmup, args.rounds, args.steps, device, progress))
        except (RuntimeError, ValueError, TypeError) as error:  # a missing library or a bad name: go on
            progress(f"{spec}: skipped: {_error_line(error)}")
            models.append({"model": spec, "error": _error_line(error)})
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    meta = {
        "command": " ".join(["benchmarks/real_models.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.date.today().isoformat(), "commit": _commit(), "torch": torch.__version__,
        "device": str(device), "device_name": where, "threads": args.threads, "batch_size": args.batch,
        "size": list(args.size), "warmup": args.warmup, "rounds": args.rounds, "steps": args.steps,
        "memory": "max_memory_allocated" if device.type == "cuda" else "torch.profiler allocation events",
        "variants": {name: VARIANTS[name].description for name in dict.fromkeys(["original", *args.variants])},
    }
    print(f"\nbatch {args.batch}, {args.size[0]}x{args.size[1]}, float32, {device} ({where}), {args.threads} threads; "
          f"memory above the resting state ({meta['memory']}); step time: median of {args.rounds} interleaved "
          f"rounds x {args.steps} steps; torch {torch.__version__}, commit {meta['commit']}\n")
    print(format_table(models))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "models": models}, handle, indent=2)
    return 0 if all("error" not in entry for entry in models) else 1


if __name__ == "__main__":
    sys.exit(main())
