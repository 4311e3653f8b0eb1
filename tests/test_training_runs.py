"""What a long run needs from the trainer: ``--init-from`` a checkpoint with another class count (the
report says which keys were taken, re-initialised or left out), ``--resume`` on a folder without a
checkpoint yet, validation every N steps keeping the best checkpoint (also under torchrun), warmup
with the poly and step schedules over epochs, and the optimizer and augmentation options of the
original's recipes."""

import csv
import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")

from fixture_trees import write_imagefolder_tree, write_vistas_tree  # noqa: E402
from inplace_abn import cli  # noqa: E402
from inplace_abn.training import Trainer, TrainConfig, load_checkpoint  # noqa: E402
from inplace_abn.training.data import build_dataset  # noqa: E402
from inplace_abn.training.loop import build_model  # noqa: E402


@pytest.fixture(autouse=True)
def _eager_backend(monkeypatch):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")


def tiny(out_dir, **overrides) -> TrainConfig:
    settings = dict(
        network="deeplabv3_resnet18", width_multiplier=0.125, dataset="synthetic", synthetic_samples=8,
        synthetic_val_samples=3, synthetic_size=(32, 64), crop_size=(32, 64), batch_size=4, steps=4, lr=0.02,
        checkpoint_every=100, log_every=1, out_dir=str(out_dir), progress=False, device="cpu",
    )  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


def saved_checkpoint(config) -> str:
    """A checkpoint of ``config``'s network at step 0 (its random initialisation)."""
    trainer = Trainer(config, quiet=True)
    trainer.save()
    trainer.close()
    return trainer.checkpoint_path


def run(config, **kwargs):
    trainer = Trainer(config, quiet=True, **kwargs)
    try:
        return trainer, trainer.run()
    finally:
        trainer.close()


# -- --init-from -------------------------------------------------------------------------------------


def test_init_from_with_another_class_count_takes_all_but_the_classifier(tmp_path):
    source_path = saved_checkpoint(tiny(tmp_path / "source", seed=1))  # 19 Cityscapes classes
    source = load_checkpoint(source_path)["model"]
    write_vistas_tree(str(tmp_path / "vistas"))
    config = tiny(tmp_path / "target", dataset="vistas", root=str(tmp_path / "vistas"), init_from=source_path)
    trainer = Trainer(config, quiet=True)
    model = trainer.model.state_dict()
    report = trainer.init_report
    assert trainer.num_classes == 65
    classifier = {key for key in model if key.startswith("cls.")}
    assert classifier and set(report.reinitialised) == classifier
    assert all("shape" in reason and "19" in reason and "65" in reason for reason in report.reinitialised.values())
    assert set(report.left_out) == classifier  # the 19-class classifier has no place here
    assert set(report.taken) == set(model) - classifier
    for key in report.taken:
        assert torch.equal(model[key], source[key]), key
    torch.manual_seed(config.seed)
    fresh = build_model(config, 65).state_dict()  # what the seed alone gives: the classifier kept it
    for key in classifier:
        assert torch.equal(model[key], fresh[key])
    written = json.loads((tmp_path / "target" / "init_report.json").read_text())
    assert written["taken"] == report.taken and written["left_out"] == report.left_out
    trainer.close()


def test_init_from_a_classifier_gives_a_segmentation_network_its_backbone(tmp_path):
    write_imagefolder_tree(str(tmp_path / "images"))
    classifier_config = tiny(tmp_path / "imagenet", network="resnet18", dataset="imagefolder",
                             root=str(tmp_path / "images"), crop_size=(32, 32), batch_size=2, seed=1)  # fmt: skip
    source_path = saved_checkpoint(classifier_config)
    source = load_checkpoint(source_path)["model"]
    trainer = Trainer(tiny(tmp_path / "segmentation", init_from=source_path), quiet=True)
    report, model = trainer.init_report, trainer.model.state_dict()
    assert report.key_map == "'body.' prefixed"
    assert set(report.taken) == {key for key in model if key.startswith("body.")}
    assert set(report.reinitialised) == {key for key in model if key.startswith(("head.", "cls."))}
    assert set(report.left_out) == {key for key in source if key.startswith("classifier.")}  # the ImageNet classifier
    for key in report.taken:
        assert torch.equal(model[key], source[key[len("body."):]])
    trainer.close()


def test_init_from_refuses_weights_of_another_norm_scale(tmp_path):
    source_path = saved_checkpoint(tiny(tmp_path / "source", norm="batchnorm"))
    with pytest.raises(ValueError, match="'batchnorm' .*scale weight.*'inplace_abn' .*would not mean the same"):
        Trainer(tiny(tmp_path / "target", init_from=source_path), quiet=True)


def test_init_from_a_checkpoint_that_fits_nothing_is_an_error(tmp_path):
    source_path = saved_checkpoint(tiny(tmp_path / "source", width_multiplier=0.25))
    with pytest.raises(ValueError, match="none of its .* tensors fits the network"):
        Trainer(tiny(tmp_path / "target", init_from=source_path), quiet=True)


# -- --resume ----------------------------------------------------------------------------------------


def test_resume_on_an_empty_folder_starts_from_scratch_and_says_so(tmp_path, capsys):
    flags = ["--network", "deeplabv3_resnet18", "--width", "0.125", "--synthetic-samples", "8", "--synthetic-size",
             "32x64", "--crop", "32x64", "--batch-size", "4", "--device", "cpu", "--quiet"]  # fmt: skip
    empty = tmp_path / "preemptible"
    empty.mkdir()
    assert cli.main(["train", "--resume", "--out", str(empty), "--steps", "2"] + flags) == 0
    err = capsys.readouterr().err
    assert f"no checkpoint in {empty} yet" in err and "starting from scratch" in err
    assert cli.main(["train", "--out", str(tmp_path / "plain"), "--steps", "2"] + flags) == 0
    resumed = load_checkpoint(str(empty / "checkpoint.pt"))
    plain = load_checkpoint(str(tmp_path / "plain" / "checkpoint.pt"))
    assert resumed["step"] == plain["step"] == 2
    for key, value in plain["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    # the same command, rerun, continues from the checkpoint the first run left
    assert cli.main(["train", "--resume", "--out", str(empty), "--steps", "3"] + flags) == 0
    assert "resumed from" in capsys.readouterr().err
    assert load_checkpoint(str(empty / "checkpoint.pt"))["step"] == 3
    # an explicit checkpoint that does not exist stays an error
    missing = tmp_path / "missing.pt"
    assert cli.main(["train", "--resume", str(missing), "--out", str(tmp_path / "x"), "--steps", "2"] + flags) == 1
    assert "not found" in capsys.readouterr().err


# -- validation and the best checkpoint ---------------------------------------------------------------


def _mean_iou_by_hand(model, dataset) -> float:
    """Mean IoU of ``model`` on ``dataset``, counted with numpy: the reference for the trainer's."""
    matrix = np.zeros((19, 19), dtype=np.int64)
    model.eval()
    with torch.no_grad():
        for index in range(len(dataset)):
            sample = dataset[index]
            prediction = model(sample["image"][None]).argmax(1)[0].numpy().ravel()
            label = sample["label"].numpy().ravel()
            keep = label < 19
            np.add.at(matrix, (label[keep], prediction[keep]), 1)
    tp = np.diag(matrix).astype(float)
    union = matrix.sum(0) + matrix.sum(1) - tp
    return float(np.mean(tp[union > 0] / union[union > 0]))


def test_validation_every_n_steps_keeps_the_best_checkpoint(tmp_path):
    config = tiny(tmp_path, steps=6, val_every=2, lr=0.05)
    trainer, summary = run(config)
    with open(tmp_path / "val.csv") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["step"]) for row in rows] == [2, 4, 6]
    values = [float(row["value"]) for row in rows]
    best_step = 2 * (int(np.argmax(values)) + 1)  # the first of equal maxima: a later tie is no improvement
    best = load_checkpoint(str(tmp_path / "best.pt"))
    assert best["step"] == best_step == summary["best"]["step"]
    assert best["best"]["metric"] == "mean_iou" and best["best"]["step"] == best_step
    assert best["best"]["value"] == pytest.approx(max(values), rel=1e-5)  # the CSV keeps 6 digits
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["best"] == best["best"]  # resumes know it
    model = build_model(config, 19)
    model.load_state_dict(best["model"])
    validation = build_dataset(config, "val", train=False)
    assert _mean_iou_by_hand(model, validation) == pytest.approx(best["best"]["value"], abs=1e-12)


# -- schedules and the optimizer ------------------------------------------------------------------------


def _learning_rates(trainer):
    """The learning rate of each step of the run, stepping the trainer's own scheduler."""
    rates = []
    for _ in range(trainer.total_steps):
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.scheduler.step()
    return rates


def test_warmup_then_poly_over_epochs(tmp_path):
    # 8 samples, batch 2: 4 steps an epoch, 2.5 epochs = 10 steps
    trainer = Trainer(tiny(tmp_path, batch_size=2, epochs=2.5, warmup_steps=3, warmup_start_factor=0.25,
                           poly_power=0.9, lr=0.1), quiet=True)  # fmt: skip
    assert trainer.steps_per_epoch == 4 and trainer.total_steps == 10
    for step, rate in enumerate(_learning_rates(trainer)):
        warm = 0.25 + 0.75 * step / 3 if step < 3 else 1.0
        assert rate == pytest.approx(0.1 * warm * (1 - step / 10) ** 0.9, rel=1e-12), step
    trainer.close()


def test_step_schedule_at_epoch_milestones(tmp_path):
    trainer = Trainer(tiny(tmp_path, batch_size=2, epochs=3, lr_schedule="step", lr_milestones=(1, 2.5),
                           lr_gamma=0.5, lr=0.2), quiet=True)  # fmt: skip
    rates = _learning_rates(trainer)
    assert len(rates) == 12
    for step, rate in enumerate(rates):
        drops = (step >= 4) + (step >= 10)  # epoch 1 = step 4, epoch 2.5 = step 10
        assert rate == pytest.approx(0.2 * 0.5**drops, rel=1e-12), step
    trainer.close()


def test_optimizer_options_of_the_original_recipes(tmp_path):
    default = Trainer(tiny(tmp_path / "a"), quiet=True)
    decay, no_decay = default.optimizer.param_groups
    assert not decay["nesterov"] and no_decay["weight_decay"] == 0.0
    assert {p.ndim for p in no_decay["params"]} == {1} and all(p.ndim > 1 for p in decay["params"])
    original = Trainer(tiny(tmp_path / "b", nesterov=True, decay_norm_and_bias=True, global_batch_size=2), quiet=True)
    decay, no_decay = original.optimizer.param_groups
    assert decay["nesterov"] and not no_decay["params"]
    assert len(decay["params"]) == len(list(original.model.parameters()))
    assert original.batch_size == 2 and original.steps_per_epoch == 4  # one process: the whole global batch
    for trainer in (default, original):
        trainer.close()


def test_run_length_flags_replace_the_config_unit(tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"epochs": 90, "global_batch_size": 256, "synthetic_samples": 8}))
    from inplace_abn.tools.train import configure, resolve_config
    import argparse

    parser = argparse.ArgumentParser()
    configure(parser)
    config = resolve_config(parser.parse_args(["--config", str(recipe), "--steps", "3", "--batch-size", "2"]))
    assert config.epochs is None and config.steps == 3 and config.global_batch_size is None and config.batch_size == 2
    config = resolve_config(parser.parse_args(["--config", str(recipe)]))
    assert config.epochs == 90 and config.global_batch_size == 256
    assert math.isclose(config.lr, TrainConfig().lr)


def test_validation_under_torchrun_scores_all_images_once(tmp_path):
    """Two processes validate half the images each and add their confusion matrices: the score is
    that of one process validating the same weights on every image."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "inplace_abn.cli", "train", "--network", "deeplabv3_resnet18", "--width", "0.125",
        "--synthetic-samples", "15", "--synthetic-size", "32x64", "--crop", "32x64", "--batch-size", "2",
        "--steps", "2", "--val-every", "2", "--device", "cpu", "--out", str(out), "--quiet",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", INPLACE_ABN_BACKEND="eager")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint(str(out / "checkpoint.pt"))
    config = TrainConfig.from_dict(state["config"])
    model = build_model(config, 19)
    model.load_state_dict(state["model"])
    validation = build_dataset(config, "val", train=False)
    assert len(validation) == 3  # 15 // 5: two images for the first process, one for the second
    assert _mean_iou_by_hand(model, validation) == pytest.approx(state["best"]["value"], abs=1e-12)


def test_lighting_on_normalised_tensors_is_the_originals_shift_before_normalising():
    from inplace_abn.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Lighting

    # AlexNet's PCA of ImageNet's pixels, as the original's scripts/imagenet/transforms.py has them
    eigenvalues = torch.tensor([0.2175, 0.0188, 0.0045], dtype=torch.float64)
    eigenvectors = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140],
                                 [-0.5836, -0.6948, 0.4203]], dtype=torch.float64)  # fmt: skip
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    image = torch.rand(3, 5, 7)
    shifted = Lighting(0.1)((image - mean) / std, torch.Generator().manual_seed(3))
    alpha = torch.randn(3, generator=torch.Generator().manual_seed(3)).double() * 0.1
    rgb = (eigenvectors * alpha * eigenvalues).sum(dim=1).view(3, 1, 1)
    expected = (image.double() + rgb - mean) / std
    torch.testing.assert_close(shifted.double(), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(shifted, (image - mean) / std)


def test_the_recipe_augmentation_settings_reach_the_transforms(tmp_path):
    from inplace_abn.training.data import WithLighting, train_transform

    config = tiny(tmp_path, network="resnet18", dataset="imagefolder", root="unused", lighting=0.1,
                  color_jitter_amounts=(0.4, 0.4, 0.4, 0.0), image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25))
    transform = train_transform(config)
    assert isinstance(transform, WithLighting) and transform.lighting.alpha_std == 0.1
    assert transform.lighting.std == (0.25, 0.25, 0.25) and transform.transform.std == (0.25, 0.25, 0.25)
    jitter = transform.transform.jitter
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (0.4, 0.4, 0.4, 0.0)
