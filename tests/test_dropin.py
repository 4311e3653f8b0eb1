"""Drop-in checks: the 1.1.0 API exactly as two projects that depend on it call it, reconstructed here
without installing them.

- timm (``timm/layers/inplace_abn.py``): its own ``InplaceAbn`` module imports
  ``from inplace_abn.functions import inplace_abn, inplace_abn_sync``, maps ``act_layer`` (a name or
  ``nn.LeakyReLU`` / ``nn.ELU`` / ``nn.Identity``) to ``"leaky_relu"`` / ``"elu"`` / ``"identity"``,
  keeps BatchNorm's parameters and buffers (without ``num_batches_tracked``), and calls the functional
  positionally; TResNet builds ``Sequential(Conv2d, InplaceAbn)`` blocks with ``act_param=1e-3``.
- segmentation_models_pytorch (``base/modules.py``): ``Conv2dReLU(use_norm="inplace")`` builds
  ``InPlaceABN(out_channels, activation="leaky_relu", activation_param=0.0)`` and, when
  ``isinstance(norm, InPlaceABN)``, an ``nn.Identity`` after it (older releases: ``ReLU(inplace=True)``
  after it, since their name check never matched; older still: ``use_batchnorm="inplace"``).
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inplace_abn import InPlaceABN, InPlaceABNSync, activations
from inplace_abn.functions import inplace_abn, inplace_abn_sync

from reference import torch_activation


@pytest.fixture(autouse=True)
def _eager_backend(monkeypatch):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")


def reference(x, weight, bias, running_mean, running_var, training, activation, param, eps=1e-5, momentum=0.1):
    """float64 BatchNorm with weight |w| + eps, then the activation (running statistics on copies)."""
    scale = None if weight is None else weight.double().abs() + eps
    mean = None if running_mean is None else running_mean.double().clone()
    var = None if running_var is None else running_var.double().clone()
    y = F.batch_norm(x.double(), mean, var, scale, None if bias is None else bias.double(), training, momentum, eps)
    return torch_activation(y, activation, param), mean, var


# --- timm ------------------------------------------------------------------------------------------

class TimmInplaceAbn(nn.Module):
    """What timm's ``InplaceAbn`` does with the package (its code paraphrased, behaviour kept)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, apply_act=True,
                 act_layer="leaky_relu", act_param=0.01, drop_layer=None):
        super().__init__()
        self.num_features, self.affine, self.eps, self.momentum = num_features, affine, eps, momentum
        if not apply_act:
            self.act_name = "identity"
        elif isinstance(act_layer, str):
            assert act_layer in ("leaky_relu", "elu", "identity", "")
            self.act_name = act_layer or "identity"
        else:
            self.act_name = {nn.ELU: "elu", nn.LeakyReLU: "leaky_relu", nn.Identity: "identity", None: "identity"}[act_layer]
        self.act_param = act_param
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        output = inplace_abn(
            x, self.weight, self.bias, self.running_mean, self.running_var,
            self.training, self.momentum, self.eps, self.act_name, self.act_param)
        if isinstance(output, tuple):  # some releases returned (output, mean, var)
            output = output[0]
        return output


@pytest.mark.parametrize("act_layer,act_param,name", [
    ("leaky_relu", 0.01, "leaky_relu"), (nn.LeakyReLU, 1e-3, "leaky_relu"), ("elu", 1.0, "elu"), (nn.ELU, 0.5, "elu"),
    ("identity", 0.0, "identity"), ("", 0.0, "identity"), (nn.Identity, 0.0, "identity"), (None, 0.0, "identity"),
])
def test_timm_inplace_abn_wrapper(act_layer, act_param, name):
    torch.manual_seed(0)
    layer = TimmInplaceAbn(5, act_layer=act_layer, act_param=act_param).double()
    with torch.no_grad():
        layer.weight.normal_(), layer.bias.normal_()
    conv = nn.Conv2d(3, 5, 3).double()
    x = torch.randn(4, 3, 7, 7, dtype=torch.float64)
    features = conv(x)
    expected, mean, var = reference(features.detach(), layer.weight, layer.bias, layer.running_mean, layer.running_var, True, name, act_param)
    out = layer(features)  # in place over the conv output, as in timm's networks
    torch.testing.assert_close(out, expected)
    assert out.data_ptr() == features.data_ptr()
    torch.testing.assert_close(layer.running_mean, mean), torch.testing.assert_close(layer.running_var, var)
    out.square().sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    layer.eval()
    with torch.no_grad():
        features = conv(x)
        expected, _, _ = reference(features, layer.weight, layer.bias, layer.running_mean, layer.running_var, False, name, act_param)
        torch.testing.assert_close(layer(features), expected)


def test_timm_tresnet_block_and_checkpoint_into_inplace_abn():
    """TResNet's ``conv2d_iabn``: ``Sequential(Conv2d(bias=False), InplaceAbn(act_layer, act_param=1e-3))``,
    ending a block with ``act_layer="identity"`` before the residual add. Its state dict (no
    ``num_batches_tracked``) loads into the package's own ``InPlaceABN``."""
    def conv2d_iabn(ni, nf, stride=1, act_layer="leaky_relu", act_param=1e-2):
        return nn.Sequential(nn.Conv2d(ni, nf, 3, stride, 1, bias=False), TimmInplaceAbn(nf, act_layer=act_layer, act_param=act_param))

    torch.manual_seed(0)
    block = nn.Sequential(conv2d_iabn(4, 4, act_param=1e-3), conv2d_iabn(4, 4, act_layer="identity"))
    x = torch.randn(2, 4, 8, 8)
    out = F.relu(block(x) + x)
    out.sum().backward()
    state = block[0][1].state_dict()
    assert "num_batches_tracked" not in state
    ours = InPlaceABN(4, activation="leaky_relu", activation_param=1e-3)
    ours.load_state_dict(state)
    block.eval(), ours.eval()
    with torch.no_grad():
        features = block[0][0](x)
        torch.testing.assert_close(ours(features.clone()), block[0][1](features))


def test_positional_functional_calls():
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5)
    weight, bias = torch.randn(4), torch.randn(4)
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    expected, mean, var = reference(x, weight, bias, running_mean, running_var, True, "elu", 0.5, eps=1e-3, momentum=0.2)
    out = inplace_abn(x.clone(), weight, bias, running_mean, running_var, True, 0.2, 1e-3, "elu", 0.5)
    torch.testing.assert_close(out.double(), expected)
    torch.testing.assert_close(running_mean.double(), mean), torch.testing.assert_close(running_var.double(), var)
    # Without a process group the synchronized form is the same layer; the group is the 11th argument.
    out = inplace_abn_sync(x.clone(), weight, bias, torch.zeros(4), torch.ones(4), True, 0.2, 1e-3, "elu", 0.5, None)
    torch.testing.assert_close(out.double(), expected)


def test_class_construction_as_1_1_0():
    """1.1.0's order: num_features, eps, momentum, affine, track_running_stats, activation, activation_param."""
    layer = InPlaceABN(8, 1e-3, 0.05, True, False, "elu", 0.5)
    assert (layer.eps, layer.momentum, layer.affine, layer.track_running_stats) == (1e-3, 0.05, True, False)
    assert (layer.activation, layer.activation_param) == ("elu", 0.5) and layer.running_mean is None
    layer = InPlaceABN(num_features=8, eps=1e-5, momentum=None, affine=False, track_running_stats=True,
                       activation="identity", activation_param=0.0)
    assert layer.weight is None and layer.momentum is None
    sync = InPlaceABNSync(8, 1e-5, 0.1, True, True, "leaky_relu", 0.01, None)
    assert isinstance(sync, InPlaceABN) and sync.group is None


# --- segmentation_models_pytorch --------------------------------------------------------------------

def smp_get_norm_layer(use_norm, out_channels):
    """smp's ``get_norm_layer`` for the cases that matter here."""
    if use_norm == "inplace":
        return InPlaceABN(out_channels, activation="leaky_relu", activation_param=0.0)
    if use_norm in (True, "batchnorm"):
        return nn.BatchNorm2d(out_channels)
    return nn.Identity()


class SmpConv2dReLU(nn.Sequential):
    """smp's ``Conv2dReLU``: the current release (isinstance check), or an older one whose name check
    never matched, leaving ``ReLU(inplace=True)`` after the InPlaceABN."""

    def __init__(self, in_channels, out_channels, kernel_size, padding=0, stride=1, use_norm="batchnorm", by_name=False):
        norm = smp_get_norm_layer(use_norm, out_channels)
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         bias=isinstance(norm, nn.Identity))
        is_inplaceabn = norm._get_name() == "Inplace" if by_name else isinstance(norm, InPlaceABN)
        activation = nn.Identity() if is_inplaceabn else nn.ReLU(inplace=True)
        super().__init__(conv, norm, activation)


class SmpDecoderBlock(nn.Module):
    """smp's U-Net decoder block: upsample, concatenate the skip, two Conv2dReLU."""

    def __init__(self, in_channels, skip_channels, out_channels, use_norm="inplace", by_name=False):
        super().__init__()
        self.conv1 = SmpConv2dReLU(in_channels + skip_channels, out_channels, 3, 1, use_norm=use_norm, by_name=by_name)
        self.conv2 = SmpConv2dReLU(out_channels, out_channels, 3, 1, use_norm=use_norm, by_name=by_name)

    def forward(self, x, skip):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


@pytest.mark.parametrize("by_name", [False, True])
def test_smp_conv2d_relu_inplace_is_exact_relu(by_name):
    """Slope 0 is ReLU, which is not invertible: the layer keeps its input (recompute mode) and gives
    exact gradients (1.1.0 gave wrong ones); trained without the recompute hooks it warns once. The same
    weights in BatchNorm2d + ReLU give the same results."""
    activations._warned_outside.clear()
    torch.manual_seed(0)
    block = SmpDecoderBlock(6, 3, 4, by_name=by_name).double()
    assert isinstance(block.conv1[1], InPlaceABN) and block.conv1[0].bias is None
    assert type(block.conv1[2]) is (nn.ReLU if by_name else nn.Identity)
    reference_block = SmpDecoderBlock(6, 3, 4, use_norm="batchnorm").double()
    reference_block.load_state_dict(block.state_dict())  # BatchNorm's keys, num_batches_tracked included
    with torch.no_grad():
        for norm in (block.conv1[1], block.conv2[1]):
            norm.weight.uniform_(0.5, 1.5).mul_(torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64))
            norm.bias.normal_()
        for ours, theirs in ((block.conv1[1], reference_block.conv1[1]), (block.conv2[1], reference_block.conv2[1])):
            theirs.weight.copy_(ours.weight.abs() + ours.eps), theirs.bias.copy_(ours.bias)
    x, skip = torch.randn(2, 6, 4, 4, dtype=torch.float64), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for train in (True, False):
        block.train(train), reference_block.train(train)
        inputs = [x.clone().requires_grad_(), skip.clone().requires_grad_()]
        reference_inputs = [x.clone().requires_grad_(), skip.clone().requires_grad_()]
        if train:
            with pytest.warns(UserWarning, match="outside inplace_abn.enable_recompute"):
                out = block(*inputs)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # not in eval mode
                out = block(*inputs)
        expected = reference_block(*reference_inputs)
        torch.testing.assert_close(out, expected)
        grad = torch.randn_like(out)
        out.backward(grad), expected.backward(grad)
        torch.testing.assert_close(inputs[0].grad, reference_inputs[0].grad)
        torch.testing.assert_close(inputs[1].grad, reference_inputs[1].grad)
        torch.testing.assert_close(block.conv1[1].running_var, reference_block.conv1[1].running_var)


def test_smp_old_use_batchnorm_inplace():
    """Older smp: ``Conv2dReLU(..., use_batchnorm="inplace")`` gave ``bias=not use_batchnorm`` (False) and
    ``InPlaceABN(out_channels, activation="leaky_relu", activation_param=0.0)`` then ``nn.Identity``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        block = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), InPlaceABN(4, activation="leaky_relu", activation_param=0.0), nn.Identity())
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    out = block(x)
    assert (out >= 0).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
