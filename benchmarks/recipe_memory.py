"""GPU memory per crop of the training recipes in configs/, estimated on a CPU: the bytes autograd keeps
for backward (``inplace-abn bench``'s count, full width, float32) per crop of a batch of two (the
image-level pooling of DeepLabV3 needs more than one), with InPlace-ABN and with BatchNorm +
activation, measured at the real crop where a CPU manages it and otherwise at two smaller square crops
and scaled linearly in the pixel count to the real one; plus weights, gradients and momentum.

    python benchmarks/recipe_memory.py configs/*/*.json            # print the estimates
    python benchmarks/recipe_memory.py --write configs/*/*.json    # and put them in the recipes' notes

On a GPU, ``inplace-abn bench --network NAME --crop C --batch-size B`` measures the real peak.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

GIB = 1024**3
MIB = 1024**2
NOTE_PREFIX = "GPU memory per crop"
#: classes of the datasets the recipes train on
NUM_CLASSES = {"imagefolder": 1000, "vistas": 65, "cityscapes": 19, "kitti": 19, "synthetic": 19}


def saved_bytes(config, num_classes: int, norm: str, height: int, width: int) -> float:
    """Bytes kept for backward per crop of ``height`` x ``width``, from a batch of two."""
    from inplace_abn.tools.bench import saved_tensor_bytes
    from inplace_abn.training.loop import build_model

    torch.manual_seed(0)
    model = build_model(type(config).from_dict(dict(config.to_dict(), norm=norm)), num_classes).train()
    return saved_tensor_bytes(model, torch.randn(2, 3, height, width)) / 2


def estimate(path: str, probes, direct_limit: int) -> dict:
    from inplace_abn.training import TrainConfig

    config = TrainConfig.from_json(path, {"root": "unused"})
    num_classes = NUM_CLASSES[config.dataset]
    height, width = config.crop_size
    if config.task == "classification":
        height = width = height  # classification crops are squares of crop_size[0]
    crop = f"{height}x{width}"
    result = {"recipe": path, "network": config.network, "crop": crop, "num_classes": num_classes}
    for norm in ("inplace_abn", "batchnorm"):
        start = time.perf_counter()
        if max(height, width) <= direct_limit:
            value, how = saved_bytes(config, num_classes, norm, height, width), f"measured at {crop}"
        else:
            small, large = probes
            low, high = (saved_bytes(config, num_classes, norm, size, size) for size in (small, large))
            slope = (high - low) / (large**2 - small**2)
            value = low + slope * (height * width - small**2)
            how = f"measured at {small}x{small} and {large}x{large}, scaled linearly in pixels to {crop}"
        result[norm] = value
        result["how"] = how
        print(f"  {os.path.basename(path)} {norm}: {value / GIB:.2f} GiB ({time.perf_counter() - start:.0f} s)",
              file=sys.stderr, flush=True)  # fmt: skip
    from inplace_abn.training.loop import build_model

    parameters = sum(p.numel() for p in build_model(config, num_classes).parameters())
    result["parameters"] = parameters
    result["resting_bytes"] = 3 * 4 * parameters  # weights, gradients and SGD momentum in float32
    return result


def _size(value: float) -> str:
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / MIB:.0f} MiB"


def note(result: dict) -> str:
    crop = result["crop"]
    return (
        f"{NOTE_PREFIX} (estimate): {_size(result['inplace_abn'])} kept for backward per {crop} crop "
        f"with InPlace-ABN (BatchNorm + activation: {_size(result['batchnorm'])}), plus "
        f"{_size(result['resting_bytes'])} per GPU for weights, gradients and momentum "
        f"({result['parameters'] / 1e6:.1f} M parameters). How: bytes autograd saves (inplace-abn bench's count), "
        f"full width, float32, on a CPU, {result['how']} (benchmarks/recipe_memory.py); a GPU step also needs "
        f"workspace: inplace-abn bench --network {result['network']} --crop {max(map(int, crop.split('x')))} "
        "measures it on a GPU (with the network's default options)."
    )


def write_note(path: str, text: str) -> None:
    with open(path, encoding="utf-8") as file:
        values = json.load(file)
    notes = [line for line in values.get("notes", []) if not line.startswith(NOTE_PREFIX)]
    values["notes"] = notes + [text]
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(values, file, indent=2)
        file.write("\n")
    os.replace(temporary, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="+", help="recipe JSON files")
    parser.add_argument("--write", action="store_true", help="replace the recipes' memory notes")
    parser.add_argument("--probes", type=int, nargs=2, default=(64, 128), metavar=("SMALL", "LARGE"),
                        help="crops measured when the real one is too large for a CPU (default: 64 128)")
    parser.add_argument("--direct-limit", type=int, default=224,
                        help="measure directly up to this crop (default: 224)")
    parser.add_argument("--json", metavar="FILE", help="write the numbers here")
    args = parser.parse_args()
    os.environ.setdefault("INPLACE_ABN_BACKEND", "eager")  # the same tensors are saved on every backend
    results = []
    for path in args.recipes:
        result = estimate(path, args.probes, args.direct_limit)
        results.append(result)
        print(note(result))
        if args.write:
            write_note(path, note(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(results, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
