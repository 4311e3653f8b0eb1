"""The training and evaluation pipeline on tiny synthetic data: the loss goes down, resume repeats the
uninterrupted run, checkpoints are atomic, torchrun with gloo trains two processes, evaluate and the
demo run end to end."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("numpy")
pytest.importorskip("PIL")
pytest.importorskip("tqdm")

from inplace_abn import cli  # noqa: E402
from inplace_abn.training import Trainer, TrainConfig, load_checkpoint, save_checkpoint  # noqa: E402


@pytest.fixture(autouse=True)
def _eager_backend(monkeypatch):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")


def tiny_config(out_dir, **overrides) -> TrainConfig:
    settings = dict(
        network="deeplabv3_resnet18", width_multiplier=0.125, dataset="synthetic", synthetic_samples=16,
        synthetic_size=(32, 64), crop_size=(32, 64), batch_size=4, steps=6, lr=0.02, checkpoint_every=3,
        log_every=1, out_dir=str(out_dir), progress=False, device="cpu",
    )  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


def run(config, **kwargs):
    trainer = Trainer(config, quiet=True, **kwargs)
    try:
        return trainer, trainer.run()
    finally:
        trainer.close()


def test_a_few_steps_reduce_the_loss(tmp_path):
    trainer, summary = run(tiny_config(tmp_path, steps=12, synthetic_samples=8, scale_range=(1.0, 1.0)))
    with open(tmp_path / "log.csv") as file:
        losses = [float(line.split(",")[2]) for line in file.readlines()[1:]]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "curves.png").is_file()
    assert summary["saved_for_backward_bytes"] > 0


def test_resume_equals_an_uninterrupted_run(tmp_path):
    _, _ = run(tiny_config(tmp_path / "straight"))
    straight = load_checkpoint(str(tmp_path / "straight" / "checkpoint.pt"))

    interrupted = Trainer(tiny_config(tmp_path / "resumed"), quiet=True)
    interrupted.run(stop_at=4)  # an epoch is 4 steps: the resume starts a new epoch mid-way through the run
    torch.manual_seed(1234)  # the resumed process starts from a different RNG state: the checkpoint restores it
    run(tiny_config(tmp_path / "resumed"), resume=True)
    resumed = load_checkpoint(str(tmp_path / "resumed" / "checkpoint.pt"))

    assert resumed["step"] == straight["step"] == 6
    for name, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, rtol=0, atol=1e-6, msg=name)
    for key, state in straight["optimizer"]["state"].items():
        torch.testing.assert_close(resumed["optimizer"]["state"][key]["momentum_buffer"], state["momentum_buffer"],
                                   rtol=0, atol=1e-6)  # fmt: skip
    with open(tmp_path / "resumed" / "log.csv") as file:
        assert [line.split(",")[0] for line in file.readlines()[1:]] == [str(s) for s in range(1, 7)]


def test_resume_mid_epoch(tmp_path):
    run(tiny_config(tmp_path / "straight", steps=5, checkpoint_every=100))
    straight = load_checkpoint(str(tmp_path / "straight" / "checkpoint.pt"))
    Trainer(tiny_config(tmp_path / "resumed", steps=5), quiet=True).run(stop_at=2)  # mid-epoch
    run(tiny_config(tmp_path / "resumed", steps=5), resume=True)
    resumed = load_checkpoint(str(tmp_path / "resumed" / "checkpoint.pt"))
    for name, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, rtol=0, atol=1e-6, msg=name)


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint({"step": 1, "weights": torch.arange(4.0)}, path)

    def crash(obj, file, *args, **kwargs):
        file.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2, "weights": torch.zeros(4)}, path)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["weights"], torch.arange(4.0))
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no stray temporary file


def test_train_and_evaluate_commands(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"network": "deeplabv3_resnet18", "width_multiplier": 0.125,
                                  "synthetic_samples": 8, "synthetic_size": [32, 64], "crop_size": [32, 64],
                                  "batch_size": 4, "device": "cpu"}))  # fmt: skip
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(config), "--steps", "2", "--out", str(out), "--quiet"]) == 0
    predictions = tmp_path / "pred"
    code = cli.main(["evaluate", str(out / "checkpoint.pt"), "--samples", "3", "--scales", "0.75,1", "--flip",
                     "--output", str(predictions), "--json", str(tmp_path / "metrics.json"), "--quiet"])  # fmt: skip
    assert code == 0
    assert len(list(predictions.glob("*_labelIds.png"))) == 3
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["cityscapes"]) >= {"averageScoreClasses", "averageScoreInstClasses", "classScores"}
    assert "IoU" in capsys.readouterr().out


def test_bad_config_names_the_problem(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"netwrk": "x"}))
    assert cli.main(["train", "--config", str(config)]) == 2
    assert "netwrk" in capsys.readouterr().err


def test_torchrun_two_processes_with_gloo(tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "inplace_abn.cli", "train", "--network", "deeplabv3_resnet18", "--width", "0.125",
        "--synthetic-samples", "8", "--synthetic-size", "32x64", "--crop", "32x64", "--batch-size", "2",
        "--steps", "3", "--device", "cpu", "--out", str(out), "--quiet",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", INPLACE_ABN_BACKEND="eager")
    result = subprocess.run(command, capture_output=True, text=True, timeout=150, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint(str(out / "checkpoint.pt"))
    assert state["step"] == 3
    assert not any(key.startswith("module.") for key in state["model"])  # plain keys, loadable without DDP


def test_demo_reduced(tmp_path):
    summary = tmp_path / "demo.json"
    code = cli.main(["demo", "--steps", "3", "--train-samples", "8", "--val-samples", "4", "--size", "32x64", "--crop", "32x64",
                     "--width", "0.125", "--device", "cpu", "--out", str(tmp_path), "--json", str(summary),
                     "--quiet"])  # fmt: skip
    assert code == 0
    document = json.loads(summary.read_text())
    for norm in ("batchnorm", "inplace_abn"):
        assert {"iou_classes", "iiou_classes", "iou_categories", "iiou_categories", "saved_for_backward_mib",
                "seconds_per_step"} <= set(document["results"][norm])  # fmt: skip
    assert document["comparison"]["saved_for_backward_reduction_mib"] > 0
    assert (tmp_path / "demo.png").is_file()
