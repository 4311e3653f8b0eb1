"""benchmarks/real_models.py: model names, targets shaped by the output, and memory measured per variant
against what each variant must keep (one activation fewer per in-place layer, checkpointing's peak)."""

import importlib.util
import pathlib
import sys

import pytest
import torch
from torch import nn

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "real_models.py"


@pytest.fixture(scope="module")
def real_models():
    spec = importlib.util.spec_from_file_location("real_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["real_models"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["real_models"]


@pytest.fixture
def one_thread():
    # The variants run back to back; with two threads on a loaded machine OpenMP's barriers dominate.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_model_names_are_checked_with_a_message(real_models):
    with pytest.raises(ValueError, match="torchvision:NAME, timm:NAME or smp:ARCH:ENCODER"):
        real_models.build_model("resnet50")
    with pytest.raises(ValueError, match="smp:ARCH:ENCODER"):
        real_models.build_model("smp:Unet")
    with pytest.raises(ValueError, match="timm has no model 'no_such_net'"):
        real_models.build_model("timm:no_such_net")
    with pytest.raises(ValueError, match="torchvision:no_such_net"):
        real_models.build_model("torchvision:no_such_net")


@pytest.mark.parametrize("spec, classes", [("torchvision:resnet18", 1000), ("smp:Unet:resnet18", 5)])
def test_random_targets_take_the_shape_of_the_output(real_models, spec, classes):
    model = real_models.build_model(spec, classes=classes)  # random weights: no download (none possible here)
    images = torch.randn(2, 3, 32, 64)
    targets = real_models.random_targets(model, images)
    expected = (2,) if spec.startswith("torchvision") else (2, 32, 64)
    assert targets.shape == expected and targets.dtype == torch.int64
    assert 0 <= targets.min() and targets.max() < classes
    assert model.training  # left in training mode


def conv_relu_net(channels=8, depth=3, classes=10):
    layers, width = [], 3
    for _ in range(depth):
        layers += [nn.Conv2d(width, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        width = channels
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


def test_each_variant_keeps_what_it_should(real_models, monkeypatch, one_thread):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")
    channels, depth, batch, size = 8, 3, 2, tuple(torch.randint(8, 17, (2,)).tolist())
    result = real_models.measure_model(conv_relu_net(channels, depth), ["original", "converted", "leaky", "checkpointed"],
                                       batch_size=batch, size=size, warmup=1, rounds=1, steps=1)
    variants = result["variants"]
    original, exact, leaky, checkpointed = (variants[name] for name in ("original", "converted", "leaky", "checkpointed"))
    activation = batch * channels * size[0] * size[1] * 4
    # BatchNorm and InPlace-ABN keep different per-channel statistics: a few floats per channel.
    statistics = 2 * 4 * channels * depth

    assert (exact["info"]["converted_layers"], exact["info"]["in_place_layers"]) == (depth, 0)  # ReLU: not invertible
    assert abs(exact["held_after_forward_bytes"] - original["held_after_forward_bytes"]) <= statistics
    assert (leaky["info"]["converted_layers"], leaky["info"]["in_place_layers"]) == (depth, depth)
    # BatchNorm + ReLU(inplace) keeps the BN input and the ReLU output; InPlace-ABN one of the two.
    saved_by_leaky = original["held_after_forward_bytes"] - leaky["held_after_forward_bytes"]
    assert abs(saved_by_leaky - depth * activation) <= statistics
    assert leaky["peak_bytes"] < original["peak_bytes"]
    # Checkpointing keeps the conv outputs (and the RNG state, to replay dropout) but not the ReLU
    # outputs, then rebuilds everything else at once in backward.
    rng_state = torch.get_rng_state().nbytes
    assert checkpointed["held_after_forward_bytes"] >= depth * activation
    saved_by_checkpointing = original["held_after_forward_bytes"] - checkpointed["held_after_forward_bytes"]
    assert saved_by_checkpointing >= depth * activation - rng_state - statistics
    assert checkpointed["peak_bytes"] >= original["held_after_forward_bytes"]

    for name, variant in variants.items():
        assert variant["end_bytes"] == 0, name  # gradients land in the resting .grad buffers
        assert variant["peak_ratio"] == variant["peak_bytes"] / original["peak_bytes"]
        assert variant["step_ms"] > 0
    table = real_models.format_table([result])
    assert [line.split("|")[2].strip() for line in table.splitlines()[2:]] == list(variants)
