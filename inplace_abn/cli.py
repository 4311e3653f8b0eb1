"""The ``inplace-abn`` console script: one subcommand per tool, each imported only when used.

A tool is a module under :mod:`inplace_abn.tools` with ``configure(parser)`` (add its arguments)
and ``main(args) -> int`` (run it). Tools may need the optional extras (``pip install
inplace-abn-next[train]``); the core library never imports them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module under inplace_abn.tools, one-line help)
COMMANDS = {
    "bench": ("bench", "memory and time of a network's training step: BatchNorm vs checkpointing vs InPlace-ABN"),
    "cityscapes-eval": ("cityscapes_eval", "Cityscapes pixel-level metrics (IoU / iIoU, classes and categories)"),
    "train": ("train", "train a segmentation or classification network"),
    "evaluate": ("evaluate", "evaluate a trained network and write predictions"),
    "demo": ("demo", "train the same small DeepLabV3 with BatchNorm and InPlace-ABN on built-in data, and compare"),
    "check-data": ("check_data", "read a whole dataset tree; list unreadable files, missing pairs, bad label ids"),
    "convert-checkpoint": ("convert_checkpoint", "rewrite a trusted old checkpoint so that it loads safely"),
    "convert-original": ("convert_original", "the original inplace_abn model zoo's checkpoints -> this package's format"),
}


#: what the tools import beyond torch (the ``train`` extra)
OPTIONAL_PACKAGES = {"numpy", "PIL", "tqdm", "matplotlib"}


def _load(command: str):
    return importlib.import_module(f"inplace_abn.tools.{COMMANDS[command][0]}")


def _input_error_message(error: BaseException):
    """The one-line message of a bad data file or a refused checkpoint (``None`` for other errors).
    Their classes are looked up among loaded modules, not imported: one of them can only have been
    raised by a module already loaded, and the command line stays free of the tools' packages."""
    data_errors = sys.modules.get("inplace_abn.data.errors")
    if data_errors is not None and isinstance(error, data_errors.DataError):
        return data_errors.message_of(error)  # also unwraps what a DataLoader worker raised
    checkpoint = sys.modules.get("inplace_abn.training.checkpoint")
    if checkpoint is not None and isinstance(error, checkpoint.CheckpointError):
        return str(error)
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="inplace-abn", description="In-Place Activated BatchNorm tools.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    available = {}
    for command, (module_name, help_text) in COMMANDS.items():
        try:
            module = _load(command)
        except ModuleNotFoundError as error:
            if error.name and error.name.startswith("inplace_abn.tools"):
                continue  # tool not built yet
            module = None
            help_text += f" [needs: pip install 'inplace-abn-next[train]' ({error.name} missing)]"
        sub = subparsers.add_parser(command, help=help_text, description=help_text)
        if module is not None:
            module.configure(sub)
        available[command] = module
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = available[args.command]
    if module is None:
        _load(args.command)  # raises the ModuleNotFoundError that names the missing package
    try:
        return int(module.main(args) or 0)
    except ModuleNotFoundError as error:
        package = (error.name or "").split(".")[0]
        if package not in OPTIONAL_PACKAGES:
            raise
        print(
            f"inplace-abn {args.command}: needs the optional package {package!r}, which is not installed. "
            "Install the tools' extras: pip install 'inplace-abn-next[train]'",
            file=sys.stderr,
        )
        return 2
    except Exception as error:
        message = _input_error_message(error)
        if message is None:
            raise
        print(f"inplace-abn {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
