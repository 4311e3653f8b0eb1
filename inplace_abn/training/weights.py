"""Trained networks from checkpoint files: this package's own checkpoints and the original
``inplace_abn``'s published files (through :func:`inplace_abn.models.load_original`), and the partial
initialisation of ``--init-from`` (the weights that fit are taken, the rest keeps its fresh values)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from .checkpoint import load_checkpoint

#: how the original's Vistas model sees its input (its test script): images scaled to a longest side
#: of 2048 pixels, then normalised with the Vistas training set's channel statistics
ORIGINAL_VISTAS_SETTINGS = {
    "dataset": "vistas",
    "image_mean": (0.41738699, 0.45732192, 0.46886091),
    "image_std": (0.25685097, 0.26509955, 0.29067996),
    "longest_side": 2048,
}


@dataclasses.dataclass
class LoadedNetwork:
    """A network with its weights, and what evaluating it needs to know."""

    model: torch.nn.Module
    num_classes: int
    task: str  # segmentation | classification
    source: str  # what the file was, in words
    config: Optional[Dict[str, Any]] = None  # the TrainConfig of this package's checkpoints
    settings: Dict[str, Any] = dataclasses.field(default_factory=dict)  # dataset, image_mean, ... of other files


def _is_own_checkpoint(state) -> bool:
    return isinstance(state, dict) and "config" in state and "model" in state


def _is_original_file(state) -> bool:
    return isinstance(state, dict) and "state_dict" in state


def _describe_keys(state) -> str:
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a dict"
    keys = sorted(map(str, state))
    return f"top-level keys {keys[:8]}{' ...' if len(keys) > 8 else ''}"


def load_original_network(path: str, state: Optional[dict] = None) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """The one place where the original's files come in: ``(network, settings)`` of an ImageNet
    ``.pth.tar`` or the Vistas snapshot, via :func:`inplace_abn.models.load_original`."""
    try:
        from ..models import load_original
    except ImportError:
        raise ValueError(
            f"{path} is a file of the original inplace_abn ('state_dict' at the top); reading it needs "
            "inplace_abn.models.load_original, which this installation does not have yet"
        ) from None
    model = load_original(path)
    settings: Dict[str, Any] = {}
    inner = (state or {}).get("state_dict", {})
    if isinstance(inner, dict) and {"body", "head", "cls"} <= set(inner):
        settings = dict(ORIGINAL_VISTAS_SETTINGS)
    return model, settings


def _num_classes_of(model: torch.nn.Module) -> int:
    """Outputs of the last layer that produces class scores (a Linear or the 1x1 classifier conv)."""
    last = None
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            last = module
    if last is None:
        raise ValueError("cannot tell the number of classes: the network has no Linear or Conv2d layer")
    return last.out_features if isinstance(last, torch.nn.Linear) else last.out_channels


def load_network(path: str, build=None) -> LoadedNetwork:
    """The network stored in ``path``, weights loaded, in eval mode.

    This package's checkpoints are rebuilt from their config with ``build(config, num_classes)``
    (default :func:`~inplace_abn.training.loop.build_model`); the original's files go through
    :func:`load_original_network`.
    """
    state = load_checkpoint(path)
    if _is_own_checkpoint(state):
        from .config import TrainConfig

        if build is None:
            from .loop import build_model as build
        config = TrainConfig.from_dict(dict(state["config"]), path)
        model = build(config, state["num_classes"])
        model.load_state_dict(state["model"])
        return LoadedNetwork(model.eval(), int(state["num_classes"]), config.task,
                             f"inplace-abn-next checkpoint (step {state.get('step', '?')})", config=state["config"])  # fmt: skip
    if _is_original_file(state):
        model, settings = load_original_network(path, state)
        task = "segmentation" if settings.get("dataset") == "vistas" else "classification"
        return LoadedNetwork(model.eval(), _num_classes_of(model), task, "original inplace_abn file",
                             settings=settings)  # fmt: skip
    raise ValueError(
        f"{path} is neither an inplace-abn-next checkpoint (keys 'config', 'model') nor a file of the original "
        f"inplace_abn (key 'state_dict'): it has {_describe_keys(state)}"
    )


def source_weights(path: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """``(state dict in this package's layout, description)`` of any file :func:`load_network` reads."""
    state = load_checkpoint(path)
    if _is_own_checkpoint(state):
        return dict(state["model"]), f"{path} (inplace-abn-next checkpoint of {state['config'].get('network')})"
    if _is_original_file(state):
        model, _ = load_original_network(path, state)
        return model.state_dict(), f"{path} (original inplace_abn file)"
    raise ValueError(
        f"--init-from {path}: neither an inplace-abn-next checkpoint (keys 'config', 'model') nor a file of the "
        f"original inplace_abn (key 'state_dict'): it has {_describe_keys(state)}"
    )


# ------------------------------------------------------------------------------------------------
# --init-from


@dataclasses.dataclass
class InitReport:
    """What ``--init-from`` did, key by key: ``taken`` from the checkpoint; ``reinitialised``: the
    network's keys that kept their fresh values (with the reason); ``left_out``: checkpoint keys the
    network has no place for."""

    source: str
    key_map: str  # how checkpoint keys were renamed to fit the network
    taken: List[str]
    reinitialised: Dict[str, str]
    left_out: List[str]

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        def groups(keys) -> str:
            counts: Dict[str, int] = {}
            for key in keys:
                prefix = ".".join(key.split(".")[:2])
                counts[prefix] = counts.get(prefix, 0) + 1
            return ", ".join(f"{prefix}.* ({count})" for prefix, count in counts.items()) or "none"

        return "\n".join([
            f"init from {self.source} ({self.key_map})",
            f"  taken: {len(self.taken)} tensors: {groups(self.taken)}",
            f"  re-initialised: {len(self.reinitialised)}: {groups(self.reinitialised)}",
            f"  left out: {len(self.left_out)}: {groups(self.left_out)}",
        ])  # fmt: skip

    def write(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as file:
            json.dump(self.to_dict(), file, indent=2)


# Checkpoint keys -> network keys: a classifier's ``features.*`` are a segmentation network's
# ``backbone.features.*`` and the other way round; DistributedDataParallel prefixes ``module.``.
_KEY_MAPS = (
    ("keys as they are", lambda key: key),
    ("'backbone.' prefixed", lambda key: "backbone." + key),
    ("'backbone.' removed", lambda key: key[len("backbone."):] if key.startswith("backbone.") else None),
)


def init_from_state_dict(model: torch.nn.Module, source: Dict[str, torch.Tensor], source_name: str) -> InitReport:
    """Copy into ``model`` every tensor of ``source`` whose (renamed) key and shape match one of the
    network's; the renaming of :data:`_KEY_MAPS` that fits the most tensors is used. A checkpoint of
    which nothing fits is an error (a wrong file or network)."""
    source = {(key[len("module."):] if key.startswith("module.") else key): value for key, value in source.items()}
    target = model.state_dict()
    best = None
    for description, rename in _KEY_MAPS:
        renamed = {}
        for key, value in source.items():
            new_key = rename(key)
            if new_key is not None:
                renamed[new_key] = (key, value)
        fits = [key for key, (_, value) in renamed.items()
                if key in target and tuple(value.shape) == tuple(target[key].shape)]  # fmt: skip
        if best is None or len(fits) > len(best[2]):
            best = (description, renamed, fits)
    description, renamed, taken = best
    if not taken:
        raise ValueError(
            f"--init-from {source_name}: none of its {len(source)} tensors fits the network (by name and shape); "
            f"its keys look like {sorted(source)[:3]}, the network's like {sorted(target)[:3]}"
        )
    taken_set = set(taken)
    reinitialised = {}
    for key, value in target.items():
        if key in taken_set:
            continue
        if key in renamed:
            there = tuple(renamed[key][1].shape)
            reinitialised[key] = f"shape {list(there)} in the checkpoint, {list(value.shape)} here"
        else:
            reinitialised[key] = "not in the checkpoint"
    used_sources = {renamed[key][0] for key in taken}
    left_out = sorted(key for key in source if key not in used_sources)
    model.load_state_dict({key: renamed[key][1] for key in taken}, strict=False)
    return InitReport(source_name, description, sorted(taken), reinitialised, left_out)


def init_from_checkpoint(model: torch.nn.Module, path: str) -> InitReport:
    """``--init-from PATH``: :func:`init_from_state_dict` with the weights of any file :func:`load_network`
    reads (this package's checkpoints, the original's ImageNet and Vistas files)."""
    weights, description = source_weights(path)
    return init_from_state_dict(model, weights, description)
