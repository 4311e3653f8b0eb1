"""Datasets and augmentation: Cityscapes (fine, coarse), Mapillary Vistas, KITTI semantics, ImageFolder
classification, and a built-in synthetic street-scene dataset in the Cityscapes label space (no
download); a whole-tree check before long runs. Needs numpy and pillow; the core library never
imports it.

Names load on first use, so ``import inplace_abn.data`` (and the label table) stays cheap.
"""

import importlib

_EXPORTS = {
    "DataError": "errors",
    "CityscapesDataset": "cityscapes",
    "find_cityscapes_files": "cityscapes",
    "label_ids_to_train_ids": "cityscapes",
    "train_ids_to_label_ids": "cityscapes",
    "colorize_train_ids": "cityscapes",
    "VistasDataset": "vistas",
    "load_vistas_config": "vistas",
    "KittiDataset": "kitti",
    "kitti_instances_to_cityscapes": "kitti",
    "ImageFolderDataset": "imagefolder",
    "SegmentationDataset": "base",
    "SyntheticCityscapes": "synthetic",
    "render_scene": "synthetic",
    "write_synthetic_cityscapes": "synthetic",
    "write_synthetic_kitti": "synthetic",
    "ColorJitter": "transforms",
    "SegmentationTrainTransform": "transforms",
    "SegmentationEvalTransform": "transforms",
    "ClassificationTrainTransform": "transforms",
    "ClassificationEvalTransform": "transforms",
    "IMAGENET_MEAN": "transforms",
    "IMAGENET_STD": "transforms",
    "labels": None,  # the Cityscapes label table module
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name] or name}", __name__)
        value = module if _EXPORTS[name] is None else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
