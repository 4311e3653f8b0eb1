"""Independent reference for the tests: float64 ``torch.nn.BatchNorm{1,2,3}d`` + activation."""

import torch
import torch.nn.functional as F

BATCHNORM_BY_RANK = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}


#: name -> the standard op, for every activation the layers take (independent of the package's table)
TORCH_ACTIVATIONS = {
    "leaky_relu": F.leaky_relu, "elu": F.elu, "relu": lambda y, _: F.relu(y), "relu6": lambda y, _: F.relu6(y),
    "hardswish": lambda y, _: F.hardswish(y), "hardsigmoid": lambda y, _: F.hardsigmoid(y),
    "silu": lambda y, _: F.silu(y), "gelu": lambda y, _: F.gelu(y), "gelu_tanh": lambda y, _: F.gelu(y, approximate="tanh"),
    "mish": lambda y, _: F.mish(y), "sigmoid": lambda y, _: torch.sigmoid(y), "tanh": lambda y, _: torch.tanh(y),
    "identity": lambda y, _: y,
}


def torch_activation(y, name, param):
    return TORCH_ACTIVATIONS[name](y, param)


class ReferenceABN(torch.nn.Module):
    """nn.BatchNorm with weight ``|w| + eps`` and the activation, in float64; for a layer with
    ``batchnorm_weight``, plain nn.BatchNorm (weight ``w``) and the activation."""

    def __init__(self, layer, rank):
        super().__init__()
        self.bn = BATCHNORM_BY_RANK[rank](
            layer.num_features, eps=layer.eps, momentum=layer.momentum, affine=layer.affine,
            track_running_stats=layer.track_running_stats, dtype=torch.float64,
        )
        if layer.track_running_stats:
            self.bn.running_mean.copy_(layer.running_mean)
            self.bn.running_var.copy_(layer.running_var)
            self.bn.num_batches_tracked.copy_(layer.num_batches_tracked)
        self.raw_weight = None
        if layer.affine:
            self.raw_weight = torch.nn.Parameter(layer.weight.detach().double().clone())
            self.bn.bias.data.copy_(layer.bias.detach())
            del self.bn.weight
        self.activation, self.param = layer._activation.name, layer._activation.param
        self.batchnorm_weight = layer.batchnorm_weight

    def forward(self, x, shortcut=None):
        if self.raw_weight is not None:
            self.bn.weight = self.raw_weight if self.batchnorm_weight else self.raw_weight.abs() + self.bn.eps
        y = self.bn(x)
        return torch_activation(y if shortcut is None else y + shortcut, self.activation, self.param)
