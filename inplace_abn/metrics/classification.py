"""Top-k accuracy for classification (ImageNet reports top-1 and top-5)."""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np


def topk_correct(scores, targets, ks: Sequence[int] = (1, 5)) -> Dict[int, int]:
    """How many rows of ``scores`` ``(N, C)`` have their target among the ``k`` highest, per ``k``.

    Takes torch tensors (computed on their device) or numpy arrays. ``k`` larger than ``C`` counts
    every row as correct.
    """
    if hasattr(scores, "detach"):
        import torch

        targets = torch.as_tensor(targets, device=scores.device).reshape(-1, 1)
        if scores.ndim != 2 or scores.shape[0] != targets.shape[0]:
            raise ValueError(f"scores must be (N, C), N = len(targets); got {tuple(scores.shape)}, {targets.shape[0]}")
        top = scores.detach().topk(min(max(ks), scores.shape[1]), dim=1).indices
        hits = top == targets
        return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks}
    scores, targets = np.asarray(scores), np.asarray(targets).reshape(-1, 1)
    if scores.ndim != 2 or scores.shape[0] != targets.shape[0]:
        raise ValueError(f"scores must be (N, C) with N = len(targets), got {scores.shape} and {targets.shape[0]}")
    # rank of the target = how many classes score strictly higher (ties count in its favour)
    target_scores = np.take_along_axis(scores, targets, axis=1)
    rank = (scores > target_scores).sum(axis=1)
    return {k: int((rank < k).sum()) for k in ks}


class TopKAccuracy:
    """Accumulates top-k accuracy over batches: ``add(scores, targets)``, then ``result()``.

    For ten-crop evaluation, average the crops' scores of each image before ``add``.
    """

    def __init__(self, ks: Sequence[int] = (1, 5)):
        self.ks = tuple(ks)
        self.reset()

    def reset(self) -> None:
        self.correct = {k: 0 for k in self.ks}
        self.count = 0

    def add(self, scores, targets) -> None:
        for k, hits in topk_correct(scores, targets, self.ks).items():
            self.correct[k] += hits
        self.count += int(scores.shape[0])

    def result(self) -> Dict[str, float]:
        """``{"top1": ..., "top5": ...}`` in [0, 1]."""
        return {f"top{k}": (self.correct[k] / self.count if self.count else float("nan")) for k in self.ks}
