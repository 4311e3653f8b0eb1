"""``inplace-abn check-data``: read a whole dataset tree before a long run and list every unreadable
file, missing pair and out-of-range label id (exit code 1 when there is any)."""

from __future__ import annotations

import argparse
import json
import os
import sys

DATASETS = ("cityscapes", "vistas", "kitti")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--root", required=True, metavar="DIR", help="the dataset's root folder")
    parser.add_argument("--split", action="append", metavar="SPLIT",
                        help="split to read (repeat for several; default: every split the tree holds). Cityscapes: "
                             "train, val, test, train_extra or joined with '+'; Vistas: training, validation, "
                             "testing; KITTI: train, val, trainval, test")  # fmt: skip
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
                        help="processes reading files (default: %(default)s; 0: this process)")  # fmt: skip
    parser.add_argument("--json", metavar="FILE", help="also write the report here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from ..data.check import check_tree, describe

    report = check_tree(args.dataset, args.root, args.split, workers=max(0, args.workers), progress=not args.quiet)
    print(describe(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(report.to_dict(), file, indent=2)
        print(f"report written to {args.json}", file=sys.stderr)
    return 0 if report.ok else 1
