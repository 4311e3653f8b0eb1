"""Trained networks from checkpoint files: this package's own checkpoints and the original
``inplace_abn``'s published files (through :func:`inplace_abn.models.zoo.read_original`), and the partial
initialisation of ``--init-from`` (the weights that fit are taken, the rest keeps its fresh values)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from .checkpoint import load_checkpoint


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


def read_original_weights(path: str):
    """The one place where the original's files come in: :func:`inplace_abn.models.zoo.read_original`
    (an ``OriginalWeights``: ``network``, builder ``kwargs``, ``state_dict`` in this package's layout,
    ``norm``, ``preprocessing``, ``build()``). It reads the file again, safely: a one-off at start."""
    from ..models.zoo import read_original

    return read_original(path)


def _original_settings(weights) -> Dict[str, Any]:
    """The TrainConfig data settings that feed an original network what the original fed it
    (``weights.preprocessing``: its Vistas model's images at a longest side of 2048 with the Vistas
    statistics; its ImageNet classifiers' 224 center crops with ImageNet's)."""
    preprocessing = dict(weights.preprocessing)
    settings: Dict[str, Any] = {}
    if "mean" in preprocessing:
        settings["image_mean"] = tuple(preprocessing["mean"])
        settings["image_std"] = tuple(preprocessing["std"])
    if preprocessing.get("longest_side"):
        settings["longest_side"] = int(preprocessing["longest_side"])
    if preprocessing.get("crop"):
        settings["crop_size"] = (int(preprocessing["crop"]),) * 2
    if weights.network.startswith("deeplabv3_") and weights.kwargs.get("num_classes") == 65:
        settings["dataset"] = "vistas"
    return settings


def load_network(path: str, build=None) -> LoadedNetwork:
    """The network stored in ``path``, weights loaded, in eval mode.

    This package's checkpoints are rebuilt from their config with ``build(config, num_classes)``
    (default :func:`~inplace_abn.training.loop.build_model`); the original's files go through
    :func:`read_original_weights`.
    """
    state = load_checkpoint(path)
    if _is_own_checkpoint(state):
        from .config import TrainConfig

        if build is None:
            from .loop import build_model as build
        config = TrainConfig.from_dict(dict(state["config"]), path)
        model = build(config, state["num_classes"])
        model.load_state_dict(state["model"])
        source = f"inplace-abn-next checkpoint (step {state.get('step', '?')})"
        return LoadedNetwork(model.eval(), int(state["num_classes"]), config.task, source, config=state["config"])
    if _is_original_file(state):
        del state
        weights = read_original_weights(path)
        task = "segmentation" if weights.network.startswith("deeplabv3_") else "classification"
        return LoadedNetwork(weights.build().eval(), int(weights.kwargs["num_classes"]), task,
                             f"original inplace_abn file: {weights.description or weights.network}",
                             settings=_original_settings(weights))  # fmt: skip
    raise ValueError(
        f"{path} is neither an inplace-abn-next checkpoint (keys 'config', 'model') nor a file of the original "
        f"inplace_abn (key 'state_dict'): it has {_describe_keys(state)}"
    )


#: norms whose weights mean the same: InPlace-ABN and ABN scale by ``|weight| + eps``, BatchNorm by ``weight``
_SCALE_CONVENTION = {"inplace_abn": "|weight| + eps", "abn": "|weight| + eps", "batchnorm": "weight"}


def source_weights(path: str, norm: str) -> Tuple[Dict[str, torch.Tensor], str, str]:
    """``(state dict in this package's layout, description, its norm)`` of any file :func:`load_network`
    reads, for a network whose layers are ``norm``. The original's files come in ``norm``'s scale
    convention (the zoo converts a standard-BN file exactly, or refuses); this package's checkpoints
    as they were trained."""
    state = load_checkpoint(path)
    if _is_own_checkpoint(state):
        config = state["config"]
        return dict(state["model"]), f"{path} (inplace-abn-next checkpoint of {config.get('network')})", config["norm"]
    if _is_original_file(state):
        del state
        weights = read_original_weights(path)
        description = f"{path} (original inplace_abn {weights.network})"
        if _SCALE_CONVENTION[weights.norm] == _SCALE_CONVENTION[norm]:
            return dict(weights.state_dict), description, weights.norm
        from ..models import norm_act

        layers = norm_act.batchnorm_act() if norm == "batchnorm" else norm_act.inplace_abn()
        return weights.build(norm_act=layers).state_dict(), f"{description}, scales converted to {norm}'s", norm
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


def _key_maps(model: torch.nn.Module):
    """Renamings of checkpoint keys to try: as they are; and, for a network holding a backbone (a
    segmentation network), a classifier's keys under the backbone's name, or the other way round,
    keys with their first component removed. DistributedDataParallel's ``module.`` is always removed."""
    from ..models.blocks import Backbone

    maps = [("keys as they are", lambda key: key)]
    inner = next((name for name, module in model.named_modules() if name and isinstance(module, Backbone)), None)
    if inner is not None:
        maps.append((f"'{inner}.' prefixed", lambda key: f"{inner}.{key}"))
    maps.append(("first key component removed", lambda key: key.split(".", 1)[1] if "." in key else None))
    return maps


def _whole_layers(fits, target) -> List[str]:
    """The keys of ``fits`` whose layer (key prefix) fits whole: every tensor of the layer but its 0-d
    counters (``num_batches_tracked``, absent from older files) is in ``fits``. A layer is taken
    whole or not at all: a 19-class bias beside a fresh 65-class weight would be neither."""
    fitting = set(fits)
    layers: Dict[str, List[str]] = {}
    for key in target:
        layers.setdefault(key.rsplit(".", 1)[0], []).append(key)
    taken = []
    for keys in layers.values():
        weights = [key for key in keys if target[key].ndim > 0]
        if weights and all(key in fitting for key in weights):
            taken += [key for key in keys if key in fitting]
    return taken


def init_from_state_dict(model: torch.nn.Module, source: Dict[str, torch.Tensor], source_name: str) -> InitReport:
    """Copy into ``model`` every layer of ``source`` whose (renamed) keys and shapes all match one of
    the network's; the renaming (:func:`_key_maps`) that fits the most tensors is used. A checkpoint
    of which nothing fits is an error (a wrong file or network)."""
    source = {(key[len("module."):] if key.startswith("module.") else key): value for key, value in source.items()}
    target = model.state_dict()
    best = None
    for description, rename in _key_maps(model):
        renamed = {}
        for key, value in source.items():
            new_key = rename(key)
            if new_key is not None:
                renamed[new_key] = (key, value)
        fits = [key for key, (_, value) in renamed.items()
                if key in target and tuple(value.shape) == tuple(target[key].shape)]  # fmt: skip
        taken = _whole_layers(fits, target)
        if best is None or len(taken) > len(best[2]):
            best = (description, renamed, taken)
    description, renamed, taken = best
    if not taken:
        raise ValueError(
            f"--init-from {source_name}: none of its {len(source)} tensors fits the network (whole layers, by name "
            f"and shape); its keys look like {sorted(source)[:3]}, the network's like {sorted(target)[:3]}"
        )
    taken_set = set(taken)
    reinitialised = {}
    for key, value in target.items():
        if key in taken_set:
            continue
        if key not in renamed:
            reinitialised[key] = "not in the checkpoint"
        elif tuple(renamed[key][1].shape) != tuple(value.shape):
            reinitialised[key] = f"shape {list(renamed[key][1].shape)} in the checkpoint, {list(value.shape)} here"
        else:
            reinitialised[key] = "its layer's other tensors do not fit"
    used_sources = {renamed[key][0] for key in taken}
    left_out = sorted(key for key in source if key not in used_sources)
    model.load_state_dict({key: renamed[key][1] for key in taken}, strict=False)
    return InitReport(source_name, description, sorted(taken), reinitialised, left_out)


def init_from_checkpoint(model: torch.nn.Module, path: str, norm: str) -> InitReport:
    """``--init-from PATH``: :func:`init_from_state_dict` with the weights of any file :func:`load_network`
    reads (this package's checkpoints, the original's ImageNet and Vistas files), for a network whose
    normalisation layers are ``norm``. Weights trained for a norm of another scale convention are
    refused: loaded as they are, they would compute something else."""
    weights, description, source_norm = source_weights(path, norm)
    if _SCALE_CONVENTION.get(source_norm) != _SCALE_CONVENTION[norm]:
        raise ValueError(
            f"--init-from {description}: its norm layers are {source_norm!r} "
            f"(scale {_SCALE_CONVENTION.get(source_norm)}), "
            f"this run's are {norm!r} (scale {_SCALE_CONVENTION[norm]}): the weights would not mean the same. Train "
            f"with norm {source_norm!r}, or convert the checkpoint's network first (inplace_abn.convert_to_abn turns "
            "BatchNorm weights into exact InPlace-ABN ones)"
        )
    return init_from_state_dict(model, weights, description)
