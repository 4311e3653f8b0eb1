"""The Cityscapes dataset as distributed: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
``gtFine/<split>/<city>/*_gtFine_labelIds.png`` and ``*_gtFine_instanceIds.png`` (or ``gtCoarse``);
several splits read as one (``"train+train_extra"``: fine + coarse training)."""

from __future__ import annotations

import os
from typing import Callable, List, NamedTuple, Optional, Tuple

import numpy as np

from .base import SegmentationDataset
from .io import DataError, check_label_ids, check_same_size, read_label_map, read_rgb
from .labels import LABEL_ID_TO_TRAIN_ID, NUM_LABEL_IDS, TRAIN_CLASS_NAMES, IGNORE_INDEX

IMAGE_SUFFIX = "_leftImg8bit.png"
ANNOTATION_FOLDERS = {"fine": "gtFine", "coarse": "gtCoarse"}
#: splits that only coarse annotations cover: ``annotation="auto"`` reads gtCoarse there, gtFine elsewhere
COARSE_ONLY_SPLITS = ("train_extra",)

_LABEL_ID_TO_TRAIN_ID = np.asarray(LABEL_ID_TO_TRAIN_ID, dtype=np.uint8)


class CityscapesFiles(NamedTuple):
    name: str  # <city>_<seq>_<frame>
    image: str
    label_ids: Optional[str]  # where the label map belongs (it may be missing: see require_labels)
    instance_ids: Optional[str]  # where the instance map belongs
    annotation: Optional[str]  # "fine", "coarse" or None (images only)


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


def split_names(split: str) -> List[str]:
    """``"train+train_extra"`` -> ``["train", "train_extra"]``."""
    names = split.split("+")
    if not all(names) or len(set(names)) != len(names):
        raise ValueError(f"split must be a split name or several joined by '+' (e.g. train+train_extra), got {split!r}")
    return names


def annotation_of(split: str, annotation: Optional[str]) -> Optional[str]:
    """The annotation one split is read with: ``"auto"`` is coarse for train_extra, fine elsewhere."""
    if annotation == "auto":
        return "coarse" if split in COARSE_ONLY_SPLITS else "fine"
    if annotation is not None and annotation not in ANNOTATION_FOLDERS:
        raise ValueError(f"annotation must be 'auto', 'fine', 'coarse' or None, got {annotation!r}")
    return annotation


def _layout(root: str, split: str) -> str:
    return f"{root}/leftImg8bit/{split}/<city>/<city>_<seq>_<frame>{IMAGE_SUFFIX}"


def _split_folder(root: str, split: str) -> str:
    if not os.path.isdir(root):
        raise DataError(f"Cityscapes root {root!r} does not exist or is not a folder", root)
    image_root = os.path.join(root, "leftImg8bit")
    if not os.path.isdir(image_root):
        raise DataError(
            f"no 'leftImg8bit' folder in {root!r}: expected the Cityscapes layout {_layout(root, split)}", image_root
        )
    split_root = os.path.join(image_root, split)
    if not os.path.isdir(split_root):
        present = sorted(d for d in os.listdir(image_root) if os.path.isdir(os.path.join(image_root, d)))
        raise DataError(
            f"split {split!r} not found: expected {_layout(root, split)} (splits present: {present or 'none'})",
            split_root,
        )
    return split_root


def _label_folder(root: str, split: str, annotation: str) -> str:
    folder = os.path.join(root, ANNOTATION_FOLDERS[annotation], split)
    if not os.path.isdir(folder):
        hint = ""
        if annotation == "fine" and split in COARSE_ONLY_SPLITS:
            hint = f" ({split} has coarse annotations only: use annotation 'coarse' or 'auto')"
        raise DataError(f"no ground-truth folder {folder} for the {split!r} images{hint}", folder)
    return folder


def _cities(folder: str) -> List[str]:
    return sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))


def find_cityscapes_files(
    root: str, split: str = "train", annotation: Optional[str] = "auto", require_labels: bool = True
) -> List[CityscapesFiles]:
    """The samples of ``split`` (several joined by ``+``). ``annotation``: ``"auto"`` (gtFine, gtCoarse
    for train_extra), ``"fine"``, ``"coarse"`` or ``None`` (images only, e.g. the test split).
    ``require_labels``: every image must have its label map (otherwise missing ones are left for
    :meth:`CityscapesDataset.load` to report, sample by sample)."""
    files = []
    for name in split_names(split):
        files += _find_split(root, name, annotation_of(name, annotation))
    if require_labels:
        missing = [f for f in files if f.label_ids is not None and not os.path.isfile(f.label_ids)]
        if missing:
            more = ""
            if len(missing) > 1:
                more = f" ({len(missing) - 1} more images lack theirs: inplace-abn check-data lists them all)"
            raise DataError(
                f"no ground truth for {missing[0].image}: expected {missing[0].label_ids}{more}",
                missing[0].label_ids,
                "missing",
            )
    return files


def _find_split(root: str, split: str, annotation: Optional[str]) -> List[CityscapesFiles]:
    split_root = _split_folder(root, split)
    label_root = None if annotation is None else _label_folder(root, split, annotation)
    files = []
    for city in _cities(split_root):
        city_dir = os.path.join(split_root, city)
        for filename in sorted(os.listdir(city_dir)):
            if not filename.endswith(IMAGE_SUFFIX):
                continue
            name = filename[: -len(IMAGE_SUFFIX)]
            label_path = instance_path = None
            if label_root is not None:
                stem = os.path.join(label_root, city, f"{name}_{ANNOTATION_FOLDERS[annotation]}")
                label_path, instance_path = stem + "_labelIds.png", stem + "_instanceIds.png"
            files.append(CityscapesFiles(name, os.path.join(city_dir, filename), label_path, instance_path, annotation))
    if not files:
        raise DataError(f"no images found: expected {_layout(root, split)}", split_root)
    return files


def find_orphan_labels(root: str, split: str = "train", annotation: Optional[str] = "auto") -> List[Tuple[str, str]]:
    """``(label map, its missing image)`` for every label map of ``split`` that has no image."""
    orphans = []
    for name in split_names(split):
        chosen = annotation_of(name, annotation)
        if chosen is None:
            continue
        label_root, suffix = _label_folder(root, name, chosen), f"_{ANNOTATION_FOLDERS[chosen]}_labelIds.png"
        for city in _cities(label_root):
            for filename in sorted(os.listdir(os.path.join(label_root, city))):
                if filename.endswith(suffix):
                    image = os.path.join(root, "leftImg8bit", name, city, filename[: -len(suffix)] + IMAGE_SUFFIX)
                    if not os.path.isfile(image):
                        orphans.append((os.path.join(label_root, city, filename), image))
    return orphans


class CityscapesDataset(SegmentationDataset):
    """Cityscapes images with train-id labels (19 classes, ignore 255).

    ``split``: a split folder (``train``, ``val``, ``test``, ``train_extra``) or several joined by
    ``+``; ``"train+train_extra"`` is fine + coarse training (fine labels for train, coarse for
    train_extra). ``annotation``: ``"auto"`` (gtFine, and gtCoarse for train_extra, the split only
    coarse annotations cover), ``"fine"``, ``"coarse"`` (gtCoarse: train, train_extra, val) or ``None``
    (images only). Coarse labels leave much of each image ``unlabeled`` (id 0): those pixels, like every
    id without a train id, become ``ignore_index`` and take no part in the loss.
    ``eval_maps=True`` adds ``label_ids`` and ``instance_ids`` at full resolution. ``require_labels``:
    check up front that every label file exists (``False``: each missing one raises when its sample
    loads, which ``inplace-abn check-data`` uses to list them all).
    """

    class_names = TRAIN_CLASS_NAMES
    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        root: str,
        split: str = "train",
        annotation: Optional[str] = "auto",
        transform: Optional[Callable] = None,
        eval_maps: bool = False,
        require_labels: bool = True,
    ):
        super().__init__(transform, eval_maps)
        self.root, self.split, self.annotation = root, split, annotation
        self.files = find_cityscapes_files(root, split, annotation, require_labels)
        if eval_maps and require_labels:
            annotated = [f.instance_ids for f in self.files if f.instance_ids is not None]
            missing = [path for path in annotated if not os.path.isfile(path)]
            if missing:
                raise DataError(f"eval_maps needs the instance maps: {len(missing)} missing, e.g. {missing[0]}",
                                missing[0], "missing")  # fmt: skip

    def __len__(self) -> int:
        return len(self.files)

    def name(self, index: int) -> str:
        return self.files[index].name

    def orphan_labels(self) -> List[Tuple[str, str]]:
        return find_orphan_labels(self.root, self.split, self.annotation)

    def load_image(self, index: int) -> np.ndarray:
        return read_rgb(self.files[index].image)

    def load_labels(self, index: int, image_size: Optional[Tuple[int, int]]):
        files = self.files[index]
        if files.label_ids is None:
            return None, {}
        if not os.path.isfile(files.label_ids):
            raise DataError(f"no ground truth for {files.image}: expected {files.label_ids}",
                            files.label_ids, "missing")  # fmt: skip
        label_ids = read_label_map(files.label_ids)
        check_same_size(label_ids, files.label_ids, image_size, files.image)
        train_ids = label_ids_to_train_ids(label_ids, files.label_ids)
        if not self.eval_maps:
            return train_ids, {}
        if not os.path.isfile(files.instance_ids):
            raise DataError(f"no instance map for {files.label_ids}: expected {files.instance_ids}",
                            files.instance_ids, "missing")  # fmt: skip
        instance_ids = read_label_map(files.instance_ids)
        check_same_size(instance_ids, files.instance_ids, image_size, files.image)
        return train_ids, {"label_ids": label_ids, "instance_ids": instance_ids}
