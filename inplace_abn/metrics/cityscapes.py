"""The Cityscapes pixel-level evaluation (IoU and iIoU, classes and categories), vectorised.

The numbers equal those of the official ``cityscapesscripts`` evaluation
(``evalPixelLevelSemanticLabeling``), which the tests check. Rules it follows:

- a 34x34 confusion matrix over label ids 0..33 (rows: ground truth, columns: prediction);
- class IoU = TP / (TP + FP + FN) for the 19 evaluated classes (NaN for the others, and NaN when
  the denominator is 0). FN is the rest of the class's row, whatever was predicted (an ignored id
  included); FP counts only pixels whose ground truth is an evaluated class;
- iIoU: each ground-truth instance (instance id > 1000, label id = id // 1000, ignored labels
  skipped) adds its TP and FN pixel counts weighted by (fixed average size of its class) / (its
  size); iIoU = wTP / (wTP + FP + wFN), FP as for IoU;
- categories: the same on the union of a category's evaluated labels; iIoU categories exist for the
  categories whose labels all have instances (human, vehicle), and for them a prediction of any of
  the category's labels counts, caravan and trailer included;
- averages are over the entries that are not NaN.
"""

from __future__ import annotations

import math
import os
import re
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..data.labels import (
    CATEGORIES,
    LABEL_BY_ID,
    LABELS,
    LABELS_BY_CATEGORY,
    MAX_LABEL_ID,
    NUM_LABEL_IDS,
    TRAIN_ID_TO_LABEL_ID,
)

#: average pixel count of one instance, per class, fixed by the official evaluation
AVERAGE_INSTANCE_SIZE: Dict[str, float] = {
    "bicycle": 4672.3249222261,
    "caravan": 36771.8241758242,
    "motorcycle": 6298.7200839748,
    "rider": 3930.4788056518,
    "bus": 35732.1511111111,
    "train": 67583.7075812274,
    "car": 12794.0202738185,
    "person": 3462.4756337644,
    "truck": 27855.1264367816,
    "trailer": 16926.9763313609,
}

#: label ids of the confusion matrix (0..33), in order
LABEL_IDS: Tuple[int, ...] = tuple(range(NUM_LABEL_IDS))
_EVALUATED = np.array([not LABEL_BY_ID[i].ignore_in_eval for i in LABEL_IDS])
_NAMES = [LABEL_BY_ID[i].name for i in LABEL_IDS]

# classes with an instance-level score: instances and evaluated
_INSTANCE_CLASSES = [i for i in LABEL_IDS if LABEL_BY_ID[i].has_instances and not LABEL_BY_ID[i].ignore_in_eval]
# categories with an instance-level score: every (stored) label of the category has instances
_INSTANCE_CATEGORIES = {
    category: [label.id for label in labels if label.id >= 0]
    for category, labels in LABELS_BY_CATEGORY.items()
    if all(label.has_instances for label in labels if label.id >= 0)
}
_CATEGORY_INDEX = {category: index for index, category in enumerate(CATEGORIES)}


def _category_tables():
    # per label id: its instance-score category (index into CATEGORIES) or -1
    instance_category = np.full(NUM_LABEL_IDS, -1, dtype=np.int64)
    # [gt label id, predicted label id] -> the prediction lies in the gt's instance category
    in_category = np.zeros((NUM_LABEL_IDS, NUM_LABEL_IDS), dtype=bool)
    for category, ids in _INSTANCE_CATEGORIES.items():
        for label_id in ids:
            instance_category[label_id] = _CATEGORY_INDEX[category]
            in_category[label_id, ids] = True
    return instance_category, in_category


_INSTANCE_CATEGORY_OF, _PREDICTION_IN_CATEGORY = _category_tables()
# the weight numerator of every label id (NaN: no instance-level score)
_AVERAGE_SIZE_OF = np.array(
    [AVERAGE_INSTANCE_SIZE.get(_NAMES[i], math.nan) if i in _INSTANCE_CLASSES else math.nan for i in LABEL_IDS]
)


def _iou(tp, fp, fn) -> float:
    """``tp / (tp + fp + fn)`` as the official script computes it; NaN where nothing was counted."""
    denominator = tp + fp + fn
    return math.nan if denominator == 0 else float(tp) / denominator


class EvaluationError(ValueError):
    """Malformed evaluation input: the message names the file when there is one."""


class ImageStatistics(NamedTuple):
    """What one image adds to the evaluation; images can be processed in parallel and merged in order."""

    confusion: np.ndarray  # int64 (34, 34)
    instance_labels: np.ndarray  # label id of each counted instance, by increasing instance id
    instance_sizes: np.ndarray  # pixels of each instance
    instance_tp: np.ndarray  # of them, predicted as the instance's label
    instance_category_tp: np.ndarray  # of them, predicted as any label of the instance's category


def _as_array(array, what: str, source: str) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim != 2:
        raise EvaluationError(f"{source}: the {what} must be a single-channel (H, W) map, got shape {array.shape}")
    if array.dtype.kind not in "iub":
        raise EvaluationError(f"{source}: the {what} must hold integer ids, got {array.dtype}")
    return array


def _check_ids(array: np.ndarray, what: str, source: str) -> None:
    if array.size == 0:
        return
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > MAX_LABEL_ID:
        bad = np.unique(array[(array < 0) | (array > MAX_LABEL_ID)])
        shown = ", ".join(str(int(v)) for v in bad[:8]) + (", ..." if bad.size > 8 else "")
        hint = ""
        if what == "prediction" and 255 in bad:
            hint = " (255 in a prediction: train ids must be mapped to label ids first)"
        raise EvaluationError(
            f"{source}: {what} holds ids outside the Cityscapes label ids 0..{MAX_LABEL_ID}: {shown}{hint}"
        )


def image_statistics(prediction, label_ids, instance_ids=None, source: str = "image") -> ImageStatistics:
    """Confusion matrix and per-instance counts of one image.

    ``prediction`` and ``label_ids`` hold Cityscapes label ids (0..33), ``instance_ids`` the
    ``*_instanceIds.png`` values (``None``: no instance-level scores). ``source`` names the image in
    error messages.
    """
    prediction = _as_array(prediction, "prediction", source)
    label_ids = _as_array(label_ids, "ground truth", source)
    if prediction.shape != label_ids.shape:
        raise EvaluationError(
            f"{source}: prediction is {prediction.shape[1]}x{prediction.shape[0]} (WxH) but the ground truth "
            f"is {label_ids.shape[1]}x{label_ids.shape[0]}"
        )
    _check_ids(label_ids, "ground truth", source)
    _check_ids(prediction, "prediction", source)
    gt = label_ids.astype(np.intp, copy=False).ravel()
    pred = prediction.astype(np.intp, copy=False).ravel()
    confusion = np.bincount(gt * NUM_LABEL_IDS + pred, minlength=NUM_LABEL_IDS**2).reshape(NUM_LABEL_IDS, NUM_LABEL_IDS)

    empty = np.zeros(0, dtype=np.int64)
    if instance_ids is None:
        return ImageStatistics(confusion.astype(np.int64), empty, empty, empty, empty)
    instance_ids = _as_array(instance_ids, "instance map", source)
    if instance_ids.shape != label_ids.shape:
        raise EvaluationError(
            f"{source}: instance map {instance_ids.shape} and ground truth {label_ids.shape} differ in size"
        )
    flat = instance_ids.ravel()
    selected = np.flatnonzero(flat > 1000)
    if selected.size == 0:
        return ImageStatistics(confusion.astype(np.int64), empty, empty, empty, empty)
    values = flat[selected].astype(np.intp)
    top = int(values.max()) + 1
    if top <= 1 << 20:  # 16-bit instance maps: count with a table instead of sorting
        ids = np.flatnonzero(np.bincount(values, minlength=top))
        position = np.zeros(top, dtype=np.intp)
        position[ids] = np.arange(ids.size)
        inverse = position[values]
    else:
        ids, inverse = np.unique(values, return_inverse=True)
    labels = ids.astype(np.int64) // 1000
    unknown = labels > MAX_LABEL_ID
    if unknown.any():
        raise EvaluationError(
            f"{source}: instance ids {ids[unknown][:5].tolist()} encode label ids above {MAX_LABEL_ID} "
            f"(expected label_id * 1000 + k)"
        )
    keep = _EVALUATED[labels]
    not_instance_class = keep & np.isnan(_AVERAGE_SIZE_OF[labels])
    if not_instance_class.any():
        bad = ids[not_instance_class][:5].tolist()
        raise EvaluationError(
            f"{source}: instance ids {bad} belong to classes without instances "
            f"({', '.join(sorted({_NAMES[int(v) // 1000] for v in bad}))})"
        )
    predicted = pred[selected]
    own_label = labels[inverse]
    sizes = np.bincount(inverse, minlength=ids.size)
    tp = np.bincount(inverse, weights=predicted == own_label, minlength=ids.size)
    category_tp = np.bincount(inverse, weights=_PREDICTION_IN_CATEGORY[own_label, predicted], minlength=ids.size)
    return ImageStatistics(
        confusion.astype(np.int64),
        labels[keep],
        sizes[keep].astype(np.int64),
        tp[keep].astype(np.int64),
        category_tp[keep].astype(np.int64),
    )


class CityscapesEvaluator:
    """Accumulates images and computes the official Cityscapes pixel-level scores.

        evaluator = CityscapesEvaluator()
        for prediction, label_ids, instance_ids in batches:      # label ids, (H, W) each
            evaluator.add(prediction, label_ids, instance_ids)
        scores = evaluator.result()   # scores["averageScoreClasses"], ...

    Arrays may be numpy arrays or torch tensors; :meth:`add_train_ids` takes predictions in train ids.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.confusion = np.zeros((NUM_LABEL_IDS, NUM_LABEL_IDS), dtype=np.int64)
        self.num_images = 0
        # weighted TP / FN sums per label id and per category, accumulated instance by instance in the
        # official order so that even the floating-point rounding matches
        self._class_tp = np.zeros(NUM_LABEL_IDS)
        self._class_fn = np.zeros(NUM_LABEL_IDS)
        self._category_tp = np.zeros(len(CATEGORIES))
        self._category_fn = np.zeros(len(CATEGORIES))

    def add(self, prediction, label_ids, instance_ids=None, source: str = "image") -> None:
        """Add one image (label ids 0..33; ``instance_ids`` as in ``*_instanceIds.png``)."""
        self.add_statistics(image_statistics(prediction, label_ids, instance_ids, source))

    def add_train_ids(self, prediction, label_ids, instance_ids=None, source: str = "image") -> None:
        """Add one image whose prediction holds train ids (0..18)."""
        if hasattr(prediction, "detach"):
            prediction = prediction.detach().cpu().numpy()
        prediction = np.asarray(prediction)
        if prediction.size and (prediction.min() < 0 or prediction.max() >= len(TRAIN_ID_TO_LABEL_ID)):
            raise EvaluationError(
                f"{source}: prediction holds values outside the train ids 0..{len(TRAIN_ID_TO_LABEL_ID) - 1}"
            )
        table = np.asarray(TRAIN_ID_TO_LABEL_ID, dtype=np.uint8)
        self.add(table[prediction], label_ids, instance_ids, source)

    def add_statistics(self, stats: ImageStatistics) -> None:
        self.confusion += stats.confusion
        self.num_images += 1
        if stats.instance_labels.size == 0:
            return
        weight = _AVERAGE_SIZE_OF[stats.instance_labels] / stats.instance_sizes.astype(np.float64)
        fn = stats.instance_sizes - stats.instance_tp
        # np.add.at adds element by element in order: the same sums, bit for bit, as a Python loop
        np.add.at(self._class_tp, stats.instance_labels, stats.instance_tp * weight)
        np.add.at(self._class_fn, stats.instance_labels, fn * weight)
        category = _INSTANCE_CATEGORY_OF[stats.instance_labels]
        has = category >= 0
        category_fn = stats.instance_sizes - stats.instance_category_tp
        np.add.at(self._category_tp, category[has], (stats.instance_category_tp * weight)[has])
        np.add.at(self._category_fn, category[has], (category_fn * weight)[has])

    def merge(self, other: "CityscapesEvaluator") -> None:
        """Add another evaluator's counts (e.g. from another process). Weighted sums are then added
        per class, so the last digits may differ from a sequential run."""
        self.confusion += other.confusion
        self.num_images += other.num_images
        self._class_tp += other._class_tp
        self._class_fn += other._class_fn
        self._category_tp += other._category_tp
        self._category_fn += other._category_fn

    # -- scores ------------------------------------------------------------------------------------

    def _false_positives(self, rows_excluded: Sequence[int], columns: Sequence[int]) -> int:
        rows = _EVALUATED.copy()
        rows[list(rows_excluded)] = False
        return int(self.confusion[rows][:, list(columns)].sum())

    def class_scores(self) -> Tuple[Dict[str, float], Dict[str, float]]:
        """``(IoU, iIoU)`` per label name, for all 34 label ids (NaN where not defined)."""
        iou, iiou = {}, {}
        for label_id in LABEL_IDS:
            name = _NAMES[label_id]
            if not _EVALUATED[label_id]:
                iou[name] = iiou[name] = math.nan
                continue
            tp = int(self.confusion[label_id, label_id])
            fn = int(self.confusion[label_id].sum()) - tp
            fp = self._false_positives([label_id], [label_id])
            iou[name] = _iou(tp, fp, fn)
            if label_id in _INSTANCE_CLASSES:
                iiou[name] = _iou(float(self._class_tp[label_id]), fp, float(self._class_fn[label_id]))
            else:
                iiou[name] = math.nan
        return iou, iiou

    def category_scores(self) -> Tuple[Dict[str, float], Dict[str, float]]:
        """``(IoU, iIoU)`` per category (NaN where not defined: void, and iIoU outside human, vehicle)."""
        iou, iiou = {}, {}
        for index, category in enumerate(CATEGORIES):
            members = [label.id for label in LABELS_BY_CATEGORY[category] if label.id >= 0]  # no FP rows
            evaluated = [label_id for label_id in members if _EVALUATED[label_id]]
            if not evaluated:
                iou[category] = math.nan
            else:
                tp = int(self.confusion[np.ix_(evaluated, evaluated)].sum())
                fn = int(self.confusion[evaluated].sum()) - tp
                fp = self._false_positives(members, evaluated)
                iou[category] = _iou(tp, fp, fn)
            if category in _INSTANCE_CATEGORIES:
                fp = self._false_positives(members, _INSTANCE_CATEGORIES[category])
                iiou[category] = _iou(float(self._category_tp[index]), fp, float(self._category_fn[index]))
            else:
                iiou[category] = math.nan
        return iou, iiou

    def result(self) -> dict:
        """The content of the official result file: ``averageScoreClasses``, ``averageScoreInstClasses``,
        ``averageScoreCategories``, ``averageScoreInstCategories``, ``classScores``, ``classInstScores``,
        ``categoryScores``, ``categoryInstScores`` (scores in [0, 1], NaN where undefined), plus
        ``confMatrix``, ``priors`` and ``labels`` as the official file has them."""
        class_iou, class_iiou = self.class_scores()
        category_iou, category_iiou = self.category_scores()
        total = self.confusion.sum()
        return {
            "averageScoreClasses": average_score(class_iou),
            "averageScoreInstClasses": average_score(class_iiou),
            "averageScoreCategories": average_score(category_iou),
            "averageScoreInstCategories": average_score(category_iiou),
            "classScores": class_iou,
            "classInstScores": class_iiou,
            "categoryScores": category_iou,
            "categoryInstScores": category_iiou,
            "confMatrix": self.confusion.tolist(),
            "priors": {
                _NAMES[i]: (float(self.confusion[i].sum()) / total if total else math.nan) for i in LABEL_IDS
            },
            "labels": {_NAMES[i]: i for i in LABEL_IDS},
        }


def average_score(scores: Dict[str, float]) -> float:
    """Mean of the entries that are not NaN (NaN if there are none), summed in order."""
    valid = [value for value in scores.values() if not math.isnan(value)]
    if not valid:
        return math.nan
    total = 0.0
    for value in valid:
        total += value
    return total / len(valid)


# ------------------------------------------------------------------------------------------------
# Files: ground truth and predictions in the official layout

GT_SUFFIX = "_gtFine_labelIds.png"
_GT_INSTANCE_SUFFIX = "_gtFine_instanceIds.png"


class EvaluationPair(NamedTuple):
    name: str  # <city>_<seq>_<frame>
    prediction: str
    label_ids: str
    instance_ids: Optional[str]


def _walk(folder: str, keep) -> List[str]:
    found = []
    for directory, subdirs, files in os.walk(folder):
        subdirs.sort()
        found.extend(os.path.join(directory, name) for name in sorted(files) if keep(name))
    return found


def find_evaluation_pairs(gt_dir: str, pred_dir: str, instances: bool = True) -> List[EvaluationPair]:
    """Match every ``*_gtFine_labelIds.png`` under ``gt_dir`` (recursively) with the one PNG under
    ``pred_dir`` (recursively) whose name contains its ``<city>_<seq>_<frame>``."""
    for what, folder in (("ground truth", gt_dir), ("prediction", pred_dir)):
        if not os.path.isdir(folder):
            raise EvaluationError(f"{what} folder {folder!r} does not exist or is not a folder")
    gt_files = _walk(gt_dir, lambda name: name.endswith(GT_SUFFIX))
    if not gt_files:
        raise EvaluationError(
            f"no ground truth found: expected files named <city>_<seq>_<frame>{GT_SUFFIX} under {gt_dir}"
        )
    by_name: Dict[str, str] = {}
    for path in gt_files:
        name = os.path.basename(path)[: -len(GT_SUFFIX)]
        if name in by_name:
            raise EvaluationError(f"ground truth {name} found twice: {by_name[name]} and {path}")
        by_name[name] = path

    matches: Dict[str, List[str]] = {name: [] for name in by_name}
    token = re.compile(r"[^_./\\]+")
    for path in _walk(pred_dir, lambda name: name.lower().endswith(".png")):
        parts = token.findall(os.path.basename(path)[:-4])
        for start in range(len(parts) - 2):
            key = "_".join(parts[start : start + 3])
            if key in matches:
                matches[key].append(path)
                break

    pairs = []
    for name, gt_path in by_name.items():
        found = matches[name]
        if not found:
            raise EvaluationError(
                f"no prediction for {gt_path}: expected a PNG under {pred_dir} whose name contains {name}"
            )
        if len(found) > 1:
            raise EvaluationError(f"several predictions for {gt_path}: {', '.join(found)}")
        instance_path = None
        if instances:
            instance_path = gt_path[: -len(GT_SUFFIX)] + _GT_INSTANCE_SUFFIX
            if not os.path.isfile(instance_path):
                raise EvaluationError(f"missing instance map {instance_path} (needed for iIoU) next to {gt_path}")
        pairs.append(EvaluationPair(name, found[0], gt_path, instance_path))
    return pairs


def _read(path: str) -> np.ndarray:
    from ..data.io import DataError, read_label_map

    try:
        return read_label_map(path)
    except DataError as error:
        raise EvaluationError(str(error)) from None


def pair_statistics(pair: EvaluationPair) -> ImageStatistics:
    prediction = _read(pair.prediction)
    label_ids = _read(pair.label_ids)
    if prediction.shape != label_ids.shape:
        raise EvaluationError(
            f"size mismatch: prediction {pair.prediction} is {prediction.shape[1]}x{prediction.shape[0]}, "
            f"ground truth {pair.label_ids} is {label_ids.shape[1]}x{label_ids.shape[0]}"
        )
    instance_ids = None if pair.instance_ids is None else _read(pair.instance_ids)
    _check_ids(prediction, "prediction", pair.prediction)
    _check_ids(label_ids, "ground truth", pair.label_ids)
    return image_statistics(prediction, label_ids, instance_ids, source=pair.instance_ids or pair.label_ids)


def evaluate_pairs(pairs: Sequence[EvaluationPair], jobs: int = 1, progress: bool = False) -> CityscapesEvaluator:
    """Evaluate file pairs; ``jobs`` threads decode images in parallel, results merge in order."""
    evaluator = CityscapesEvaluator()
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(pairs), desc="evaluating", unit="img")
        except ImportError:
            bar = None
    try:
        if jobs > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(jobs) as pool:
                for stats in pool.map(pair_statistics, pairs):
                    evaluator.add_statistics(stats)
                    if bar is not None:
                        bar.update()
        else:
            for pair in pairs:
                evaluator.add_statistics(pair_statistics(pair))
                if bar is not None:
                    bar.update()
    finally:
        if bar is not None:
            bar.close()
    return evaluator


def evaluate_folders(gt_dir: str, pred_dir: str, jobs: int = 1, progress: bool = False) -> dict:
    """The official result dict for the predictions in ``pred_dir`` against the ground truth in ``gt_dir``."""
    return evaluate_pairs(find_evaluation_pairs(gt_dir, pred_dir), jobs, progress).result()


# ------------------------------------------------------------------------------------------------
# Report


def format_report(result: dict) -> str:
    """The classes and categories tables, as the official script prints them (scores in [0, 1])."""

    def row(name: str, iou: float, iiou: float) -> str:
        return f"{name[:14]:<14}: {iou:>5.3f}    {iiou:>5.3f}"

    lines = ["classes          IoU      iIoU", "--------------------------------"]
    for label in LABELS:
        if label.id >= 0 and not label.ignore_in_eval:
            lines.append(row(label.name, result["classScores"][label.name], result["classInstScores"][label.name]))
    lines += [
        "--------------------------------",
        f"Score Average : {result['averageScoreClasses']:5.3f}    {result['averageScoreInstClasses']:5.3f}",
        "--------------------------------",
        "",
        "categories       IoU      iIoU",
        "--------------------------------",
    ]
    for category in CATEGORIES:
        if all(label.ignore_in_eval for label in LABELS_BY_CATEGORY[category]):
            continue
        lines.append(row(category, result["categoryScores"][category], result["categoryInstScores"][category]))
    lines += [
        "--------------------------------",
        f"Score Average : {result['averageScoreCategories']:5.3f}    {result['averageScoreInstCategories']:5.3f}",
        "--------------------------------",
    ]
    return "\n".join(lines)


def summary(result: dict) -> Dict[str, float]:
    """The four benchmark numbers, in percent: IoU/iIoU classes, IoU/iIoU categories."""
    return {
        "iou_classes": 100 * result["averageScoreClasses"],
        "iiou_classes": 100 * result["averageScoreInstClasses"],
        "iou_categories": 100 * result["averageScoreCategories"],
        "iiou_categories": 100 * result["averageScoreInstCategories"],
    }

