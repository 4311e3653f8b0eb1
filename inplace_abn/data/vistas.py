"""Mapillary Vistas: ``<root>/<split>/images/*.jpg`` with ``<root>/<split>/labels/*.png`` (palette
PNGs whose indices are class ids), the class list read from ``<root>/config.json``."""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from .base import SegmentationDataset
from .io import DataError, check_label_ids, read_label_map, read_rgb
from .labels import IGNORE_INDEX

_CONFIG_NAMES = ("config.json", "config_v1.2.json")


class VistasClass(NamedTuple):
    name: str
    readable: str
    color: Tuple[int, int, int]
    has_instances: bool
    evaluate: bool


def load_vistas_config(path: str) -> List[VistasClass]:
    """The class list of a Vistas ``config.json`` (``{"labels": [{"name", "readable", "color",
    "instances", "evaluate"}, ...]}``), index = class id in the label PNGs."""
    try:
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
    except FileNotFoundError:
        raise DataError(f"Vistas class list not found: expected {path}") from None
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read Vistas config {path}: {error}") from error
    entries = config.get("labels") if isinstance(config, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: expected a JSON object with a non-empty list under 'labels'")
    classes = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry:
            raise DataError(f"{path}: labels[{index}] must be an object with at least a 'name'")
        color = entry.get("color", (0, 0, 0))
        classes.append(
            VistasClass(
                name=str(entry["name"]),
                readable=str(entry.get("readable", entry["name"])),
                color=tuple(int(c) for c in color[:3]),
                has_instances=bool(entry.get("instances", False)),
                evaluate=bool(entry.get("evaluate", True)),
            )
        )
    return classes


class VistasDataset(SegmentationDataset):
    """Mapillary Vistas with the evaluated classes renumbered ``0..C-1`` (config order) and the
    others (``evaluate: false``, e.g. ``unlabeled``) mapped to ``ignore_index``.

    ``split`` is a folder name (``training``, ``validation``, ``testing``); ``labels=False`` reads the
    images only. ``config`` defaults to ``<root>/config.json`` (or ``config_v1.2.json``).
    """

    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        root: str,
        split: str = "training",
        transform: Optional[Callable] = None,
        config: Optional[str] = None,
        labels: bool = True,
        labels_folder: str = "labels",
    ):
        super().__init__(transform, eval_maps=False)
        if not os.path.isdir(root):
            raise DataError(f"Vistas root {root!r} does not exist or is not a folder")
        if config is None:
            candidates = [os.path.join(root, name) for name in _CONFIG_NAMES]
            config = next((c for c in candidates if os.path.isfile(c)), candidates[0])
        self.classes = load_vistas_config(config)
        self.class_names = tuple(c.readable for c in self.classes if c.evaluate)
        if len(self.class_names) > 255:
            raise DataError(f"{config}: {len(self.class_names)} evaluated classes do not fit in 8-bit train ids")
        table = np.full(256 if len(self.classes) <= 256 else 65536, IGNORE_INDEX, dtype=np.uint8)
        evaluated = [i for i, c in enumerate(self.classes) if c.evaluate]
        table[evaluated] = np.arange(len(evaluated), dtype=np.uint8)
        self._to_train_id = table

        layout = f"{root}/{split}/images/<name>.jpg with {root}/{split}/{labels_folder}/<name>.png"
        image_dir = os.path.join(root, split, "images")
        if not os.path.isdir(image_dir):
            present = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
            raise DataError(f"{image_dir} not found: expected the Vistas layout {layout} (folders present: {present})")
        label_dir = os.path.join(root, split, labels_folder)
        if labels and not os.path.isdir(label_dir):
            raise DataError(f"{label_dir} not found: expected the Vistas layout {layout}")

        self.samples: List[Tuple[str, str, Optional[str]]] = []
        for filename in sorted(os.listdir(image_dir)):
            stem, ext = os.path.splitext(filename)
            if ext.lower() not in (".jpg", ".jpeg", ".png"):
                continue
            label_path = None
            if labels:
                label_path = os.path.join(label_dir, stem + ".png")
                if not os.path.isfile(label_path):
                    raise DataError(f"no label for {os.path.join(image_dir, filename)}: expected {label_path}")
            self.samples.append((stem, os.path.join(image_dir, filename), label_path))
        if not self.samples:
            raise DataError(f"no images in {image_dir}: expected {layout}")

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, index: int) -> str:
        return self.samples[index][0]

    def load(self, index: int) -> Tuple[np.ndarray, Optional[np.ndarray], Dict[str, np.ndarray]]:
        _, image_path, label_path = self.samples[index]
        image = read_rgb(image_path)
        if label_path is None:
            return image, None, {}
        class_ids = read_label_map(label_path)
        if class_ids.shape != image.shape[:2]:
            raise DataError(
                f"{label_path} is {class_ids.shape[1]}x{class_ids.shape[0]} but its image "
                f"{image_path} is {image.shape[1]}x{image.shape[0]}"
            )
        check_label_ids(class_ids, len(self.classes), label_path)
        return image, self._to_train_id[class_ids], {}
