"""Our Cityscapes pixel-level evaluation against the official one (cityscapesscripts'
evalPixelLevelSemanticLabeling) on the same files: every number must be equal."""

import json
import math
import os
import types

import numpy as np
import pytest

from inplace_abn.data.labels import LABELS, TRAIN_ID_TO_LABEL_ID
from inplace_abn.metrics.cityscapes import (
    CityscapesEvaluator,
    EvaluationError,
    evaluate_folders,
    find_evaluation_pairs,
)

Image = pytest.importorskip("PIL.Image")

CITIES = ("aachen", "bochum", "zurich")
RESULT_KEYS = (
    "averageScoreClasses",
    "averageScoreInstClasses",
    "averageScoreCategories",
    "averageScoreInstCategories",
    "classScores",
    "classInstScores",
    "categoryScores",
    "categoryInstScores",
)


def _random_scene(rng, height, width, present):
    """Label ids made of rectangles of the ``present`` ids, instances for the instance classes
    (some as groups without instance id), and the matching instance map."""
    label_ids = np.full((height, width), rng.choice(present), dtype=np.uint8)
    instance_ids = label_ids.astype(np.int32)
    counts = {}
    for _ in range(rng.integers(8, 20)):
        label_id = int(rng.choice(present))
        y0, x0 = rng.integers(0, height - 4), rng.integers(0, width - 4)
        y1, x1 = y0 + rng.integers(2, height // 2), x0 + rng.integers(2, width // 2)
        label_ids[y0:y1, x0:x1] = label_id
        value = label_id
        if label_id >= 24 and rng.random() < 0.8:  # an instance (caravan/trailer included); else a group
            k = counts.get(label_id, 0)
            counts[label_id] = k + 1
            value = label_id * 1000 + k
        instance_ids[y0:y1, x0:x1] = value
    return label_ids, instance_ids


def _predict(rng, label_ids, error_rate):
    """The ground truth with shifted regions and random ids (ignored ids included)."""
    prediction = label_ids.copy()
    prediction = np.roll(prediction, int(rng.integers(-3, 4)), axis=1)
    noise = rng.random(label_ids.shape) < error_rate
    prediction[noise] = rng.integers(0, 34, size=int(noise.sum()))
    return prediction


def _write_dataset(root, rng, num_images=9, height=48, width=80, absent=(), prediction_ids=None):
    """Ground truth (official layout, 16-bit instance maps) and predictions in ``root/results``."""
    valid_ids = [label.id for label in LABELS if label.id >= 0 and label.id not in absent]
    gt_paths, pred_dir = [], os.path.join(root, "results")
    os.makedirs(pred_dir, exist_ok=True)
    for index in range(num_images):
        city = CITIES[index % len(CITIES)]
        name = f"{city}_{index:06d}_{(7 * index) % 1000:06d}"
        present = rng.choice(valid_ids, size=int(rng.integers(4, 12)), replace=False)
        label_ids, instance_ids = _random_scene(rng, height, width, present)
        folder = os.path.join(root, "gtFine", "val", city)
        os.makedirs(folder, exist_ok=True)
        gt_path = os.path.join(folder, f"{name}_gtFine_labelIds.png")
        Image.fromarray(label_ids).save(gt_path)
        Image.fromarray(instance_ids.astype(np.uint16)).save(os.path.join(folder, f"{name}_gtFine_instanceIds.png"))
        prediction = _predict(rng, label_ids, rng.uniform(0.05, 0.4))
        if prediction_ids is not None:  # restrict what is predicted (classes absent everywhere)
            allowed = np.asarray(prediction_ids, dtype=np.uint8)
            prediction = allowed[prediction % len(allowed)]
        pred_name = f"{name}_leftImg8bit.png" if index % 2 else f"{name}.png"
        Image.fromarray(prediction).save(os.path.join(pred_dir, pred_name))
        gt_paths.append(gt_path)
    return gt_paths, pred_dir


@pytest.fixture
def official(monkeypatch, tmp_path):
    """The official evaluation module, set up to run on a list of files: no JSON export, no console
    output, no colors, predictions searched under a folder we choose."""
    pytest.importorskip("cityscapesscripts")
    monkeypatch.setenv("CITYSCAPES_DATASET", str(tmp_path))
    monkeypatch.setenv("CITYSCAPES_EXPORT_DIR", str(tmp_path))
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as module

    if not hasattr(module.np, "in1d"):  # removed in NumPy 2.4; the official script still calls it
        shim = types.ModuleType("numpy_with_in1d")
        shim.__dict__.update(np.__dict__)
        shim.in1d = lambda values, test, invert=False: np.isin(np.ravel(values), test, invert=invert)
        monkeypatch.setattr(module, "np", shim)
    for name, value in dict(quiet=True, JSONOutput=False, colorized=False, evalInstLevelScore=True,
                            evalPixelAccuracy=False, predictionPath=None, predictionWalk=None).items():  # fmt: skip
        monkeypatch.setattr(module.args, name, value)

    def evaluate(gt_paths, pred_dir):
        module.args.predictionPath, module.args.predictionWalk = pred_dir, None
        predictions = [module.getPrediction(module.args, path) for path in gt_paths]
        return module.evaluateImgLists(predictions, gt_paths, module.args)

    return evaluate


def _assert_same(ours, theirs):
    for key in RESULT_KEYS + ("priors", "labels"):
        assert key in ours, key
        a, b = ours[key], theirs[key]
        if isinstance(b, dict):
            assert list(a) == list(b), key  # same names, same order
            for name in b:
                assert _same_number(a[name], b[name]), (key, name, a[name], b[name])
        else:
            assert _same_number(a, b), (key, a, b)
    assert ours["confMatrix"] == np.asarray(theirs["confMatrix"]).tolist()


def _same_number(a, b):
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or abs(a - b) <= 1e-12 * max(1.0, abs(b))


@pytest.mark.parametrize("seed", [0, 1])
def test_equals_official_on_random_files(tmp_path, official, seed):
    rng = np.random.default_rng(seed)
    # some classes never in the ground truth: their IoU is NaN unless predicted (then 0)
    gt_paths, pred_dir = _write_dataset(str(tmp_path), rng, absent=(27, 28, 31))
    ours = evaluate_folders(str(tmp_path / "gtFine"), pred_dir, jobs=2)
    theirs = official(gt_paths, pred_dir)
    _assert_same(ours, theirs)


def test_equals_official_when_classes_are_absent_everywhere(tmp_path, official):
    """Classes neither in the ground truth nor predicted: NaN, left out of the averages."""
    rng = np.random.default_rng(5)
    absent = (25, 27, 28, 31, 32)  # rider, truck, bus, train, motorcycle
    predictable = [label.id for label in LABELS if 0 <= label.id and label.id not in absent]
    gt_paths, pred_dir = _write_dataset(str(tmp_path), rng, num_images=5, absent=absent, prediction_ids=predictable)
    ours = evaluate_folders(str(tmp_path / "gtFine"), pred_dir)
    _assert_same(ours, official(gt_paths, pred_dir))
    for name in ("rider", "truck", "bus", "train", "motorcycle"):
        assert math.isnan(ours["classScores"][name]) and math.isnan(ours["classInstScores"][name])
    assert math.isnan(ours["categoryScores"]["void"]) and math.isnan(ours["categoryInstScores"]["flat"])


def test_equals_official_on_synthetic_scenes(tmp_path, official):
    """The built-in scenes (with groups, ignored regions, occluded instances) and noisy predictions."""
    from inplace_abn.data.synthetic import write_synthetic_cityscapes

    names = write_synthetic_cityscapes(str(tmp_path), {"val": 6}, height=64, width=128, seed=11)["val"]
    rng = np.random.default_rng(0)
    pred_dir = tmp_path / "results"
    pred_dir.mkdir()
    gt_paths = []
    for name in names:
        city = name.split("_")[0]
        gt_path = str(tmp_path / "gtFine" / "val" / city / f"{name}_gtFine_labelIds.png")
        label_ids = np.asarray(Image.open(gt_path))
        # predictions in train-id space mapped back, as a network would write them
        train_prediction = rng.integers(0, 19, size=label_ids.shape)
        keep = rng.random(label_ids.shape) < 0.7
        prediction = np.where(keep, label_ids, np.asarray(TRAIN_ID_TO_LABEL_ID, dtype=np.uint8)[train_prediction])
        Image.fromarray(prediction.astype(np.uint8)).save(pred_dir / f"{name}_leftImg8bit.png")
        gt_paths.append(gt_path)
    ours = evaluate_folders(str(tmp_path / "gtFine"), str(pred_dir))
    _assert_same(ours, official(gt_paths, str(pred_dir)))


def test_accumulator_equals_folder_evaluation(tmp_path):
    rng = np.random.default_rng(3)
    _write_dataset(str(tmp_path), rng, num_images=4)
    pairs = find_evaluation_pairs(str(tmp_path / "gtFine"), str(tmp_path / "results"))
    evaluator = CityscapesEvaluator()
    for pair in pairs:
        evaluator.add(
            np.asarray(Image.open(pair.prediction)),
            np.asarray(Image.open(pair.label_ids)),
            np.asarray(Image.open(pair.instance_ids)),
        )
    _assert_same(evaluator.result(), evaluate_folders(str(tmp_path / "gtFine"), str(tmp_path / "results")))


def test_perfect_prediction_scores_one():
    rng = np.random.default_rng(0)
    label_ids, instance_ids = _random_scene(rng, 40, 60, [7, 8, 11, 24, 26, 33, 0])
    evaluator = CityscapesEvaluator()
    evaluator.add(label_ids, label_ids, instance_ids)
    result = evaluator.result()
    assert result["averageScoreClasses"] == 1.0
    assert result["averageScoreInstClasses"] == 1.0
    assert result["averageScoreCategories"] == 1.0


def test_train_id_predictions_and_torch_tensors():
    torch = pytest.importorskip("torch")
    label_ids = np.array([[7, 8], [26, 0]], dtype=np.uint8)
    train_ids = torch.tensor([[0, 1], [13, 0]])  # road, sidewalk, car, road (on an unlabeled pixel)
    evaluator = CityscapesEvaluator()
    evaluator.add_train_ids(train_ids, torch.from_numpy(label_ids))
    scores = evaluator.result()["classScores"]
    assert scores["road"] == 1.0 and scores["sidewalk"] == 1.0 and scores["car"] == 1.0


def test_errors_name_the_file(tmp_path):
    rng = np.random.default_rng(4)
    gt_paths, pred_dir = _write_dataset(str(tmp_path), rng, num_images=3)
    gt_dir = str(tmp_path / "gtFine")
    first = os.path.basename(gt_paths[0])[: -len("_gtFine_labelIds.png")]
    pred_file = next(os.path.join(pred_dir, f) for f in os.listdir(pred_dir) if first in f)

    # a prediction of the wrong size
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(pred_file)
    with pytest.raises(EvaluationError, match="size mismatch.*" + first):
        evaluate_folders(gt_dir, pred_dir)
    # train ids with 255 for "ignore" instead of label ids
    Image.fromarray(np.full((48, 80), 255, dtype=np.uint8)).save(pred_file)
    with pytest.raises(EvaluationError, match=first + ".*outside the Cityscapes label ids.*255.*train ids"):
        evaluate_folders(gt_dir, pred_dir)
    # an RGB prediction
    Image.fromarray(np.zeros((48, 80, 3), dtype=np.uint8)).save(pred_file)
    with pytest.raises(EvaluationError, match=first + ".*single-channel"):
        evaluate_folders(gt_dir, pred_dir)
    # an unreadable prediction
    with open(pred_file, "wb") as file:
        file.write(b"not a png")
    with pytest.raises(EvaluationError, match="cannot read.*" + first):
        evaluate_folders(gt_dir, pred_dir)
    # a missing prediction
    os.remove(pred_file)
    with pytest.raises(EvaluationError, match="no prediction for .*" + first):
        evaluate_folders(gt_dir, pred_dir)
    # two predictions for one image
    Image.fromarray(np.zeros((48, 80), dtype=np.uint8)).save(os.path.join(pred_dir, f"a_{first}.png"))
    Image.fromarray(np.zeros((48, 80), dtype=np.uint8)).save(os.path.join(pred_dir, f"b_{first}.png"))
    with pytest.raises(EvaluationError, match="several predictions"):
        evaluate_folders(gt_dir, pred_dir)
    os.remove(os.path.join(pred_dir, f"b_{first}.png"))
    # ground truth with an id that is not a Cityscapes label id
    bad_gt = np.asarray(Image.open(gt_paths[1])).copy()
    bad_gt[0, 0] = 40
    Image.fromarray(bad_gt).save(gt_paths[1])
    with pytest.raises(EvaluationError, match=os.path.basename(gt_paths[1]) + ".*ground truth holds ids.*40"):
        evaluate_folders(gt_dir, pred_dir)
    # a missing instance map
    os.remove(gt_paths[2].replace("labelIds", "instanceIds"))
    with pytest.raises(EvaluationError, match="missing instance map"):
        evaluate_folders(gt_dir, pred_dir)
    # no ground truth at all
    with pytest.raises(EvaluationError, match="no ground truth found"):
        evaluate_folders(pred_dir, pred_dir)


def test_command_line(tmp_path, capsys):
    from inplace_abn.cli import main

    rng = np.random.default_rng(6)
    _write_dataset(str(tmp_path), rng, num_images=3)
    out = tmp_path / "out" / "result.json"
    code = main(["cityscapes-eval", "--gt", str(tmp_path / "gtFine"), "--pred", str(tmp_path / "results"),
                 "--json", str(out), "--quiet"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "classes          IoU      iIoU" in printed and "categories" in printed and "Score Average" in printed
    with open(out) as file:
        written = json.load(file)
    assert set(RESULT_KEYS) <= set(written)
    assert written["averageScoreClasses"] == pytest.approx(
        evaluate_folders(str(tmp_path / "gtFine"), str(tmp_path / "results"))["averageScoreClasses"]
    )

    code = main(["cityscapes-eval", "--gt", str(tmp_path / "missing"), "--pred", str(tmp_path / "results"), "--quiet"])
    assert code == 1
    assert "ground truth folder" in capsys.readouterr().err


def test_prediction_names_only_have_to_contain_the_key(tmp_path):
    rng = np.random.default_rng(7)
    _write_dataset(str(tmp_path), rng, num_images=3)
    pred_dir = tmp_path / "results"
    before = evaluate_folders(str(tmp_path / "gtFine"), str(pred_dir))
    nested = pred_dir / "deeper" / "still"
    nested.mkdir(parents=True)
    for name in os.listdir(pred_dir):
        if name.endswith(".png"):
            os.rename(pred_dir / name, nested / f"model-x_{name[:-4]}_labelIds.png")
    _assert_same(evaluate_folders(str(tmp_path / "gtFine"), str(pred_dir)), before)


# ------------------------------------------------------------------------------------------------
# Generic metrics: mean IoU for any label set, top-k accuracy


def test_confusion_matrix_mean_iou():
    torch = pytest.importorskip("torch")
    from inplace_abn.metrics import ConfusionMatrix

    target = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    prediction = np.array([[0, 1, 1, 1], [2, 0, 3, 1]])
    matrix = ConfusionMatrix(4, ignore_index=255, class_names=["a", "b", "c", "d"])
    matrix.add(prediction, target)
    # a: tp 1, fp 1, fn 1 -> 1/3; b: tp 3, fp 1 -> 3/4; c: tp 1, fn 1 -> 1/2; d: never present nor predicted
    expected = [1 / 3, 3 / 4, 1 / 2]
    assert np.allclose(matrix.iou()[:3], expected) and np.isnan(matrix.iou()[3])
    assert matrix.mean_iou() == pytest.approx(np.mean(expected))
    assert matrix.pixel_accuracy() == pytest.approx(5 / 7)
    tensors = ConfusionMatrix(4)
    tensors.add(torch.from_numpy(prediction), torch.from_numpy(target))
    assert np.array_equal(tensors.matrix, matrix.matrix)
    assert matrix.result()["class_iou"]["b"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="outside 0..3"):
        matrix.add(np.array([9]), np.array([0]))


def test_topk_accuracy():
    torch = pytest.importorskip("torch")
    from inplace_abn.metrics import TopKAccuracy, topk_correct

    scores = np.array([[0.1, 0.5, 0.2, 0.0, 0.0, 0.0, 0.3], [0.9, 0.0, 0.05, 0.04, 0.03, 0.02, 0.01]])
    targets = np.array([6, 5])  # second best; fifth best
    assert topk_correct(scores, targets, (1, 2, 4, 5)) == {1: 0, 2: 1, 4: 1, 5: 2}
    assert topk_correct(torch.from_numpy(scores), torch.from_numpy(targets), (1, 2, 4, 5)) == {1: 0, 2: 1, 4: 1, 5: 2}
    accuracy = TopKAccuracy()
    accuracy.add(torch.eye(3), torch.tensor([0, 1, 0]))
    assert accuracy.result() == {"top1": pytest.approx(2 / 3), "top5": 1.0}
