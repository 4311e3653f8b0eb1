"""Segmentation inference as the original's test script does it: views at several scales and mirrored,
fused by mean, voting or max (held against a per-pixel numpy reference), label / color / confidence
PNGs, Vistas images resized to a longest side and scored at their labels' resolution, and the
original's Vistas model evaluated with its own input settings."""

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from fixture_trees import VISTAS_LABELS, write_imagefolder_tree, write_vistas_tree  # noqa: E402
from inplace_abn import cli  # noqa: E402
from inplace_abn.data.labels import label_id_palette  # noqa: E402
from inplace_abn.training import Trainer, TrainConfig, load_checkpoint  # noqa: E402
from inplace_abn.training.evaluation import predict  # noqa: E402
from inplace_abn.training.loop import build_model  # noqa: E402

# the original's test script normalises the Vistas images with these (facts of its published model)
VISTAS_MEAN = (0.41738699, 0.45732192, 0.46886091)
VISTAS_STD = (0.25685097, 0.26509955, 0.29067996)


@pytest.fixture(autouse=True)
def _eager_backend(monkeypatch):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")


def tiny_model(num_classes=5, seed=0):
    torch.manual_seed(seed)
    config = TrainConfig(network="deeplabv3_resnet18", width_multiplier=0.125)
    model = build_model(config, num_classes).eval()
    with torch.no_grad():  # running statistics away from (0, 1), so that eval mode is not the identity
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    return model


def reference_views(model, images, scales, flip):
    """Softmax of each view at the input size, float64: resize, low-resolution logits, one bilinear
    upsampling, as the original's SegmentationModule."""
    height, width = images.shape[-2:]
    views = []
    with torch.no_grad():
        for scale in scales:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            scaled = images if scale == 1 else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            for mirrored in ((False, True) if flip else (False,)):
                view = scaled.flip(-1) if mirrored else scaled
                logits = model.cls(model.head(model.body(view)))
                logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
                if mirrored:
                    logits = logits.flip(-1)
                views.append(logits.double().softmax(1).numpy())
    return np.stack(views)  # (V, N, C, H, W)


def reference_fusion(views, fusion):
    if fusion == "mean":
        mean = views.mean(0)
        return mean.argmax(1), mean.max(1)
    view_classes, view_confidence = views.argmax(2), views.max(2)  # (V, N, H, W)
    if fusion == "max":
        best_view = view_confidence.argmax(0)  # the first of equal maxima: the first view
        pick = np.take_along_axis
        return pick(view_classes, best_view[None], 0)[0], pick(view_confidence, best_view[None], 0)[0]
    num_classes = views.shape[2]
    votes = np.stack([(view_classes == c).sum(0) for c in range(num_classes)], 1)  # (N, C, H, W)
    classes = votes.argmax(1)  # the first of equal maxima: the lowest class id
    voted = view_classes == classes[None]
    confidence = (view_confidence * voted).sum(0) / voted.sum(0)
    return classes, confidence


@pytest.mark.parametrize("fusion", ["mean", "voting", "max"])
def test_fusion_of_scales_and_flips_matches_a_per_pixel_reference(fusion):
    model = tiny_model()
    images = torch.randn(2, 3, 21, 30)
    scales = (0.7, 1.0, 1.2)
    classes, confidence = predict(model, images, scales, flip=True, fusion=fusion)
    expected_classes, expected_confidence = reference_fusion(reference_views(model, images, scales, True), fusion)
    agree = classes.numpy() == expected_classes
    # float32 against float64: a class may differ only where two views' scores are within rounding
    assert agree.mean() > 0.999
    np.testing.assert_allclose(confidence.numpy()[agree], expected_confidence[agree], rtol=1e-4, atol=1e-6)
    assert classes.shape == (2, 21, 30) and classes.dtype == torch.int64


def test_voting_breaks_ties_towards_the_lowest_class():
    # two views that disagree everywhere: every pixel is a tie between their two classes
    class Fixed(torch.nn.Module):
        def forward(self, images):
            logits = torch.zeros(images.shape[0], 4, *images.shape[-2:])
            logits[:, 3, :, : images.shape[-1] // 2] = 5.0  # left half class 3, right half class 1:
            logits[:, 1, :, images.shape[-1] // 2 :] = 5.0  # mirrored, the view votes the other way
            return logits

    classes, _ = predict(Fixed(), torch.zeros(1, 3, 4, 6), (1.0,), flip=True, fusion="voting")
    assert classes.unique().tolist() == [1]


def test_single_view_is_the_network_itself():
    model = tiny_model()
    images = torch.randn(1, 3, 24, 40)
    classes, confidence = predict(model, images, (1.0,), flip=False, fusion="mean")
    with torch.no_grad():
        probabilities = model(images).softmax(1)
    assert torch.equal(classes, probabilities.argmax(1))
    torch.testing.assert_close(confidence, probabilities.max(1).values)


def checkpoint_at_step_zero(config) -> str:
    trainer = Trainer(config, quiet=True)
    trainer.save()
    trainer.close()
    return trainer.checkpoint_path


def test_evaluate_writes_label_color_and_confidence_pngs(tmp_path, capsys):
    config = TrainConfig(network="deeplabv3_resnet18", width_multiplier=0.125, synthetic_samples=4,
                         synthetic_size=(32, 64), crop_size=(32, 64), batch_size=2, out_dir=str(tmp_path / "run"),
                         device="cpu", progress=False)  # fmt: skip
    checkpoint = checkpoint_at_step_zero(config)
    out = tmp_path / "predictions"
    assert cli.main(["evaluate", checkpoint, "--samples", "2", "--scales", "1", "--output", str(out), "--format",
                     "labels,color,prob", "--quiet"]) == 0  # fmt: skip
    labels = sorted(out.glob("*_labelIds.png"))
    assert len(labels) == 2
    palette = label_id_palette()
    for label_path in labels:
        stem = str(label_path)[: -len("_labelIds.png")]
        label = Image.open(label_path)
        color = Image.open(stem + "_color.png")
        prob = np.asarray(Image.open(stem + "_prob.png"))
        assert label.mode == "L" and color.mode == "P" and label.size == color.size == (64, 32)
        ids = np.asarray(label)
        assert np.array_equal(np.asarray(color), ids)  # the same ids, shown in the dataset's colors
        assert color.getpalette()[: 3 * 34] == palette[: 3 * 34]
        rgb = np.asarray(color.convert("RGB"))
        expected = np.asarray(palette, dtype=np.uint8).reshape(256, 3)[ids]
        assert np.array_equal(rgb, expected)
        assert prob.shape == (32, 64) and prob.min() >= np.floor(255 / 19)  # the top class has >= 1/19 of the mass
    assert "scales 1, mean" in capsys.readouterr().out


def _resized_like_the_original(image: np.ndarray, longest: int) -> np.ndarray:
    scale = longest / max(image.shape[:2])
    size = (int(image.shape[1] * scale), int(image.shape[0] * scale))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def _normalised(image: np.ndarray, mean, std) -> torch.Tensor:
    tensor = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)
    return (tensor - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def test_vistas_predictions_go_back_to_the_labels_resolution(tmp_path, capsys):
    root = tmp_path / "vistas"
    write_vistas_tree(str(root))
    config = TrainConfig(network="deeplabv3_resnet18", width_multiplier=0.125, dataset="vistas", root=str(root),
                         longest_side=40, image_mean=VISTAS_MEAN, image_std=VISTAS_STD, crop_size=(32, 32),
                         batch_size=2, out_dir=str(tmp_path / "run"), device="cpu", progress=False)  # fmt: skip
    checkpoint = checkpoint_at_step_zero(config)
    out, metrics = tmp_path / "predictions", tmp_path / "metrics.json"
    assert cli.main(["evaluate", checkpoint, "--scales", "1", "--output", str(out), "--json", str(metrics),
                     "--quiet"]) == 0  # fmt: skip
    assert "65 classes" in capsys.readouterr().out

    model = build_model(config, 65)
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    model.eval()
    matrix = np.zeros((65, 65), dtype=np.int64)
    for index in range(2):
        name = f"validation{index}"
        image = np.asarray(Image.open(root / "validation" / "images" / f"{name}.png").convert("RGB"))
        resized = _resized_like_the_original(image, 40)
        assert max(resized.shape[:2]) == 40
        with torch.no_grad():
            small = model(_normalised(resized, VISTAS_MEAN, VISTAS_STD)[None]).argmax(1)[0].numpy().astype(np.uint8)
        prediction = np.asarray(Image.fromarray(small).resize((image.shape[1], image.shape[0]), Image.NEAREST))
        written = np.asarray(Image.open(out / f"{name}.png"))
        assert written.shape == image.shape[:2]
        assert np.array_equal(written, prediction)  # class ids of config.json: the 65 evaluated come first
        class_ids = np.asarray(Image.open(root / "validation" / "labels" / f"{name}.png"))
        keep = class_ids < VISTAS_LABELS - 1  # "unlabeled" is not evaluated
        np.add.at(matrix, (class_ids[keep], prediction[keep]), 1)
    tp = np.diag(matrix).astype(float)
    union = matrix.sum(0) + matrix.sum(1) - tp
    expected = float(np.mean(tp[union > 0] / union[union > 0]))
    assert json.loads(metrics.read_text())["mean_iou"] == pytest.approx(expected, abs=1e-12)


def original_vistas_snapshot(path, num_classes=65, seed=0):
    """A file in the layout of the original's Vistas snapshot (``state_dict`` holding ``body``, ``head``,
    ``cls``; no ``num_batches_tracked``, legacy serialization) of a WRN-38-A2 + DeepLabV3 at 1/16 of the
    width, with random weights and statistics. Returns the network those weights make here."""
    from inplace_abn.models import build

    torch.manual_seed(seed)
    model = build("deeplabv3_wider_resnet38_a2", num_classes=num_classes, width_multiplier=1 / 16, output_stride=8,
                  pooling_size=(84, 84))  # fmt: skip
    with torch.no_grad():  # statistics that keep the classes varying with the input
        for name, tensor in model.state_dict().items():
            if name.endswith("running_mean"):
                tensor.normal_(0, 0.01)
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
    parts = {"body": {}, "head": {}, "cls": {}}
    for name, tensor in model.state_dict().items():
        part, key = name.split(".", 1)
        if not key.endswith("num_batches_tracked"):
            parts[part][key] = tensor.clone()
    torch.save({"state_dict": parts}, str(path), _use_new_zipfile_serialization=False)
    return model.eval()


def test_the_original_vistas_model_is_evaluated_with_its_own_settings(tmp_path, capsys):
    from inplace_abn.tools import evaluate
    from inplace_abn.training import weights

    root = tmp_path / "vistas"
    write_vistas_tree(str(root), {"validation": 2}, height=40, width=56)
    snapshot = tmp_path / "wide_resnet38_deeplab_vistas.pth.tar"
    network = original_vistas_snapshot(snapshot)

    parser = argparse.ArgumentParser()
    evaluate.configure(parser)
    loaded = weights.load_network(str(snapshot))
    assert loaded.task == "segmentation" and loaded.num_classes == 65 and "original" in loaded.source
    settings = evaluate.data_config(loaded, parser.parse_args([str(snapshot), "--root", str(root)]))
    assert settings.dataset == "vistas" and settings.longest_side == 2048  # the original's test script
    assert settings.image_mean == VISTAS_MEAN and settings.image_std == VISTAS_STD

    out = tmp_path / "predictions"
    assert cli.main(["evaluate", str(snapshot), "--root", str(root), "--longest-side", "48", "--scales", "1",
                     "--output", str(out), "--format", "labels,prob", "--quiet"]) == 0  # fmt: skip
    assert "65 classes" in capsys.readouterr().out
    for index in range(2):
        name = f"validation{index}"
        image = np.asarray(Image.open(root / "validation" / "images" / f"{name}.png").convert("RGB"))
        resized = _resized_like_the_original(image, 48)

        def prediction(mean, std):
            """(classes, confidence x 255) as the original's test script makes them, at the image's size."""
            with torch.no_grad():
                confidence, classes = network(_normalised(resized, mean, std)[None]).softmax(1).max(1)
            size = (image.shape[1], image.shape[0])
            classes = Image.fromarray(classes[0].numpy().astype(np.uint8)).resize(size, Image.NEAREST)
            confidence = (confidence[0] * 255).round().numpy().astype(np.uint8)
            confidence = Image.fromarray(confidence).resize(size, Image.NEAREST)
            return np.asarray(classes), np.asarray(confidence).astype(int)

        classes, confidence = prediction(VISTAS_MEAN, VISTAS_STD)
        assert np.array_equal(np.asarray(Image.open(out / f"{name}.png")), classes)
        written = np.asarray(Image.open(out / f"{name}_prob.png")).astype(int)
        assert np.abs(written - confidence).max() <= 1  # float rounding at the x 255 step
        # the check can tell: ImageNet's statistics would have given other confidences
        _, imagenet_confidence = prediction((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        assert np.abs(written - imagenet_confidence).max() > 1


def test_init_from_the_original_vistas_model_keeps_all_but_its_classifier(tmp_path):
    snapshot = tmp_path / "wide_resnet38_deeplab_vistas.pth.tar"
    network = original_vistas_snapshot(snapshot)
    config = TrainConfig(network="deeplabv3_wider_resnet38_a2", output_stride=8, width_multiplier=1 / 16,
                         network_options={"pooling_size": [84, 84]}, synthetic_samples=4, synthetic_size=(32, 64),
                         crop_size=(32, 64), batch_size=2, init_from=str(snapshot), out_dir=str(tmp_path / "run"),
                         device="cpu", progress=False)  # fmt: skip
    trainer = Trainer(config, quiet=True)
    report = trainer.init_report
    assert report.source.endswith("(original inplace_abn deeplabv3_wider_resnet38_a2)")
    assert sorted(report.reinitialised) == sorted(report.left_out) == ["cls.bias", "cls.weight"]  # 65 -> 19
    model, source = trainer.model.state_dict(), network.state_dict()
    for key in report.taken:
        assert torch.equal(model[key], source[key]), key
    trainer.close()


def test_init_from_an_original_standard_bn_file_converts_its_scales_exactly(tmp_path, monkeypatch):
    from inplace_abn.models import build, zoo

    torch.manual_seed(0)
    classifier = build("resnext101_64x2d", num_classes=10, width_multiplier=1 / 16, input_3x3=True)
    state = {}
    for name, tensor in classifier.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        if name.endswith(".weight") and tensor.ndim == 1:  # BatchNorm scales, above eps as convertible ones are
            tensor = torch.rand(tensor.shape) + 0.5
        state["module." + name] = tensor.clone()
    path = tmp_path / "resnext101_stdbn_lr_256.pth.tar"
    torch.save({"state_dict": state, "arch": "resnext101"}, str(path), _use_new_zipfile_serialization=False)
    md5 = zoo._md5(str(path))
    monkeypatch.setitem(zoo.PUBLISHED_FILES, md5, zoo.PublishedFile("resnext101_64x2d", "batchnorm", "standard BN"))

    write_imagefolder_tree(str(tmp_path / "images"))
    config = TrainConfig(network="resnext101_64x2d", network_options={"input_3x3": True}, width_multiplier=1 / 16,
                         dataset="imagefolder", root=str(tmp_path / "images"), crop_size=(32, 32), batch_size=2,
                         init_from=str(path), out_dir=str(tmp_path / "run"), device="cpu", progress=False)  # fmt: skip
    trainer = Trainer(config, quiet=True)  # InPlace-ABN layers: scale |w| + eps
    assert "scales converted to inplace_abn's" in trainer.init_report.source
    model = trainer.model.state_dict()
    scales = [key for key in trainer.init_report.taken if key.endswith(".weight") and model[key].ndim == 1]
    assert scales
    for key in scales:
        # the same scale: |w'| + eps = w, the BatchNorm weight
        torch.testing.assert_close(model[key].abs() + 1e-5, state["module." + key], rtol=0, atol=1e-7)
    assert sorted(trainer.init_report.left_out) == ["classifier.fc.bias", "classifier.fc.weight"]  # 10 -> 3 classes
    trainer.close()
