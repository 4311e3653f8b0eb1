"""The networks: InPlaceABN and ABN give the same outputs and gradients with the same weights, the
in-place model keeps one activation less per norm layer, and the output shapes and strides."""

import pytest
import torch
from torch import nn

from inplace_abn import ABN, InPlaceABN
from inplace_abn.models import (
    BACKBONES, BatchNormAct2d, CheckpointedBatchNormAct2d, DeepLabV3, PreActivationBlock, batchnorm_act, build,
    checkpointed_batchnorm_act, deeplabv3, norm_act, resnet18, wider_resnet16,
)
from inplace_abn.models.norm_act import overwrites_input

# name -> builder arguments for a small but complete network; output stride 8 keeps enough values
# per channel at 32x32 for well-conditioned batch statistics.
FAMILIES = {
    "resnet18": dict(width_multiplier=0.25, num_classes=10, output_stride=8),
    "resnext50_32x4d": dict(width_multiplier=0.25, num_classes=10, output_stride=8),
    "wider_resnet38": dict(width_multiplier=0.125, num_classes=10, output_stride=8),
    "wider_resnet38_a2": dict(width_multiplier=0.125, num_classes=10, output_stride=8),
    "densenet121": dict(width_multiplier=0.125, num_classes=10, output_stride=8),
    "deeplabv3_wider_resnet38_a2": dict(width_multiplier=0.125, num_classes=5, output_stride=8, hidden_channels=16),
}


@pytest.fixture(autouse=True)
def _eager_backend(monkeypatch):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")  # no torch.compile time in these tests


def _pair(name, dtype=torch.float64, **kwargs):
    """The same network with ABN and with InPlaceABN, holding identical weights."""
    reference = build(name, norm_act=norm_act.abn(), **kwargs).to(dtype)
    in_place = build(name, norm_act=norm_act.inplace_abn(), **kwargs).to(dtype)
    in_place.load_state_dict(reference.state_dict())
    return reference, in_place


def _norm_layers(model):
    return [m for m in model.modules() if isinstance(m, (ABN, nn.BatchNorm2d))]


def _train_step(model, images, seed=1):
    torch.manual_seed(seed)  # the same dropout masks in both models
    out = model(images)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    (out * weights).sum().backward()
    return out.detach()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_inplace_abn_matches_abn(name):
    reference, in_place = _pair(name, **FAMILIES[name])
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for step in range(2):
        out_reference = _train_step(reference, images, seed=step)
        out_in_place = _train_step(in_place, images, seed=step)
        torch.testing.assert_close(out_in_place, out_reference, rtol=1e-8, atol=1e-10)
    for (param_name, p_ref), p_ours in zip(reference.named_parameters(), in_place.parameters()):
        scale = p_ref.grad.abs().max().clamp_min(1.0)
        torch.testing.assert_close(p_ours.grad / scale, p_ref.grad / scale, rtol=0, atol=1e-9, msg=param_name)
    for (buffer_name, b_ref), b_ours in zip(reference.named_buffers(), in_place.buffers()):
        torch.testing.assert_close(b_ours, b_ref, rtol=1e-8, atol=1e-10, msg=buffer_name)
    reference.eval(), in_place.eval()
    with torch.no_grad():
        torch.testing.assert_close(in_place(images), reference(images), rtol=1e-8, atol=1e-10)


def _saved_activation_bytes(model, images) -> tuple[int, int]:
    """Bytes of the distinct activation storages autograd keeps for backward (parameters and
    per-channel vectors excluded), and the bytes of one output per norm layer."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}
    norm_output_bytes = 0

    def pack(tensor):
        storage = tensor.untyped_storage()
        if tensor.dim() > 1 and storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def count(module, inputs, output):
        nonlocal norm_output_bytes
        norm_output_bytes += output.numel() * output.element_size()

    hooks = [layer.register_forward_hook(count) for layer in _norm_layers(model)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(images)
    for hook in hooks:
        hook.remove()
    out.sum().backward()  # the graph must also be usable
    return sum(storages.values()), norm_output_bytes


@pytest.mark.parametrize("name", ["resnext50_32x4d", "densenet121", "deeplabv3_wider_resnet38_a2"])
def test_inplace_abn_keeps_one_activation_less_per_norm_layer(name):
    kwargs = dict(FAMILIES[name], output_stride=16)
    images = torch.randn(2, 3, 32, 32)
    saved = {}
    for variant, make in [
        ("abn", norm_act.abn()),
        ("batchnorm_inplace_act", batchnorm_act(inplace_activation=True)),
        ("inplace_abn", norm_act.inplace_abn()),
    ]:
        torch.manual_seed(0)
        saved[variant], one_activation_per_norm = _saved_activation_bytes(build(name, norm_act=make, **kwargs), images)
    # BatchNorm + in-place activation keeps the BatchNorm input and the activation output; InPlace-ABN
    # only the output. ABN (as BatchNorm + out-of-place leaky_relu, which keeps its input) also keeps
    # the BatchNorm output: two activations more per norm layer.
    saved_less = saved["batchnorm_inplace_act"] - saved["inplace_abn"]
    assert 0.97 * one_activation_per_norm <= saved_less <= 1.03 * one_activation_per_norm
    # ABN keeps its input, its output and the activation's output: two activations more per norm layer
    assert saved["abn"] - saved["inplace_abn"] >= 1.9 * one_activation_per_norm


@pytest.mark.parametrize("name", list(BACKBONES))
def test_classification_output_shape(name):
    model = build(name, num_classes=7, width_multiplier=1 / 16).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 40, 40)).shape == (1, 7)


@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d", "wider_resnet38", "wider_resnet38_a2", "densenet121"])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_feature_map_output_stride(name, output_stride):
    model = build(name, num_classes=0, output_stride=output_stride, width_multiplier=1 / 16).eval()
    with torch.no_grad():
        features = model(torch.randn(1, 3, 64, 96))
    assert model.output_stride == output_stride
    assert features.shape == (1, model.out_channels, 64 // output_stride, 96 // output_stride)


def test_full_width_channels():
    assert build("resnet18", num_classes=0).out_channels == 512
    assert build("resnext50_32x4d", num_classes=0).out_channels == 2048
    assert build("wider_resnet16", num_classes=0).out_channels == 4096
    assert build("densenet121", num_classes=0).out_channels == 1024
    parameters = sum(p.numel() for p in build("resnet50").parameters())
    assert 25.0e6 < parameters < 26.0e6  # pre-activation ResNet-50 with its 1000-way classifier


def test_invalid_output_stride():
    with pytest.raises(ValueError, match="output_stride"):
        resnet18(output_stride=12)


@pytest.mark.parametrize("backbone,output_stride,head", [
    ("resnet18", 16, "paper"), ("wider_resnet38_a2", 8, "paper"), ("densenet121", 16, "aspp"),
])
def test_deeplabv3_output_matches_input_size(backbone, output_stride, head):
    model = build("deeplabv3_" + backbone, num_classes=4, output_stride=output_stride, width_multiplier=1 / 16,
                  hidden_channels=8, head=head)
    images = torch.randn(2, 3, 50, 70)
    out = model(images)
    assert out.shape == (2, 4, 50, 70)
    out.mean().backward()
    if head == "paper":
        rates = [conv.dilation[0] for conv in model.head.map_convs[1:]]
    else:
        rates = [branch[0].dilation[0] for branch in model.head.branches[1:]]
    assert rates == ([12, 24, 36] if output_stride == 8 else [6, 12, 18])


def test_default_norm_act_is_inplace_abn_leaky_relu():
    model = wider_resnet16(num_classes=0, width_multiplier=1 / 16)
    layers = _norm_layers(model)
    assert layers and all(type(layer) is InPlaceABN for layer in layers)
    assert {(layer.activation, layer.activation_param) for layer in layers} == {("leaky_relu", 0.01)}


def test_identity_block_keeps_its_input_for_the_shortcut():
    block = PreActivationBlock(8, (8, 8), norm_act=norm_act.inplace_abn()).double()
    reference = PreActivationBlock(8, (8, 8), norm_act=norm_act.abn()).double()
    reference.load_state_dict(block.state_dict())
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    block_input = x * 1
    torch.testing.assert_close(block(block_input), reference(x))
    torch.testing.assert_close(block_input, x)  # the block normalized a copy


def test_overwrites_input():
    assert overwrites_input(InPlaceABN(4))
    assert not overwrites_input(ABN(4))
    assert not overwrites_input(BatchNormAct2d(4, inplace_activation=True))
    assert not overwrites_input(nn.Sequential(nn.BatchNorm2d(4), nn.LeakyReLU(inplace=True)))
    assert overwrites_input(nn.LeakyReLU(inplace=True))  # unknown: assumed to


@pytest.mark.parametrize("inplace_activation", [False, True])
def test_batchnorm_act_is_batchnorm_then_activation(inplace_activation):
    layer = batchnorm_act(inplace_activation=inplace_activation)(6).double()
    reference = nn.Sequential(nn.BatchNorm2d(6), nn.LeakyReLU(0.01)).double()
    reference[0].load_state_dict(layer.state_dict())
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference(x))
    torch.testing.assert_close(layer.running_var, reference[0].running_var)


def test_checkpointed_batchnorm_act_matches_and_updates_statistics_once():
    layer = checkpointed_batchnorm_act()(6).double()
    assert isinstance(layer, CheckpointedBatchNormAct2d)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.normal_()
    reference = BatchNormAct2d(6).double()
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    x_checkpointed, x_reference = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    out, expected = layer(x_checkpointed), reference(x_reference)
    torch.testing.assert_close(out, expected)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x_checkpointed.grad, x_reference.grad)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad)
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad)
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(getattr(layer, name), buffer, msg=name)  # one update, not two


def test_deeplabv3_builder_uses_one_norm_act_throughout():
    model = deeplabv3(resnet18, num_classes=3, output_stride=16, norm_act=norm_act.abn(), width_multiplier=1 / 16,
                      hidden_channels=8)
    assert isinstance(model, DeepLabV3)
    assert all(type(layer) is ABN for layer in _norm_layers(model))


def test_default_backend(monkeypatch):
    """One small network on the default backend (compiled on CPU when a C++ compiler is present)."""
    monkeypatch.delenv("INPLACE_ABN_BACKEND")
    reference, in_place = _pair("resnet18", dtype=torch.float32, width_multiplier=0.125, num_classes=10,
                                output_stride=8)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_train_step(in_place, images), _train_step(reference, images), rtol=1e-4, atol=1e-4)
    for p_ref, p_ours in zip(reference.parameters(), in_place.parameters()):
        torch.testing.assert_close(p_ours.grad, p_ref.grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_v1_is_torchvision_resnet(name):
    """ResNet v1 with BatchNorm + ReLU is torchvision's ResNet (an independent definition of the same
    network): its weights, renamed, give the same outputs."""
    torchvision = pytest.importorskip("torchvision")
    reference = getattr(torchvision.models, name)(num_classes=10).double().eval()
    for module in reference.modules():  # non-trivial statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1), module.running_var.uniform_(0.5, 2.0), module.weight.data.normal_()
    ours = build(name + "_v1", num_classes=10, norm_act=batchnorm_act("relu")).double().eval()
    top_level = {"conv1": "mod1.conv1", "bn1": "mod1.bn1", "fc": "classifier.fc"}
    in_block = {"downsample.0": "proj_conv", "downsample.1": "proj_bn"}
    state = {}
    for key, value in reference.state_dict().items():
        parts = key.split(".")
        if parts[0].startswith("layer"):  # layer<S>.<B>.<layer>.<tensor>
            stage, block, layer = int(parts[0][len("layer"):]), int(parts[1]), ".".join(parts[2:-1])
            key = f"mod{stage + 1}.block{block + 1}.{in_block.get(layer, 'convs.' + layer)}.{parts[-1]}"
        else:
            key = f"{top_level[parts[0]]}.{parts[-1]}"
        state[key] = value
    ours.load_state_dict(state)
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), reference(images), rtol=1e-10, atol=1e-10)
