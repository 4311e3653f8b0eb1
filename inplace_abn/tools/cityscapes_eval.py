"""``inplace-abn cityscapes-eval``: the official Cityscapes pixel-level metrics (IoU / iIoU, classes
and categories) of a folder of label-id predictions, with the numbers of ``cityscapesscripts``."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gt", required=True, metavar="DIR",
        help="ground truth: searched recursively for *_gtFine_labelIds.png and their *_gtFine_instanceIds.png",
    )  # fmt: skip
    parser.add_argument(
        "--pred", required=True, metavar="DIR",
        help="predictions: label-id PNGs (not train ids) whose names contain <city>_<seq>_<frame>",
    )  # fmt: skip
    parser.add_argument("--json", metavar="FILE", help="write the results (keys of the official result file) here")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
                        help="threads reading images (default: %(default)s)")  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _train_id_warning(confusion) -> str:
    """Predictions that use only ids 0..18 and put pixels on void ids 0..6 are most likely train ids."""
    predicted = confusion.sum(axis=0)
    used = [i for i in range(len(predicted)) if predicted[i] > 0]
    if used and max(used) <= 18 and predicted[:7].sum() > 0.2 * predicted.sum():
        return (
            "warning: the predictions use only ids 0..18 and put many pixels on void ids 0..6: they look like "
            "train ids. Prediction files must hold label ids (road = 7, ..., bicycle = 33)."
        )
    return ""


def main(args: argparse.Namespace) -> int:
    from ..metrics.cityscapes import EvaluationError, evaluate_pairs, find_evaluation_pairs, format_report

    try:
        pairs = find_evaluation_pairs(args.gt, args.pred)
        if not args.quiet:
            print(f"Evaluating {len(pairs)} pairs of images...", file=sys.stderr)
        evaluator = evaluate_pairs(pairs, jobs=max(1, args.jobs), progress=not args.quiet)
    except EvaluationError as error:
        print(f"inplace-abn cityscapes-eval: error: {error}", file=sys.stderr)
        return 1

    result = evaluator.result()
    print(format_report(result))
    warning = _train_id_warning(evaluator.confusion)
    if warning:
        print(warning, file=sys.stderr)
    if args.json:
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as file:
            # NaN (classes without ground truth) is written as NaN, like the official result file
            json.dump(result, file, indent=4, sort_keys=True)
        print(f"results written to {args.json}")
    if math.isnan(result["averageScoreClasses"]):
        print("warning: no evaluated class is present in the ground truth or the predictions", file=sys.stderr)
    return 0
