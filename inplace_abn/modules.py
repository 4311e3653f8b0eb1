"""The layers: ``ABN``, ``InPlaceABN``, ``RecomputeABN`` and ``InPlaceABNSync`` share one base and differ
only in the function they call. Parameters, buffers, state-dict keys and momentum semantics are those of
``torch.nn.BatchNorm2d``, so a BatchNorm state dict loads.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import functions
from .activations import describe, make_activation


def _recording_graph() -> bool:
    """Whether ``torch.jit.trace`` or ``torch.export`` is recording the model (the ONNX exporters run one
    of the two): they need standard ops, and see the in-place autograd Function as an opaque call."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


class ABN(nn.Module):
    """Activated BatchNorm: BatchNorm with effective scale ``|weight| + eps``, then an activation;
    ``layer(x, shortcut)`` computes ``act(BN(x) + shortcut)`` (a residual block's add, fused).

    Not in place: keeps what BatchNorm + activation keep. Its math is that of :class:`InPlaceABN`,
    so the layers are interchangeable with the same weights.

    Args:
        num_features: channels ``C`` of an input ``(N, C, *spatial)`` of rank 2 to 5.
        eps: added to the variance, and to ``|weight|`` in the scale. Must be > 0.
        momentum: running-statistics update factor; ``None`` for a cumulative average.
        affine: learn ``weight`` and ``bias``.
        track_running_stats: keep running statistics for eval mode (else batch statistics always).
        activation: one of :data:`inplace_abn.activations.ACTIVATIONS`: ``"leaky_relu"``, ``"elu"``,
            ``"identity"`` (alias ``"none"``), ``"silu"`` (alias ``"swish"``), ``"gelu"``, ``"gelu_tanh"``,
            ``"mish"``, ``"relu"``, ``"relu6"``, ``"hardswish"``, ``"hardsigmoid"``, ``"sigmoid"``, ``"tanh"``.
        activation_param: leaky_relu's negative slope, or elu's alpha (ignored by the others).
        batchnorm_weight: scale by ``weight`` itself, of any sign or zero, as ``nn.BatchNorm`` does,
            instead of ``|weight| + eps``. Only for a layer that does not write over its input (``ABN``,
            :class:`RecomputeABN`, where it is the default, ``InPlaceABNSync(in_place=False)``, an
            ``InPlaceABN`` with a lossy activation): in place, the backward pass divides by the scale.
            A BatchNorm state dict then loads with its meaning unchanged.
    """

    _version = 2  # that of BatchNorm's state dict: has num_batches_tracked
    _function = staticmethod(functions.abn)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        activation: str = "leaky_relu",
        activation_param: float = 0.01,
        *,
        batchnorm_weight: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps must be > 0 (got {eps}): the scale |weight| + eps must stay positive.")
        if momentum is not None and not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1] or None (got {momentum}).")
        self._activation = make_activation(activation, activation_param)
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.activation = activation
        self.activation_param = activation_param
        self._set_batchnorm_weight(batchnorm_weight)
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def _writes_in_place(self) -> bool:
        return False

    def _set_batchnorm_weight(self, batchnorm_weight: bool) -> None:
        if batchnorm_weight and self._writes_in_place():
            raise ValueError(
                f"{type(self).__name__} with activation {describe(self._activation)} writes over its input, and "
                "its backward pass divides by the scale, which must stay positive (|weight| + eps): "
                "batchnorm_weight=True needs RecomputeABN, ABN or InPlaceABNSync(in_place=False).")
        self.batchnorm_weight = bool(batchnorm_weight)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _momentum_and_training(self) -> tuple[float, bool]:
        """As ``nn.BatchNorm``: the update factor (cumulative average for momentum None), and whether
        batch statistics are used."""
        momentum = 0.0 if self.momentum is None else self.momentum
        # "is not None": TorchScript types an absent buffer as None and drops this branch for it.
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or self.running_mean is None
        return momentum, use_batch_stats

    def _running_stats(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        # Buffers are updated only when they are used for normalization in eval, i.e. when tracked.
        if not self.training or self.track_running_stats:
            return self.running_mean, self.running_var
        return None, None

    def forward(self, x: torch.Tensor, shortcut: Optional[torch.Tensor] = None) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only
            return self._forward_standard_ops(x, shortcut)
        if _recording_graph():
            return self._forward_standard_ops(x, shortcut)
        momentum, use_batch_stats = self._momentum_and_training()
        running_mean, running_var = self._running_stats()
        return self._function(
            x, self.weight, self.bias, running_mean, running_var, use_batch_stats, momentum, self.eps,
            self.activation, self.activation_param, shortcut=shortcut, batchnorm_weight=self.batchnorm_weight,
        )

    def _forward_standard_ops(self, x: torch.Tensor, shortcut: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The same math out of place in standard ops (``F.batch_norm`` + activation), for exporters."""
        momentum, use_batch_stats = self._momentum_and_training()
        running_mean, running_var = self._running_stats()
        return functions.batch_norm_act(
            x, self.weight, self.bias, running_mean, running_var, use_batch_stats, momentum, self.eps,
            self.activation, float(self.activation_param), shortcut, self.batchnorm_weight,
        )

    def extra_repr(self) -> str:
        act = describe(self._activation)
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, activation={act}, "
            f"batchnorm_weight={self.batchnorm_weight}"
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # State dicts of inplace-abn 1.1.0 (and BatchNorm before version 2) have no num_batches_tracked.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long) if self.num_batches_tracked is None else self.num_batches_tracked
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class InPlaceABN(ABN):
    """In-place activated BatchNorm: writes its output over its input and keeps only the output for
    backward, halving the activation memory of a BatchNorm + activation pair.

    In place for ``leaky_relu`` (slope > 0, the default 0.01), ``elu``, ``identity``, and for ``silu``,
    ``gelu``, ``gelu_tanh`` and ``mish``, which also keep one bit per element (the side of their
    minimum). With an activation that loses information (``relu``, ``relu6``, ``hardswish``,
    ``hardsigmoid``, ``sigmoid``, ``tanh``) it works as :class:`RecomputeABN`. The input must not be
    used by anything else after this layer: see the README ("What may not share an in-place input").
    """

    _function = staticmethod(functions.inplace_abn)

    def _writes_in_place(self) -> bool:
        return self._activation.in_place


class RecomputeABN(ABN):
    """BatchNorm + activation that keeps its input and per-channel statistics, not its output: where a
    later op (the next convolution) would store the output for backward, it is rebuilt there instead,
    one elementwise pass (the paper's "computationally efficient checkpointing", METHOD.md §8 (c)).

    Exact for any activation, and the input is not modified, so it may also be used elsewhere. The
    memory is saved when the model runs under :func:`inplace_abn.enable_recompute` (what
    :func:`inplace_abn.convert_to_abn` sets up); otherwise the output is stored as after BatchNorm.

    It scales by ``weight`` itself by default (``batchnorm_weight=True``), as ``nn.BatchNorm``: a drop-in
    for BatchNorm + activation whose BatchNorm state dict loads with the same meaning (negative and zero
    weights included). ``batchnorm_weight=False`` scales by ``|weight| + eps``, as :class:`InPlaceABN`.
    """

    _function = staticmethod(functions.recompute_abn)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        activation: str = "leaky_relu",
        activation_param: float = 0.01,
        *,
        batchnorm_weight: bool = True,
        **factory,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, activation, activation_param,
                         batchnorm_weight=batchnorm_weight, **factory)


class InPlaceABNSync(InPlaceABN):
    """:class:`InPlaceABN` with batch statistics synchronized over a ``torch.distributed`` group.

    In training, the statistics of all ranks' shards are merged exactly (ranks may hold different
    batch sizes), so outputs, input gradients and running statistics equal those of one process on
    the concatenated batch; ``weight``/``bias`` gradients are this rank's contribution, which
    ``DistributedDataParallel`` averages. One collective forward, one backward (docs/distributed.md).

    ``group=None`` synchronizes over the whole world. Without an initialized process group, with
    one process, on a rank outside ``group``, or in eval mode, it behaves as :class:`InPlaceABN` and
    communicates nothing. ``in_place=False`` works as :class:`RecomputeABN`: the input is kept and
    not modified (what :meth:`convert_sync_abn` gives an ``ABN``, whose input may still be in use), and
    then also takes ``batchnorm_weight=True`` (see :class:`ABN`).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, activation: str = "leaky_relu", activation_param: float = 0.01,
                 group=None, *, in_place: bool = True, batchnorm_weight: bool = False, **factory):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, activation, activation_param, **factory)
        self.group = group
        self.in_place = in_place
        self._set_batchnorm_weight(batchnorm_weight)  # checked once in_place is known

    def _writes_in_place(self) -> bool:
        return self.in_place and self._activation.in_place

    def set_group(self, group) -> None:
        """Synchronize over ``group`` from now on (what :func:`~inplace_abn.set_active_group` calls)."""
        self.group = group

    def forward(self, x: torch.Tensor, shortcut: Optional[torch.Tensor] = None) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only
            return self._forward_standard_ops(x, shortcut)  # in training: this rank's statistics, no collective
        if _recording_graph():
            return self._forward_standard_ops(x, shortcut)
        momentum, use_batch_stats = self._momentum_and_training()
        running_mean, running_var = self._running_stats()
        args = (x, self.weight, self.bias, running_mean, running_var, use_batch_stats, momentum, self.eps,
                self.activation, self.activation_param)
        if not self.training:  # running statistics, or (untracked) this rank's batch: nothing to share
            function = functions.inplace_abn if self.in_place else functions.recompute_abn
            return function(*args, shortcut=shortcut, batchnorm_weight=self.batchnorm_weight)
        return functions.inplace_abn_sync(*args, self.group, shortcut=shortcut, in_place=self.in_place,
                                          batchnorm_weight=self.batchnorm_weight)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.in_place else ", in_place=False")

    @classmethod
    def convert_sync_abn(cls, module: nn.Module, group=None) -> nn.Module:
        """Return ``module`` with every :class:`ABN` and :class:`InPlaceABN` layer replaced by an
        :class:`InPlaceABNSync` over ``group``, as ``nn.SyncBatchNorm.convert_sync_batchnorm`` does.

        The new layers share the old ones' parameters and buffers (an optimizer built before the
        conversion still holds the right tensors) and keep their hyper-parameters, activation and
        train/eval mode, ``batchnorm_weight`` included. An ``ABN`` or ``RecomputeABN`` becomes
        ``InPlaceABNSync(in_place=False)``, since code written for them may still use their input. Layers
        that already are ``InPlaceABNSync`` are kept as they are (change their group with
        :func:`~inplace_abn.set_active_group`). Plain ``nn.BatchNorm`` layers are not touched:
        ``nn.SyncBatchNorm.convert_sync_batchnorm`` handles those.
        """
        if isinstance(module, ABN) and not isinstance(module, InPlaceABNSync):
            converted = cls(
                module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                module.activation, module.activation_param, group, in_place=isinstance(module, InPlaceABN),
                batchnorm_weight=module.batchnorm_weight, device="meta",
            )
            for name, _ in converted.named_parameters(recurse=False):
                setattr(converted, name, getattr(module, name))
            for name, _ in converted.named_buffers(recurse=False):
                setattr(converted, name, getattr(module, name))
            converted.train(module.training)
            return converted
        for name, child in module.named_children():
            converted_child = cls.convert_sync_abn(child, group)
            if converted_child is not child:
                module.add_module(name, converted_child)
        return module
