"""Datasets in their on-disk layouts (tiny trees written here), augmentation that keeps labels
aligned, the synthetic dataset's determinism, and errors that name the file."""

import json
import os

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image")

from inplace_abn.data import labels as cs_labels  # noqa: E402
from inplace_abn.data.cityscapes import CityscapesDataset, label_ids_to_train_ids, train_ids_to_label_ids  # noqa: E402
from inplace_abn.data.imagefolder import ImageFolderDataset  # noqa: E402
from inplace_abn.data.io import DataError  # noqa: E402
from inplace_abn.data.synthetic import SyntheticCityscapes, write_synthetic_cityscapes  # noqa: E402
from inplace_abn.data.transforms import (  # noqa: E402
    ClassificationEvalTransform,
    ClassificationTrainTransform,
    ColorJitter,
    SegmentationTrainTransform,
    random_resized_crop_box,
    tensor_to_image,
)
from inplace_abn.data.vistas import VistasDataset  # noqa: E402

# ------------------------------------------------------------------------------------------------
# The label table


def test_label_table_facts():
    assert cs_labels.NUM_TRAIN_CLASSES == 19 and cs_labels.MAX_LABEL_ID == 33
    assert cs_labels.TRAIN_CLASS_NAMES[0] == "road" and cs_labels.TRAIN_CLASS_NAMES[-1] == "bicycle"
    instance_classes = ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
    assert cs_labels.INSTANCE_CLASS_NAMES == instance_classes
    assert cs_labels.CATEGORIES == ("void", "flat", "construction", "object", "nature", "sky", "human", "vehicle")
    assert cs_labels.LABEL_BY_ID[-1].name == "license plate"
    assert cs_labels.LABEL_BY_NAME["caravan"].ignore_in_eval and cs_labels.LABEL_BY_NAME["caravan"].has_instances
    ids = np.arange(34, dtype=np.uint8)
    train = label_ids_to_train_ids(ids)
    assert train[7] == 0 and train[33] == 18 and train[0] == 255 and train[29] == 255
    assert (train_ids_to_label_ids(train[train != 255]) == ids[train != 255]).all()


# ------------------------------------------------------------------------------------------------
# Cityscapes


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cityscapes"))
    write_synthetic_cityscapes(root, {"train": 3, "val": 2}, height=32, width=64, seed=1)
    return root


def test_cityscapes_layout_matches_the_synthetic_scenes(cityscapes_root):
    dataset = CityscapesDataset(cityscapes_root, "val", eval_maps=True)
    synthetic = SyntheticCityscapes(2, 32, 64, seed=1, split="val", eval_maps=True)
    assert len(dataset) == 2 and dataset.num_classes == 19
    assert os.path.isfile(dataset.files[0].image) and dataset.files[0].name == synthetic.name(0)
    for index in range(2):
        ours, reference = dataset[index], synthetic[index]
        assert set(ours) == {"image", "label", "name", "size", "label_ids", "instance_ids"}
        assert ours["name"] == reference["name"]
        for key in ("image", "label", "label_ids", "instance_ids"):
            assert torch.equal(ours[key], reference[key]), key
        assert ours["label"].dtype == torch.int64 and ours["image"].shape == (3, 32, 64)
    # the 16-bit instance maps are stored as in Cityscapes
    assert Image.open(dataset.files[0].instance_ids).mode.startswith("I")


def test_cityscapes_coarse_and_images_only(cityscapes_root, tmp_path):
    root = str(tmp_path)
    name = "ulm_000001_000002"
    os.makedirs(os.path.join(root, "leftImg8bit", "train_extra", "ulm"))
    os.makedirs(os.path.join(root, "gtCoarse", "train_extra", "ulm"))
    image_path = os.path.join(root, "leftImg8bit", "train_extra", "ulm", f"{name}_leftImg8bit.png")
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(image_path)
    coarse = np.array([[0, 7, 8, 11, 26, 33]] * 4, dtype=np.uint8)
    Image.fromarray(coarse).save(os.path.join(root, "gtCoarse", "train_extra", "ulm", f"{name}_gtCoarse_labelIds.png"))
    sample = CityscapesDataset(root, "train_extra", annotation="coarse")[0]
    assert sample["label"][0].tolist() == [255, 0, 1, 2, 13, 18]
    images_only = CityscapesDataset(cityscapes_root, "val", annotation=None)[1]
    assert "label" not in images_only and images_only["image"].shape == (3, 32, 64)


def test_cityscapes_layout_errors(cityscapes_root, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        CityscapesDataset(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="no 'leftImg8bit' folder.*leftImg8bit/train/<city>"):
        CityscapesDataset(str(tmp_path))
    with pytest.raises(DataError, match=r"split 'test' not found.*splits present: \['train', 'val'\]"):
        CityscapesDataset(cityscapes_root, "test")
    # an image without its ground truth
    root = tmp_path / "partial"
    (root / "leftImg8bit" / "val" / "ulm").mkdir(parents=True)
    image_path = root / "leftImg8bit" / "val" / "ulm" / "ulm_000000_000001_leftImg8bit.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(image_path)
    with pytest.raises(DataError, match="no ground-truth folder .*gtFine/val for the 'val' images"):
        CityscapesDataset(str(root), "val")
    (root / "leftImg8bit" / "train_extra").mkdir()
    with pytest.raises(DataError, match="train_extra has coarse annotations only"):
        CityscapesDataset(str(root), "train_extra", annotation="fine")
    (root / "gtFine" / "val" / "ulm").mkdir(parents=True)
    with pytest.raises(DataError, match="no ground truth for .*ulm_000000_000001_leftImg8bit.png: expected .*"):
        CityscapesDataset(str(root), "val")
    image_path.unlink()
    with pytest.raises(DataError, match="no images found"):
        CityscapesDataset(str(root), "val")


def _copy_of(src_root, dst_root):
    import shutil

    shutil.copytree(src_root, dst_root)
    return CityscapesDataset(dst_root, "train", eval_maps=True)


def test_cityscapes_file_errors_name_the_file(cityscapes_root, tmp_path):
    dataset = _copy_of(cityscapes_root, str(tmp_path / "copy"))
    files = dataset.files
    # unreadable image
    with open(files[0].image, "wb") as file:
        file.write(b"\x89PNG garbage")
    with pytest.raises(DataError, match="cannot read image file .*" + os.path.basename(files[0].image)):
        dataset[0]
    # label id out of range
    label = np.asarray(Image.open(files[1].label_ids)).copy()
    label[0, :3] = [34, 99, 7]
    Image.fromarray(label).save(files[1].label_ids)
    with pytest.raises(DataError, match=os.path.basename(files[1].label_ids) + r".*out of range.*0\.\.33.*34, 99"):
        dataset[1]
    # label and image of different sizes
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(files[2].label_ids)
    with pytest.raises(DataError, match=os.path.basename(files[2].label_ids) + ".*5x5.*64x32"):
        dataset[2]
    # a missing instance map, when the evaluation maps are asked for
    os.remove(files[2].instance_ids)
    with pytest.raises(DataError, match="instance maps.*instanceIds.png"):
        CityscapesDataset(str(tmp_path / "copy"), "train", eval_maps=True)


# ------------------------------------------------------------------------------------------------
# Mapillary Vistas

VISTAS_LABELS = [
    {"name": "construction--flat--road", "readable": "Road", "color": [128, 64, 128], "instances": False,
     "evaluate": True},
    {"name": "human--person", "readable": "Person", "color": [220, 20, 60], "instances": True, "evaluate": True},
    {"name": "void--ego-vehicle", "readable": "Ego Vehicle", "color": [0, 0, 0], "instances": False,
     "evaluate": False},
    {"name": "object--vehicle--car", "readable": "Car", "color": [0, 0, 142], "instances": True, "evaluate": True},
]  # fmt: skip


def _write_vistas(root, split="training", n=2):
    os.makedirs(os.path.join(root, split, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, split, "labels"), exist_ok=True)
    with open(os.path.join(root, "config.json"), "w") as file:
        json.dump({"labels": VISTAS_LABELS, "version": "test"}, file)
    palette = [c for entry in VISTAS_LABELS for c in entry["color"]] + [0] * (768 - 3 * len(VISTAS_LABELS))
    for index in range(n):
        image = Image.fromarray(np.full((6, 8, 3), 40 * index, np.uint8))
        image.save(os.path.join(root, split, "images", f"img{index}.jpg"))
        label = Image.fromarray(np.array([[0, 1, 2, 3] * 2] * 6, dtype=np.uint8))
        label.putpalette(palette)  # Vistas labels are palette PNGs: indices are class ids
        label.save(os.path.join(root, split, "labels", f"img{index}.png"))


def test_vistas(tmp_path):
    _write_vistas(str(tmp_path))
    dataset = VistasDataset(str(tmp_path), "training")
    assert len(dataset) == 2 and dataset.class_names == ("Road", "Person", "Car")
    sample = dataset[1]
    assert sample["name"] == "img1" and sample["image"].shape == (3, 6, 8)
    assert sample["label"][0].tolist() == [0, 1, 255, 2] * 2  # not evaluated -> ignored


def test_vistas_errors(tmp_path):
    root = str(tmp_path)
    _write_vistas(root)
    with pytest.raises(DataError, match=r"validation/images not found.*folders present: \['training'\]"):
        VistasDataset(root, "validation")
    # a class id beyond the class list
    bad = np.array([[0, 1, 2, 9] * 2] * 6, dtype=np.uint8)
    Image.fromarray(bad).save(os.path.join(root, "training", "labels", "img0.png"))
    with pytest.raises(DataError, match=r"img0.png.*out of range \(valid: 0\.\.3\).*9"):
        VistasDataset(root, "training")[0]
    # an image without a label
    os.remove(os.path.join(root, "training", "labels", "img1.png"))
    with pytest.raises(DataError, match="no label for .*img1.jpg: expected .*img1.png"):
        VistasDataset(root, "training")
    # broken and missing class lists
    with open(os.path.join(root, "config.json"), "w") as file:
        file.write("{not json")
    with pytest.raises(DataError, match="cannot read Vistas config .*config.json"):
        VistasDataset(root, "training")
    with open(os.path.join(root, "config.json"), "w") as file:
        json.dump({"classes": []}, file)
    with pytest.raises(DataError, match="config.json: expected .*'labels'"):
        VistasDataset(root, "training")
    os.remove(os.path.join(root, "config.json"))
    with pytest.raises(DataError, match="class list not found: expected .*config.json"):
        VistasDataset(root, "training")


# ------------------------------------------------------------------------------------------------
# ImageFolder classification


def _write_imagefolder(root):
    for split in ("train", "val"):
        for class_index, name in enumerate(("tabby", "beagle", "acorn")):
            folder = os.path.join(root, split, name)
            os.makedirs(folder)
            for index in range(2):
                color = (80 * class_index, 10 * index, 0)
                Image.new("RGB", (40 + 8 * index, 30), color).save(os.path.join(folder, f"{index}.jpg"))
    os.makedirs(os.path.join(root, "train", ".hidden"))


def test_imagefolder(tmp_path):
    _write_imagefolder(str(tmp_path))
    train = ImageFolderDataset(str(tmp_path), "train", ClassificationTrainTransform(size=16))
    assert train.classes == ["acorn", "beagle", "tabby"] and len(train) == 6
    image, target = train[5]
    assert image.shape == (3, 16, 16) and target == 2
    val = ImageFolderDataset(str(tmp_path), "val", ClassificationEvalTransform(size=16, resize=20))
    assert val[0][0].shape == (3, 16, 16) and val.classes == train.classes
    ten = ImageFolderDataset(str(tmp_path), "val", ClassificationEvalTransform(size=16, resize=20, ten_crop=True))
    crops = ten[0][0]
    assert crops.shape == (10, 3, 16, 16)
    assert torch.equal(crops[5], crops[0].flip(-1))  # the second five are the first five mirrored


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="train not found: expected the ImageFolder layout"):
        ImageFolderDataset(str(tmp_path), "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        ImageFolderDataset(str(tmp_path), "train")
    (tmp_path / "train" / "cat").mkdir()
    (tmp_path / "train" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        ImageFolderDataset(str(tmp_path), "train")
    (tmp_path / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    dataset = ImageFolderDataset(str(tmp_path), "train")
    with pytest.raises(DataError, match="cannot read image file .*broken.jpg"):
        dataset[0]


def test_random_resized_crop_box_inside_the_image():
    generator = torch.Generator().manual_seed(0)
    for width, height in ((50, 30), (30, 50), (7, 300)):
        for _ in range(50):
            left, top, right, bottom = random_resized_crop_box(width, height, generator=generator)
            assert 0 <= left < right <= width and 0 <= top < bottom <= height


# ------------------------------------------------------------------------------------------------
# Segmentation augmentation keeps image and label aligned

PALETTE = np.random.default_rng(0).integers(0, 256, size=(256, 3)).astype(np.uint8)


def _encoded_pair(rng, height=40, width=56, block=8):
    """A label of blocks and an image whose color is a function of the label."""
    coarse = rng.integers(0, 19, size=(height // block, width // block)).astype(np.uint8)
    label = np.kron(coarse, np.ones((block, block), np.uint8))
    return PALETTE[label], label


@pytest.mark.parametrize("crop", [(24, 32), (64, 80)])  # smaller than the image, and larger (padding)
def test_augmentation_keeps_labels_aligned_exactly(crop):
    rng = np.random.default_rng(1)
    generator = torch.Generator().manual_seed(0)
    transform = SegmentationTrainTransform(
        crop, scale_range=(0.5, 2.0), jitter=None, interpolation="nearest", generator=generator
    )
    fill = np.asarray(transform.fill, np.uint8)
    padded = 0
    for _ in range(20):  # random scales, crops and flips (p = 0.5)
        image, label = _encoded_pair(rng)
        out_image, out_label = transform.augment(image, label)
        assert out_image.shape == (*crop, 3) and out_label.shape == crop
        valid = out_label != 255
        assert (out_image[valid] == PALETTE[out_label[valid]]).all()
        assert (out_image[~valid] == fill).all()  # padding: the mean color, ignored in the loss
        padded += int((~valid).any())
    if crop[0] > 40:
        assert padded > 0


def test_augmentation_bilinear_and_jitter_stay_aligned():
    rng = np.random.default_rng(2)
    generator = torch.Generator().manual_seed(1)
    transform = SegmentationTrainTransform((48, 64), scale_range=(0.75, 1.5), jitter=None, generator=generator)
    aligned, shifted = [], []
    for _ in range(10):
        image, label = _encoded_pair(rng, 64, 96, block=16)
        out_image, out_label = transform.augment(image, label)
        valid = out_label[:, 2:] != 255

        def agreement(image_part, label_part):  # pixels with the exact color of their label
            colors = PALETTE[label_part[valid]].astype(int)
            return (np.abs(image_part[valid].astype(int) - colors).max(axis=1) <= 2).mean()

        aligned.append(agreement(out_image[:, 2:], out_label[:, 2:]))
        shifted.append(agreement(out_image[:, 2:], out_label[:, :-2]))  # two pixels off
    # bilinear blends only the pixels next to a block edge; a 2-pixel misalignment shows clearly
    assert np.mean(aligned) > 0.85 and np.mean(aligned) > np.mean(shifted) + 0.05

    # with flips forced on, the label is the mirrored label; jitter changes colors only
    jitter = ColorJitter(0.4, 0.4, 0.4, 0.05)
    transform = SegmentationTrainTransform((40, 56), scale_range=(1.0, 1.0), hflip=1.0, jitter=jitter)
    image, label = _encoded_pair(rng)
    out_image, out_label = transform.augment(image, label)
    assert np.array_equal(out_label, label[:, ::-1])
    assert out_image.dtype == np.uint8 and not np.array_equal(out_image, image[:, ::-1])
    image_tensor, label_tensor = transform(image, label)
    assert image_tensor.shape == (3, 40, 56) and label_tensor.dtype == torch.int64


def test_augmentation_is_reproducible_with_a_seeded_generator():
    image, label = _encoded_pair(np.random.default_rng(3))
    runs = []
    for _ in range(2):
        transform = SegmentationTrainTransform((24, 24), generator=torch.Generator().manual_seed(7))
        runs.append([transform.augment(image, label) for _ in range(3)])
    for (a_image, a_label), (b_image, b_label) in zip(*runs):
        assert np.array_equal(a_image, b_image) and np.array_equal(a_label, b_label)


def test_tensor_round_trip():
    image = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3)).astype(np.uint8)
    transform = SegmentationTrainTransform((5, 7), scale_range=(1.0, 1.0), hflip=0.0, jitter=None)
    tensor, _ = transform(image, np.zeros((5, 7), np.uint8))
    assert np.array_equal(tensor_to_image(tensor), image)


# ------------------------------------------------------------------------------------------------
# The synthetic dataset


def test_synthetic_is_deterministic_by_seed():
    a = SyntheticCityscapes(10, 48, 96, seed=3)
    b = SyntheticCityscapes(10, 48, 96, seed=3)
    order = [b.render(i) for i in (7, 2)]  # order and dataset object don't matter
    for scene, index in zip(order, (7, 2)):
        reference = a.render(index)
        assert np.array_equal(scene.image, reference.image)
        assert np.array_equal(scene.label_ids, reference.label_ids)
        assert np.array_equal(scene.instance_ids, reference.instance_ids)
    assert not np.array_equal(a.render(2).image, SyntheticCityscapes(10, 48, 96, seed=4).render(2).image)
    assert not np.array_equal(a.render(2).image, SyntheticCityscapes(10, 48, 96, seed=3, split="val").render(2).image)
    assert not np.array_equal(a.render(2).image, a.render(3).image)


def test_synthetic_labels_and_instances_follow_cityscapes():
    dataset = SyntheticCityscapes(12, 64, 128, seed=0, eval_maps=True)
    seen_classes, seen_instances = set(), set()
    for index in range(len(dataset)):
        scene = dataset.render(index)
        label_ids, instance_ids = scene.label_ids.astype(int), scene.instance_ids
        assert scene.image.shape == (64, 128, 3) and scene.image.dtype == np.uint8
        assert label_ids.max() <= 33
        instance = instance_ids >= 1000
        # instance pixels: label id * 1000 + k of an instance class; other pixels: the label id
        assert (instance_ids[instance] // 1000 == label_ids[instance]).all()
        assert (instance_ids[~instance] == label_ids[~instance]).all()
        assert all(cs_labels.LABEL_BY_ID[i].has_instances for i in np.unique(label_ids[instance]))
        seen_classes |= set(np.unique(scene.train_ids).tolist())
        seen_instances |= set((np.unique(instance_ids[instance]) // 1000).tolist())
    names = {cs_labels.TRAIN_CLASS_NAMES[i] for i in seen_classes if i != 255}
    assert {"road", "sidewalk", "building", "vegetation", "sky", "car", "person", "bicycle"} <= names
    assert {24, 26, 33} <= seen_instances
    sample = dataset[0]
    assert sample["label"].shape == (64, 128) and sample["instance_ids"].shape == (64, 128)
    assert sample["name"] == "synthtrain_000000_000000"


def test_synthetic_classes_are_not_separable_by_color_alone():
    """The best color-only classifier (most frequent class per quantised color, fitted on one half
    of the pixels, scored on the other) labels well under 60% of the pixels: texture and context
    matter."""
    dataset = SyntheticCityscapes(16, 48, 96, seed=0, split="val")
    scenes = [dataset.render(i) for i in range(len(dataset))]
    colors = np.concatenate([s.image.reshape(-1, 3) for s in scenes]).astype(np.int64) // 16
    targets = np.concatenate([s.train_ids.ravel() for s in scenes]).astype(np.int64)
    keep = targets != 255
    bins, targets = (colors[:, 0] * 256 + colors[:, 1] * 16 + colors[:, 2])[keep], targets[keep]
    fit = np.arange(targets.size) % 2 == 0
    histogram = np.zeros((4096, 19))
    np.add.at(histogram, (bins[fit], targets[fit]), 1)
    accuracy = (histogram.argmax(1)[bins[~fit]] == targets[~fit]).mean()
    assert accuracy < 0.6


def test_synthetic_with_augmentation_in_a_dataloader():
    transform = SegmentationTrainTransform((32, 64), scale_range=(0.75, 1.25))
    dataset = SyntheticCityscapes(4, 48, 96, transform=transform)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 64) and batch["label"].shape == (4, 32, 64)
    assert len(batch["name"]) == 4
