"""The learning-rate factor of a step: an optional linear warmup times the main schedule (poly decay,
steps at given epochs, or constant)."""

from __future__ import annotations

from typing import Callable, Sequence


def poly_factor(step: int, total: int, power: float) -> float:
    return max(0.0, 1.0 - step / total) ** power


def step_factor(step: int, milestone_steps: Sequence[int], gamma: float) -> float:
    return gamma ** sum(step >= milestone for milestone in milestone_steps)


def warmup_factor(step: int, warmup_steps: int, start_factor: float) -> float:
    """From ``start_factor`` at step 0 linearly to 1 at ``warmup_steps`` (1 from then on)."""
    if step >= warmup_steps:
        return 1.0
    return start_factor + (1.0 - start_factor) * step / warmup_steps


def lr_factor_function(config, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """``factor(step)`` for ``torch.optim.lr_scheduler.LambdaLR``: the lr of step ``step`` (counted from
    0) is ``config.lr * factor(step)``. Milestones in epochs become steps with ``steps_per_epoch``."""
    milestone_steps = [round(epoch * steps_per_epoch) for epoch in config.lr_milestones]

    def factor(step: int) -> float:
        if config.lr_schedule == "poly":
            main = poly_factor(step, total_steps, config.poly_power)
        elif config.lr_schedule == "step":
            main = step_factor(step, milestone_steps, config.lr_gamma)
        else:
            main = 1.0
        return main * warmup_factor(step, config.warmup_steps, config.warmup_start_factor)

    return factor
