"""Cityscapes fine + coarse (train_extra with gtCoarse) and KITTI semantics, read from tiny trees in
their on-disk layouts, against the scenes they were written from; both selectable in the training config."""

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")

from inplace_abn.data import CityscapesDataset, DataError, KittiDataset, kitti_instances_to_cityscapes  # noqa: E402
from inplace_abn.data import labels as cs_labels  # noqa: E402
from inplace_abn.data.synthetic import (  # noqa: E402
    SyntheticCityscapes,
    coarsen_labels,
    render_scene,
    scene_rng,
    write_synthetic_cityscapes,
    write_synthetic_kitti,
)
from inplace_abn.training import TrainConfig  # noqa: E402
from inplace_abn.training.data import build_dataset, splits  # noqa: E402

TO_TRAIN_ID = np.asarray(cs_labels.LABEL_ID_TO_TRAIN_ID, dtype=np.int64)


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cityscapes"))
    write_synthetic_cityscapes(root, {"train": 3, "train_extra": 2, "val": 1}, height=24, width=48, seed=5)
    return root


def test_fine_plus_coarse_is_fine_train_and_coarse_train_extra(cityscapes_root):
    both = CityscapesDataset(cityscapes_root, "train+train_extra", eval_maps=True)
    assert len(both) == 5 and [f.annotation for f in both.files] == ["fine"] * 3 + ["coarse"] * 2
    assert all("/gtCoarse/train_extra/" in f.label_ids for f in both.files[3:])
    fine = SyntheticCityscapes(3, 24, 48, seed=5, split="train", eval_maps=True)
    extra = SyntheticCityscapes(2, 24, 48, seed=5, split="train_extra", eval_maps=True)
    for index in range(3):
        assert torch.equal(both[index]["label"], fine[index]["label"])
    for index in range(2):
        sample, scene = both[3 + index], extra.render(index)
        expected = TO_TRAIN_ID[coarsen_labels(scene.label_ids)]  # reference: the coarsened label ids
        assert torch.equal(sample["label"], torch.from_numpy(expected))
        void = coarsen_labels(scene.label_ids) == 0
        assert void.any() and (sample["label"][torch.from_numpy(void)] == 255).all()  # coarse void: ignored
        assert torch.equal(sample["image"], extra[index]["image"])
    # the same tree through the training config
    config = TrainConfig(dataset="cityscapes", root=cityscapes_root, train_split="train+train_extra")
    assert splits(config) == ("train+train_extra", "val")
    assert len(build_dataset(config, "train+train_extra", train=False)) == 5


def test_cityscapes_split_and_annotation_errors(cityscapes_root):
    with pytest.raises(ValueError, match="joined by '\\+'"):
        CityscapesDataset(cityscapes_root, "train++val")
    with pytest.raises(ValueError, match="annotation must be"):
        CityscapesDataset(cityscapes_root, "train", annotation="medium")
    with pytest.raises(DataError, match="train_extra has coarse annotations only"):
        CityscapesDataset(cityscapes_root, "train+train_extra", annotation="fine")
    coarse_only = CityscapesDataset(cityscapes_root, "train_extra", annotation="coarse")
    assert len(coarse_only) == 2


@pytest.fixture(scope="module")
def kitti_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("kitti"))
    write_synthetic_kitti(root, train=11, test=2, height=20, width=40, seed=2)
    return root


def test_kitti_splits_and_labels(kitti_root):
    train, val, trainval = (KittiDataset(kitti_root, split, eval_maps=True) for split in ("train", "val", "trainval"))
    names = [f"{i:06d}_10" for i in range(11)]
    assert [trainval.name(i) for i in range(len(trainval))] == names
    assert [val.name(i) for i in range(len(val))] == names[::5]  # every 5th, the first included
    assert sorted(train.name(i) for i in range(len(train))) == sorted(set(names) - set(names[::5]))
    assert len(KittiDataset(kitti_root, "val", val_every=3)) == 4
    for index in range(len(val)):
        sample = val[index]
        scene = render_scene(scene_rng(2, "kitti_training", int(sample["name"][:6])), 20, 40)
        assert torch.equal(sample["label"], torch.from_numpy(TO_TRAIN_ID[scene.label_ids]))
        assert torch.equal(sample["label_ids"], torch.from_numpy(scene.label_ids.astype(np.int64)))
        # instances come back in the Cityscapes format, numbered from 1 as KITTI numbers them
        cityscapes = scene.instance_ids.astype(np.int64)
        assert torch.equal(sample["instance_ids"], torch.from_numpy(np.where(cityscapes >= 1000, cityscapes + 1,
                                                                             cityscapes)))  # fmt: skip
    test = KittiDataset(kitti_root, "test")
    assert len(test) == 2 and "label" not in test[0]
    config = TrainConfig(dataset="kitti", root=kitti_root, network="deeplabv3_resnet18")
    assert splits(config) == ("train", "val") and len(build_dataset(config, "val", train=False)) == 3


def test_kitti_instances_to_cityscapes():
    car, building = cs_labels.LABEL_BY_NAME["car"].id, cs_labels.LABEL_BY_NAME["building"].id
    kitti = np.array([[car * 256 + 3, car * 256, building * 256 + 2, 0]], dtype=np.uint16)
    # a numbered car is an instance; an unnumbered car, and a building even when numbered, are not
    assert kitti_instances_to_cityscapes(kitti).tolist() == [[car * 1000 + 3, car, building, 0]]


def test_kitti_errors(kitti_root, tmp_path):
    with pytest.raises(DataError, match="KITTI root .* does not exist"):
        KittiDataset(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="training/image_2 not found: expected the KITTI semantics layout"):
        KittiDataset(str(tmp_path))
    with pytest.raises(ValueError, match="split must be one of train, val, trainval, test"):
        KittiDataset(kitti_root, "validation")
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(kitti_root, root)
    (root / "training" / "semantic" / "000002_10.png").unlink()
    (root / "training" / "semantic" / "000003_10.png").unlink()
    with pytest.raises(DataError, match=r"no label for .*000002_10.png: expected .*semantic/000002_10.png \(1 more"):
        KittiDataset(str(root), "trainval")
    lenient = KittiDataset(str(root), "trainval", require_labels=False)
    with pytest.raises(DataError, match="no label for .*000003_10.png"):
        lenient[3]
