"""Mapillary Vistas: ``<root>/<split>/images/*.jpg`` with ``<root>/<split>/labels/*.png`` (palette
PNGs whose indices are class ids), the class list read from ``<root>/config.json``."""

from __future__ import annotations

import json
import os
from typing import Callable, List, NamedTuple, Optional, Tuple

import numpy as np

from .base import SegmentationDataset
from .io import DataError, check_label_ids, check_same_size, read_label_map, read_rgb
from .labels import IGNORE_INDEX

_CONFIG_NAMES = ("config.json", "config_v1.2.json")
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


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
        raise DataError(f"Vistas class list not found: expected {path}", path, "missing") from None
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read Vistas config {path}: {error}", path, "unreadable") from error
    entries = config.get("labels") if isinstance(config, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: expected a JSON object with a non-empty list under 'labels'", path, "format")
    classes = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry:
            raise DataError(f"{path}: labels[{index}] must be an object with at least a 'name'", path, "format")
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
    ``require_labels``: check up front that every image has its label (``False``: a missing one raises
    when its sample loads, as ``inplace-abn check-data`` uses to list them all).
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
        require_labels: bool = True,
    ):
        super().__init__(transform, eval_maps=False)
        if not os.path.isdir(root):
            raise DataError(f"Vistas root {root!r} does not exist or is not a folder", root)
        if config is None:
            candidates = [os.path.join(root, name) for name in _CONFIG_NAMES]
            config = next((c for c in candidates if os.path.isfile(c)), candidates[0])
        self.classes = load_vistas_config(config)
        self.class_names = tuple(c.readable for c in self.classes if c.evaluate)
        if len(self.class_names) > 255:
            raise DataError(f"{config}: {len(self.class_names)} evaluated classes do not fit in 8-bit train ids",
                            config, "format")  # fmt: skip
        table = np.full(256 if len(self.classes) <= 256 else 65536, IGNORE_INDEX, dtype=np.uint8)
        evaluated = [i for i, c in enumerate(self.classes) if c.evaluate]
        table[evaluated] = np.arange(len(evaluated), dtype=np.uint8)
        self._to_train_id = table

        layout = f"{root}/{split}/images/<name>.jpg with {root}/{split}/{labels_folder}/<name>.png"
        image_dir = os.path.join(root, split, "images")
        if not os.path.isdir(image_dir):
            present = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
            raise DataError(f"{image_dir} not found: expected the Vistas layout {layout} (folders present: {present})",
                            image_dir)  # fmt: skip
        label_dir = os.path.join(root, split, labels_folder)
        if labels and not os.path.isdir(label_dir):
            raise DataError(f"{label_dir} not found: expected the Vistas layout {layout}", label_dir)
        self.image_dir, self.label_dir = image_dir, (label_dir if labels else None)

        self.samples: List[Tuple[str, str, Optional[str]]] = []
        for filename in sorted(os.listdir(image_dir)):
            stem, ext = os.path.splitext(filename)
            if ext.lower() not in _IMAGE_EXTENSIONS:
                continue
            label_path = os.path.join(label_dir, stem + ".png") if labels else None
            self.samples.append((stem, os.path.join(image_dir, filename), label_path))
        if not self.samples:
            raise DataError(f"no images in {image_dir}: expected {layout}", image_dir)
        if labels and require_labels:
            missing = [(image, label) for _, image, label in self.samples if not os.path.isfile(label)]
            if missing:
                more = ""
                if len(missing) > 1:
                    more = f" ({len(missing) - 1} more images lack theirs: inplace-abn check-data lists them all)"
                raise DataError(f"no label for {missing[0][0]}: expected {missing[0][1]}{more}", missing[0][1],
                                "missing")  # fmt: skip

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, index: int) -> str:
        return self.samples[index][0]

    def orphan_labels(self) -> List[Tuple[str, str]]:
        if self.label_dir is None:
            return []
        stems = {stem for stem, _, _ in self.samples}
        return [
            (os.path.join(self.label_dir, filename), os.path.join(self.image_dir, filename[:-4] + ".jpg"))
            for filename in sorted(os.listdir(self.label_dir))
            if filename.endswith(".png") and filename[:-4] not in stems
        ]

    def load_image(self, index: int) -> np.ndarray:
        return read_rgb(self.samples[index][1])

    def load_labels(self, index: int, image_size: Optional[Tuple[int, int]]):
        _, image_path, label_path = self.samples[index]
        if label_path is None:
            return None, {}
        if not os.path.isfile(label_path):
            raise DataError(f"no label for {image_path}: expected {label_path}", label_path, "missing")
        class_ids = read_label_map(label_path)
        check_same_size(class_ids, label_path, image_size, image_path)
        check_label_ids(class_ids, len(self.classes), label_path)
        return self._to_train_id[class_ids], {}
