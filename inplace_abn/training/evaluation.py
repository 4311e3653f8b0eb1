"""Evaluation of a trained network: segmentation at one or several scales with optional flipping
(Cityscapes metrics when the data has label and instance ids, mean IoU always, label PNGs in the
Cityscapes or Vistas format), classification with the center crop or ten crops (top-1 / top-5)."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def segment(model: torch.nn.Module, images: torch.Tensor, scales: Sequence[float] = (1.0,),
            flip: bool = False) -> torch.Tensor:  # fmt: skip
    """Class probabilities ``(N, C, H, W)`` at the input size, averaged over ``scales`` (and their
    mirror images with ``flip``)."""
    height, width = images.shape[-2:]
    total = None
    for scale in scales:
        scaled = images
        if scale != 1.0:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        views = [scaled, scaled.flip(-1)] if flip else [scaled]
        for index, view in enumerate(views):
            logits = model(view).float()
            if index == 1:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (height, width):
                logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            probabilities = logits.softmax(1)
            total = probabilities if total is None else total + probabilities
    return total / (len(scales) * (2 if flip else 1))


def _vistas_ids(dataset) -> Optional[np.ndarray]:
    """Train id -> Vistas class id (the index in config.json), for writing Vistas-format labels."""
    classes = getattr(dataset, "classes", None)
    if classes is None or not hasattr(classes[0], "evaluate"):
        return None
    table = np.zeros(256, dtype=np.uint8)
    evaluated = [index for index, entry in enumerate(classes) if entry.evaluate]
    table[: len(evaluated)] = evaluated
    return table


def evaluate_segmentation(
    model: torch.nn.Module,
    dataset,
    device: torch.device,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    batch_size: int = 1,
    output_dir: Optional[str] = None,
    workers: int = 0,
    progress: bool = False,
    keep: int = 0,
) -> Dict[str, Any]:
    """Run ``model`` over ``dataset`` (samples as :class:`~inplace_abn.data.SegmentationDataset`).

    Returns ``mean_iou`` / ``pixel_accuracy`` / ``class_iou`` (train ids) and, when the samples carry
    ``label_ids`` and ``instance_ids``, ``cityscapes`` (the official result dict). ``output_dir``
    receives one label PNG per image: Cityscapes label ids (``<name>_labelIds.png``) or, for Vistas,
    the class ids of its config. ``keep`` returns the first predictions (train ids) as ``examples``.
    """
    from ..data.cityscapes import train_ids_to_label_ids
    from ..data.io import write_label_png
    from ..metrics import CityscapesEvaluator, ConfusionMatrix

    model.eval()
    confusion = ConfusionMatrix(dataset.num_classes, dataset.ignore_index, dataset.class_names)
    cityscapes = CityscapesEvaluator() if getattr(dataset, "eval_maps", False) else None
    vistas_table = _vistas_ids(dataset)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    iterator = loader
    if progress:
        from tqdm import tqdm

        iterator = tqdm(loader, desc="evaluating", unit="batch")
    examples = []
    for batch in iterator:
        probabilities = segment(model, batch["image"].to(device), scales, flip)
        predictions = probabilities.argmax(1).to(torch.uint8).cpu()
        for index, prediction in enumerate(predictions):
            if "label" in batch:
                confusion.add(prediction, batch["label"][index])
            array = prediction.numpy()
            name = batch["name"][index]
            if cityscapes is not None and "label_ids" in batch:
                label_ids = batch["label_ids"][index].numpy()
                if label_ids.shape != array.shape:  # evaluated at a rescaled size: back to the original
                    array = _resize_nearest(array, label_ids.shape)
                cityscapes.add_train_ids(array, label_ids, batch["instance_ids"][index].numpy(), source=name)
            if output_dir:
                if vistas_table is not None:
                    write_label_png(os.path.join(output_dir, f"{name}.png"), vistas_table[array])
                else:
                    write_label_png(os.path.join(output_dir, f"{name}_labelIds.png"), train_ids_to_label_ids(array))
            if len(examples) < keep:
                examples.append((name, array))
    result: Dict[str, Any] = confusion.result()
    if cityscapes is not None and cityscapes.num_images:
        result["cityscapes"] = cityscapes.result()
    if keep:
        result["examples"] = examples
    return result


def _resize_nearest(array: np.ndarray, shape) -> np.ndarray:
    from ..data.transforms import resize_label

    return resize_label(array, shape[0], shape[1])


@torch.no_grad()
def evaluate_classification(model: torch.nn.Module, dataset, device: torch.device, batch_size: int = 32,
                            workers: int = 0, progress: bool = False) -> Dict[str, float]:  # fmt: skip
    """Top-1 / top-5 accuracy; ten-crop samples ``(10, 3, S, S)`` have their crops' softmax averaged."""
    from ..metrics import TopKAccuracy

    model.eval()
    accuracy = TopKAccuracy((1, 5))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    iterator = loader
    if progress:
        from tqdm import tqdm

        iterator = tqdm(loader, desc="evaluating", unit="batch")
    for images, targets in iterator:
        images = images.to(device)
        if images.ndim == 5:  # ten crops
            n, crops = images.shape[:2]
            scores = model(images.flatten(0, 1)).float().softmax(1).view(n, crops, -1).mean(1)
        else:
            scores = model(images).float().softmax(1)
        accuracy.add(scores.cpu(), targets)
    result = accuracy.result()
    result["images"] = accuracy.count
    return result
