"""Learning-rate schedules as pure functions of the step, so a resumed run needs no scheduler state."""

from __future__ import annotations

import math


def learning_rate(step: int, total_steps: int, warmup_steps: int, base_lr: float, schedule: str) -> float:
    """Linear warm-up from 0 over `warmup_steps`, then cosine decay to 0 or a constant rate."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
