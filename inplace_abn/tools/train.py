"""``inplace-abn train``: train a segmentation (DeepLabV3) or classification network from a JSON config
(the recipes in ``configs/``) and/or flags; under ``torchrun`` each process trains a shard with
InPlaceABNSync + DDP."""

from __future__ import annotations

import argparse
import json
import sys

# flag -> (TrainConfig field, type, help); flags left out keep the config file's (or default) value
_FLAGS = {
    "--network": ("network", str, "deeplabv3_<backbone> (segmentation) or a backbone (classification)"),
    "--init-from": ("init_from", str, "start from the matching weights of this checkpoint (ours or the original's, "
                                      "e.g. an ImageNet backbone); the rest, e.g. a head for other classes, is new"),
    "--norm": ("norm", str, "inplace_abn | batchnorm | abn"),
    "--width": ("width_multiplier", float, "channel width multiplier"),
    "--output-stride": ("output_stride", int, "8 / 16 (segmentation), 32 (classification)"),
    "--dataset": ("dataset", str, "synthetic | cityscapes | vistas | imagefolder"),
    "--root": ("root", str, "dataset root folder"),
    "--train-split": ("train_split", str, "default: train (Vistas: training)"),
    "--val-split": ("val_split", str, "default: val (Vistas: validation)"),
    "--synthetic-samples": ("synthetic_samples", int, "size of the synthetic training set"),
    "--synthetic-size": ("synthetic_size", "pair", "HxW of the synthetic scenes"),
    "--crop": ("crop_size", "pair", "HxW training crop (classification: H)"),
    "--longest-side": ("longest_side", int, "segmentation: resize images to this longest side first"),
    "--batch-size": ("batch_size", int, "per process"),
    "--global-batch-size": ("global_batch_size", int, "over all processes (split evenly)"),
    "--steps": ("steps", int, "total training steps"),
    "--epochs": ("epochs", float, "total passes over the training set (instead of --steps)"),
    "--lr": ("lr", float, "initial learning rate (after the warmup; decay by the config's lr_schedule)"),
    "--warmup-steps": ("warmup_steps", int, "linear learning-rate warmup over this many steps"),
    "--momentum": ("momentum", float, "SGD momentum"),
    "--weight-decay": ("weight_decay", float, "weight decay (not on norm parameters and biases)"),
    "--amp": ("amp", str, "none | bf16 | fp16 autocast"),
    "--workers": ("workers", int, "DataLoader worker processes"),
    "--seed": ("seed", int, "random seed"),
    "--device": ("device", str, "auto | cpu | cuda"),
    "--out": ("out_dir", str, "output folder: checkpoint.pt, log.csv, curves.png"),
    "--checkpoint-every": ("checkpoint_every", int, "steps between checkpoints"),
    "--val-every": ("val_every", int, "steps between validations (the best is kept as OUT/best.pt; 0: none)"),
    "--log-every": ("log_every", int, "steps between CSV rows"),
}


def _pair(text: str):
    parts = text.lower().split("x")
    return tuple(int(p) for p in parts) if len(parts) == 2 else (int(parts[0]), int(parts[0]))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="JSON object of settings (flags override it)")
    for flag, (field, kind, help_text) in _FLAGS.items():
        parser.add_argument(flag, dest=field, type=_pair if kind == "pair" else kind, default=None, help=help_text)
    parser.add_argument("--tensorboard", action="store_true", default=None, help="also log to TensorBoard")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="continue from CHECKPOINT; without one, from OUT/checkpoint.pt, or from scratch while "
                             "OUT has none yet (rerun the same command after a preemption)")  # fmt: skip
    parser.add_argument("--evaluate", action="store_true", help="evaluate on the validation split at the end")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")


def resolve_config(args: argparse.Namespace):
    from ..training import TrainConfig

    overrides = {field: getattr(args, field) for _, (field, _, _) in _FLAGS.items() if getattr(args, field) is not None}
    # a flag sets the run's length or batch in its own unit: the config's other unit then no longer applies
    for given, other in (("steps", "epochs"), ("batch_size", "global_batch_size")):
        if given in overrides and other not in overrides:
            overrides[other] = None
    if args.tensorboard:
        overrides["tensorboard"] = True
    if args.config:
        return TrainConfig.from_json(args.config, overrides)
    return TrainConfig.from_dict(overrides, "flags")


def main(args: argparse.Namespace) -> int:
    from ..training import Trainer

    try:
        config = resolve_config(args).validate()
    except ValueError as error:
        print(f"inplace-abn train: error: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    if args.quiet:
        config.progress = False
    try:
        # --quiet only drops the progress bar: what the run decides (resume, init) is still said
        trainer = Trainer(config, resume=args.resume, quiet=False)
    except (ValueError, FileNotFoundError) as error:
        print(f"inplace-abn train: error: {error}", file=sys.stderr)
        return 1
    try:
        summary = trainer.run()
        if trainer.world.main:
            print(json.dumps({k: v for k, v in summary.items()}, indent=2, default=str))
            if args.evaluate:
                _evaluate(trainer)
    finally:
        trainer.close()
    return 0


def _evaluate(trainer) -> None:
    from ..training.data import build_dataset, splits
    from ..training.evaluation import evaluate_classification, evaluate_segmentation

    config = trainer.config
    _, val_split = splits(config)
    if config.task == "classification":
        dataset = build_dataset(config, val_split, train=False)
        print(json.dumps(evaluate_classification(trainer.model, dataset, trainer.device), indent=2))
        return
    eval_maps = config.dataset in ("synthetic", "cityscapes")
    dataset = build_dataset(config, val_split, train=False, eval_maps=eval_maps)
    result = evaluate_segmentation(trainer.model, dataset, trainer.device)
    if "cityscapes" in result:
        from ..metrics import format_report

        print(format_report(result["cityscapes"]))
    print(f"mean IoU {100 * result['mean_iou']:.2f}  pixel accuracy {100 * result['pixel_accuracy']:.2f}")
