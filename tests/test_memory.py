"""Memory contract: in training, an InPlaceABN layer saves for backward only its output, which lives
in its input's storage; a conv stack stores one activation per conv and nothing extra per norm."""

import warnings

import pytest
import torch
from torch import nn

from inplace_abn import ABN, InPlaceABN


def saved_activation_storages(model, x, min_numel):
    """Distinct storages of the full-size tensors autograd saves for backward in ``model(x)``."""
    storages = {}

    def pack(tensor):
        if tensor.numel() >= min_numel:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x)
    return storages, out


def conv_stack(norm, depth=4, channels=8):
    layers = []
    for _ in range(depth):
        layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), norm(channels)]
    layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=False))
    return nn.Sequential(*layers)


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_single_layer_saves_only_its_output_in_the_input_storage(monkeypatch, backend):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", backend)
    layer = InPlaceABN(6)
    x = torch.randn(4, 6, 5, 5, requires_grad=True) * 1
    storages, out = saved_activation_storages(layer, x, min_numel=x.numel())
    assert list(storages) == [x.untyped_storage().data_ptr()]
    assert out.data_ptr() == x.data_ptr()
    out.sum().backward()


@pytest.mark.parametrize("depth", [2, 5])
def test_conv_stack_saves_one_activation_per_conv(monkeypatch, depth):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")
    x = torch.randn(2, 8, 10, 10, requires_grad=True)  # larger than a conv weight (8*8*3*3)
    inplace, _ = saved_activation_storages(conv_stack(InPlaceABN, depth), x, x.numel())
    reference, _ = saved_activation_storages(conv_stack(ABN, depth), x, x.numel())
    batchnorm, _ = saved_activation_storages(
        conv_stack(lambda c: nn.Sequential(nn.BatchNorm2d(c), nn.LeakyReLU(0.01)), depth), x, x.numel()
    )
    activation_bytes = x.numel() * x.element_size()
    convs = depth + 1
    assert len(inplace) == convs  # each conv's input; the norm layers add nothing
    assert sum(inplace.values()) == convs * activation_bytes
    # BatchNorm + LeakyReLU keeps the BN input, the BN output (LeakyReLU's input) and the activation
    # output (the next conv's input): two more per norm layer. ABN keeps its input too.
    assert len(batchnorm) == convs + 2 * depth
    assert len(reference) == len(batchnorm)  # ABN: the same as BatchNorm + activation


def test_not_invertible_layer_keeps_its_input(monkeypatch):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = conv_stack(lambda c: InPlaceABN(c, activation="relu"), depth=2)
    x = torch.randn(2, 8, 10, 10, requires_grad=True)  # larger than a conv weight (8*8*3*3)
    storages, _ = saved_activation_storages(model, x, x.numel())
    assert len(storages) == 3 + 2  # exact but not in place: one more per norm layer, as ABN
