"""The recipes in configs/ run: each one trains on a tiny tree of its dataset's layout through
``inplace-abn train --config``, shrunk only by the command line (width, crop, steps, batch); the
segmentation recipes chain as they would at full size: ImageNet WideResNet-38 -> Vistas -> Cityscapes
fine + coarse -> KITTI, each starting from the previous one's checkpoint."""

import glob
import json
import os

import pytest
import torch

pytest.importorskip("numpy")
pytest.importorskip("PIL")

from fixture_trees import write_imagefolder_tree, write_vistas_tree  # noqa: E402
from inplace_abn import cli  # noqa: E402
from inplace_abn.data.synthetic import write_synthetic_cityscapes, write_synthetic_kitti  # noqa: E402
from inplace_abn.training import TrainConfig, load_checkpoint  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
RECIPES = sorted(glob.glob(os.path.join(CONFIGS, "*", "*.json")))
IMAGENET = [path for path in RECIPES if os.path.basename(os.path.dirname(path)) == "imagenet"]
TINY = ["--width", "0.0625", "--batch-size", "2", "--workers", "0", "--device", "cpu", "--quiet"]


@pytest.fixture(autouse=True)
def _eager_backend(monkeypatch):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("trees")
    write_imagefolder_tree(str(root / "imagenet"))
    write_vistas_tree(str(root / "vistas"))
    write_synthetic_cityscapes(str(root / "cityscapes"), {"train": 2, "train_extra": 2, "val": 2}, height=32, width=64)
    write_synthetic_kitti(str(root / "kitti"), train=6, test=1, height=32, width=96)  # val: images 0 and 5
    return root


def recipe(name):
    return os.path.join(CONFIGS, name)


def test_the_recipes_are_there():
    names = {os.path.relpath(path, CONFIGS) for path in RECIPES}
    assert len(IMAGENET) == 9  # the original's scripts/experiments/*.json
    assert {"vistas/wrn38a2_deeplabv3.json", "cityscapes/wrn38a2_deeplabv3_fine_coarse.json",
            "kitti/wrn38a2_deeplabv3_kitti.json"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: os.path.relpath(path, CONFIGS))
def test_each_recipe_is_a_complete_config_with_its_memory_note(path):
    with open(path) as file:
        values = json.load(file)
    config = TrainConfig.from_dict(dict(values, root="/data"), path).validate()  # the root is the user's
    assert "root" not in values
    assert any(note.startswith("GPU memory per crop") and "estimate" in note for note in config.notes), config.notes
    assert config.out_dir.startswith("out/")
    assert config.epochs is not None and config.global_batch_size is not None  # sizes independent of the GPUs
    if config.task == "classification":
        assert config.dataset == "imagefolder" and config.crop_size == (224, 224) and config.epochs == 90


@pytest.mark.parametrize("path", IMAGENET, ids=lambda path: os.path.basename(path)[:-5])
def test_each_imagenet_recipe_trains(path, trees, tmp_path):
    out = tmp_path / "run"
    code = cli.main(["train", "--config", path, "--root", str(trees / "imagenet"), "--crop", "32", "--steps", "1",
                     "--val-every", "0", "--out", str(out)] + TINY)  # fmt: skip
    assert code == 0
    state = load_checkpoint(str(out / "checkpoint.pt"))
    with open(path) as file:
        recipe_values = json.load(file)
    for key in ("network", "norm", "lr", "nesterov", "lighting", "lr_schedule", "decay_norm_and_bias"):
        assert state["config"][key] == recipe_values[key], key  # the recipe's settings, not defaults
    assert state["step"] == 1 and state["num_classes"] == 3


def test_the_segmentation_recipes_chain_imagenet_vistas_cityscapes_kitti(trees, tmp_path, capsys):
    imagenet_out, vistas_out, cityscapes_out = tmp_path / "imagenet", tmp_path / "vistas", tmp_path / "cityscapes"
    assert cli.main(["train", "--config", recipe("imagenet/wider_resnet38_ipabn_lr_256.json"), "--root",
                     str(trees / "imagenet"), "--crop", "32", "--steps", "1", "--out", str(imagenet_out)] + TINY) == 0
    assert (imagenet_out / "best.pt").is_file()  # validated at the end: the recipe's val_every

    assert cli.main(["train", "--config", recipe("vistas/wrn38a2_deeplabv3.json"), "--root", str(trees / "vistas"),
                     "--init-from", str(imagenet_out / "best.pt"), "--crop", "32x32", "--longest-side", "40",
                     "--steps", "1", "--out", str(vistas_out)] + TINY) == 0  # fmt: skip
    vistas = load_checkpoint(str(vistas_out / "best.pt"))
    assert vistas["num_classes"] == 65 and vistas["best"]["metric"] == "mean_iou"
    report = json.loads((vistas_out / "init_report.json").read_text())
    model = vistas["model"]
    assert set(report["taken"]) == {key for key in model if key.startswith("body.")}  # WRN-38's are WRN-38-A2's
    assert set(report["reinitialised"]) == {key for key in model if key.startswith(("head.", "cls."))}
    assert report["left_out"] == ["classifier.fc.bias", "classifier.fc.weight"]  # the ImageNet classifier

    assert cli.main(["train", "--config", recipe("cityscapes/wrn38a2_deeplabv3_fine_coarse.json"), "--root",
                     str(trees / "cityscapes"), "--init-from", str(vistas_out / "best.pt"), "--crop", "32x32",
                     "--steps", "1", "--out", str(cityscapes_out)] + TINY) == 0  # fmt: skip
    cityscapes = load_checkpoint(str(cityscapes_out / "checkpoint.pt"))
    assert cityscapes["num_classes"] == 19 and cityscapes["config"]["train_split"] == "train+train_extra"
    report = json.loads((cityscapes_out / "init_report.json").read_text())
    reinitialised = sorted(report["reinitialised"])
    assert reinitialised and all("shape" in report["reinitialised"][key] for key in reinitialised)  # 65 -> 19 classes
    assert len(reinitialised) == 2 and len(report["left_out"]) == 2  # only the classifier is new (65 -> 19)
    assert "init from" in capsys.readouterr().err
    # what was taken is the Vistas model's, bit for bit (before the one step: compare a buffer no step changes)
    for key in report["taken"]:
        if key.endswith("num_batches_tracked"):
            assert int(cityscapes["model"][key]) == int(vistas["model"][key]) + 1

    kitti_out = tmp_path / "kitti"
    assert cli.main(["train", "--config", recipe("kitti/wrn38a2_deeplabv3_kitti.json"), "--root", str(trees / "kitti"),
                     "--init-from", str(cityscapes_out / "checkpoint.pt"), "--crop", "32x64", "--steps", "1",
                     "--out", str(kitti_out)] + TINY) == 0  # fmt: skip
    report = json.loads((kitti_out / "init_report.json").read_text())
    assert not report["reinitialised"] and not report["left_out"]  # the same 19 classes: everything is taken
    assert load_checkpoint(str(kitti_out / "best.pt"))["best"]["metric"] == "mean_iou"
