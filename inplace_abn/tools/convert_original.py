"""``inplace-abn convert-original IN OUT``: a checkpoint of the original inplace_abn model zoo (its
ImageNet ``.pth.tar`` files, the Vistas snapshot) -> this package's format, read back by
``inplace_abn.models.load_original`` and loadable with ``torch.load(..., weights_only=True)``."""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="the original's checkpoint (e.g. wide_resnet38_deeplab_vistas.pth.tar)")
    parser.add_argument("output", metavar="OUT", help="file to write (written atomically)")
    parser.add_argument("--network", help="the network, where the file does not tell (default: inferred from the "
                                          "keys and shapes)")  # fmt: skip


def main(args: argparse.Namespace) -> int:
    import torch

    from ..models.zoo import OriginalFileError, converted_checkpoint, read_original
    from ..training.checkpoint import save_checkpoint

    try:
        weights = read_original(args.input, args.network)
    except (FileNotFoundError, OriginalFileError) as error:
        print(f"inplace-abn convert-original: error: {error}", file=sys.stderr)
        return 1
    save_checkpoint(converted_checkpoint(weights, args.input), args.output)
    written = torch.load(args.output, map_location="cpu", weights_only=True)["state_dict"]
    if written.keys() != weights.state_dict.keys() or any(
        not torch.equal(written[key], tensor) for key, tensor in weights.state_dict.items()
    ):
        print(f"inplace-abn convert-original: error: {args.output} does not read back as written", file=sys.stderr)
        return 1
    arguments = ", ".join(f"{key}={value!r}" for key, value in weights.kwargs.items())
    print(f"{args.input}: {weights.description or 'not a file of the original README (recognised by md5)'}")
    print(f"  network   {weights.network}({arguments})")
    print(f"  layers    {weights.norm} ({weights.activation} {weights.activation_param:g}), "
          f"{len(weights.state_dict)} tensors, {sum(t.numel() for t in weights.state_dict.values()):,} values")  # fmt: skip
    print(f"written to {args.output}; load with inplace_abn.models.load_original({args.output!r})")
    return 0
