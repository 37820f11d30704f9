"""The paper's learning-rate schedule, as a pure function of the optimizer step.

Linear warm-up from ``start`` to ``peak`` over ``warmup_steps``, then cosine decay reaching ``end``
at the last step. One continuous schedule spans stem training and routed training alike.

Beyond the paper (``optim.rewarm_epochs``, upcycling practice): at the clone step (the first step of
routed training) the schedule restarts: a linear warm-up from the LR it has reached to ``peak`` over
``rewarm_steps``, then the same cosine from ``peak`` to ``end`` over the remaining steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


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


def rewarmed_lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, start: float, end: float,
                   restart_step: int, rewarm_steps: int) -> float:
    """:func:`lr_at` up to ``restart_step``; from there a new schedule over the remaining steps that starts
    at the LR ``lr_at`` gives at ``restart_step`` (so the two curves meet there), rises linearly to ``peak``
    in ``rewarm_steps`` (0: straight back to the peak) and follows the cosine to ``end`` at the last step."""
    if step < restart_step or restart_step >= total_steps:
        return lr_at(step, total_steps, warmup_steps, peak, start, end)
    current = lr_at(restart_step, total_steps, warmup_steps, peak, start, end)
    return lr_at(step - restart_step, total_steps - restart_step, rewarm_steps, peak, current, end)


def untied_at(step: int, clone_step: int, untie_steps: int, final: float = 1.0) -> float:
    """How far routed step ``step`` has untied its procedures (``optim.untie_epochs``, ``optim.untie_to``): rising
    linearly from ``final / untie_steps`` at the clone step to ``final`` after ``untie_steps`` steps, then staying
    there; ``final`` from the clone step on when ``untie_steps`` is 0 (1, untied, is the paper)."""
    if untie_steps <= 0:
        return final
    return final * min(1.0, max(0.0, (step - clone_step + 1) / untie_steps))


@dataclass(frozen=True)
class Schedule:
    """A run's schedule in optimizer steps, from its config and the steps of one epoch."""
    total_steps: int
    warmup_steps: int
    peak: float
    start: float
    end: float
    restart_step: int | None = None  # the clone step, when optim.rewarm_epochs > 0
    rewarm_steps: int = 0

    @classmethod
    def of(cls, cfg, steps_per_epoch: int, schedule=None) -> "Schedule":
        """``cfg``'s schedule (a :class:`rmn.recipe.config.Config`), with ``schedule``'s epochs and stem epochs
        when given (a resumed run's old :class:`~rmn.recipe.config.ScheduleConfig`)."""
        o, s = cfg.optim, schedule or cfg.schedule
        restart = s.stem_epochs * steps_per_epoch if o.rewarm_epochs > 0 else None
        return cls(s.epochs * steps_per_epoch, round(o.warmup_epochs * steps_per_epoch), o.lr, o.start_lr, o.end_lr,
                   restart, round(o.rewarm_epochs * steps_per_epoch))

    def lr(self, step: int) -> float:
        if self.restart_step is None:
            return lr_at(step, self.total_steps, self.warmup_steps, self.peak, self.start, self.end)
        return rewarmed_lr_at(step, self.total_steps, self.warmup_steps, self.peak, self.start, self.end,
                              self.restart_step, self.rewarm_steps)
