"""KITTI semantic segmentation (the 2015 benchmark, ``data_semantics.zip``): ``training/image_2/*.png``
with ``training/semantic/*.png`` in Cityscapes label ids, ``testing/image_2/*.png`` unlabelled.
KITTI has no validation split; ``val`` here is every ``val_every``-th training image."""

from __future__ import annotations

import os
from typing import Callable, List, NamedTuple, Optional, Tuple

import numpy as np

from .base import SegmentationDataset
from .cityscapes import label_ids_to_train_ids
from .io import DataError, check_same_size, read_label_map, read_rgb
from .labels import IGNORE_INDEX, LABELS, TRAIN_CLASS_NAMES

SPLITS = ("train", "val", "trainval", "test")
#: every 5th training image (positions 0, 5, 10, ... in name order) is the validation set: 40 of 200
DEFAULT_VAL_EVERY = 5

_HAS_INSTANCES = np.zeros(256, dtype=bool)
_HAS_INSTANCES[[label.id for label in LABELS if label.has_instances]] = True


class KittiFiles(NamedTuple):
    name: str  # e.g. 000042_10
    image: str
    semantic: Optional[str]  # where the label map belongs (None: the unlabelled test split)
    instance: Optional[str]


def kitti_instances_to_cityscapes(instance: np.ndarray) -> np.ndarray:
    """KITTI's 16-bit instance maps (label id * 256 + instance number, 0: no instance) in the Cityscapes
    format the iIoU metrics read: label id * 1000 + number for instance classes, the label id elsewhere."""
    instance = np.asarray(instance).astype(np.int64)
    label_ids, numbers = instance >> 8, instance & 255
    is_instance = _HAS_INSTANCES[np.clip(label_ids, 0, 255)] & (numbers > 0)
    return np.where(is_instance, label_ids * 1000 + numbers, label_ids)


def kitti_split_names(names: List[str], split: str, val_every: int = DEFAULT_VAL_EVERY) -> List[str]:
    """The training images (sorted ``names``) of ``split``: ``val`` every ``val_every``-th, ``train`` the
    rest, ``trainval`` all."""
    if split not in ("train", "val", "trainval"):
        raise ValueError(f"split must be train, val or trainval to divide the training images, got {split!r}")
    if val_every < 2:
        raise ValueError(f"val_every must be >= 2 (one validation image every val_every), got {val_every}")
    if split == "trainval":
        return list(names)
    return [name for position, name in enumerate(names) if (position % val_every == 0) == (split == "val")]


class KittiDataset(SegmentationDataset):
    """KITTI semantic segmentation with Cityscapes train ids (19 classes, ignore 255).

    ``split``: ``train``, ``val`` (every ``val_every``-th training image in name order, the first
    included: 40 of the 200 with the default 5), ``trainval`` (all 200, for a final model) or ``test``
    (the 200 unlabelled test images). Label maps hold Cityscapes label ids, mapped as Cityscapes'.
    ``eval_maps=True`` adds ``label_ids`` and ``instance_ids`` (converted to the Cityscapes instance format)
    for the Cityscapes metrics, which the KITTI benchmark reports. ``require_labels`` as in
    :class:`~inplace_abn.data.CityscapesDataset`.
    """

    class_names = TRAIN_CLASS_NAMES
    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        root: str,
        split: str = "train",
        transform: Optional[Callable] = None,
        eval_maps: bool = False,
        val_every: int = DEFAULT_VAL_EVERY,
        require_labels: bool = True,
    ):
        super().__init__(transform, eval_maps)
        if split not in SPLITS:
            raise ValueError(f"KITTI split must be one of {', '.join(SPLITS)}, got {split!r}")
        if not os.path.isdir(root):
            raise DataError(f"KITTI root {root!r} does not exist or is not a folder", root)
        self.root, self.split = root, split
        folder = os.path.join(root, "testing" if split == "test" else "training")
        layout = (f"{root}/training/image_2/<name>.png with {root}/training/semantic/<name>.png "
                  f"(and instance/), {root}/testing/image_2/<name>.png")  # fmt: skip
        self.image_dir = os.path.join(folder, "image_2")
        if not os.path.isdir(self.image_dir):
            present = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
            raise DataError(f"{self.image_dir} not found: expected the KITTI semantics layout {layout} "
                            f"(folders present: {present})", self.image_dir)  # fmt: skip
        self.label_dir = None if split == "test" else os.path.join(folder, "semantic")
        if self.label_dir is not None and not os.path.isdir(self.label_dir):
            raise DataError(f"{self.label_dir} not found: expected the KITTI semantics layout {layout}",
                            self.label_dir)  # fmt: skip
        names = sorted(f[:-4] for f in os.listdir(self.image_dir) if f.endswith(".png"))
        if not names:
            raise DataError(f"no images (*.png) in {self.image_dir}: expected {layout}", self.image_dir)
        if split != "test":
            names = kitti_split_names(names, split, val_every)
        instance_dir = os.path.join(folder, "instance")
        self.files = [
            KittiFiles(
                name,
                os.path.join(self.image_dir, name + ".png"),
                None if self.label_dir is None else os.path.join(self.label_dir, name + ".png"),
                None if self.label_dir is None else os.path.join(instance_dir, name + ".png"),
            )
            for name in names
        ]
        if require_labels and self.label_dir is not None:
            needed = [(f.image, f.semantic, "label") for f in self.files]
            if eval_maps:
                needed += [(f.image, f.instance, "instance map") for f in self.files]
            missing = [(image, path, what) for image, path, what in needed if not os.path.isfile(path)]
            if missing:
                image, path, what = missing[0]
                more = ""
                if len(missing) > 1:
                    more = f" ({len(missing) - 1} more files missing: inplace-abn check-data lists them all)"
                raise DataError(f"no {what} for {image}: expected {path}{more}", path, "missing")

    def __len__(self) -> int:
        return len(self.files)

    def name(self, index: int) -> str:
        return self.files[index].name

    def orphan_labels(self) -> List[Tuple[str, str]]:
        if self.label_dir is None:
            return []
        images = set(os.listdir(self.image_dir))
        return [
            (os.path.join(self.label_dir, filename), os.path.join(self.image_dir, filename))
            for filename in sorted(os.listdir(self.label_dir))
            if filename.endswith(".png") and filename not in images
        ]

    def load_image(self, index: int) -> np.ndarray:
        return read_rgb(self.files[index].image)

    def load_labels(self, index: int, image_size: Optional[Tuple[int, int]]):
        files = self.files[index]
        if files.semantic is None:
            return None, {}
        for path, what in ((files.semantic, "label"), (files.instance, "instance map")):
            if (what == "label" or self.eval_maps) and not os.path.isfile(path):
                raise DataError(f"no {what} for {files.image}: expected {path}", path, "missing")
        label_ids = read_label_map(files.semantic)
        check_same_size(label_ids, files.semantic, image_size, files.image)
        train_ids = label_ids_to_train_ids(label_ids, files.semantic)
        if not self.eval_maps:
            return train_ids, {}
        instance = read_label_map(files.instance)
        check_same_size(instance, files.instance, image_size, files.image)
        return train_ids, {"label_ids": label_ids, "instance_ids": kitti_instances_to_cityscapes(instance)}
