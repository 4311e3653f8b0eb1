"""Evaluation of a trained network: segmentation at one or several scales with optional flipping, fused
by mean, voting or max (Cityscapes metrics when the data has label and instance ids, mean IoU always,
label / color / confidence PNGs), classification with the center crop or ten crops (top-1 / top-5)."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F


FUSIONS = ("mean", "voting", "max")
OUTPUTS = ("labels", "color", "prob")


def _class_scores(model: torch.nn.Module, view: torch.Tensor, size) -> torch.Tensor:
    """Logits of ``view`` bilinearly resized to ``size``. A DeepLabV3's logits are taken before its own
    upsampling, so a rescaled view is interpolated once, from the output stride to ``size`` (as the
    original's test script does)."""
    from ..models.deeplab import DeepLabV3

    if isinstance(model, DeepLabV3):
        logits = model.cls(model.head(model.body(view)))
    else:
        logits = model(view)
    logits = logits.float()
    if logits.shape[-2:] != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return logits


def _view_probabilities(model, images: torch.Tensor, scales: Sequence[float], flip: bool):
    """Softmax of every view (each scale, and its mirror image with ``flip``), at the input size."""
    height, width = images.shape[-2:]
    for scale in scales:
        scaled = images
        if scale != 1.0:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        yield _class_scores(model, scaled, (height, width)).softmax(1)
        if flip:
            yield _class_scores(model, scaled.flip(-1), (height, width)).flip(-1).softmax(1)


@torch.no_grad()
def segment(model: torch.nn.Module, images: torch.Tensor, scales: Sequence[float] = (1.0,),
            flip: bool = False) -> torch.Tensor:  # fmt: skip
    """Class probabilities ``(N, C, H, W)`` at the input size, averaged over ``scales`` (and their
    mirror images with ``flip``)."""
    total, count = None, 0
    for probabilities in _view_probabilities(model, images, scales, flip):
        total = probabilities if total is None else total.add_(probabilities)
        count += 1
    return total.div_(count)


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False,
            fusion: str = "mean"):  # fmt: skip
    """``(classes int64 (N, H, W), confidence float (N, H, W))`` fused over the views of :func:`segment`:

    - ``mean``: the class of highest mean probability, and that probability;
    - ``voting``: the class most views predict (ties: the lowest class id), and its mean probability
      over the views that voted for it;
    - ``max``: the prediction of the view most confident at that pixel (ties: the first view).
    """
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
    if fusion == "mean":
        confidence, classes = segment(model, images, scales, flip).max(1)
        return classes, confidence
    votes = probability_sums = best = best_classes = None
    for probabilities in _view_probabilities(model, images, scales, flip):
        confidence, classes = probabilities.max(1)
        if fusion == "voting":
            if votes is None:
                votes = torch.zeros_like(probabilities)
                probability_sums = torch.zeros_like(probabilities)
            votes.scatter_add_(1, classes[:, None], torch.ones_like(confidence[:, None]))
            probability_sums.scatter_add_(1, classes[:, None], confidence[:, None])
        elif best is None:
            best, best_classes = confidence, classes
        else:
            better = confidence > best
            best = torch.where(better, confidence, best)
            best_classes = torch.where(better, classes, best_classes)
    if fusion == "max":
        return best_classes, best
    classes = votes.argmax(1)  # the first of equal maxima: the lowest class id
    index = classes[:, None]
    return classes, (probability_sums.gather(1, index) / votes.gather(1, index))[:, 0]


def _vistas_ids(dataset) -> Optional[np.ndarray]:
    """Train id -> Vistas class id (the index in config.json), for writing Vistas-format labels."""
    classes = getattr(dataset, "classes", None)
    if classes is None or not hasattr(classes[0], "evaluate"):
        return None
    table = np.zeros(256, dtype=np.uint8)
    evaluated = [index for index, entry in enumerate(classes) if entry.evaluate]
    table[: len(evaluated)] = evaluated
    return table


def _palette(dataset, vistas_table: Optional[np.ndarray]) -> list:
    """768 palette entries for the ids the label files hold: Vistas class ids in its config's colors,
    else Cityscapes label ids in the official colors."""
    if vistas_table is not None:
        palette = [0] * 768
        for index, entry in enumerate(dataset.classes[:256]):
            palette[3 * index : 3 * index + 3] = entry.color
        return palette
    from ..data.labels import label_id_palette

    return label_id_palette()


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
    fusion: str = "mean",
    outputs: Sequence[str] = ("labels",),
    reduce: Optional[Callable[[np.ndarray], np.ndarray]] = None,
) -> Dict[str, Any]:
    """Run ``model`` over ``dataset`` (samples as :class:`~inplace_abn.data.SegmentationDataset`),
    fusing the views of ``scales`` / ``flip`` by ``fusion`` (:func:`predict`).

    Predictions are compared at the resolution of the labels (resized by nearest neighbour when the
    images were resized). Returns ``mean_iou`` / ``pixel_accuracy`` / ``class_iou`` (train ids) and,
    when the samples carry ``label_ids`` and ``instance_ids``, ``cityscapes`` (the official result
    dict). ``output_dir`` receives per image, for each of ``outputs``: ``labels``: Cityscapes label
    ids (``<name>_labelIds.png``) or, for Vistas, the class ids of its config (``<name>.png``);
    ``color``: the same ids as a palette PNG in the dataset's colors (``<name>_color.png``); ``prob``:
    the fused confidence times 255 (``<name>_prob.png``). ``keep`` returns the first predictions
    (train ids) as ``examples``. ``reduce`` sums the confusion matrix over processes (each evaluating
    its own share of the images).
    """
    from ..data.cityscapes import train_ids_to_label_ids
    from ..data.io import write_label_png
    from ..metrics import CityscapesEvaluator, ConfusionMatrix

    unknown = sorted(set(outputs) - set(OUTPUTS))
    if unknown:
        raise ValueError(f"unknown output(s) {', '.join(unknown)}: use {', '.join(OUTPUTS)}")
    model.eval()
    confusion = ConfusionMatrix(dataset.num_classes, dataset.ignore_index, dataset.class_names)
    cityscapes = CityscapesEvaluator() if getattr(dataset, "eval_maps", False) else None
    vistas_table = _vistas_ids(dataset)
    palette = _palette(dataset, vistas_table) if output_dir and "color" in outputs else None
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    iterator = loader
    if progress:
        from tqdm import tqdm

        iterator = tqdm(loader, desc="evaluating", unit="batch")
    examples = []
    for batch in iterator:
        classes, confidence = predict(model, batch["image"].to(device), scales, flip, fusion)
        classes, confidence = classes.to(torch.uint8).cpu(), confidence.cpu()
        for index in range(classes.shape[0]):
            array = classes[index].numpy()
            name = batch["name"][index]
            label = batch["label"][index] if "label" in batch else None
            size = tuple(label.shape) if label is not None else _original_size(batch, index)
            if size is not None and size != array.shape:  # images were resized: back to their labels' size
                array = _resize_nearest(array, size)
            if label is not None:
                confusion.add(array, label.numpy())
            if cityscapes is not None and "label_ids" in batch:
                label_ids = batch["label_ids"][index].numpy()
                if label_ids.shape != array.shape:
                    array = _resize_nearest(array, label_ids.shape)
                cityscapes.add_train_ids(array, label_ids, batch["instance_ids"][index].numpy(), source=name)
            if output_dir:
                ids = vistas_table[array] if vistas_table is not None else train_ids_to_label_ids(array)
                stem = os.path.join(output_dir, name if vistas_table is not None else f"{name}_labelIds")
                if "labels" in outputs:
                    write_label_png(f"{stem}.png", ids)
                if "color" in outputs:
                    write_label_png(os.path.join(output_dir, f"{name}_color.png"), ids, palette=palette)
                if "prob" in outputs:
                    scaled = (confidence[index].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
                    if scaled.shape != array.shape:
                        scaled = _resize_nearest(scaled, array.shape)
                    write_label_png(os.path.join(output_dir, f"{name}_prob.png"), scaled)
            if len(examples) < keep:
                examples.append((name, array))
    if reduce is not None:
        confusion.matrix = np.asarray(reduce(confusion.matrix), dtype=np.int64)
    result: Dict[str, Any] = confusion.result()
    if cityscapes is not None and cityscapes.num_images:
        result["cityscapes"] = cityscapes.result()
    if keep:
        result["examples"] = examples
    return result


def _original_size(batch, index: int) -> Optional[tuple]:
    """The size the image had before its transform, when the dataset records it."""
    if "size" not in batch:
        return None
    return tuple(int(v) for v in batch["size"][index])


def _resize_nearest(array: np.ndarray, shape) -> np.ndarray:
    from ..data.transforms import resize_label

    return resize_label(array, shape[0], shape[1])


@torch.no_grad()
def evaluate_classification(model: torch.nn.Module, dataset, device: torch.device, batch_size: int = 32,
                            workers: int = 0, progress: bool = False,
                            reduce: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> Dict[str, float]:
    """Top-1 / top-5 accuracy; ten-crop samples ``(10, 3, S, S)`` have their crops' softmax averaged.
    ``reduce`` sums the counts over processes (each evaluating its own share of the images)."""
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
    if reduce is not None:
        counts = np.asarray(reduce(np.array([accuracy.count] + [accuracy.correct[k] for k in accuracy.ks])))
        accuracy.count = int(counts[0])
        accuracy.correct = {k: int(c) for k, c in zip(accuracy.ks, counts[1:])}
    result = accuracy.result()
    result["images"] = accuracy.count
    return result
