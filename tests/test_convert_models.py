"""convert_to_abn on the networks people bring: torchvision, timm and segmentation_models_pytorch model
definitions, converted in the default (exact) mode. Each converted model computes what the original does
(float64, training and eval mode: outputs, input and parameter gradients, running statistics), and the
report's entries are those that the pattern table implies for the model's structure, read here from the
library's own module tree. Models marked slow take several seconds each on two cores."""

import copy

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torchvision
from timm.layers import BatchNormAct2d
from timm.models import _efficientnet_blocks as efficientnet_blocks
from timm.models import cspnet as timm_cspnet
from timm.models import regnet as timm_regnet
from timm.models import resnet as timm_resnet
from torch import nn
from torchvision.models import mobilenetv3 as tv_mobilenet
from torchvision.models import resnet as tv_resnet
from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation

from conversion_checks import assert_converted_exactly, randomize_batchnorms
from inplace_abn import ABN, InPlaceABN, convert_to_abn
from inplace_abn.activations import make_activation

slow = pytest.mark.slow

ACTIVATION_NAMES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.SiLU: "silu",
                    nn.Identity: "identity"}


@pytest.fixture(autouse=True)
def _eager_backend(monkeypatch):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")


def mode_of(activation):
    """Every norm in these models reads a fresh conv output that nothing else uses: in place when its
    activation is invertible (piecewise ones recompute by default, as lossy ones do)."""
    return "in place" if make_activation(*activation).kind == "invertible" else "recompute"


def act_name(module):
    """(name, param) of an activation module."""
    if isinstance(module, nn.LeakyReLU):
        return "leaky_relu", module.negative_slope
    return ACTIVATION_NAMES[type(module)], 0.0


# --- what the pattern table implies, read from each library's modules: name -> (pattern, act, gate) ---

def resnet_blocks(model, prefix=""):
    """torchvision's and timm's BasicBlock / Bottleneck: every norm but the block's last one -> its ReLU;
    the last one -> add(shortcut) -> ReLU; a projection shortcut's norm alone."""
    blocks = (tv_resnet.BasicBlock, tv_resnet.Bottleneck, timm_resnet.BasicBlock, timm_resnet.Bottleneck)
    expected = {f"{prefix}bn1": ("norm-act", ("relu", 0.0), False)}  # the stem
    for name, block in model.named_modules():
        if not isinstance(block, blocks):
            continue
        norms = ["bn1", "bn2", "bn3"] if hasattr(block, "bn3") else ["bn1", "bn2"]
        for norm in norms[:-1]:
            expected[f"{prefix}{name}.{norm}"] = ("norm-act", ("relu", 0.0), False)
        expected[f"{prefix}{name}.{norms[-1]}"] = ("norm-add-act", ("relu", 0.0), False)
        if block.downsample is not None:
            expected[f"{prefix}{name}.downsample.1"] = ("norm", ("identity", 0.0), False)
    return expected


def tv_mobilenet_v3(model):
    """Conv2dNormActivation -> its activation; in an InvertedResidual the projection (no activation) adds
    the block input where the block has a residual, and the SE gates the norm before it."""
    expected = {}
    for index, feature in enumerate(model.features):
        if isinstance(feature, Conv2dNormActivation):
            expected[f"features.{index}.1"] = ("norm-act", act_name(feature[2]), False)
            continue
        assert isinstance(feature, tv_mobilenet.InvertedResidual)
        layers = list(feature.block)
        for j, layer in enumerate(layers):
            if not isinstance(layer, Conv2dNormActivation):
                continue
            gated = j + 1 < len(layers) and isinstance(layers[j + 1], SqueezeExcitation)
            name = f"features.{index}.block.{j}.1"
            if len(layer) == 3:
                expected[name] = ("norm-act", act_name(layer[2]), gated)
            else:
                expected[name] = ("norm-add" if feature.use_res_connect else "norm", ("identity", 0.0), gated)
    return expected


# timm's efficientnet blocks: (the norm the SE gates, the block's last norm, which adds the shortcut)
TIMM_BLOCK_NORMS = {
    efficientnet_blocks.DepthwiseSeparableConv: ("bn1", "bn2"),
    efficientnet_blocks.InvertedResidual: ("bn2", "bn3"),
    efficientnet_blocks.ConvBnAct: (None, "bn1"),
}


def timm_efficientnet(model):
    """timm's BatchNormAct2d: its own act, or (act Identity) the block's residual add where it has one."""
    expected = {}
    blocks = {name: block for name, block in model.named_modules() if type(block) in TIMM_BLOCK_NORMS}
    for name, bn in model.named_modules():
        if not isinstance(bn, BatchNormAct2d):
            continue
        parent, _, attribute = name.rpartition(".")
        block = blocks.get(parent)
        gated_norm, last_norm = TIMM_BLOCK_NORMS[type(block)] if block is not None else (None, None)
        gated = attribute == gated_norm and not isinstance(block.se, nn.Identity)
        if not isinstance(bn.act, nn.Identity):
            expected[name] = ("norm-act", act_name(bn.act), gated)
        else:
            residual = block is not None and attribute == last_norm and block.has_skip
            expected[name] = ("norm-add" if residual else "norm", ("identity", 0.0), gated)
    return expected


def timm_regnet_blocks(model):
    """RegNet's Bottleneck: conv1 and conv2 norms -> ReLU (conv2's gated by the SE), conv3's norm ->
    drop_path + shortcut -> act3; a projection shortcut's norm alone."""
    expected = {"stem.bn": ("norm-act", ("relu", 0.0), False)}
    for name, block in model.named_modules():
        if not isinstance(block, timm_regnet.Bottleneck):
            continue
        expected[f"{name}.conv1.bn"] = ("norm-act", ("relu", 0.0), False)
        expected[f"{name}.conv2.bn"] = ("norm-act", ("relu", 0.0), not isinstance(block.se, nn.Identity))
        expected[f"{name}.conv3.bn"] = ("norm-add-act", act_name(block.act3), False)
        if isinstance(block.downsample, timm.layers.ConvNormAct):
            expected[f"{name}.downsample.bn"] = ("norm", ("identity", 0.0), False)
    return expected


def timm_cspresnet(model):
    """CSP ResNet: every BatchNormAct2d with an act -> its act, one without (a cross stage's linear
    expansion) alone; a BottleneckBlock's conv3 norm (act Identity) -> drop_path + shortcut -> act3."""
    expected = {}
    for name, module in model.named_modules():
        if isinstance(module, BatchNormAct2d):
            linear = isinstance(module.act, nn.Identity)
            expected[name] = ("norm" if linear else "norm-act", act_name(module.act), False)
    for name, module in model.named_modules():
        if isinstance(module, timm_cspnet.BottleneckBlock):
            expected[f"{name}.conv3.bn"] = ("norm-add-act", act_name(module.act3), False)
    return expected


def smp_unet(model):
    """The encoder is torchvision's ResNet; each decoder Conv2dReLU is conv -> BN -> ReLU."""
    expected = resnet_blocks(model.encoder, "encoder.")
    for name, module in model.decoder.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            expected[f"decoder.{name}"] = ("norm-act", ("relu", 0.0), False)
    return expected


MODELS = [
    pytest.param(lambda: torchvision.models.resnet18(), resnet_blocks, id="torchvision-resnet18"),
    pytest.param(lambda: torchvision.models.resnet50(), resnet_blocks, id="torchvision-resnet50", marks=slow),
    pytest.param(lambda: torchvision.models.mobilenet_v3_small(), tv_mobilenet_v3, id="torchvision-mobilenet_v3_small"),
    pytest.param(lambda: torchvision.models.mobilenet_v3_large(), tv_mobilenet_v3, id="torchvision-mobilenet_v3_large",
                 marks=slow),
    pytest.param(lambda: timm.create_model("efficientnet_b0"), timm_efficientnet, id="timm-efficientnet_b0", marks=slow),
    pytest.param(lambda: timm.create_model("mobilenetv3_small_050"), timm_efficientnet, id="timm-mobilenetv3_small_050"),
    pytest.param(lambda: timm.create_model("resnet18"), resnet_blocks, id="timm-resnet18"),
    pytest.param(lambda: timm.create_model("resnet50"), resnet_blocks, id="timm-resnet50", marks=slow),
    pytest.param(lambda: timm.create_model("regnety_002"), timm_regnet_blocks, id="timm-regnety_002"),
    pytest.param(lambda: timm.create_model("regnety_016"), timm_regnet_blocks, id="timm-regnety_016", marks=slow),
    pytest.param(lambda: timm.create_model("cspresnet50"), timm_cspresnet, id="timm-cspresnet50", marks=slow),
    pytest.param(lambda: smp.Unet("resnet18", encoder_weights=None), smp_unet, id="smp-unet-resnet18"),
]


@pytest.mark.parametrize("build, structure", MODELS)
def test_real_model_converts_exactly(build, structure):
    torch.manual_seed(0)
    model = randomize_batchnorms(build()).double()
    converted, report = convert_to_abn(model)
    expected = {name: (pattern, mode_of(act), gate) for name, (pattern, act, gate) in structure(model).items()}
    found = {layer.name: (layer.pattern, layer.mode, bool(layer.gate)) for layer in report.layers}
    assert found == expected
    assert report.exact and not report.untraced
    assert report.recompute == any(mode == "recompute" or gate for _, mode, gate in expected.values())
    assert type(converted) is type(model) and not report.graph_module  # only blocks' forwards were rewritten
    assert set(converted.state_dict()) == set(model.state_dict())
    assert all(isinstance(converted.get_submodule(name), ABN) for name in expected)
    # 64x64: the last stages still normalize 8 values per channel in training (at 32x32, two values per
    # channel make the batch statistics so ill-conditioned that float64 rounding reaches 1e-8).
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert_converted_exactly(model, converted, x)


# timm's ResNet and RegNet as built: each residual block's last norm (its norm-add-act) has weight 0
AS_BUILT = [
    pytest.param(lambda: timm.create_model("resnet18"), resnet_blocks, id="timm-resnet18"),
    pytest.param(lambda: timm.create_model("resnet50"), resnet_blocks, id="timm-resnet50", marks=slow),
    pytest.param(lambda: timm.create_model("regnety_002"), timm_regnet_blocks, id="timm-regnety_002"),
    pytest.param(lambda: timm.create_model("regnety_016"), timm_regnet_blocks, id="timm-regnety_016", marks=slow),
]


@pytest.mark.parametrize("build, structure", AS_BUILT)
def test_zero_initialized_models_convert_every_norm_exactly(build, structure):
    """As built, timm zeroes the weight of each residual block's last norm (``zero_init_last``), a scale no
    in-place layer has (``|w'| + eps >= eps``): every BatchNorm converts all the same, in the modes the
    structure implies, the recompute-mode layers scaling by BatchNorm's own weight, and exactly. With
    ``relu_to="leaky_relu"`` (not exact anyway) the zero weights clamp to eps and every norm runs in place."""
    torch.manual_seed(0)
    model = build().double()
    structure_found = structure(model)
    zero_initialized = [name for name, (pattern, _, _) in structure_found.items() if pattern == "norm-add-act"]
    assert zero_initialized and all(torch.all(model.get_submodule(name).weight == 0) for name in zero_initialized)
    converted, report = convert_to_abn(model)
    expected = {name: (pattern, mode_of(act), gate) for name, (pattern, act, gate) in structure_found.items()}
    found = {layer.name: (layer.pattern, layer.mode, bool(layer.gate)) for layer in report.layers}
    assert found == expected and len(report.converted) == len(report.layers) and report.exact
    for layer in report.layers:
        assert converted.get_submodule(layer.name).batchnorm_weight == (layer.mode == "recompute"), layer
    assert_converted_exactly(model, converted, torch.randn(2, 3, 64, 64, dtype=torch.float64))
    _, leaky = convert_to_abn(model, relu_to="leaky_relu")
    assert {layer.mode for layer in leaky.layers} == {"in place"}
    assert {layer.name for layer in leaky.layers if layer.clamped_channels} == set(zero_initialized)


def test_relu_to_leaky_relu_runs_resnet_in_place_and_changes_only_the_activation():
    """The opt-in: every ReLU merged into a norm becomes leaky_relu(slope), in place; the converted model
    computes the original with its ReLU modules swapped for LeakyReLU."""
    torch.manual_seed(0)
    model = randomize_batchnorms(torchvision.models.resnet18()).double()
    converted, report = convert_to_abn(model, relu_to="leaky_relu", relu_slope=0.05)
    assert not report.exact and not report.recompute
    assert {layer.mode for layer in report.layers} == {"in place"}
    assert all(type(converted.get_submodule(layer.name)) is InPlaceABN for layer in report.layers)
    leaky = copy.deepcopy(model)
    for parent in list(leaky.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, name, nn.LeakyReLU(0.05, inplace=True))
    assert_converted_exactly(leaky, converted, torch.randn(2, 3, 64, 64, dtype=torch.float64))


def test_saved_memory_of_real_models():
    """The report measures the memory before and after: the saved tensors (the recompute-mode outputs are
    rebuilt, so not counted) and, at the allocator, what a training forward leaves. (At this size the peak
    of a step is the parameter gradients': tests/test_convert.py compares peaks where activations count.)"""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for model in (torchvision.models.resnet18(), timm.create_model("mobilenetv3_small_050")):
        converted, report = convert_to_abn(model, sample_input=x)
        summary = "\n".join(str(report).splitlines()[-4:])
        assert report.saved_bytes_after < 0.75 * report.saved_bytes_before, summary
        assert report.held_bytes_after < 0.75 * report.held_bytes_before, summary
        assert report.max_output_difference < 1e-4


def test_piecewise_in_place_on_a_real_residual_network():
    """``piecewise="in_place"`` on timm's ResNet-18 built with SiLU: every norm, the post-activation
    residual ones included, writes over its input (silu inverted from the output and one bit), and the
    float64 model still matches the original to 1e-9."""
    torch.manual_seed(0)
    model = randomize_batchnorms(timm.create_model("resnet18", act_layer="silu")).double()
    converted, report = convert_to_abn(model, piecewise="in_place")
    assert {layer.mode for layer in report.layers} == {"in place"} and report.exact
    assert {layer.pattern for layer in report.layers} == {"norm-act", "norm-add-act", "norm"}
    assert_converted_exactly(model, converted, torch.randn(2, 3, 64, 64, dtype=torch.float64))
