"""Metrics: the official Cityscapes evaluation (IoU / iIoU, classes and categories), mean IoU for any
label set, top-k accuracy. Needs numpy (reading files also pillow); the core library never imports it.

Names load on first use, so ``import inplace_abn.metrics`` stays cheap.
"""

import importlib

_EXPORTS = {
    "AVERAGE_INSTANCE_SIZE": "cityscapes",
    "CityscapesEvaluator": "cityscapes",
    "EvaluationError": "cityscapes",
    "evaluate_folders": "cityscapes",
    "find_evaluation_pairs": "cityscapes",
    "format_report": "cityscapes",
    "image_statistics": "cityscapes",
    "summary": "cityscapes",
    "ConfusionMatrix": "segmentation",
    "TopKAccuracy": "classification",
    "topk_correct": "classification",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
