"""Learning-rate schedules as pure functions of the step, so a resumed run needs no scheduler state."""

from __future__ import annotations

import math


# One-cycle (Smith 2018, as torch.optim.lr_scheduler.OneCycleLR with its defaults): a cosine rise from
# base/25 over the first 30% of the steps, then a cosine fall to base/(25 * 1e4).
ONECYCLE_RISE = 0.3
ONECYCLE_START_DIV = 25.0
ONECYCLE_END_DIV = 25.0 * 1e4


def learning_rate(step: int, total_steps: int, warmup_steps: int, base_lr: float, schedule: str) -> float:
    """Linear warm-up from 0 over `warmup_steps`, then cosine decay to 0 or a constant rate; or the
    one-cycle schedule over all `total_steps` (it has its own rise, so `warmup_steps` is ignored)."""
    if schedule == "onecycle":
        return onecycle(step, total_steps, base_lr)
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def onecycle(step: int, total_steps: int, base_lr: float) -> float:
    rise = max(1, int(ONECYCLE_RISE * total_steps))
    start, end = base_lr / ONECYCLE_START_DIV, base_lr / ONECYCLE_END_DIV
    if step < rise:
        progress, low, high = step / rise, start, base_lr
    else:
        progress, low, high = min(1.0, (step - rise) / max(1, total_steps - rise)), base_lr, end
    return high + (low - high) * 0.5 * (1.0 + math.cos(math.pi * progress))
