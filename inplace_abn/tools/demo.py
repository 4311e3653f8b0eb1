"""``inplace-abn demo``: the README's main job. Trains the same small DeepLabV3 twice on the built-in
synthetic street scenes, with standard BatchNorm + activation and with InPlace-ABN (same seed, data
and settings), evaluates both with the Cityscapes metrics, and compares accuracy, memory and time."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

VARIANTS = (("batchnorm", "BatchNorm + act"), ("inplace_abn", "InPlace-ABN"))
MIB = 1024**2


def _size(text: str):
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, got {text!r}") from None
    return height, width


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="out/demo", metavar="DIR", help="output folder (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="write the summary here (default: DIR/demo.json)")
    parser.add_argument("--steps", type=int, default=300, help="training steps per network (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")
    parser.add_argument("--lr", type=float, default=0.02, help="initial learning rate (default: %(default)s)")
    parser.add_argument("--size", type=_size, default=(64, 128), metavar="HxW",
                        help="size of the scenes, evaluated whole (default: 64x128)")  # fmt: skip
    parser.add_argument("--crop", type=_size, default=(64, 128), metavar="HxW",
                        help="training crops, from scenes rescaled by 0.75-1.5 (default: 64x128)")  # fmt: skip
    parser.add_argument("--train-samples", type=int, default=300, help="default: %(default)s")
    parser.add_argument("--val-samples", type=int, default=60, help="default: %(default)s")
    parser.add_argument("--network", default="deeplabv3_resnet18", help="default: %(default)s")
    parser.add_argument("--width", type=float, default=0.5, help="channel width multiplier (default: %(default)s)")
    parser.add_argument("--output-stride", type=int, default=16, choices=(8, 16), help="default: %(default)s")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _config(args, norm: str):
    from ..training import TrainConfig

    return TrainConfig(
        network=args.network, norm=norm, width_multiplier=args.width, output_stride=args.output_stride,
        dataset="synthetic", synthetic_samples=args.train_samples, synthetic_size=args.size, crop_size=args.crop,
        scale_range=(0.75, 1.5), batch_size=args.batch_size, steps=args.steps, lr=args.lr, weight_decay=1e-4,
        seed=args.seed, device=args.device, out_dir=os.path.join(args.out, norm), checkpoint_every=args.steps,
        log_every=max(1, args.steps // 50), progress=not args.quiet,
    )  # fmt: skip


def run_variant(args, norm: str, train_set, val_set):
    """Train and evaluate one variant; returns its summary and the example predictions."""
    import torch

    from ..metrics import summary as cityscapes_summary
    from ..training import Trainer
    from ..training.evaluation import evaluate_segmentation
    from ..training.memory import reset_resident_peak, resident_bytes, return_freed_memory

    gc.collect()
    return_freed_memory()
    trainer = Trainer(_config(args, norm), quiet=args.quiet, dataset=train_set)
    start_rss = resident_bytes()
    peak_reset = reset_resident_peak()
    if trainer.device.type == "cuda":
        torch.cuda.empty_cache()
    start = time.perf_counter()
    result = trainer.run()
    train_seconds = time.perf_counter() - start
    scores = evaluate_segmentation(trainer.model, val_set, trainer.device, batch_size=16, keep=4)
    trainer.close()
    peak_rss = resident_bytes("VmHWM")
    summary = {
        "norm": norm,
        **cityscapes_summary(scores["cityscapes"]),
        "mean_iou_train_ids": 100 * scores["mean_iou"],
        "pixel_accuracy": 100 * scores["pixel_accuracy"],
        "first_loss": result["first_loss"],
        "final_loss": result["final_loss"],
        "seconds_per_step": result["seconds_per_step"],
        "mean_seconds_per_step": result["mean_seconds_per_step"],
        "train_seconds": train_seconds,
        "saved_for_backward_mib": result["saved_for_backward_bytes"] / MIB,
        "peak_cuda_mib": None if result["peak_cuda_bytes"] is None else result["peak_cuda_bytes"] / MIB,
        "peak_rss_growth_mib": (peak_rss - start_rss) / MIB if peak_reset and peak_rss and start_rss else None,
        "class_iou": {k: 100 * v for k, v in scores["cityscapes"]["classScores"].items() if v == v},
    }
    return summary, scores["examples"]


def _table(results) -> str:
    rows = [
        ("IoU classes", "iou_classes", "{:.1f}"),
        ("iIoU classes", "iiou_classes", "{:.1f}"),
        ("IoU categories", "iou_categories", "{:.1f}"),
        ("iIoU categories", "iiou_categories", "{:.1f}"),
        ("final loss", "final_loss", "{:.3f}"),
        ("saved for backward (MiB)", "saved_for_backward_mib", "{:.1f}"),
        ("peak GPU memory (MiB)", "peak_cuda_mib", "{:.1f}"),
        ("peak RSS growth (MiB)", "peak_rss_growth_mib", "{:.1f}"),
        ("time per step, median (ms)", "seconds_per_step", "{:.0f}"),
        ("time per step, mean (ms)", "mean_seconds_per_step", "{:.0f}"),
    ]
    header = f"{'':<26}" + "".join(f"{label:>18}" for _, label in VARIANTS)
    lines = [header, "-" * len(header)]
    for title, key, form in rows:
        values = [result.get(key) for result in results]
        if all(v is None for v in values):
            continue
        scale = 1000 if "seconds_per_step" in key else 1
        lines.append(f"{title:<26}" + "".join(
            f"{form.format(v * scale) if v is not None else '-':>18}" for v in values))  # fmt: skip
    return "\n".join(lines)


def plot(path: str, results, examples, val_set) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..data.cityscapes import colorize_train_ids

    count = len(examples[0])
    figure = plt.figure(figsize=(13, 2.0 * count + 2.6))
    grid = figure.add_gridspec(count + 1, 4, height_ratios=[1] * count + [1.3])
    titles = ["image", "ground truth"] + [label for _, label in VARIANTS]
    for row in range(count):
        index = row
        sample = val_set[index]
        image = sample["image"]
        from ..data.transforms import tensor_to_image

        panels = [tensor_to_image(image), colorize_train_ids(sample["label"].numpy())]
        for variant in range(len(VARIANTS)):
            prediction = colorize_train_ids(examples[variant][row][1])
            panels.append((0.45 * tensor_to_image(image) + 0.55 * prediction).astype(np.uint8))
        for column, panel in enumerate(panels):
            axis = figure.add_subplot(grid[row, column])
            axis.imshow(panel)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(titles[column] + (f"  (IoU {results[column - 2]['iou_classes']:.1f})"
                                                 if column >= 2 else ""), fontsize=10)  # fmt: skip
    memory_key = "peak_cuda_mib" if results[0].get("peak_cuda_mib") is not None else "saved_for_backward_mib"
    bars = [
        ("saved for backward (MiB)", "saved_for_backward_mib"),
        ("peak GPU memory (MiB)" if memory_key == "peak_cuda_mib" else "peak RSS growth (MiB)",
         "peak_cuda_mib" if memory_key == "peak_cuda_mib" else "peak_rss_growth_mib"),
        ("IoU classes (%)", "iou_classes"),
        ("time per step, median (ms)", "seconds_per_step"),
    ]  # fmt: skip
    colors = ["#7f7f7f", "#d62728"]
    for column, (title, key) in enumerate(bars):
        axis = figure.add_subplot(grid[count, column])
        values = [(r.get(key) or 0) * (1000 if key == "seconds_per_step" else 1) for r in results]
        positions = range(len(VARIANTS))
        axis.bar(positions, values, color=colors)
        axis.set_xticks(list(positions), [label for _, label in VARIANTS], fontsize=8)
        axis.set_title(title, fontsize=10)
        for position, value in zip(positions, values):
            axis.text(position, value, f"{value:.1f}", ha="center", va="bottom", fontsize=8)
    figure.suptitle("DeepLabV3 on synthetic street scenes: BatchNorm + act vs InPlace-ABN")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _build_kernels(args, device, num_classes: int) -> None:
    """Build InPlace-ABN's fused CPU kernels before anything is measured. They are compiled once per
    process (and cached on disk), and would otherwise count in its step times and memory."""
    import torch

    from .. import backends
    from ..training.loop import build_model

    if backends.select(torch.empty(0, device=device)) is not backends.compiled:
        return
    print("demo: compiling InPlace-ABN's fused CPU kernels (once; cached on disk for later runs)", file=sys.stderr)
    model = build_model(_config(args, "inplace_abn"), num_classes).to(device)
    images = torch.randn(2, 3, *args.crop, device=device)
    model(images).mean().backward()
    model.eval()
    with torch.no_grad():
        model(images)


def main(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from ..data import SyntheticCityscapes
    from ..training.config import TrainConfig
    from ..training.data import train_transform
    from ..training.loop import pick_device

    device = pick_device(args.device)
    wall = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    height, width = args.size
    probe = _config(args, "inplace_abn")
    train_set = SyntheticCityscapes(args.train_samples, height, width, seed=args.seed, split="train",
                                    transform=train_transform(probe), cache=True)  # fmt: skip
    val_set = SyntheticCityscapes(args.val_samples, height, width, seed=args.seed, split="val", eval_maps=True)
    print(f"demo: {args.network} (width {args.width}, output stride {args.output_stride}) on {device}, "
          f"{args.steps} steps of {args.batch_size} {args.crop[0]}x{args.crop[1]} crops of synthetic scenes, "
          f"{args.val_samples} validation images", file=sys.stderr)  # fmt: skip

    for index in range(len(train_set)):  # render once, before measuring: both runs then read the same cache
        train_set.render(index)

    _build_kernels(args, device, train_set.num_classes)
    results, examples = [], []
    for norm, label in VARIANTS:
        summary, kept = run_variant(args, norm, train_set, val_set)
        summary["label"] = label
        results.append(summary)
        examples.append(kept)

    baseline, ours = results
    saved = baseline["saved_for_backward_mib"] - ours["saved_for_backward_mib"]
    comparison = {
        "iou_classes_difference": ours["iou_classes"] - baseline["iou_classes"],
        "saved_for_backward_reduction_mib": saved,
        "saved_for_backward_reduction_percent": 100 * saved / baseline["saved_for_backward_mib"],
    }
    if baseline.get("peak_cuda_mib") is not None:
        comparison["peak_cuda_reduction_mib"] = baseline["peak_cuda_mib"] - ours["peak_cuda_mib"]
    print()
    print(_table(results))
    print()
    print(f"InPlace-ABN keeps {saved:.1f} MiB less for backward "
          f"({comparison['saved_for_backward_reduction_percent']:.0f}% less), IoU classes "
          f"{comparison['iou_classes_difference']:+.2f} points vs BatchNorm.")  # fmt: skip

    png = None
    if not args.no_plot:
        png = os.path.join(args.out, "demo.png")
        plot(png, results, examples, val_set)
        print(f"figure written to {png}")
    wall = time.perf_counter() - wall
    document = {
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "func"},
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "backend": os.environ.get("INPLACE_ABN_BACKEND", "auto"),
        "results": {r["norm"]: r for r in results},
        "comparison": comparison,
        "figure": png,
        "wall_seconds": wall,
    }
    json_path = args.json or os.path.join(args.out, "demo.json")
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w", encoding="utf-8") as file:
        json.dump(document, file, indent=2)
    print(f"summary written to {json_path}; total {wall:.0f} s")
    return 0
