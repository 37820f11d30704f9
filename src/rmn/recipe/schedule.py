"""The paper's learning-rate schedule, as a pure function of the optimizer step.

Linear warm-up from ``start`` to ``peak`` over ``warmup_steps``, then cosine decay reaching ``end``
at the last step. One continuous schedule spans stem training and routed training alike.
"""
from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, start: float = 1e-5, end: float = 1e-5) -> float:
    if total_steps < 1:
        raise ValueError("total_steps must be >= 1")
    step = min(max(step, 0), total_steps - 1)
    warmup_steps = min(warmup_steps, total_steps - 1)
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    span = total_steps - 1 - warmup_steps
    if span <= 0:
        return peak
    progress = (step - warmup_steps) / span
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
