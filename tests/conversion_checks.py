"""Checks for converted models: a converted model computes what the original computes (float64), in
training and eval mode: outputs, input gradients, parameter gradients through the sign moves, and
running statistics. The reference is the original model itself."""

import torch
from torch import nn

from inplace_abn import ABN

BatchNorm = nn.modules.batchnorm._BatchNorm


def randomize_batchnorms(model, low=0.1):
    """Weights of either sign with |w| >= low (channel 0 negative), biases and running statistics away
    from the defaults, for every BatchNorm."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BatchNorm):
                sign = torch.where(torch.rand(module.num_features) < 0.5, -1.0, 1.0)
                sign[0] = -1.0
                if module.affine:
                    module.weight.copy_(sign * (low + torch.rand(module.num_features)))
                    module.bias.normal_()
                if module.track_running_stats:
                    module.running_mean.normal_()
                    module.running_var.uniform_(0.5, 2.0)
    return model


def assert_close(actual, expected, rtol, what, floor=0.0):
    """|actual - expected| <= rtol * max|expected| + floor: relative to the tensor's scale, not per element."""
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    error = (actual.detach() - expected.detach()).abs().max().item() if expected.numel() else 0.0
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert error <= rtol * scale + floor or error == 0, f"{what}: error {error:.3g} over scale {scale:.3g}"


def _sign_factors(original, converted, rename):
    """Per parameter of the original, the factor (+1 or -1 per element) its gradient has in the converted
    model: weights the converter negated (a channel's sign moved into the conv before the norm), and the
    norms' ``weight``, whose sign went there too (a layer's is ``|w| - eps``, scaling by ``|w|``; one with
    ``batchnorm_weight`` keeps ``w`` itself)."""
    converted_parameters = dict(converted.named_parameters())
    converted_modules = dict(converted.named_modules())
    factors = {}
    for name, parameter in original.named_parameters():
        twin = converted_parameters[rename(name)]
        owner = converted_modules[rename(name).rpartition(".")[0]]
        one = torch.ones_like(parameter)  # copysign: a negated 0.0 is -0.0, so zeros tell their sign too
        factors[name] = (torch.copysign(one, twin) * torch.copysign(one, parameter)).detach()
        if isinstance(owner, ABN) and owner.batchnorm_weight and name.endswith("weight"):
            assert torch.equal(twin, parameter), f"{name} changed, though the layer scales by BatchNorm's weight"
        elif isinstance(owner, (ABN, BatchNorm)) and name.endswith("weight"):
            scale = twin.abs() + owner.eps if isinstance(owner, ABN) else twin.abs()
            assert_close(scale, parameter.abs(), 1e-12, f"|weight| of {name}")
        else:
            assert torch.equal(twin.abs(), parameter.abs()), f"{name} changed beyond a sign"
    return factors


def _step(model, x, seed, grad=None):
    """One forward and backward (with ``grad``, or a random output gradient); returns the output, the
    input gradient, the parameter gradients and the output gradient."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)  # dropout draws the same masks in both models
    output = model(x)
    if grad is None:
        grad = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed), dtype=output.dtype)
    output.backward(grad)
    return output.detach(), x.grad, {name: p.grad for name, p in model.named_parameters()}, grad


def _check_running_statistics(original, converted, factors, rename, rtol):
    converted_modules = dict(converted.named_modules())
    for name, bn in original.named_modules():
        if not isinstance(bn, BatchNorm) or not bn.track_running_stats:
            continue
        layer = converted_modules[rename(f"{name}.weight").rpartition(".")[0]]
        sign = factors[f"{name}.weight"] if bn.affine else 1.0  # the mean flips where the weight's sign moved
        assert_close(layer.running_mean, sign * bn.running_mean, rtol, f"running_mean of {name}")
        assert_close(layer.running_var, bn.running_var, rtol, f"running_var of {name}")
        assert int(layer.num_batches_tracked) == int(bn.num_batches_tracked), name


def assert_converted_exactly(original, converted, x, rtol=1e-9, steps=("train", "eval"), rename=lambda name: name):
    """The converted model computes what the original does, within ``rtol`` relative to each tensor's scale:
    for each mode in ``steps`` (in that order), one forward and backward of both with the same output
    gradient; outputs, input gradients and parameter gradients (mapped through the sign moves) agree, and
    so do the running statistics after each step. Parameter gradients also get a floor of 1e-12 of the
    largest one: those that are zero in exact arithmetic (the bias of a BatchNorm whose output another
    training-mode BatchNorm normalizes again) are rounding noise in both models. ``rename`` maps a
    parameter name of the original to the converted model's (they are the same unless converted back)."""
    factors = _sign_factors(original, converted, rename)
    for seed, mode in enumerate(steps):
        original.train(mode == "train")
        converted.train(mode == "train")
        out_o, dx_o, grads_o, grad = _step(original, x, seed)
        out_c, dx_c, grads_c, _ = _step(converted, x, seed, grad)
        assert_close(out_c, out_o, rtol, f"{mode} output")
        assert_close(dx_c, dx_o, rtol, f"{mode} input gradient")
        largest = max(g.abs().max().item() for g in grads_o.values() if g is not None)
        for name, grad_o in grads_o.items():
            grad_c = grads_c[rename(name)]
            if grad_o is None:
                assert grad_c is None, name
                continue
            assert_close(grad_c, factors[name] * grad_o, rtol, f"{mode} gradient of {name}", 1e-12 * largest)
        _check_running_statistics(original, converted, factors, rename, rtol)
