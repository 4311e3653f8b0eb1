"""Independent reference for the tests: float64 ``torch.nn.BatchNorm{1,2,3}d`` + activation."""

import torch
import torch.nn.functional as F

BATCHNORM_BY_RANK = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}


def torch_activation(y, name, param):
    if name == "leaky_relu":
        return F.leaky_relu(y, param)
    if name == "elu":
        return F.elu(y, param)
    if name == "relu":
        return F.relu(y)
    return y


class ReferenceABN(torch.nn.Module):
    """nn.BatchNorm with weight ``|w| + eps`` and the activation, in float64."""

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

    def forward(self, x):
        if self.raw_weight is not None:
            self.bn.weight = self.raw_weight.abs() + self.bn.eps
        return torch_activation(self.bn(x), self.activation, self.param)
