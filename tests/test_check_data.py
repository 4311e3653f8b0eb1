"""``inplace-abn check-data`` lists every broken file of a dataset tree (truncated PNGs, missing pairs,
label ids no label has), and a broken file met during a run ends it with one line naming the file."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("tqdm")

from inplace_abn import cli  # noqa: E402
from inplace_abn.data import DataError, write_synthetic_cityscapes, write_synthetic_kitti  # noqa: E402
from inplace_abn.data.check import check_tree  # noqa: E402
from inplace_abn.data.errors import message_of  # noqa: E402


@pytest.fixture(scope="module")
def clean_cityscapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    write_synthetic_cityscapes(str(root), {"train": 4, "val": 2, "train_extra": 2}, height=16, width=32, seed=3)
    return root


def image_of(root, split, index):
    city = "synth" + split.replace("_", "")
    return root / "leftImg8bit" / split / city / f"{city}_000000_{index:06d}_leftImg8bit.png"


def label_of(root, split, index, folder="gtFine"):
    city = "synth" + split.replace("_", "")
    return root / folder / split / city / f"{city}_000000_{index:06d}_{folder}_labelIds.png"


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def set_pixel(path, value):
    array = np.asarray(Image.open(path)).copy()
    array[0, 0] = value
    Image.fromarray(array).save(path)


def broken_tree(clean, root):
    """A copy of ``clean`` with one problem of each kind; returns {(kind, path)} of what was broken."""
    shutil.copytree(clean, root)
    truncate(image_of(root, "train", 0))
    set_pixel(label_of(root, "train", 0), 250)  # the same sample's label is broken too: both are listed
    os.remove(label_of(root, "train", 1))
    set_pixel(label_of(root, "val", 1), 250)
    os.remove(image_of(root, "val", 0))  # its label is left without an image
    coarse = label_of(root, "train_extra", 1, "gtCoarse")
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(coarse)
    instance = str(label_of(root, "train", 2)).replace("_labelIds", "_instanceIds")
    with open(instance, "wb") as file:
        file.write(b"\x89PNG\r\n\x1a\n not a png")
    return {
        ("unreadable", str(image_of(root, "train", 0))),
        ("label ids", str(label_of(root, "train", 0))),
        ("missing", str(label_of(root, "train", 1))),
        ("label ids", str(label_of(root, "val", 1))),
        ("missing", str(image_of(root, "val", 0))),
        ("size", str(coarse)),
        ("unreadable", instance),
    }


def test_a_clean_tree_passes(clean_cityscapes, capsys):
    assert cli.main(["check-data", "--dataset", "cityscapes", "--root", str(clean_cityscapes), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "8 samples read (train 4 (fine), train_extra 2 (coarse), val 2 (fine))" in out
    assert "no problems found" in out


@pytest.mark.parametrize("workers", [0, 1])
def test_every_problem_is_listed_with_its_file(clean_cityscapes, tmp_path, capsys, workers):
    root = tmp_path / "broken"
    broken = broken_tree(clean_cityscapes, root)
    report_path = tmp_path / "report.json"
    code = cli.main(["check-data", "--dataset", "cityscapes", "--root", str(root), "--json", str(report_path),
                     "--workers", str(workers), "--quiet"])  # fmt: skip
    assert code == 1
    report = json.loads(report_path.read_text())
    assert {(p["kind"], p["path"]) for p in report["problems"]} == broken
    assert report["counts"] == {"unreadable": 2, "label ids": 2, "missing": 2, "size": 1} and not report["ok"]
    out = capsys.readouterr().out
    for kind, path in broken:  # one line each, naming the file
        assert any(line.startswith(f"[{kind}]") and path in line for line in out.splitlines()), (kind, path)
    assert "found 250" in out and "image file is truncated" in out and "7 problems:" in out


def test_missing_folders_are_layout_problems(tmp_path, capsys):
    assert cli.main(["check-data", "--dataset", "cityscapes", "--root", str(tmp_path / "nowhere"), "--quiet"]) == 1
    assert "[layout] Cityscapes root" in capsys.readouterr().out
    write_synthetic_cityscapes(str(tmp_path / "cs"), {"val": 1}, height=16, width=32)
    shutil.rmtree(tmp_path / "cs" / "gtFine")
    report = check_tree("cityscapes", str(tmp_path / "cs"), progress=False)
    assert [(p.kind, os.path.basename(p.path)) for p in report.problems] == [("layout", "val")]
    assert "no ground-truth folder" in report.problems[0].message


def test_kitti_and_vistas_trees(tmp_path):
    root = tmp_path / "kitti"
    write_synthetic_kitti(str(root), train=5, test=2, height=16, width=32)
    assert check_tree("kitti", str(root), progress=False).ok
    set_pixel(root / "training" / "semantic" / "000003_10.png", 34)  # one past the last Cityscapes id
    os.remove(root / "training" / "semantic" / "000001_10.png")
    truncate(root / "testing" / "image_2" / "000001_10.png")
    report = check_tree("kitti", str(root), progress=False)
    assert report.splits == {"trainval": {"samples": 5, "labels": "labels"}, "test": {"samples": 2, "labels": None}}
    assert sorted((p.kind, os.path.relpath(p.path, root)) for p in report.problems) == [
        ("label ids", "training/semantic/000003_10.png"),
        ("missing", "training/semantic/000001_10.png"),
        ("unreadable", "testing/image_2/000001_10.png"),
    ]

    vistas = tmp_path / "vistas"
    (vistas / "training" / "images").mkdir(parents=True)
    (vistas / "training" / "labels").mkdir()
    labels = [{"name": name, "evaluate": True} for name in ("road", "car", "person")]
    (vistas / "config.json").write_text(json.dumps({"labels": labels}))
    for index, top in enumerate((2, 3)):  # 3 is no class of the three
        Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(vistas / "training" / "images" / f"{index}.jpg")
        Image.fromarray(np.full((4, 6), top, np.uint8)).save(vistas / "training" / "labels" / f"{index}.png")
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(vistas / "training" / "labels" / "orphan.png")
    report = check_tree("vistas", str(vistas), progress=False)
    found = sorted((p.kind, os.path.basename(p.path)) for p in report.problems)
    assert found == [("label ids", "1.png"), ("missing", "orphan.jpg")]


class _Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise DataError(f"cannot read image file /data/{index}.png: image file is truncated", f"/data/{index}.png",
                        "unreadable")  # fmt: skip


def test_a_worker_error_keeps_its_one_line_message():
    with pytest.raises(DataError) as caught:
        next(iter(torch.utils.data.DataLoader(_Broken(), num_workers=1)))
    assert "Traceback" in str(caught.value)  # PyTorch re-raises it with the worker's traceback as message
    assert message_of(caught.value) == "cannot read image file /data/0.png: image file is truncated"
    assert message_of(DataError("plain")) == "plain"


def test_a_broken_file_ends_training_with_one_line(clean_cityscapes, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")
    root = tmp_path / "cs"
    shutil.copytree(clean_cityscapes, root)
    for index in range(4):
        truncate(image_of(root, "train", index))
    code = cli.main(["train", "--dataset", "cityscapes", "--root", str(root), "--network", "deeplabv3_resnet18",
                     "--width", "0.125", "--crop", "16x32", "--batch-size", "2", "--steps", "1", "--workers", "1",
                     "--device", "cpu", "--out", str(tmp_path / "run"), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("inplace-abn train: error: cannot read image file ") and "_leftImg8bit.png" in err
