"""The original inplace_abn model zoo (mapillary/inplace_abn): read its published ImageNet and Vistas
checkpoint files, safely (tensors and plain data only), into this package's networks."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..modules import ABN

__all__ = [
    "CONVERTED_FORMAT", "IMAGENET_PREPROCESSING", "PUBLISHED_FILES", "VISTAS_PREPROCESSING", "OriginalFileError", "OriginalWeights", "converted_checkpoint",
    "init_from_original", "load_original", "load_weights", "read_original", "weights_from_checkpoint",
]

#: ``format`` of the files ``inplace-abn convert-original`` writes (see :func:`converted_checkpoint`)
CONVERTED_FORMAT = "inplace-abn-next/original-weights/1"

#: The eps of every layer of the published models (the original's default): their InPlace-ABN scale
#: is ``|weight| + ORIGINAL_EPS``.
ORIGINAL_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class PublishedFile:
    network: str
    norm: str
    description: str


#: md5 of each file of the original's README (v1 release) -> what it is. Recognising a file matters
#: for one of them: the standard-BN ResNeXt-101, whose layers scale by ``weight``, not ``|weight| + eps``.
PUBLISHED_FILES = {
    "448438885986d14db5e870b95f814f91": PublishedFile("resnext101_64x2d", "batchnorm",
                                                      "ResNeXt-101, standard BN (ImageNet top-1 77.04)"),
    "3b7a221cbc076410eb12c8dd361b7e4e": PublishedFile("resnext101_64x2d", "inplace_abn",
                                                      "ResNeXt-101, InPlace-ABN (ImageNet top-1 78.08)"),
    "2c8d572587961ed74611d534c5b2e9ce": PublishedFile("resnext152_64x2d", "inplace_abn",
                                                      "ResNeXt-152, InPlace-ABN (ImageNet top-1 78.28)"),
    "1c085ab70b789cc1d6c1594f7a761007": PublishedFile("wider_resnet38", "inplace_abn",
                                                      "WideResNet-38, InPlace-ABN (ImageNet top-1 79.72)"),
    "0a85a21847b15e5a242e17bf3b753849": PublishedFile("resnext101_64x2d", "inplace_abn",
                                                      "ResNeXt-101, InPlace-ABN sync (ImageNet top-1 77.70)"),
    "0b413d67b725619441d0646d663865bf": PublishedFile("densenet264", "inplace_abn",
                                                      "DenseNet-264, InPlace-ABN (ImageNet top-1 78.57)"),
    "2522ca639f7fdfd7c0089ba1f5f6c2e8": PublishedFile("resnet50_v1", "inplace_abn",
                                                      "ResNet-50 v1, InPlace-ABN sync (ImageNet top-1 75.53)"),
    "61515c1484911c3cc753d405131e1dda": PublishedFile("resnet34_v1", "inplace_abn",
                                                      "ResNet-34 v1, InPlace-ABN sync (ImageNet top-1 73.27)"),
    "1552ae0f3d610108df702135f56bd27b": PublishedFile("resnet101_v1", "inplace_abn",
                                                      "ResNet-101 v1, InPlace-ABN sync (ImageNet top-1 77.07)"),
    "913f78486a34aa1577a7cd295e8a33bb": PublishedFile("deeplabv3_wider_resnet38_a2", "inplace_abn",
                                                      "WideResNet-38-A2 + DeepLabV3, Mapillary Vistas (val mIoU 53.42)"),
}

NORMS = ("inplace_abn", "batchnorm")

#: The inputs the original's networks were trained on: RGB in [0, 1], minus ``mean``, over ``std``.
#: ImageNet (its scripts/imagenet/config.py): shorter side resized to 256, 224 center crop.
#: Vistas (its test_vistas_single_gpu.py): longer side resized to 2048 (bilinear), whole image.
IMAGENET_PREPROCESSING = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "resize": 256, "crop": 224}
VISTAS_PREPROCESSING = {"mean": (0.41738699, 0.45732192, 0.46886091), "std": (0.25685097, 0.26509955, 0.29067996),
                        "longest_side": 2048}


class OriginalFileError(ValueError):
    """A file that is not one of the original's checkpoints, fits no known network, or would need
    code from the file to load."""


@dataclasses.dataclass
class OriginalWeights:
    """The weights of one original checkpoint, in this package's layout.

    Attributes:
        network: the name :func:`inplace_abn.models.build` takes (``"resnext101_64x2d"``,
            ``"deeplabv3_wider_resnet38_a2"``, ...).
        kwargs: the builder arguments that give the original's network (``num_classes``,
            ``input_3x3``, ``output_stride``, ``pooling_size``, ``width_multiplier``, ...).
        state_dict: parameter and buffer tensors, keyed as in ``build(network, **kwargs)``.
        norm: ``"inplace_abn"`` (scale ``|weight| + eps``, the original's InPlace-ABN layers) or
            ``"batchnorm"`` (scale ``weight``: the original's standard-BN ``ABN``).
        activation, activation_param: the activation of every norm layer (leaky_relu 0.01 in all
            published files).
        description: what the file is, where it is known (a published file recognised by its md5).
        preprocessing: the input the original fed its network (:data:`IMAGENET_PREPROCESSING` or
            :data:`VISTAS_PREPROCESSING`).
    """

    network: str
    kwargs: Dict[str, Any]
    state_dict: Dict[str, torch.Tensor]
    norm: str = "inplace_abn"
    activation: str = "leaky_relu"
    activation_param: float = 0.01
    description: str = ""
    preprocessing: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def norm_act(self) -> Callable[[int], nn.Module]:
        """The ``norm_act`` that computes what the original's layers computed with these weights:
        InPlace-ABN, or standard BatchNorm + activation for ``norm="batchnorm"``."""
        from . import norm_act

        if self.norm == "batchnorm":
            return norm_act.batchnorm_act(self.activation, self.activation_param)
        return norm_act.inplace_abn(self.activation, self.activation_param)

    def build(self, norm_act: Optional[Callable[[int], nn.Module]] = None, **overrides) -> nn.Module:
        """The network with these weights in it, in training mode. ``norm_act`` replaces the layers'
        type (an InPlace-ABN scale is converted exactly for BatchNorm layers and back); ``overrides``
        replace builder arguments (``output_stride``, ``pooling_size``, ...: they change the function)."""
        from . import build

        model = build(self.network, norm_act=norm_act or self.norm_act(), **{**self.kwargs, **overrides})
        load_weights(model, self.state_dict, self.norm)
        return model


# --------------------------------------------------------------------------------------------------
# Public entry points


def read_original(path: str, network: Optional[str] = None) -> OriginalWeights:
    """Read an original checkpoint (or one written by ``inplace-abn convert-original``) without
    running code from it; ``network`` (a :func:`~inplace_abn.models.build` name) is inferred from the
    keys and shapes when not given. Raises :class:`OriginalFileError` naming what did not match."""
    checksum = _md5(path)
    checkpoint = _load_tensors_only(path)
    published = PUBLISHED_FILES.get(checksum)
    return weights_from_checkpoint(checkpoint, network, source=path, published=published)


def load_original(path: str, network: Optional[str] = None, *, norm_act=None, **overrides) -> nn.Module:
    """The network of an original checkpoint, with its weights, in eval mode: outputs equal the
    original's (``.train()`` to fine-tune). ``norm_act`` replaces the layers' type (e.g.
    ``functools.partial(InPlaceABNSync, activation="leaky_relu", activation_param=0.01)`` for
    distributed fine-tuning); ``overrides`` replace builder arguments (e.g. ``pooling_size``)."""
    return read_original(path, network).build(norm_act, **overrides).eval()


def init_from_original(model: nn.Module, path: str) -> List[str]:
    """Load an original checkpoint's weights into ``model``: the same network, or a DeepLabV3 whose
    ``body`` is the file's classifier network (the ImageNet initialization of a segmentation
    network; the classifier is then skipped). Returns the keys of the file that were not loaded;
    raises :class:`OriginalFileError` where shapes or names do not fit."""
    weights = read_original(path)
    state = dict(weights.state_dict)
    target = model
    if not set(state) & set(model.state_dict()) and isinstance(getattr(model, "body", None), nn.Module):
        target = model.body  # a classifier's weights into a segmentation network's body
    expected = target.state_dict()
    classifier = [key for key in state if key.startswith("classifier.")]
    # A classifier for other classes (or none) starts afresh: its weights are left out, and returned.
    skipped = classifier if any(key not in expected or expected[key].shape != state[key].shape
                                for key in classifier) else []
    for key in skipped:
        del state[key]
    mismatch = _mismatch(expected, state)
    if mismatch:
        raise OriginalFileError(f"{path} ({weights.network}) does not fit {type(target).__name__}: {mismatch}")
    load_weights(target, state, weights.norm)
    return skipped


def weights_from_checkpoint(checkpoint: Mapping, network: Optional[str] = None, source: str = "checkpoint",
                            published: Optional[PublishedFile] = None) -> OriginalWeights:
    """:func:`read_original` on a checkpoint already in memory (what ``torch.load`` returned): a dict
    with ``state_dict`` (the original's ImageNet files: keys maybe prefixed ``module.``; the Vistas
    snapshot: ``body``, ``head`` and ``cls``), a bare state dict, or a converted file's contents."""
    if not isinstance(checkpoint, Mapping):
        raise OriginalFileError(f"{source} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    if checkpoint.get("format") == CONVERTED_FORMAT:
        return _from_converted(checkpoint, network, source)
    state, arch = _original_state_dict(checkpoint, source)
    norm, description = "inplace_abn", ""
    if published is not None:
        norm, description = published.norm, published.description
        network = network or published.network
    inferred_network, kwargs = _infer(state, arch, source, hint=network)
    if network is None:
        network = inferred_network
    elif _family(network) != _family(inferred_network):
        kwargs = {}  # the inferred arguments belong to another family; the shape check below explains
    state = _complete(network, kwargs, state, source)
    preprocessing = VISTAS_PREPROCESSING if network.startswith("deeplabv3_") else IMAGENET_PREPROCESSING
    return OriginalWeights(network, kwargs, state, norm, description=description, preprocessing=dict(preprocessing))


def converted_checkpoint(weights: OriginalWeights, source: str = "") -> Dict[str, Any]:
    """What ``inplace-abn convert-original`` writes: tensors and plain data only (it loads with
    ``torch.load(..., weights_only=True)``), read back by :func:`read_original`."""
    return {
        "format": CONVERTED_FORMAT,
        "network": weights.network,
        "kwargs": dict(weights.kwargs),
        "norm": weights.norm,
        "activation": weights.activation,
        "activation_param": float(weights.activation_param),
        "description": weights.description,
        "preprocessing": dict(weights.preprocessing),
        "source": os.path.basename(source),
        "state_dict": {key: tensor.detach().cpu().contiguous() for key, tensor in weights.state_dict.items()},
    }


# --------------------------------------------------------------------------------------------------
# Reading files


def _md5(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found")
    digest = hashlib.md5(usedforsecurity=False)  # identifies a file, guards nothing
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load_tensors_only(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        message = str(error)
        found = re.search(r"GLOBAL ([\w.]+)", message)
        if found:
            raise OriginalFileError(
                f"{path} refused: loading it would call {found.group(1)}, code named by the file, and checkpoints "
                "are read as tensors and plain data only (torch.load with weights_only=True), so that a file "
                "cannot run code. The original's published files need nothing more. If you trust this file, "
                "load it yourself (torch.load(path, weights_only=False)) and pass the result to "
                "inplace_abn.models.zoo.weights_from_checkpoint."
            ) from None
        detail = message.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].strip()
        raise OriginalFileError(f"{path} is not a PyTorch checkpoint that can be read ({detail})") from None
    except (RuntimeError, EOFError) as error:  # a truncated or foreign file
        raise OriginalFileError(f"{path} is not a PyTorch checkpoint that can be read ({error or 'empty'})") from None


def _original_state_dict(checkpoint: Mapping, source: str) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    """The flat state dict of an original checkpoint, without DistributedDataParallel's ``module.``;
    the Vistas snapshot's ``body`` / ``head`` / ``cls`` become key prefixes. Also the ``arch`` the
    ImageNet training script records, where present."""
    arch = checkpoint.get("arch") if isinstance(checkpoint.get("arch"), str) else None
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise OriginalFileError(f"{source}: 'state_dict' holds a {type(state).__name__}, not a dict of tensors")
    flat: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, Mapping):  # the Vistas snapshot: one state dict per part
            for inner_key, tensor in value.items():
                flat[f"{key}.{inner_key}"] = tensor
        else:
            flat[key] = value
    if flat and all(key.startswith("module.") for key in flat):
        flat = {key[len("module."):]: value for key, value in flat.items()}
    not_tensors = [key for key, value in flat.items() if not isinstance(value, torch.Tensor)]
    if not flat or not_tensors:
        what = f"entries that are not tensors: {', '.join(not_tensors[:5])}" if flat else "no tensors"
        raise OriginalFileError(f"{source} is not a state dict of the original's networks ({what})")
    return flat, arch


def _from_converted(checkpoint: Mapping, network: Optional[str], source: str) -> OriginalWeights:
    if network is not None and network != checkpoint["network"]:
        raise OriginalFileError(f"{source} holds {checkpoint['network']}, not {network}")
    if checkpoint["norm"] not in NORMS:
        raise OriginalFileError(f"{source}: unknown norm {checkpoint['norm']!r} (expected one of {NORMS})")
    return OriginalWeights(checkpoint["network"], dict(checkpoint["kwargs"]), dict(checkpoint["state_dict"]),
                           checkpoint["norm"], checkpoint["activation"], checkpoint["activation_param"],
                           checkpoint.get("description", ""), dict(checkpoint.get("preprocessing", {})))


# --------------------------------------------------------------------------------------------------
# Inferring the network from keys and shapes


def _family(network: str) -> str:
    """Networks of one family share a constructor, so the builder arguments inferred for one fit another."""
    if network.startswith("deeplabv3_"):
        return "deeplabv3"
    if network.endswith("_v1"):
        return "resnet_v1"
    for family, prefixes in (("resnet", ("resnet", "resnext")), ("wider_resnet", ("wider_resnet",)),
                             ("densenet", ("densenet",))):
        if network.startswith(prefixes):
            return family
    return network


def _blocks(state: Mapping[str, torch.Tensor], module: str, pattern: str) -> int:
    """How many distinct indices ``pattern`` (a regex with one group) takes under ``module``."""
    expression = re.compile(re.escape(module) + pattern)
    return len({match.group(1) for match in map(expression.match, state) if match})


#: blocks per module -> depth
_WIDER_RESNET_DEPTHS = {(1, 1, 1, 1, 1, 1): 16, (1, 1, 1, 3, 1, 1): 20, (3, 3, 6, 3, 1, 1): 38}
#: (blocks per stage, bottleneck) -> depth: ResNet v1 and the pre-activation ResNet / ResNeXt alike
_RESNET_DEPTHS = {
    ((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34, ((3, 4, 6, 3), True): 50, ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}
#: layers per dense module -> depth
_DENSENET_DEPTHS = {(6, 12, 24, 16): 121, (6, 12, 32, 32): 169, (6, 12, 48, 32): 201, (6, 12, 64, 48): 264}


def _infer(state: Mapping[str, torch.Tensor], arch: Optional[str], source: str,
           hint: Optional[str] = None) -> Tuple[str, Dict[str, Any]]:
    """``(network, kwargs)`` of a flat original state dict; ``arch`` (the ImageNet files' record) or
    ``hint`` (the network asked for) decide what the weights cannot: WiderResNet or its A2 variant."""
    if "cls.weight" in state and any(key.startswith("body.") for key in state):
        return _infer_segmentation(state, source, hint)
    a2 = None
    for name in (hint, arch):
        if name is not None and name.startswith("wider_resnet"):
            a2 = name.endswith("_a2")
            break
    return _infer_backbone(state, a2, source)


def _infer_segmentation(state: Mapping[str, torch.Tensor], source: str,
                        hint: Optional[str]) -> Tuple[str, Dict[str, Any]]:
    body = {key[len("body."):]: value for key, value in state.items() if key.startswith("body.")}
    a2 = hint is None or hint.endswith("_a2")  # the original's segmentation body is A2
    backbone, kwargs = _infer_backbone(body, a2, source)
    if "head.map_convs.0.weight" not in state:
        raise OriginalFileError(f"{source}: a segmentation snapshot (body, cls) whose head is not the original's "
                                "DeeplabV3 (no head.map_convs.0.weight)")
    kwargs.pop("num_classes")
    # The original's Vistas model (its test_vistas.py): dilated body (output stride 8), head rates
    # 12 / 24 / 36, sliding 84x84 image pooling at test time.
    kwargs.update(num_classes=state["cls.weight"].shape[0], hidden_channels=state["head.map_convs.0.weight"].shape[0],
                  output_stride=8, pooling_size=(84, 84))
    return "deeplabv3_" + backbone, kwargs


def _width(channels: int, base: int) -> Dict[str, Any]:
    if channels == base:
        return {}
    return {"width_multiplier": channels / base}


def _infer_backbone(state: Mapping[str, torch.Tensor], a2: Optional[bool], source: str) -> Tuple[str, Dict[str, Any]]:
    """``(network, kwargs)`` of a classification network's state dict; ``a2``: whether a WiderResNet
    is the A2 variant (None: unknown)."""
    stem = state.get("mod1.conv1.weight")
    if stem is None or stem.dim() != 4:
        top = {key.split(".")[0] for key in state}
        raise OriginalFileError(
            f"{source} fits no known network: no mod1.conv1.weight (the stem of every network of the original's "
            f"scripts/models); its keys start with {', '.join(sorted(top)[:8])}"
        )
    kwargs: Dict[str, Any] = {"num_classes": state["classifier.fc.weight"].shape[0]
                              if "classifier.fc.weight" in state else 0}
    stem_channels = stem.shape[0]
    if "mod7.block1.bn1.weight" in state:  # WiderResNet: six modules after the 3x3 stem
        structure = tuple(_blocks(state, f"mod{index}.", r"block(\d+)\.") for index in range(2, 8))
        depth = _WIDER_RESNET_DEPTHS.get(structure)
        if depth is None:
            raise OriginalFileError(f"{source}: a WiderResNet with {structure} blocks per module, not 16, 20 or 38")
        if a2 is None:
            raise OriginalFileError(
                f"{source}: wider_resnet{depth} and wider_resnet{depth}_a2 have the same weights and the file does "
                "not say which it is (no 'arch'); pass network='wider_resnet38' (the ImageNet model) or "
                "network='wider_resnet38_a2'"
            )
        return f"wider_resnet{depth}" + ("_a2" if a2 else ""), {**kwargs, **_width(stem_channels, 64)}
    structure = tuple(_blocks(state, f"mod{index}.", r"block(\d+)\.") for index in range(2, 6))
    if "mod2.block1.convs.bn1.weight" in state:  # post-activation blocks: ResNet v1
        bottleneck = "mod2.block1.convs.conv3.weight" in state
        depth = _RESNET_DEPTHS.get((structure, bottleneck))
        if depth is None:
            raise OriginalFileError(f"{source}: a ResNet v1 with {structure} {'bottleneck' if bottleneck else 'basic'} "
                                    "blocks per stage, not ResNet-18/34/50/101/152")
        return f"resnet{depth}_v1", {**kwargs, **_width(stem_channels, 64)}
    kwargs["input_3x3"] = "mod1.conv2.weight" in state
    if "mod2.block1.bn1.weight" in state:  # pre-activation blocks: the original's ResNeXt layout
        bottleneck = "mod2.block1.convs.conv3.weight" in state
        depth = _RESNET_DEPTHS.get((structure, bottleneck))
        if depth is None:
            raise OriginalFileError(f"{source}: a pre-activation network with {structure} "
                                    f"{'bottleneck' if bottleneck else 'basic'} blocks per stage, not ResNet-18/34/50/"
                                    "101/152 or ResNeXt-50/101/152")
        grouped = state["mod2.block1.convs.conv2.weight"]
        groups = grouped.shape[0] // grouped.shape[1]
        network = f"resnet{depth}" if groups == 1 else f"resnext{depth}_{groups}x{128 // groups}d"
        from . import BACKBONES

        if network not in BACKBONES:
            raise OriginalFileError(f"{source}: a ResNeXt-{depth} with {groups} groups; the known ones have 32 or 64")
        return network, {**kwargs, **_width(stem_channels, 64)}
    if "mod2.convs1.0.bn.weight" in state:  # DenseNet
        structure = tuple(_blocks(state, f"mod{index}.", r"convs1\.(\d+)\.") for index in range(2, 6))
        depth = _DENSENET_DEPTHS.get(structure)
        if depth is None:
            raise OriginalFileError(f"{source}: a DenseNet with {structure} layers per block, not 121/169/201/264")
        growth = state["mod2.convs3.0.conv.weight"].shape[0]
        return f"densenet{depth}", {**kwargs, **_width(growth, 32)}
    raise OriginalFileError(
        f"{source} fits no known network: it has mod1.conv1.weight but none of the block layouts of the "
        "original's WiderResNet (mod7.block1.bn1), ResNet (mod2.block1.convs.bn1), ResNeXt (mod2.block1.bn1) "
        "or DenseNet (mod2.convs1.0.bn)"
    )


def _mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> str:
    """What keeps ``found`` from loading where ``expected`` is (empty when it fits); a missing
    ``num_batches_tracked`` is no mismatch (the original's files have none)."""
    missing = [key for key in expected if key not in found and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in found if key not in expected]
    shapes = [f"{key} {tuple(found[key].shape)} instead of {tuple(expected[key].shape)}"
              for key in expected if key in found and found[key].shape != expected[key].shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            more = f" and {len(items) - 5} more" if len(items) > 5 else ""
            problems.append(f"{label}: {', '.join(items[:5])}{more}")
    return "; ".join(problems)


def _complete(network: str, kwargs: Dict[str, Any], state: Dict[str, torch.Tensor], source: str):
    """``state`` checked against ``build(network, **kwargs)`` (on the meta device: shapes only), with
    the ``num_batches_tracked`` counters the original's files lack."""
    from . import build

    try:
        with torch.device("meta"):
            expected = build(network, **kwargs).state_dict()
    except (ValueError, TypeError) as error:
        raise OriginalFileError(f"{source}: cannot build {network} with {kwargs}: {error}") from None
    mismatch = _mismatch(expected, state)
    if mismatch:
        raise OriginalFileError(f"{source} does not fit {network} ({kwargs}): {mismatch}")
    completed = {}
    for key, reference in expected.items():
        completed[key] = state[key] if key in state else torch.zeros((), dtype=reference.dtype)
    return completed


# --------------------------------------------------------------------------------------------------
# Loading into layers of another scale convention


def _scales_by_abs(layer: nn.Module) -> Optional[bool]:
    """Whether ``layer`` scales by ``|weight| + eps`` (InPlace-ABN's layers), by ``weight`` (BatchNorm, and
    the layers with ``batchnorm_weight``), or None (no normalization layer)."""
    if isinstance(layer, ABN):
        return not layer.batchnorm_weight
    if isinstance(layer, nn.modules.batchnorm._NormBase):
        return False
    return None


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], norm: str = "inplace_abn") -> None:
    """``model.load_state_dict(state_dict)`` (strict), where ``state_dict``'s norm weights follow
    ``norm``'s convention and each layer of ``model`` its own: a scale ``|w| + eps`` becomes the
    BatchNorm weight ``|w| + eps``, and a BatchNorm weight ``w >= eps`` the InPlace-ABN weight
    ``w - eps``, both exact. A BatchNorm weight below eps has no InPlace-ABN equivalent on its own:
    refused (``inplace_abn.convert_to_abn`` converts such networks exactly, through the convolutions)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    file_by_abs = norm == "inplace_abn"
    state = dict(state_dict)
    for name, layer in model.named_modules():
        by_abs = _scales_by_abs(layer)
        key = f"{name}.weight" if name else "weight"
        if by_abs is None or by_abs == file_by_abs or getattr(layer, "weight", None) is None or key not in state:
            continue
        weight = state[key]
        if file_by_abs:  # InPlace-ABN weights into a BatchNorm layer
            state[key] = weight.abs() + ORIGINAL_EPS
        else:
            if bool((weight < layer.eps).any()):
                raise OriginalFileError(
                    f"{key}: standard-BN weights below eps ({float(weight.min()):.3g}) have no |weight| + eps "
                    f"equivalent in {type(layer).__name__}; load these weights with norm_act="
                    "inplace_abn.models.norm_act.batchnorm_act() and convert the model with "
                    "inplace_abn.convert_to_abn, which negates the channels of the preceding convolution"
                )
            state[key] = weight - layer.eps
    model.load_state_dict(state)
