"""convert_to_abn, convert_to_batchnorm and fuse_conv_abn: converted models compute what the originals did
(float64, eval and training mode), go in place only where that is safe, and report what they did."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from inplace_abn import ABN, InPlaceABN, InPlaceABNSync, convert_to_abn, convert_to_batchnorm, fuse_conv_abn
from inplace_abn.conversion import saved_activation_bytes


@pytest.fixture(autouse=True)
def _eager_backend(monkeypatch):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")


# --- models shaped like torchvision's ResNet (torchvision itself is not installed here) --------------

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels, channels, stride=1, downsample=None, act=nn.ReLU):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = act(inplace=True)  # used twice, as in torchvision
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels, channels, stride=1, downsample=None, act=nn.ReLU):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, channels * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels * 4)
        self.relu = act(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, block=BasicBlock, act=nn.ReLU, width=4, num_classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = act(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        out = width * block.expansion
        self.layer1 = nn.Sequential(
            block(width, width, 1, nn.Sequential(nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out)), act),
            block(out, width * 2, 2, nn.Sequential(nn.Conv2d(out, out * 2, 1, 2, bias=False), nn.BatchNorm2d(out * 2)), act),
        )
        self.fc = nn.Linear(out * 2, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class FunctionalNet(nn.Module):
    """Activations called as functions and tensor methods, a conv with bias, a grouped conv, a
    transposed conv, and a linear layer before a BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, groups=3), nn.BatchNorm2d(6)
        self.conv3, self.bn3 = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2), nn.BatchNorm2d(4)
        self.conv4, self.bn4 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.conv5, self.bn5, self.act5 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Identity()
        self.fc, self.bn6 = nn.Linear(4, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.leaky_relu(self.bn2(self.conv2(x)), 0.2)
        x = F.elu(self.bn3(self.conv3(x)), alpha=0.5)
        x = self.bn4(self.conv4(x)).relu()
        x = self.act5(self.bn5(self.conv5(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return torch.relu(self.bn6(self.fc(x)))


def randomize_batchnorms(model, low=0.1):
    """Weights of either sign with |w| >= low, biases and running statistics away from the defaults."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                sign = torch.where(torch.rand(module.num_features) < 0.5, -1.0, 1.0)
                sign[0] = -1.0
                module.weight.copy_(sign * (low + torch.rand(module.num_features)))
                module.bias.normal_()
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    return model


def assert_same_training_and_eval(original, converted, x, atol=1e-10):
    """Same outputs in training mode (batch statistics), same input gradient; for every BatchNorm that
    became a layer, the same running variance, bias gradient and weight gradient (up to the sign moved
    into the convolution); and the same outputs in eval mode after that step."""
    original, converted = original.train(), converted.train()
    x_original, x_converted = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_original, out_converted = original(x_original), converted(x_converted)
    torch.testing.assert_close(out_converted, out_original, atol=atol, rtol=0)
    grad = torch.randn_like(out_original)
    out_original.backward(grad)
    out_converted.backward(grad)
    torch.testing.assert_close(x_converted.grad, x_original.grad, atol=atol, rtol=0)
    for name, bn in original.named_modules():
        layer = converted.get_submodule(name) if isinstance(bn, nn.modules.batchnorm._BatchNorm) else None
        if isinstance(layer, ABN):
            torch.testing.assert_close(layer.running_var, bn.running_var, atol=atol, rtol=0, msg=name)
            torch.testing.assert_close(layer.bias.grad, bn.bias.grad, atol=atol, rtol=0, msg=name)
            torch.testing.assert_close(layer.weight.grad.abs(), bn.weight.grad.abs(), atol=atol, rtol=0, msg=name)
    original.eval(), converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), original(x), atol=atol, rtol=0)


def model_and_input(model, shape=(4, 3, 8, 8)):
    torch.manual_seed(0)
    model = randomize_batchnorms(model).double()
    return model, torch.randn(shape, dtype=torch.float64)


def records(report):
    return {layer.name: layer for layer in report.layers}


# --- convert_to_abn --------------------------------------------------------------------------------

@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_resnet_like_model_with_relu_converts_exactly(block):
    model, x = model_and_input(TinyResNet(block))
    converted, report = convert_to_abn(model, relu_to="relu")
    assert report.exact and report.graph_module  # self.relu is used twice per block: the graph is rewritten
    assert isinstance(converted, fx.GraphModule)
    assert all(isinstance(converted.get_submodule(layer.name), ABN) for layer in report.converted)
    assert all(not layer.in_place and "relu is not invertible" in layer.reason for layer in report.converted)
    # BatchNorms before the residual add have no activation after them: they stay.
    last = "layer1.0.bn2" if block is BasicBlock else "layer1.0.bn3"
    kept = {layer.name for layer in report.layers if not layer.converted_to}
    assert {last, "layer1.0.downsample.1", "layer1.1.downsample.1"} <= kept
    assert "operator.add" in records(report)[last].reason
    assert sum(layer.negated_channels for layer in report.converted) > 0
    assert set(converted.state_dict()) == set(model.state_dict())
    assert_same_training_and_eval(model, converted, x)


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_leaky_relu_model_goes_in_place_and_stays_exact(block):
    act = lambda inplace: nn.LeakyReLU(0.1, inplace=inplace)  # noqa: E731
    model, x = model_and_input(TinyResNet(block, act=act))
    converted, report = convert_to_abn(model, sample_input=x)
    pairs = {BasicBlock: 1 + 2, Bottleneck: 1 + 2 * 2}[block]  # the stem, and bn1 (and bn2) of each block
    assert len(report.converted) == len(report.in_place) == pairs and report.exact
    assert all(type(converted.get_submodule(layer.name)) is InPlaceABN for layer in report.converted)
    assert report.saved_bytes_after < report.saved_bytes_before
    assert report.max_output_difference < 1e-12
    assert "in place" in str(report) and "saved for backward" in str(report)
    assert_same_training_and_eval(model, converted, x)


def test_relu_becomes_leaky_relu_by_default_and_the_class_is_kept():
    torch.manual_seed(0)
    model = randomize_batchnorms(nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.Conv2d(6, 2, 1))).double()
    leaky = copy.deepcopy(model)
    leaky[2] = nn.LeakyReLU(0.05)
    converted, report = convert_to_abn(model, relu_slope=0.05)
    assert type(converted) is nn.Sequential and not report.graph_module
    assert type(converted[1]) is InPlaceABN and type(converted[2]) is nn.Identity
    assert (converted[1].activation, converted[1].activation_param) == ("leaky_relu", 0.05)
    (layer,) = report.layers
    assert layer.in_place and not layer.exact and not report.exact and "leaky_relu(0.05)" in layer.reason
    assert list(converted.state_dict()) == list(model.state_dict())
    assert_same_training_and_eval(leaky, converted, torch.randn(4, 3, 6, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="relu_slope must be > 0"):
        convert_to_abn(model, relu_slope=0.0)
    with pytest.raises(ValueError, match="relu_to"):
        convert_to_abn(model, relu_to="gelu")


def test_functional_activations_and_every_kind_of_feeding_layer():
    model, x = model_and_input(FunctionalNet(), (6, 3, 4, 4))
    converted, report = convert_to_abn(model, relu_to="relu")
    found = records(report)
    assert [found[f"bn{i}"].converted_to for i in range(1, 7)] == [
        "ABN(relu)", "InPlaceABN(leaky_relu[0.2])", "InPlaceABN(elu[0.5])", "ABN(relu)", "InPlaceABN(identity)", "ABN(relu)",
    ]
    assert found["bn1"].activation == "torch.nn.functional.relu" and found["bn4"].activation == "Tensor.relu"
    assert found["bn5"].activation == "Identity 'act5'"
    assert all(found[f"bn{i}"].negated_channels > 0 for i in range(1, 7))  # every feeding layer took signs
    assert report.exact and isinstance(converted, fx.GraphModule)
    assert_same_training_and_eval(model, converted, x)


class Shared(nn.Module):
    """Places where writing over the input (or keeping the output) would break something."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn_input, self.bn_shared, self.bn_after_act, self.bn_modified = (nn.BatchNorm2d(c) for c in (3, 4, 4, 4))
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        a = F.leaky_relu(self.bn_input(x), 0.1)  # the model's input: the caller may still use it
        y = self.conv(x)
        b = F.leaky_relu(self.bn_shared(y), 0.1) + y  # y is used again
        c = F.leaky_relu(self.bn_after_act(F.leaky_relu(b)), 0.1)  # leaky_relu keeps what it returns
        d = F.leaky_relu(self.bn_modified(self.conv2(c)), 0.1)
        d.mul_(2)  # the output is then modified in place
        return a.sum() + d


def test_unsafe_places_stay_out_of_place_and_say_why():
    model, x = model_and_input(Shared(), (4, 3, 5, 5))
    with torch.no_grad():
        for bn in (model.bn_input, model.bn_shared, model.bn_after_act):
            bn.weight.abs_()  # no convolution feeds these alone to take a negative sign
    converted, report = convert_to_abn(model)
    found = records(report)
    assert not report.in_place and len(report.converted) == 4
    assert "the input 'x'" in found["bn_input"].reason
    assert "also used by operator.add" in found["bn_shared"].reason
    assert "torch.nn.functional.leaky_relu" in found["bn_after_act"].reason and "keep it for backward" in found["bn_after_act"].reason
    assert "modified in place by Tensor.mul_" in found["bn_modified"].reason
    assert_same_training_and_eval(model, converted, x)


def test_negative_weights_need_a_feeding_layer():
    class AfterAdd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return F.leaky_relu(self.bn(self.a(x) + self.b(x)), 0.1)

    model, x = model_and_input(AfterAdd(), (4, 3, 5, 5))
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([1.0, -1.0, 0.5, 2.0]))
    converted, report = convert_to_abn(model)
    assert not report.converted and "1 channels have a negative weight" in report.layers[0].reason
    with torch.no_grad():
        model.bn.weight.abs_()
    converted, report = convert_to_abn(model)
    assert report.layers[0].in_place  # the sum is a fresh tensor that nothing else uses
    assert_same_training_and_eval(model, converted, x)


def test_weights_below_eps_are_clamped_with_a_warning():
    torch.manual_seed(0)
    model = randomize_batchnorms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, eps=1e-3), nn.ELU())).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, -2e-4, 0.0, 0.5]))
    with pytest.warns(UserWarning, match="'1': 2 channels have \\|weight\\| < eps=0.001"):
        converted, report = convert_to_abn(model)
    (layer,) = report.layers
    assert layer.clamped_channels == 2 and not layer.exact and not report.exact
    torch.testing.assert_close(converted[1].weight.abs() + 1e-3, torch.tensor([1.0, 1e-3, 1e-3, 0.5], dtype=torch.float64))


def test_untraceable_model_converts_the_parts_that_trace():
    class Branching(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LeakyReLU(0.1), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.LeakyReLU(0.1)
            )

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
                return self.features(x)
            return -self.features(x)

    model, x = model_and_input(Branching(), (4, 3, 7, 7))
    converted, report = convert_to_abn(model)
    assert type(converted) is Branching and report.untraced and "Branching" in report.untraced[0]
    found = records(report)
    assert found["features.1"].in_place
    assert not found["features.4"].in_place and "leaves 'features'" in found["features.4"].reason
    assert_same_training_and_eval(model, converted, x)


def test_memory_report_counts_saved_storages_and_leaves_the_model_alone():
    torch.manual_seed(0)
    depth, x = 3, torch.randn(2, 4, 6, 6)
    layers = []
    for _ in range(depth):
        layers += [nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.LeakyReLU(0.01)]
    model = nn.Sequential(*layers, nn.Conv2d(4, 4, 3, padding=1, bias=False))
    state = copy.deepcopy(model.state_dict())
    converted, report = convert_to_abn(model, sample_input=x)
    activation = x.numel() * x.element_size()  # every activation has the input's size
    # Before: each conv's input, each BatchNorm's input, each LeakyReLU's input (the BatchNorm output).
    # After: each conv's input only; the InPlaceABN output lives in its input's storage. Both plus the
    # small per-channel tensors that BatchNorm and InPlaceABN keep (less than one activation).
    assert report.saved_bytes_before // activation == 3 * depth + 1
    assert report.saved_bytes_after // activation == depth + 1
    assert saved_activation_bytes(converted, x) == report.saved_bytes_after
    for key, value in model.state_dict().items():  # the original's running statistics are untouched
        torch.testing.assert_close(value, state[key])
    assert converted.training and int(converted[1].num_batches_tracked) == 0


def test_sync_layers_keep_the_in_place_decision():
    model, x = model_and_input(Shared(), (4, 3, 5, 5))
    with torch.no_grad():
        for bn in (model.bn_input, model.bn_shared, model.bn_after_act):
            bn.weight.abs_()
    converted, report = convert_to_abn(model, sync=True)
    assert all(isinstance(converted.get_submodule(layer.name), InPlaceABNSync) for layer in report.converted)
    assert all(not converted.get_submodule(layer.name).in_place for layer in report.converted)
    sequential = randomize_batchnorms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ELU(), nn.Conv2d(4, 2, 1)))
    converted, report = convert_to_abn(sequential, sync=True)
    assert type(converted[1]) is InPlaceABNSync and converted[1].in_place and report.layers[0].converted_to == "InPlaceABNSync(elu[1.0])"


def test_in_place_false_gives_abn_everywhere():
    model, x = model_and_input(TinyResNet(act=lambda inplace: nn.ELU(inplace=inplace)))
    converted, report = convert_to_abn(model, in_place=False)
    assert report.converted and not report.in_place
    assert all(type(converted.get_submodule(layer.name)) is ABN for layer in report.converted)
    assert_same_training_and_eval(model, converted, x)


# --- convert_to_batchnorm and fuse_conv_abn --------------------------------------------------------

def abn_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, bias=False), InPlaceABN(6),
        nn.Conv2d(6, 6, 3, groups=2), ABN(6, activation="elu", activation_param=0.7),
        nn.ConvTranspose2d(6, 4, 2, stride=2), InPlaceABNSync(4, activation="identity"),
        nn.Conv2d(4, 4, 1), ABN(4, activation="relu"),
        nn.Conv2d(4, 4, 1), ABN(4, affine=False),
    ).double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ABN):
                if module.affine:
                    module.weight.normal_(), module.bias.normal_()
                module.running_mean.normal_(), module.running_var.uniform_(0.5, 2)
    return model


def test_convert_to_batchnorm_gives_standard_layers_with_the_same_outputs():
    model = abn_model()
    standard = convert_to_batchnorm(model)
    assert not any(isinstance(m, ABN) for m in standard.modules())
    assert [type(standard[i][1]) for i in (1, 3, 5, 7, 9)] == [nn.LeakyReLU, nn.ELU, nn.Identity, nn.ReLU, nn.LeakyReLU]
    assert "1.0.weight" in standard.state_dict() and "9.0.running_var" in standard.state_dict()
    assert_same_training_and_eval(model, standard, torch.randn(4, 3, 7, 7, dtype=torch.float64))


def test_batchnorm_to_abn_and_back_is_exact():
    model, x = model_and_input(FunctionalNet(), (6, 3, 4, 4))
    converted, _ = convert_to_abn(model, relu_to="relu")
    back = convert_to_batchnorm(converted)
    assert not any(isinstance(m, ABN) for m in back.modules())
    back.bn6[0].__class__ = nn.BatchNorm1d  # its input has rank 2, which BatchNorm2d refuses
    assert_same_training_and_eval(model, back, x)


def test_fuse_conv_abn_folds_into_every_kind_of_layer():
    model = abn_model().eval()
    head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 5), ABN(5, activation="elu")).double().eval()
    with torch.no_grad():
        head[2].weight.normal_(), head[2].running_mean.normal_(), head[2].running_var.uniform_(0.5, 2)
    model.append(head)
    fused = fuse_conv_abn(model)
    assert not any(isinstance(m, ABN) for m in fused.modules())
    assert type(fused) is nn.Sequential and [type(fused[i]) for i in (1, 3, 5, 7, 9)] == [nn.LeakyReLU, nn.ELU, nn.Identity, nn.ReLU, nn.LeakyReLU]
    assert fused[0].bias is not None and type(fused[10][2]) is nn.ELU
    x = torch.randn(3, 3, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="model.eval()"):
        fuse_conv_abn(model.train())


def test_fuse_after_convert_matches_the_batchnorm_model():
    act = lambda inplace: nn.LeakyReLU(0.1, inplace=inplace)  # noqa: E731
    model, x = model_and_input(TinyResNet(Bottleneck, act=act))
    converted, _ = convert_to_abn(model)
    fused = fuse_conv_abn(converted.eval())
    assert not any(isinstance(m, ABN) for m in fused.modules())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model.eval()(x), atol=1e-10, rtol=0)
