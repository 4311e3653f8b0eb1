"""``inplace-abn evaluate``: run a checkpoint of ``inplace-abn train`` over a validation split.
Segmentation: single- or multi-scale (+ flip) inference, label PNGs in the Cityscapes / Vistas format,
the Cityscapes metrics where the data has them, mean IoU always. Classification: center or ten crops."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


def _scales(text: str):
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated scales like 0.75,1,1.25; got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"scales must be positive, got {text!r}")
    return values


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint.pt written by inplace-abn train")
    parser.add_argument("--dataset", help="override the training config's dataset")
    parser.add_argument("--root", help="override the dataset root")
    parser.add_argument("--split", help="split to evaluate (default: the config's validation split)")
    parser.add_argument("--samples", type=int, default=100, help="synthetic data: images to evaluate (default: 100)")
    parser.add_argument("--scales", type=_scales, default=(1.0,), metavar="S1,S2,...",
                        help="segmentation: inference scales, averaged (default: 1)")  # fmt: skip
    parser.add_argument("--flip", action="store_true", help="segmentation: also average the mirrored images")
    parser.add_argument("--ten-crop", action="store_true", help="classification: average ten crops")
    parser.add_argument("--output", metavar="DIR", help="segmentation: write one label PNG per image here")
    parser.add_argument("--json", metavar="FILE", help="write the metrics here")
    parser.add_argument("--batch-size", type=int, default=1, help="default: 1 (images of any size)")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _clean(value):
    """JSON without NaN surprises: keep NaN as the official files do, drop the examples."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if k not in ("examples", "confMatrix")}
    return value


def main(args: argparse.Namespace) -> int:
    from ..training import TrainConfig, load_checkpoint
    from ..training.data import build_dataset, splits
    from ..training.evaluation import evaluate_classification, evaluate_segmentation
    from ..training.loop import build_model, pick_device

    try:
        state = load_checkpoint(args.checkpoint)
        values = dict(state["config"])
        if args.dataset:
            values["dataset"] = args.dataset
        if args.root:
            values["root"] = args.root
        config = TrainConfig.from_dict(values, args.checkpoint).validate()
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"inplace-abn evaluate: error: {error}", file=sys.stderr)
        return 1
    device = pick_device(args.device)
    split = args.split or splits(config)[1]
    progress = not args.quiet

    from ..data import ClassificationEvalTransform, DataError

    try:
        if config.task == "classification":
            size = config.crop_size[0]
            transform = ClassificationEvalTransform(size=size, resize=int(round(size * 8 / 7)), ten_crop=args.ten_crop)
            dataset = build_dataset(config, split, train=False, transform=transform)
        else:
            eval_maps = config.dataset in ("synthetic", "cityscapes")
            dataset = build_dataset(config, split, train=False, eval_maps=eval_maps, num_samples=args.samples)
    except DataError as error:
        print(f"inplace-abn evaluate: error: {error}", file=sys.stderr)
        return 1
    if dataset.num_classes != state["num_classes"]:
        print(f"inplace-abn evaluate: error: the checkpoint has {state['num_classes']} classes, "
              f"the dataset {dataset.num_classes}", file=sys.stderr)  # fmt: skip
        return 1
    model = build_model(config, state["num_classes"])
    model.load_state_dict(state["model"])
    model.to(device).eval()

    if config.task == "classification":
        result = evaluate_classification(model, dataset, device, args.batch_size, args.workers, progress)
        print(f"top-1 {100 * result['top1']:.2f}  top-5 {100 * result['top5']:.2f}  ({result['images']} images, "
              f"{'ten crops' if args.ten_crop else 'center crop'})")  # fmt: skip
    else:
        result = evaluate_segmentation(model, dataset, device, args.scales, args.flip, args.batch_size,
                                       args.output, args.workers, progress)  # fmt: skip
        if "cityscapes" in result:
            from ..metrics import format_report

            print(format_report(result["cityscapes"]))
        print(f"mean IoU {100 * result['mean_iou']:.2f}  pixel accuracy {100 * result['pixel_accuracy']:.2f}  "
              f"(scales {','.join(f'{s:g}' for s in args.scales)}{', flip' if args.flip else ''})")  # fmt: skip
        if args.output:
            print(f"predictions written to {args.output}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(_clean(result), file, indent=2)
        print(f"metrics written to {args.json}")
    return 0 if not math.isnan(result.get("mean_iou", result.get("top1", 0.0))) else 1
