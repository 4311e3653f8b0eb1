"""``inplace-abn convert-checkpoint --trust OLD NEW``: rewrite a checkpoint you trust, which holds more
than tensors and plain data (e.g. NumPy generator states, as older versions wrote), into one that
loads with ``torch.load(weights_only=True)``. Reading the old file runs whatever code it carries:
only for files you wrote yourself or otherwise trust."""

from __future__ import annotations

import argparse
import collections
import sys
from typing import Any

_PLAIN = (str, bytes, int, float, bool, complex, type(None))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="the trusted checkpoint to convert")
    parser.add_argument("output", help="where to write the converted copy (the original is left as it is)")
    parser.add_argument("--trust", action="store_true",
                        help="required: you trust the file (reading it may run code it carries)")  # fmt: skip


def plain(value: Any, where: str = "checkpoint") -> Any:
    """``value`` with NumPy arrays and scalars turned into tensors and numbers; anything else that a
    ``weights_only`` load refuses raises ``TypeError`` naming where it sits."""
    import torch

    if isinstance(value, (torch.Tensor, torch.dtype, torch.device, torch.Size) + _PLAIN):
        return value
    if type(value) in (dict, collections.OrderedDict):  # state dicts stay OrderedDicts
        converted = type(value)()
        for key, item in value.items():
            converted[plain(key, where)] = plain(item, f"{where}[{key!r}]")
        return converted
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(plain(item, f"{where}[{i}]") for i, item in enumerate(value))
    module = type(value).__module__.split(".")[0]
    if module == "numpy":
        import numpy as np

        if isinstance(value, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, np.generic):
            return value.item()
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    raise TypeError(f"{where} is of type {kind}, which a safe load refuses; turn it into tensors, numbers, "
                    "strings, lists or dicts by hand")  # fmt: skip


def main(args: argparse.Namespace) -> int:
    import os

    import torch

    from ..training.checkpoint import plain_numpy_state, load_checkpoint, save_checkpoint

    if not args.trust:
        print(f"inplace-abn convert-checkpoint: reading {args.checkpoint} may run code it carries; convert only a "
              "file you trust, and say so with --trust", file=sys.stderr)  # fmt: skip
        return 2
    if os.path.abspath(args.output) == os.path.abspath(args.checkpoint):
        print("inplace-abn convert-checkpoint: write the copy to another path; the original stays as it is",
              file=sys.stderr)  # fmt: skip
        return 2
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)  # trusted, by --trust
    rng = state.get("rng") if isinstance(state, dict) else None
    if isinstance(rng, dict) and isinstance(rng.get("numpy"), tuple):  # NumPy's legacy state tuple
        rng["numpy"] = plain_numpy_state(rng["numpy"])
    try:
        converted = plain(state)
    except TypeError as error:
        print(f"inplace-abn convert-checkpoint: cannot convert {args.checkpoint}: {error}", file=sys.stderr)
        return 1
    save_checkpoint(converted, args.output)
    load_checkpoint(args.output)  # proves that the copy loads safely
    print(f"{args.output}: written; it loads with weights_only=True")
    return 0
