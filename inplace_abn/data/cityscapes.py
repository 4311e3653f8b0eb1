"""The Cityscapes dataset as distributed: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
``gtFine/<split>/<city>/*_gtFine_labelIds.png`` and ``*_gtFine_instanceIds.png`` (or ``gtCoarse``)."""

from __future__ import annotations

import os
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from .base import SegmentationDataset
from .io import DataError, check_label_ids, read_label_map, read_rgb
from .labels import LABEL_ID_TO_TRAIN_ID, NUM_LABEL_IDS, TRAIN_CLASS_NAMES, IGNORE_INDEX

IMAGE_SUFFIX = "_leftImg8bit.png"
_ANNOTATION_FOLDERS = {"fine": "gtFine", "coarse": "gtCoarse"}

_LABEL_ID_TO_TRAIN_ID = np.asarray(LABEL_ID_TO_TRAIN_ID, dtype=np.uint8)


class CityscapesFiles(NamedTuple):
    name: str  # <city>_<seq>_<frame>
    image: str
    label_ids: Optional[str]
    instance_ids: Optional[str]


def label_ids_to_train_ids(label_ids: np.ndarray, path: str = "label map") -> np.ndarray:
    """Map Cityscapes label ids (0..33) to train ids (0..18, ignore 255); other values are an error."""
    check_label_ids(label_ids, NUM_LABEL_IDS, path)
    return _LABEL_ID_TO_TRAIN_ID[label_ids]


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Train ids (0..18) to the label ids a Cityscapes prediction file stores; anything else -> 0."""
    from .labels import TRAIN_ID_TO_LABEL_ID

    table = np.zeros(256, dtype=np.uint8)
    table[: len(TRAIN_ID_TO_LABEL_ID)] = TRAIN_ID_TO_LABEL_ID
    train_ids = np.asarray(train_ids)
    if train_ids.dtype != np.uint8:
        train_ids = np.where((train_ids >= 0) & (train_ids < 256), train_ids, 255).astype(np.uint8)
    return table[train_ids]


def colorize_train_ids(train_ids: np.ndarray) -> np.ndarray:
    """``uint8 (H, W, 3)`` in the official Cityscapes colors (ignored pixels black)."""
    from .labels import train_id_palette

    palette = np.asarray(train_id_palette(), dtype=np.uint8).reshape(256, 3)
    return palette[np.clip(np.asarray(train_ids), 0, 255).astype(np.intp)]


def find_cityscapes_files(
    root: str, split: str = "train", annotation: Optional[str] = "fine"
) -> List[CityscapesFiles]:
    """The samples of one split, checked: every image has its label files (``annotation=None``:
    images only, e.g. for the test split)."""
    if not os.path.isdir(root):
        raise DataError(f"Cityscapes root {root!r} does not exist or is not a folder")
    image_root = os.path.join(root, "leftImg8bit")
    layout = f"{root}/leftImg8bit/{split}/<city>/<city>_<seq>_<frame>{IMAGE_SUFFIX}"
    if not os.path.isdir(image_root):
        raise DataError(f"no 'leftImg8bit' folder in {root!r}: expected the Cityscapes layout {layout}")
    split_root = os.path.join(image_root, split)
    if not os.path.isdir(split_root):
        present = sorted(d for d in os.listdir(image_root) if os.path.isdir(os.path.join(image_root, d)))
        raise DataError(f"split {split!r} not found: expected {layout} (splits present: {present or 'none'})")

    if annotation is not None and annotation not in _ANNOTATION_FOLDERS:
        raise ValueError(f"annotation must be one of {sorted(_ANNOTATION_FOLDERS)} or None, got {annotation!r}")
    gt_folder = _ANNOTATION_FOLDERS.get(annotation, "")

    files = []
    for city in sorted(os.listdir(split_root)):
        city_dir = os.path.join(split_root, city)
        if not os.path.isdir(city_dir):
            continue
        for filename in sorted(os.listdir(city_dir)):
            if not filename.endswith(IMAGE_SUFFIX):
                continue
            name = filename[: -len(IMAGE_SUFFIX)]
            label_path = instance_path = None
            if annotation is not None:
                stem = os.path.join(root, gt_folder, split, city, f"{name}_{gt_folder}")
                label_path, instance_path = stem + "_labelIds.png", stem + "_instanceIds.png"
                if not os.path.isfile(label_path):
                    raise DataError(
                        f"no ground truth for {os.path.join(city_dir, filename)}: expected {label_path}"
                    )
                if not os.path.isfile(instance_path):
                    instance_path = None
            files.append(CityscapesFiles(name, os.path.join(city_dir, filename), label_path, instance_path))
    if not files:
        raise DataError(f"no images found: expected {layout}")
    return files


class CityscapesDataset(SegmentationDataset):
    """Cityscapes images with train-id labels (19 classes, ignore 255).

    ``annotation``: ``"fine"`` (gtFine), ``"coarse"`` (gtCoarse: splits train, train_extra, val) or
    ``None`` (images only). ``eval_maps=True`` adds ``label_ids`` and ``instance_ids`` at full resolution.
    """

    class_names = TRAIN_CLASS_NAMES
    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        root: str,
        split: str = "train",
        annotation: Optional[str] = "fine",
        transform: Optional[Callable] = None,
        eval_maps: bool = False,
    ):
        super().__init__(transform, eval_maps)
        self.root, self.split, self.annotation = root, split, annotation
        self.files = find_cityscapes_files(root, split, annotation)
        if eval_maps and annotation is not None:
            missing = [f.label_ids for f in self.files if f.instance_ids is None]
            if missing:
                raise DataError(
                    f"eval_maps needs the instance maps: {len(missing)} missing, e.g. "
                    f"{missing[0].replace('_labelIds.png', '_instanceIds.png')}"
                )

    def __len__(self) -> int:
        return len(self.files)

    def name(self, index: int) -> str:
        return self.files[index].name

    def load(self, index: int) -> Tuple[np.ndarray, Optional[np.ndarray], Dict[str, np.ndarray]]:
        files = self.files[index]
        image = read_rgb(files.image)
        if files.label_ids is None:
            return image, None, {}
        label_ids = read_label_map(files.label_ids)
        if label_ids.shape != image.shape[:2]:
            raise DataError(
                f"{files.label_ids} is {label_ids.shape[1]}x{label_ids.shape[0]} but its image "
                f"{files.image} is {image.shape[1]}x{image.shape[0]}"
            )
        train_ids = label_ids_to_train_ids(label_ids, files.label_ids)
        extra = {}
        if self.eval_maps:
            instance_ids = read_label_map(files.instance_ids)
            if instance_ids.shape != label_ids.shape:
                raise DataError(f"{files.instance_ids} and {files.label_ids} differ in size")
            extra = {"label_ids": label_ids, "instance_ids": instance_ids}
        return image, train_ids, extra
