"""``inplace-abn evaluate``: run a trained network over a dataset split: a checkpoint of ``inplace-abn
train``, or a published file of the original inplace_abn (its Vistas model, its ImageNet classifiers),
each with its own input settings. Segmentation: single- or multi-scale (+ flip) inference fused by mean,
voting or max, label / color / confidence PNGs, the Cityscapes metrics where the data has them, mean IoU
always. Classification: center or ten crops."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

DEFAULT_SCALES = (0.7, 1.0, 1.2)  # the original's test script


def _scales(text: str):
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated scales like 0.7,1,1.2; got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"scales must be positive, got {text!r}")
    return values


def _outputs(text: str):
    from ..training.evaluation import OUTPUTS

    values = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in values if v not in OUTPUTS]
    if not values or unknown:
        raise argparse.ArgumentTypeError(f"expected some of {','.join(OUTPUTS)} (comma-separated), got {text!r}")
    return values


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint.pt / best.pt of inplace-abn train, or a published file of the "
                                           "original inplace_abn (e.g. its Vistas model)")
    parser.add_argument("--dataset", help="override the dataset (default: the checkpoint's; the original's Vistas "
                                          "model: vistas)")
    parser.add_argument("--root", help="dataset root folder (default: the checkpoint's)")
    parser.add_argument("--split", help="split to evaluate (default: the validation split)")
    parser.add_argument("--samples", type=int, default=100, help="synthetic data: images to evaluate (default: 100)")
    parser.add_argument("--scales", type=_scales, default=DEFAULT_SCALES, metavar="S1,S2,...",
                        help="segmentation: inference scales, fused (default: 0.7,1,1.2 as the original; 1: single "
                             "scale)")  # fmt: skip
    parser.add_argument("--flip", action="store_true", help="segmentation: also the mirrored images")
    parser.add_argument("--fusion", choices=("mean", "voting", "max"), default="mean",
                        help="segmentation: how the views are fused (default: mean of the probabilities)")
    parser.add_argument("--longest-side", type=int, metavar="PIXELS",
                        help="segmentation: resize images to this longest side first (default: the checkpoint's; "
                             "the original's Vistas model: 2048)")  # fmt: skip
    parser.add_argument("--ten-crop", action="store_true", help="classification: average ten crops")
    parser.add_argument("--output", metavar="DIR", help="segmentation: write predictions here")
    parser.add_argument("--format", type=_outputs, default=("labels",), metavar="LIST",
                        help="what --output gets, comma-separated: labels (label-id PNGs), color (the same as "
                             "palette PNGs in the dataset's colors), prob (confidence x 255); default: labels")
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


def data_config(loaded, args):
    """The TrainConfig whose data settings evaluation uses: the checkpoint's own (normalisation, sizes,
    dataset), or the original file's, with the command line's overrides."""
    from ..training import TrainConfig

    if loaded.config is not None:
        values = dict(loaded.config)
    else:
        values = {key: value for key, value in loaded.settings.items() if key in {f.name for f in TrainConfig.fields()}}
        values["network"] = "deeplabv3_original" if loaded.task == "segmentation" else "original"
        values.setdefault("dataset", "vistas" if loaded.task == "segmentation" else "imagefolder")
        if loaded.task == "classification":
            values["crop_size"] = (224, 224)
    if args.dataset:
        values["dataset"] = args.dataset
    if args.root:
        values["root"] = args.root
    if args.longest_side:
        values["longest_side"] = args.longest_side
    values.pop("init_from", None)  # evaluation reads nothing else
    return TrainConfig.from_dict(values, args.checkpoint).validate()


def main(args: argparse.Namespace) -> int:
    from ..data import DataError
    from ..training.data import build_dataset, eval_transform, splits
    from ..training.evaluation import evaluate_classification, evaluate_segmentation
    from ..training.loop import pick_device
    from ..training.weights import load_network

    def fail(message) -> int:
        print(f"inplace-abn evaluate: error: {message}", file=sys.stderr)
        return 1

    try:
        loaded = load_network(args.checkpoint)
        config = data_config(loaded, args)
    except (FileNotFoundError, ValueError, KeyError) as error:
        return fail(error)
    device = pick_device(args.device)
    split = args.split or splits(config)[1]
    progress = not args.quiet
    try:
        if config.task == "classification":
            dataset = build_dataset(config, split, train=False, transform=eval_transform(config, args.ten_crop))
        else:
            eval_maps = config.dataset in ("synthetic", "cityscapes")
            dataset = build_dataset(config, split, train=False, eval_maps=eval_maps, num_samples=args.samples)
    except DataError as error:
        return fail(error)
    if dataset.num_classes != loaded.num_classes:
        hint = ""
        if config.dataset == "vistas":
            hint = " (the original's Vistas model predicts the 65 classes of Vistas v1.1's config.json)"
        return fail(f"the network predicts {loaded.num_classes} classes, the dataset has {dataset.num_classes}{hint}")
    model = loaded.model.to(device).eval()
    print(f"{args.checkpoint}: {loaded.source}, {loaded.num_classes} classes; {config.dataset} {split}, "
          f"{len(dataset)} images", file=sys.stderr)  # fmt: skip

    if config.task == "classification":
        result = evaluate_classification(model, dataset, device, args.batch_size, args.workers, progress)
        print(f"top-1 {100 * result['top1']:.2f}  top-5 {100 * result['top5']:.2f}  ({result['images']} images, "
              f"{'ten crops' if args.ten_crop else 'center crop'})")  # fmt: skip
    else:
        result = evaluate_segmentation(model, dataset, device, args.scales, args.flip, args.batch_size, args.output,
                                       args.workers, progress, fusion=args.fusion, outputs=args.format)  # fmt: skip
        if "cityscapes" in result:
            from ..metrics import format_report

            print(format_report(result["cityscapes"]))
        views = f"scales {','.join(f'{s:g}' for s in args.scales)}{', flip' if args.flip else ''}, {args.fusion}"
        print(f"mean IoU {100 * result['mean_iou']:.2f}  pixel accuracy {100 * result['pixel_accuracy']:.2f}  "
              f"({dataset.num_classes} classes; {views})")  # fmt: skip
        if args.output:
            print(f"predictions ({','.join(args.format)}) written to {args.output}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(_clean(result), file, indent=2)
        print(f"metrics written to {args.json}")
    return 0 if not math.isnan(result.get("mean_iou", result.get("top1", 0.0))) else 1
