"""The original model zoo: state dicts laid out as the original's networks (mapillary/inplace_abn,
scripts/models and scripts/modules, described here from its module structure, random weights and
running statistics) load, and the networks then compute what a float64 reimplementation of the
original's forward, written here in plain functional ops, computes. Plus inference of the network,
clear errors, files that carry code, the converted format and the CLI."""

import functools
import math
import os

import pytest
import torch
import torch.nn.functional as F

from inplace_abn import ABN, RecomputeABN, cli
from inplace_abn.models import (
    OriginalFileError, build, init_from_original, load_original, norm_act, read_original, zoo,
)

EPS = 1e-5
WIDTH = 1 / 16  # every channel count of the original divided by 16


@pytest.fixture(autouse=True)
def _eager_backend(monkeypatch):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")


# --------------------------------------------------------------------------------------------------
# The original's state-dict layouts: key -> shape


def _norm(spec, key, channels):
    for name in ("weight", "bias", "running_mean", "running_var"):  # the original's files: no num_batches_tracked
        spec[f"{key}.{name}"] = (channels,)


def _conv(spec, key, out_channels, in_channels, kernel, groups=1):
    spec[f"{key}.weight"] = (out_channels, in_channels // groups, kernel, kernel)


def _fc(spec, in_channels, classes):
    if classes:
        spec["classifier.fc.weight"], spec["classifier.fc.bias"] = (classes, in_channels), (classes,)


def _c(channels, divisor=1):
    """A channel count of the original at WIDTH (the first two of a grouped block: a multiple of the groups)."""
    return max(divisor, round(channels * WIDTH / divisor) * divisor)


def _stem(spec, channels, input_3x3):
    if input_3x3:  # conv1 (stride 2), bn1, conv2, bn2, conv3, pool
        _conv(spec, "mod1.conv1", channels, 3, 3)
        _norm(spec, "mod1.bn1", channels)
        _conv(spec, "mod1.conv2", channels, channels, 3)
        _norm(spec, "mod1.bn2", channels)
        _conv(spec, "mod1.conv3", channels, channels, 3)
    else:  # conv1 (7x7, stride 2), pool
        _conv(spec, "mod1.conv1", channels, 3, 7)


def _identity_block(spec, prefix, in_channels, channels, groups=1, projection=True):
    """IdentityResidualBlock: bn1, convs (conv1, bn2, conv2[, bn3, conv3]), proj_conv."""
    _norm(spec, prefix + "bn1", in_channels)
    if len(channels) == 2:
        _conv(spec, prefix + "convs.conv1", channels[0], in_channels, 3)
        _norm(spec, prefix + "convs.bn2", channels[0])
        _conv(spec, prefix + "convs.conv2", channels[1], channels[0], 3)
    else:
        _conv(spec, prefix + "convs.conv1", channels[0], in_channels, 1)
        _norm(spec, prefix + "convs.bn2", channels[0])
        _conv(spec, prefix + "convs.conv2", channels[1], channels[0], 3, groups)
        _norm(spec, prefix + "convs.bn3", channels[1])
        _conv(spec, prefix + "convs.conv3", channels[2], channels[1], 1)
    if projection:
        _conv(spec, prefix + "proj_conv", channels[-1], in_channels, 1)


def wider_resnet_layout(structure, classes=1000):
    spec = {}
    _conv(spec, "mod1.conv1", _c(64), 3, 3)
    channels_in = _c(64)
    module_channels = [(128, 128), (256, 256), (512, 512), (512, 1024), (512, 1024, 2048), (1024, 2048, 4096)]
    for module, (blocks, channels) in enumerate(zip(structure, module_channels)):
        channels = [_c(c) for c in channels]
        for block in range(blocks):
            # every module's first block widens (and in A2 may stride): it has a projection
            _identity_block(spec, f"mod{module + 2}.block{block + 1}.", channels_in, channels, projection=block == 0)
            channels_in = channels[-1]
    _norm(spec, "bn_out", channels_in)
    _fc(spec, channels_in, classes)
    return spec


def resnext_layout(structure, groups, input_3x3=True, classes=1000):
    spec = {}
    _stem(spec, _c(64), input_3x3)
    channels_in = _c(64)
    for stage, blocks in enumerate(structure):
        channels = [_c(128 * 2**stage, groups), _c(128 * 2**stage, groups), _c(256 * 2**stage)]
        for block in range(blocks):
            _identity_block(spec, f"mod{stage + 2}.block{block + 1}.", channels_in, channels, groups, block == 0)
            channels_in = channels[-1]
    _norm(spec, "bn_out", channels_in)
    _fc(spec, channels_in, classes)
    return spec


def resnet_layout(structure, bottleneck, classes=1000):
    """ResNet (v1): mod1 (conv1 7x7, bn1, pool1); ResidualBlock: convs (conv1, bn1, conv2, bn2[, conv3,
    bn3]), proj_conv + proj_bn; no bn_out."""
    spec = {}
    _conv(spec, "mod1.conv1", _c(64), 3, 7)
    _norm(spec, "mod1.bn1", _c(64))
    channels_in = _c(64)
    for stage, blocks in enumerate(structure):
        channels = [_c(c * 2**stage) for c in ((64, 64, 256) if bottleneck else (64, 64))]
        for block in range(blocks):
            prefix = f"mod{stage + 2}.block{block + 1}."
            kernels = (1, 3, 1) if bottleneck else (3, 3)
            previous = channels_in
            for index, (kernel, out_channels) in enumerate(zip(kernels, channels)):
                _conv(spec, f"{prefix}convs.conv{index + 1}", out_channels, previous, kernel)
                _norm(spec, f"{prefix}convs.bn{index + 1}", out_channels)
                previous = out_channels
            if block == 0 and (stage > 0 or channels_in != channels[-1]):
                _conv(spec, prefix + "proj_conv", channels[-1], channels_in, 1)
                _norm(spec, prefix + "proj_bn", channels[-1])
            channels_in = channels[-1]
    _fc(spec, channels_in, classes)
    return spec


def densenet_layout(structure, input_3x3=True, classes=1000):
    spec, growth = {}, _c(32)
    channels = 2 * growth
    _stem(spec, channels, input_3x3)
    for module, layers in enumerate(structure):
        if module > 0:  # tra2 ... tra4: bn, conv (halving), pool
            _norm(spec, f"tra{module + 1}.bn", channels)
            _conv(spec, f"tra{module + 1}.conv", channels // 2, channels, 1)
            channels //= 2
        for layer in range(layers):
            _norm(spec, f"mod{module + 2}.convs1.{layer}.bn", channels)
            _conv(spec, f"mod{module + 2}.convs1.{layer}.conv", 4 * growth, channels, 1)
            _norm(spec, f"mod{module + 2}.convs3.{layer}.bn", 4 * growth)
            _conv(spec, f"mod{module + 2}.convs3.{layer}.conv", growth, 4 * growth, 3)
            channels += growth
    _norm(spec, "bn_out", channels)
    _fc(spec, channels, classes)
    return spec


def deeplab_head_layout(in_channels, hidden, out):
    spec = {}
    _conv(spec, "map_convs.0", hidden, in_channels, 1)
    for index in (1, 2, 3):
        _conv(spec, f"map_convs.{index}", hidden, in_channels, 3)
    _norm(spec, "map_bn", 4 * hidden)
    _conv(spec, "global_pooling_conv", hidden, in_channels, 1)
    _norm(spec, "global_pooling_bn", hidden)
    _conv(spec, "red_conv", out, 4 * hidden, 1)
    _conv(spec, "pool_red_conv", out, hidden, 1)
    _norm(spec, "red_bn", out)
    return spec


def random_state(spec, seed=0):
    """Random weights (of both signs for the norms: the scale is |w| + eps) and running statistics."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in spec.items():
        if key.endswith("running_var"):
            value = torch.rand(shape, generator=generator) * 1.5 + 0.5
        elif key.endswith(("running_mean", "bias")):
            value = torch.randn(shape, generator=generator) * 0.1
        elif len(shape) == 1:  # a norm's weight
            sign = torch.randint(0, 2, shape, generator=generator) * 2 - 1
            value = sign * (torch.rand(shape, generator=generator) + 0.5)
        else:
            fan_in = math.prod(shape[1:])
            value = torch.randn(shape, generator=generator) * math.sqrt((2.0 if len(shape) == 4 else 1.0) / fan_in)
        state[key] = value.float()  # as published: float32
    return state


# --------------------------------------------------------------------------------------------------
# The original's forward, in functional ops (eval mode; batch statistics with training=True)


class Reference:
    def __init__(self, state, standard_bn=False, training=False):
        self.state = {key: value.double() for key, value in state.items()}
        self.standard_bn, self.training = standard_bn, training

    def has(self, key):
        return key + ".weight" in self.state

    def conv(self, key, x, stride=1, dilation=1):
        weight = self.state[key + ".weight"]
        padding = dilation * (weight.shape[-1] // 2)
        return F.conv2d(x, weight, self.state.get(key + ".bias"), stride, padding, dilation, x.shape[1] // weight.shape[1])

    def norm(self, key, x, activation=True):
        weight = self.state[key + ".weight"]
        scale = weight if self.standard_bn else weight.abs() + EPS
        if self.training:
            y = F.batch_norm(x, None, None, scale, self.state[key + ".bias"], True, 0.0, EPS)
        else:
            y = F.batch_norm(x, self.state[key + ".running_mean"], self.state[key + ".running_var"], scale,
                             self.state[key + ".bias"], False, 0.0, EPS)
        return F.leaky_relu(y, 0.01) if activation else y

    def blocks(self, module):
        return sum(1 for key in self.state if key.startswith(f"{module}.block") and key.endswith(".convs.conv1.weight"))

    def classifier(self, x):
        if "classifier.fc.weight" not in self.state:
            return x
        return F.linear(x.mean(dim=(2, 3)), self.state["classifier.fc.weight"], self.state["classifier.fc.bias"])

    def identity_block(self, prefix, x, stride, dilation):
        activated = self.norm(prefix + "bn1", x)
        shortcut = self.conv(prefix + "proj_conv", activated, stride) if self.has(prefix + "proj_conv") else x
        if self.has(prefix + "convs.conv3"):
            h = self.norm(prefix + "convs.bn2", self.conv(prefix + "convs.conv1", activated, stride))
            h = self.norm(prefix + "convs.bn3", self.conv(prefix + "convs.conv2", h, 1, dilation))
            h = self.conv(prefix + "convs.conv3", h)
        else:
            h = self.norm(prefix + "convs.bn2", self.conv(prefix + "convs.conv1", activated, stride, dilation))
            h = self.conv(prefix + "convs.conv2", h, 1, dilation)
        return h + shortcut

    def residual_block(self, prefix, x, stride):
        if self.has(prefix + "convs.conv3"):
            h = self.norm(prefix + "convs.bn1", self.conv(prefix + "convs.conv1", x))
            h = self.norm(prefix + "convs.bn2", self.conv(prefix + "convs.conv2", h, stride))
            h = self.norm(prefix + "convs.bn3", self.conv(prefix + "convs.conv3", h), activation=False)
        else:
            h = self.norm(prefix + "convs.bn1", self.conv(prefix + "convs.conv1", x, stride))
            h = self.norm(prefix + "convs.bn2", self.conv(prefix + "convs.conv2", h), activation=False)
        if self.has(prefix + "proj_conv"):
            x = self.norm(prefix + "proj_bn", self.conv(prefix + "proj_conv", x, stride), activation=False)
        return F.leaky_relu(h + x, 0.01)

    def stem(self, x):
        if self.has("mod1.conv2"):
            x = self.norm("mod1.bn1", self.conv("mod1.conv1", x, 2))
            x = self.norm("mod1.bn2", self.conv("mod1.conv2", x))
            x = self.conv("mod1.conv3", x)
        else:
            x = self.conv("mod1.conv1", x, 2)
        return F.max_pool2d(x, 3, 2, 1)

    def wider_resnet(self, x, a2=False, dilation=False):
        x = self.conv("mod1.conv1", x)
        for mod_id in range(6):
            if mod_id <= 4 and (not a2 or mod_id < 2):
                x = F.max_pool2d(x, 3, 2, 1)
            for block in range(self.blocks(f"mod{mod_id + 2}")):
                stride, dil = 1, 1
                if a2 and not dilation:
                    stride = 2 if block == 0 and 2 <= mod_id <= 4 else 1
                elif a2:
                    dil = 2 if mod_id == 3 else 4 if mod_id > 3 else 1
                    stride = 2 if block == 0 and mod_id == 2 else 1
                x = self.identity_block(f"mod{mod_id + 2}.block{block + 1}.", x, stride, dil)
        return self.classifier(self.norm("bn_out", x))

    def resnext(self, x):
        x = self.stem(x)
        for mod_id in range(4):
            for block in range(self.blocks(f"mod{mod_id + 2}")):
                stride = 2 if mod_id > 0 and block == 0 else 1
                x = self.identity_block(f"mod{mod_id + 2}.block{block + 1}.", x, stride, 1)
        return self.classifier(self.norm("bn_out", x))

    def resnet(self, x):
        x = F.max_pool2d(self.norm("mod1.bn1", self.conv("mod1.conv1", x, 2)), 3, 2, 1)
        for mod_id in range(4):
            for block in range(self.blocks(f"mod{mod_id + 2}")):
                x = self.residual_block(f"mod{mod_id + 2}.block{block + 1}.", x, 2 if mod_id > 0 and block == 0 else 1)
        return self.classifier(x)

    def densenet(self, x):
        x = self.stem(x)
        for mod_id in range(4):
            if mod_id > 0:
                x = F.avg_pool2d(self.conv(f"tra{mod_id + 1}.conv", self.norm(f"tra{mod_id + 1}.bn", x)), 2, 2)
            features = [x]
            layers = sum(1 for key in self.state if key.startswith(f"mod{mod_id + 2}.convs1.") and key.endswith("conv.weight"))
            for layer in range(layers):
                prefix = f"mod{mod_id + 2}."
                h = self.conv(prefix + f"convs1.{layer}.conv", self.norm(prefix + f"convs1.{layer}.bn", torch.cat(features, 1)))
                features.append(self.conv(prefix + f"convs3.{layer}.conv", self.norm(prefix + f"convs3.{layer}.bn", h)))
            x = torch.cat(features, 1)
        return self.classifier(self.norm("bn_out", x))

    def deeplab_head(self, prefix, x, pooling_size=None, dilations=(12, 24, 36)):
        maps = [self.conv(prefix + "map_convs.0", x)]
        maps += [self.conv(prefix + f"map_convs.{i + 1}", x, 1, d) for i, d in enumerate(dilations)]
        out = self.conv(prefix + "red_conv", self.norm(prefix + "map_bn", torch.cat(maps, 1)))
        if self.training or pooling_size is None:
            pool = x.mean(dim=(2, 3), keepdim=True)
        else:
            ph, pw = min(pooling_size[0], x.shape[2]), min(pooling_size[1], x.shape[3])
            padding = ((pw - 1) // 2, (pw - 1) // 2 + (0 if pw % 2 else 1), (ph - 1) // 2, (ph - 1) // 2 + (0 if ph % 2 else 1))
            pool = F.pad(F.avg_pool2d(x, (ph, pw), stride=1), padding, mode="replicate")
        pool = self.conv(prefix + "global_pooling_conv", pool)
        pool = self.conv(prefix + "pool_red_conv", self.norm(prefix + "global_pooling_bn", pool))
        return self.norm(prefix + "red_bn", out + pool.expand_as(out))


def _prefixed(prefix, state):
    return {prefix + key: value for key, value in state.items()}


def _save(path, checkpoint):
    # The published files were written by PyTorch 1.x: the legacy (non-zip) serialization.
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
    return str(path)


def _close(out, expected, tolerance=1e-9):
    scale = expected.abs().max().clamp_min(1e-3)
    torch.testing.assert_close(out.double() / scale, expected / scale, rtol=0, atol=tolerance)


# A weight converted between the two scale conventions is rounded to float32 once (as stored).
FLOAT32_CONVERSION = 1e-5


# --------------------------------------------------------------------------------------------------
# Round trips: the ImageNet files

# arch (as the original's train_imagenet.py records it) -> (layout, reference forward, network expected)
IMAGENET = {
    "wider_resnet38": (lambda: wider_resnet_layout([3, 3, 6, 3, 1, 1]), "wider_resnet", "wider_resnet38"),
    "resnext101": (lambda: resnext_layout([3, 4, 23, 3], groups=64), "resnext", "resnext101_64x2d"),
    "resnext152": (lambda: resnext_layout([3, 8, 36, 3], groups=64), "resnext", "resnext152_64x2d"),
    "densenet264": (lambda: densenet_layout([6, 12, 64, 48]), "densenet", "densenet264"),
    "resnet34": (lambda: resnet_layout([3, 4, 6, 3], bottleneck=False), "resnet", "resnet34_v1"),
    "resnet50": (lambda: resnet_layout([3, 4, 6, 3], bottleneck=True), "resnet", "resnet50_v1"),
    "resnet101": (lambda: resnet_layout([3, 4, 23, 3], bottleneck=True), "resnet", "resnet101_v1"),
}


@pytest.mark.parametrize("arch", list(IMAGENET))
def test_imagenet_file_loads_and_computes_the_original_function(arch, tmp_path):
    layout, forward, expected_network = IMAGENET[arch]
    state = random_state(layout())
    checkpoint = {"epoch": 90, "arch": arch, "best_prec1": 78.0, "state_dict": _prefixed("module.", state)}
    path = _save(tmp_path / f"{arch}.pth.tar", checkpoint)
    weights = read_original(path)
    assert weights.network == expected_network and weights.norm == "inplace_abn"
    assert weights.kwargs["num_classes"] == 1000 and weights.kwargs["width_multiplier"] == WIDTH
    model = load_original(path).double()
    assert not model.training
    images = torch.randn(1, 3, 32, 32, dtype=torch.float64)  # eval mode: one image is enough
    with torch.no_grad():
        _close(model(images), getattr(Reference(state), forward)(images))


def test_wider_resnet38_needs_the_variant_named_and_trains_as_the_original(tmp_path):
    """Without ``arch`` the weights cannot tell WiderResNet-38 from its A2 variant (same keys and
    shapes): the network is then named. Training mode (batch statistics) on the same weights."""
    state = random_state(wider_resnet_layout([3, 3, 6, 3, 1, 1], classes=10))
    path = _save(tmp_path / "wrn.pth.tar", {"state_dict": state})
    with pytest.raises(OriginalFileError, match="network='wider_resnet38'"):
        read_original(path)
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    model = load_original(path, "wider_resnet38").double().train()
    _close(model(images).detach(), Reference(state, training=True).wider_resnet(images))
    model = load_original(path, "wider_resnet38_a2").double()  # eval: A2 has spatial dropout in training
    with torch.no_grad():
        _close(model(images), Reference(state).wider_resnet(images, a2=True))


def test_standard_bn_file_is_recognised_and_loads_as_batchnorm(tmp_path, monkeypatch):
    """The published ResNeXt-101 Std-BN file, recognised by its md5, scales by ``weight``: it loads
    into BatchNorm layers, and into InPlace-ABN layers as ``w - eps`` where every weight is at least
    eps (else refused). A ResNeXt-50 stands in for it here, with its md5 in the table."""
    state = random_state(resnext_layout([3, 4, 6, 3], groups=64))
    path = _save(tmp_path / "resnext_stdbn.pth.tar", {"arch": "resnext50", "state_dict": state})
    standard_bn = zoo.PublishedFile("resnext50_64x2d", "batchnorm", "ResNeXt, standard BN")
    monkeypatch.setitem(zoo.PUBLISHED_FILES, zoo._md5(path), standard_bn)
    weights = read_original(path)
    assert weights.norm == "batchnorm" and weights.description == "ResNeXt, standard BN"
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model = load_original(path).double()
    assert not any(isinstance(layer, ABN) for layer in model.modules())
    with torch.no_grad():
        _close(model(images), Reference(state, standard_bn=True).resnext(images))
        with pytest.raises(OriginalFileError, match="convert_to_abn"):  # negative weights: no |w| + eps form
            load_original(path, norm_act=norm_act.inplace_abn())
        # RecomputeABN scales by weight itself (batchnorm_weight): the weights load as they are
        recompute_layers = functools.partial(RecomputeABN, activation="leaky_relu", activation_param=0.01)
        model = load_original(path, norm_act=recompute_layers).double()
        assert any(isinstance(layer, RecomputeABN) for layer in model.modules())
        _close(model(images), Reference(state, standard_bn=True).resnext(images))
    positive = {key: value.abs() + 0.1 if key.endswith(".weight") and value.dim() == 1 else value
                for key, value in state.items()}
    positive_path = _save(tmp_path / "positive.pth.tar", {"arch": "resnext50", "state_dict": positive})
    monkeypatch.setitem(zoo.PUBLISHED_FILES, zoo._md5(positive_path), standard_bn)
    model = load_original(positive_path, norm_act=norm_act.inplace_abn()).double()
    layers = list(model.modules())
    assert any(isinstance(layer, ABN) for layer in layers)
    assert not any(isinstance(layer, torch.nn.BatchNorm2d) for layer in layers)
    with torch.no_grad():
        _close(model(images), Reference(positive, standard_bn=True).resnext(images), FLOAT32_CONVERSION)


def test_inplace_abn_weights_load_exactly_into_batchnorm(tmp_path):
    state = random_state(resnet_layout([3, 4, 6, 3], bottleneck=False, classes=10))
    path = _save(tmp_path / "resnet34.pth.tar", {"arch": "resnet34", "state_dict": state})
    model = load_original(path, norm_act=norm_act.batchnorm_act()).double()
    assert not any(isinstance(layer, ABN) for layer in model.modules())
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        _close(model(images), Reference(state).resnet(images), FLOAT32_CONVERSION)


# --------------------------------------------------------------------------------------------------
# The Vistas snapshot, end to end


def _vistas_snapshot(tmp_path, classes=65):
    """The original's Vistas snapshot at WIDTH: state_dict holding body (WRN-38-A2), head (DeeplabV3,
    4096 -> 256 at full size) and cls (256 -> 65, with bias)."""
    body = random_state(wider_resnet_layout([3, 3, 6, 3, 1, 1], classes=0), seed=1)
    head = random_state(deeplab_head_layout(_c(4096), _c(256), _c(256)), seed=2)
    cls = random_state({"weight": (classes, _c(256), 1, 1), "bias": (classes,)}, seed=3)
    path = _save(tmp_path / "wide_resnet38_deeplab_vistas.pth.tar", {"state_dict": {"body": body, "head": head, "cls": cls}})
    return path, body, head, cls


def _vistas_reference(body, head, cls, images, pooling_size):
    state = {**_prefixed("body.", body), **_prefixed("head.", head), **_prefixed("cls.", cls)}
    reference = Reference(state)
    features = Reference(body).wider_resnet(images, a2=True, dilation=True)
    logits = reference.conv("cls", reference.deeplab_head("head.", features, pooling_size))
    return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def test_vistas_snapshot_end_to_end(tmp_path):
    path, body, head, cls = _vistas_snapshot(tmp_path)
    weights = read_original(path)
    assert weights.network == "deeplabv3_wider_resnet38_a2"
    assert weights.kwargs == dict(num_classes=65, hidden_channels=_c(256), output_stride=8, pooling_size=(84, 84),
                                  width_multiplier=WIDTH)
    assert weights.preprocessing == zoo.VISTAS_PREPROCESSING
    images = torch.randn(1, 3, 80, 104, dtype=torch.float64)  # a 10x13 feature map: 84x84 clips to it
    with torch.no_grad():
        model = load_original(path).double()
        _close(model(images), _vistas_reference(body, head, cls, images, (84, 84)))
        # a window smaller than the map: the sliding average and its replicate padding (even and odd sides)
        model = load_original(path, pooling_size=(4, 5)).double()
        _close(model(images), _vistas_reference(body, head, cls, images, (4, 5)))


def test_deeplab_head_trains_with_global_pooling():
    spec = deeplab_head_layout(12, 8, 8)
    state = random_state(spec, seed=4)
    from inplace_abn.models import DeepLabV3Head

    head = DeepLabV3Head(12, 8, 8, norm_act=norm_act.inplace_abn(), pooling_size=(3, 3)).double()
    head.load_state_dict({key: value.double() for key, value in state.items()})
    features = torch.randn(3, 12, 7, 9, dtype=torch.float64)
    _close(head(features.clone()).detach(), Reference(state, training=True).deeplab_head("", features))


# --------------------------------------------------------------------------------------------------
# What the files may hold, the converted format, the CLI


def test_a_file_that_carries_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return os.makedirs, (str(marker),)

    path = tmp_path / "payload.pth.tar"
    torch.save({"state_dict": {"mod1.conv1.weight": torch.zeros(4, 3, 3, 3)}, "extra": Payload()}, path)
    with pytest.raises(OriginalFileError, match=r"refused: loading it would call os\.makedirs"):
        read_original(str(path))
    assert not marker.exists()
    for name, contents in (("text.pth", b"not a checkpoint\n" * 16), ("empty.pth", b"")):
        (tmp_path / name).write_bytes(contents)
        with pytest.raises(OriginalFileError, match="not a PyTorch checkpoint"):
            read_original(str(tmp_path / name))


def test_a_file_that_fits_no_network_says_what_did_not_match(tmp_path):
    path = _save(tmp_path / "other.pth", {"state_dict": {"features.0.weight": torch.zeros(4, 3, 3, 3)}})
    with pytest.raises(OriginalFileError, match="fits no known network.*features"):
        read_original(path)
    state = random_state(resnet_layout([3, 4, 6, 3], bottleneck=True, classes=10))
    state["mod3.block1.convs.conv2.weight"] = torch.zeros(9, 9, 3, 3)
    del state["mod5.block3.convs.bn3.running_var"]
    path = _save(tmp_path / "broken.pth", {"state_dict": state})
    with pytest.raises(OriginalFileError, match=r"missing: mod5.block3.convs.bn3.running_var.*"
                                                r"wrong shape: mod3.block1.convs.conv2.weight \(9, 9, 3, 3\)"):
        read_original(path)
    with pytest.raises(OriginalFileError, match="does not fit densenet121"):
        read_original(_save(tmp_path / "resnet.pth", {"state_dict": random_state(resnet_layout([2, 2, 2, 2], False))}),
                      "densenet121")


def test_converted_file_loads_with_weights_only_and_computes_the_same(tmp_path, capsys):
    path, body, head, cls = _vistas_snapshot(tmp_path, classes=7)
    out = tmp_path / "converted" / "vistas.pt"
    assert cli.main(["convert-original", path, str(out)]) == 0
    assert "deeplabv3_wider_resnet38_a2" in capsys.readouterr().out
    contents = torch.load(out, weights_only=True)
    assert contents["format"] == zoo.CONVERTED_FORMAT and contents["network"] == "deeplabv3_wider_resnet38_a2"
    assert not [name for name in os.listdir(out.parent) if name != "vistas.pt"]  # no temporary file left
    images = torch.randn(1, 3, 48, 56, dtype=torch.float64)
    with torch.no_grad():
        _close(load_original(str(out)).double()(images), _vistas_reference(body, head, cls, images, (84, 84)))
    assert cli.main(["convert-original", str(tmp_path / "missing.pth"), str(out)]) == 1
    assert "not found" in capsys.readouterr().err


def test_init_from_original_puts_imagenet_weights_into_the_segmentation_body(tmp_path):
    state = random_state(wider_resnet_layout([3, 3, 6, 3, 1, 1]))
    path = _save(tmp_path / "wrn38.pth.tar", {"arch": "wider_resnet38", "state_dict": state})
    model = build("deeplabv3_wider_resnet38_a2", num_classes=5, width_multiplier=WIDTH, hidden_channels=8).double()
    skipped = init_from_original(model, path)
    assert sorted(skipped) == ["classifier.fc.bias", "classifier.fc.weight"]
    images = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    body_state = {key: value for key, value in state.items() if not key.startswith("classifier.")}
    with torch.no_grad():
        _close(model.body.eval()(images), Reference(body_state).wider_resnet(images, a2=True, dilation=True))
    with pytest.raises(OriginalFileError, match="does not fit"):
        init_from_original(build("resnet18", num_classes=5, width_multiplier=WIDTH), path)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d", "resnet18_v1", "densenet121",
                                  "wider_resnet16", "deeplabv3_resnet50"])
def test_every_family_is_inferred_from_its_keys_and_shapes(name, tmp_path):
    """This package's own networks, saved as the original would (no num_batches_tracked, ``module.``),
    are recognised with their builder arguments."""
    kwargs = dict(num_classes=7, width_multiplier=WIDTH, input_3x3=name.startswith(("resnet50", "resnext")))
    if name.endswith("_v1") or "wider" in name or name.startswith("deeplabv3_"):
        del kwargs["input_3x3"]
    if name.startswith("deeplabv3_"):
        kwargs.update(hidden_channels=_c(256), output_stride=8, pooling_size=(84, 84))
    state = {f"module.{key}": value for key, value in build(name, **kwargs).state_dict().items()
             if not key.endswith("num_batches_tracked")}
    arch = "wider_resnet16" if "wider" in name else "unused"
    weights = read_original(_save(tmp_path / "file.pth", {"arch": arch, "state_dict": state}))
    if name == "deeplabv3_resnet50":  # the original's only segmentation model has a WiderResNet body
        assert weights.network == name and weights.kwargs["input_3x3"] is False
        kwargs["input_3x3"] = False
    assert (weights.network, weights.kwargs) == (name, kwargs)
