"""Synchronization of InPlaceABNSync over ``torch.distributed``: one collective forward, one backward.

Forward: every rank contributes (count, mean, M2) of its shard in one ``all_gather`` of a
``3 x C`` float64 buffer, merged exactly with Chan's formula (METHOD.md section 4), so shards of
different sizes are right. Backward: one ``all_reduce`` of the ``2 x C`` buffer (sum dy, sum dy*xhat).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def group_to_sync(group=None):
    """The group to synchronize over, or ``None`` when there is nothing to synchronize with
    (torch.distributed unavailable or not initialized, or a group of one process)."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    if group is None:
        group = dist.group.WORLD
    if dist.get_world_size(group) <= 1:
        return None
    return group


def _buffer_device(x: torch.Tensor, group) -> torch.device:
    # NCCL only talks CUDA tensors; gloo and others take tensors where they are.
    if dist.get_backend(group) == "nccl" and x.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return x.device


def merge_stats(counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor):
    """Merge per-shard (count, mean, M2) along dim 0 exactly (Chan et al.); returns (count, mean, M2)."""
    count, mean, m2 = counts[0], means[0], m2s[0]
    for n_b, mean_b, m2_b in zip(counts[1:], means[1:], m2s[1:]):
        total = count + n_b
        delta = mean_b - mean
        ratio = torch.where(total > 0, n_b / total.clamp_min(1), torch.zeros_like(total))
        mean = mean + delta * ratio
        m2 = m2 + m2_b + delta * delta * count * ratio
        count = total
    return count, mean, m2


def global_batch_stats(local_stats, x: torch.Tensor, group):
    """All ranks' statistics merged: ``(mean, biased var, global count per channel)``."""
    mean, var = local_stats
    count = x.numel() // x.shape[1]
    channels = mean.numel()
    device = _buffer_device(x, group)
    local = torch.stack(
        [torch.full((channels,), float(count), dtype=torch.float64, device=mean.device), mean.double(), var.double() * count]
    ).to(device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    stacked = torch.stack(gathered)  # (world, 3, C)
    total, global_mean, m2 = merge_stats(stacked[:, 0], stacked[:, 1], stacked[:, 2])
    global_count = int(total[0].item())
    global_var = m2 / max(global_count, 1)
    return global_mean.to(mean.device, mean.dtype), global_var.to(var.device, var.dtype), global_count


def all_reduce_sums(sum_dy: torch.Tensor, sum_dy_xhat: torch.Tensor, group):
    """Sum the two backward reductions over the group in one collective."""
    device = _buffer_device(sum_dy, group)
    buffer = torch.cat([sum_dy, sum_dy_xhat]).to(device)
    dist.all_reduce(buffer, group=group)
    buffer = buffer.to(sum_dy.device)
    return buffer[: sum_dy.numel()], buffer[sum_dy.numel():]


def active_group(active: bool):
    """A process group of the ranks that pass ``active=True`` (every rank must call it).

    As in inplace-abn 1.1.0: lets ranks with no data for a layer opt out of its synchronization.
    """
    world_size = dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([dist.get_rank() if active else -1], dtype=torch.long, device=device)
    flags = [torch.empty_like(flag) for _ in range(world_size)]
    dist.all_gather(flags, flag)
    ranks = [int(f.item()) for f in flags if int(f.item()) >= 0]
    return dist.new_group(ranks)


def set_active_group(module: torch.nn.Module, group) -> None:
    """Set ``group`` on every InPlaceABNSync layer inside ``module``."""
    from .modules import InPlaceABNSync

    for layer in module.modules():
        if isinstance(layer, InPlaceABNSync):
            layer.group = group
