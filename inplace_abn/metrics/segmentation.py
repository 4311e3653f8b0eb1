"""Mean IoU from a confusion matrix, for any label set (Mapillary Vistas, Cityscapes train ids, ...)."""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np


class ConfusionMatrix:
    """A ``(C, C)`` confusion matrix (rows: ground truth, columns: prediction) accumulated over
    batches; pixels whose ground truth is ``ignore_index`` (or outside ``0..C-1``) are skipped.

    ``add`` takes numpy arrays or torch tensors of any matching shape; tensors are counted on their own
    device (one ``bincount``), so evaluation on a GPU moves only ``C * C`` numbers.
    """

    def __init__(
        self, num_classes: int, ignore_index: Optional[int] = 255, class_names: Optional[Sequence[str]] = None
    ):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = tuple(class_names) if class_names is not None else tuple(str(i) for i in range(num_classes))
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def reset(self) -> None:
        self.matrix[...] = 0

    def add(self, prediction, target) -> None:
        n = self.num_classes
        if hasattr(prediction, "detach") or hasattr(target, "detach"):
            import torch

            prediction = torch.as_tensor(prediction)
            target = torch.as_tensor(target, device=prediction.device)
            if prediction.shape != target.shape:
                shapes = f"{tuple(prediction.shape)} and {tuple(target.shape)}"
                raise ValueError(f"prediction and target differ in shape: {shapes}")
            prediction, target = prediction.reshape(-1).long(), target.reshape(-1).long()
            valid = (target >= 0) & (target < n)
            bad = valid & ((prediction < 0) | (prediction >= n))
            if bool(bad.any()):
                raise ValueError(f"prediction holds class ids outside 0..{n - 1}")
            counts = torch.bincount(target[valid] * n + prediction[valid], minlength=n * n)
            self.matrix += counts.cpu().numpy().reshape(n, n)
            return
        prediction, target = np.asarray(prediction), np.asarray(target)
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {prediction.shape} and target {target.shape} differ in shape")
        prediction = prediction.reshape(-1).astype(np.int64, copy=False)
        target = target.reshape(-1).astype(np.int64, copy=False)
        valid = (target >= 0) & (target < n)
        prediction, target = prediction[valid], target[valid]
        if prediction.size and (prediction.min() < 0 or prediction.max() >= n):
            raise ValueError(f"prediction holds class ids outside 0..{n - 1}")
        self.matrix += np.bincount(target * n + prediction, minlength=n * n).reshape(n, n)

    def merge(self, other: "ConfusionMatrix") -> None:
        self.matrix += other.matrix

    def iou(self) -> np.ndarray:
        """Per-class TP / (TP + FP + FN); NaN for classes neither present nor predicted."""
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def mean_iou(self) -> float:
        """Mean of the defined per-class IoUs (NaN if none is)."""
        iou = self.iou()
        valid = ~np.isnan(iou)
        return float(iou[valid].mean()) if valid.any() else math.nan

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else math.nan

    def result(self) -> Dict[str, object]:
        """``mean_iou`` and ``pixel_accuracy`` in [0, 1], ``class_iou`` per class name (NaN: undefined)."""
        return {
            "mean_iou": self.mean_iou(),
            "pixel_accuracy": self.pixel_accuracy(),
            "class_iou": dict(zip(self.class_names, (float(v) for v in self.iou()))),
        }
