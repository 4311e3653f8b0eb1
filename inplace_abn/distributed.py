"""Synchronization of InPlaceABNSync over ``torch.distributed``: one collective forward, one backward.

Forward: every rank contributes ``(count, mean, M2)`` of its shard in one ``all_gather`` of a
``2C + 1`` float64 buffer; the shards are merged exactly (Chan et al., METHOD.md section 4), so shards
of different sizes are right. Backward: one ``all_reduce`` of the ``2C`` buffer (sum dy, sum dy*xhat).
Nothing is read back to the host: the global count stays a device tensor, so CUDA streams keep running.
See ``docs/distributed.md`` for what each layer sends.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

Tensor = torch.Tensor


def group_to_sync(group=None):
    """The group to synchronize over, or ``None`` when there is nothing to synchronize with:
    torch.distributed unavailable or not initialized, a group of one process, or a group this rank
    is not a member of (``dist.new_group`` hands non-members a placeholder; they run unsynchronized
    and take part in no collective)."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    if group is None:
        group = dist.group.WORLD
    if dist.get_world_size(group) <= 1:  # -1 for a non-member
        return None
    return group


def _all_gather_single(output: Tensor, tensor: Tensor, group=None) -> None:
    # torch 2.13 renamed all_gather_into_tensor (the old name warns); older versions have only that.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)


def _collective_device(tensor: Tensor, group) -> torch.device:
    """Where a buffer must live for ``group``'s backend: NCCL talks CUDA tensors only; gloo (and a
    mixed ``cpu:gloo,cuda:nccl`` group) takes tensors where they are."""
    if dist.get_backend(group) == "nccl" and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def merge_stats(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge per-shard ``(count, mean, M2)`` stacked along dim 0 into ``(count, mean, M2)``.

    The k-shard closed form of Chan's pairwise update: ``mean = sum(n_r mean_r) / n`` and
    ``M2 = sum(M2_r + n_r (mean_r - mean)^2)``. Deviations are taken from the merged mean, never raw
    second moments, so it is as stable as the pairwise recursion and needs no loop over ranks.
    ``counts`` broadcasts against ``means`` (shape ``(shards, 1)`` for ``(shards, C)`` means). Empty
    shards (count 0, mean NaN) contribute nothing.
    """
    present = counts > 0
    means = torch.where(present, means, torch.zeros_like(means))
    m2s = torch.where(present, m2s, torch.zeros_like(m2s))
    count = counts.sum(0)
    mean = (counts * means).sum(0) / count.clamp_min(1)
    m2 = (m2s + counts * (means - mean).square()).sum(0)
    return count, mean, m2


def global_batch_stats(mean: Tensor, var: Tensor, count: int, group) -> tuple[Tensor, Tensor, Tensor]:
    """All ranks' shard statistics merged, from this rank's ``mean``, biased ``var`` and element
    ``count`` per channel. Returns ``(mean, biased var, count)``: the first two in the dtype and on
    the device of ``mean``, the global count a 0-dim float64 tensor on the same device.

    One collective: an ``all_gather`` of ``[count, mean(C), M2(C)]`` in float64 from every rank.
    """
    channels = mean.numel()
    mean64, var64 = mean.detach().to(torch.float64), var.detach().to(torch.float64)
    local = torch.cat([mean64.new_full((1,), float(count)), mean64, var64 * count])
    local = local.to(_collective_device(local, group))
    world_size = dist.get_world_size(group)
    gathered = local.new_empty(world_size * local.numel())  # flat: the layout torch.compile traces
    _all_gather_single(gathered, local, group=group)
    gathered = gathered.view(world_size, -1).to(mean.device)
    total, global_mean, m2 = merge_stats(gathered[:, :1], gathered[:, 1 : channels + 1], gathered[:, channels + 1 :])
    global_var = m2 / total.clamp_min(1)
    return global_mean.to(mean.dtype), global_var.to(var.dtype), total.reshape(())


def all_reduce_sums(sum_dy: Tensor, sum_dy_xhat: Tensor, group) -> tuple[Tensor, Tensor]:
    """Sum the two per-channel backward reductions over ``group`` in one ``all_reduce``."""
    channels = sum_dy.numel()
    buffer = torch.cat([sum_dy, sum_dy_xhat])
    buffer = buffer.to(_collective_device(buffer, group))
    dist.all_reduce(buffer, group=group)
    buffer = buffer.to(sum_dy.device)
    return buffer[:channels], buffer[channels:]


def active_group(active: bool):
    """A process group of the ranks that pass ``active=True``; every rank of the default group must
    call it, in the same order relative to other collectives.

    As in inplace-abn 1.x: ranks that have no data for some layers (a branch used by some samples
    only) leave those layers' synchronization. Ranks that pass ``active=False`` get a placeholder
    group, with which an :class:`~inplace_abn.InPlaceABNSync` layer runs unsynchronized. Creating a
    group is itself collective and not free: create the few groups you need once, not per step.
    """
    if not dist.is_available() or not dist.is_initialized():
        return None
    flag = torch.tensor([dist.get_rank() if active else -1], dtype=torch.long)
    flag = flag.to(_collective_device(flag, None))
    flags = flag.new_empty(dist.get_world_size())
    _all_gather_single(flags, flag)
    ranks = [rank for rank in flags.tolist() if rank >= 0]
    if not ranks:  # new_group([]) would mean "every rank": nobody is active, so nobody syncs
        return dist.GroupMember.NON_GROUP_MEMBER
    return dist.new_group(ranks)


def set_active_group(module: torch.nn.Module, group) -> None:
    """Set ``group`` on every layer inside ``module`` that has ``set_group``: every
    :class:`~inplace_abn.InPlaceABNSync` (as in inplace-abn 1.x, any layer may take part)."""
    for layer in module.modules():
        set_group = getattr(layer, "set_group", None)
        if callable(set_group):
            set_group(group)
