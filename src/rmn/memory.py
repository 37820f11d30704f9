"""Memory heads of one routed stage (paper section 3.2).

A stage holds N memory vectors ``m_j`` living in the space of the GAP'd stage input. Each sample
goes to ``argmin_j ||GAP(x) - m_j||``; after a training step, every memory that received H > 0
samples moves towards their mean feature: ``m_j <- alpha * m_j + (1 - alpha) * mean_h f_h``.

Memories are buffers (saved with the model, never touched by the optimizer). Routing in training
mode only *accumulates* per-memory sums and counts; :meth:`MemoryBank.update` applies them. That
split lets gradient accumulation update once per optimizer step over the whole effective batch,
and lets data-parallel training all-reduce the statistics first so every replica stays identical.

Beyond the paper (all off by default), for training at small batch sizes where the paper's rule
lets procedures die:

* ``rule="count_ema"``: EMAs of per-memory counts ``c`` and feature sums ``s``;
  ``m <- (s + lam * m) / (c + lam)``. A memory's move is weighed by how many samples it saw, and a
  memory without samples stays where it is (the pseudo-count ``lam`` is the Laplace smoothing).
* ``accumulate_steps=K``: statistics of K steps form one update (a "virtual batch" for memories).
* ``update(rate=r)``: the step's update is scaled by ``r`` (``alpha_eff = 1 - (1 - alpha) * r``); the recipe
  passes the LR over its peak when ``model.memory_follows_lr`` is set, so memories settle as the LR anneals
  instead of moving on (online k-means) while the procedures can no longer follow them.
* revival: a memory whose load share stays at or below ``revive_threshold`` for ``revive_after``
  consecutive steps is re-seeded by splitting the most loaded memory along the per-dimension
  spread of its samples: ``m_dead = mu + d``, ``m_donor = mu - d``, ``d = split_scale * sigma``.
  The network may also re-clone the procedure (see :func:`rmn.training.reclone_procedure`).

Every decision is taken on all-reduced statistics, so all ranks revive the same memories.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from . import distributed
from .precision import float32_only


def stage_feature(x: torch.Tensor) -> torch.Tensor:
    """What a memory is compared with: the global-average-pooled stage input [B, C], accumulated and
    returned in float32 whatever the autocast dtype of ``x``. Never differentiated."""
    if x.requires_grad:
        x = x.detach()
    if x.dtype == torch.float32:  # the same values; asking for dtype= adds a copy (~60 us at batch 1 on a CPU)
        return x.mean(dim=(2, 3))
    return torch.mean(x, dim=(2, 3), dtype=torch.float32)


@float32_only
def nearest(features: torch.Tensor, memories: torch.Tensor, sq_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the nearest memory (Euclidean) for each row of ``features`` [B, C], in float32
    whatever the autocast state (a bf16 distance would flip routes between close memories).
    ``sq_norms``: the memories' squared norms if already known (:func:`squared_norms`); the same values."""
    # every op skipped counts at batch 1, where each costs 10-40 us between convolutions (BENCHMARKS.md)
    f = features if features.dtype == torch.float32 else features.float()
    m = memories if memories.dtype == torch.float32 else memories.float()
    # ||f - m||^2 = ||f||^2 - 2 f.m + ||m||^2; ||f||^2 is constant per row and cannot change the argmin.
    sq = squared_norms(m) if sq_norms is None else sq_norms
    # one op for ``sq - 2 (f.m)``, with the same rounding (the factor 2 is exact): fewer calls at batch 1
    d = torch.sub(sq, torch.mm(f, m.t()), alpha=2.0)
    return d.argmin(dim=1)


def squared_norms(memories: torch.Tensor) -> torch.Tensor:
    """||m||^2 per memory, in float32: the part of the distance that only changes with the memories."""
    return memories.float().pow(2).sum(1)


class MemoryBank(nn.Module):
    """N memory vectors of dimension C with moving-average updates and load counters."""

    RULES = ("ema", "count_ema")

    def __init__(
        self,
        num_memories: int,
        dim: int,
        momentum: float = 0.9,
        rule: str = "ema",
        accumulate_steps: int = 1,
        smoothing: float = 1.0,
        revive_after: int = 0,
        revive_threshold: float = 0.0,
        split_scale: float = 0.5,
    ) -> None:
        super().__init__()
        if num_memories < 1:
            raise ValueError(f"num_memories must be >= 1, got {num_memories}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"memory momentum (alpha) must be in [0, 1], got {momentum}")
        if rule not in self.RULES:
            raise ValueError(f"memory update rule must be one of {', '.join(self.RULES)}, got {rule!r}")
        if accumulate_steps < 1:
            raise ValueError(f"memory accumulate_steps must be >= 1, got {accumulate_steps}")
        if smoothing <= 0:
            raise ValueError(f"memory smoothing must be > 0, got {smoothing}")
        if revive_after < 0 or not 0.0 <= revive_threshold < 1.0:
            raise ValueError("revive_after must be >= 0 and revive_threshold in [0, 1)")
        self.num_memories = num_memories
        self.dim = dim
        self.momentum = momentum
        self.rule = rule
        self.accumulate_steps = accumulate_steps
        self.smoothing = smoothing
        self.revive_after = revive_after
        self.revive_threshold = revive_threshold
        self.split_scale = split_scale
        f64 = torch.float64
        self.register_buffer("memories", torch.zeros(num_memories, dim))
        # Samples routed to each memory since the last reset_load() (training mode only).
        self.register_buffer("load", torch.zeros(num_memories, dtype=torch.long))
        # Statistics of the current step; not saved: checkpoints are taken between steps.
        self.register_buffer("pending_sum", torch.zeros(num_memories, dim, dtype=f64), persistent=False)
        self.register_buffer("pending_count", torch.zeros(num_memories, dtype=f64), persistent=False)
        if revive_after:
            self.register_buffer("pending_sqsum", torch.zeros(num_memories, dim, dtype=f64), persistent=False)
            self.register_buffer("idle_steps", torch.zeros(num_memories, dtype=torch.long))
        if accumulate_steps > 1:  # statistics of the steps since the last update (saved: resumable mid-way)
            self.register_buffer("acc_sum", torch.zeros(num_memories, dim, dtype=f64))
            self.register_buffer("acc_count", torch.zeros(num_memories, dtype=f64))
            self.register_buffer("acc_steps", torch.zeros((), dtype=torch.long))
        if rule == "count_ema":
            self.register_buffer("ema_sum", torch.zeros(num_memories, dim, dtype=f64))
            self.register_buffer("ema_count", torch.zeros(num_memories, dtype=f64))
        # Samples each memory received in the last step (over all ranks); None before the first.
        self.last_counts: torch.Tensor | None = None
        self._sq: torch.Tensor | None = None  # squared_norms() and (the memories, their version) it is of
        self._sq_of: tuple[torch.Tensor, int] | None = None

    def extra_repr(self) -> str:
        extra = "" if self.rule == "ema" else f", rule={self.rule}"
        extra += "" if self.accumulate_steps == 1 else f", accumulate_steps={self.accumulate_steps}"
        extra += "" if not self.revive_after else f", revive_after={self.revive_after}"
        return f"num_memories={self.num_memories}, dim={self.dim}, momentum={self.momentum}{extra}"

    def route(self, features: torch.Tensor) -> torch.Tensor:
        """Route GAP'd features [B, C]; in a training forward with gradients on also record them for the
        next update (a no-grad pass in training mode, e.g. a feature pass, leaves the memories alone)."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"memory of dim {self.dim} got features of shape {tuple(features.shape)}")
        if not torch.is_grad_enabled():  # evaluation, a feature pass: nothing to record
            return nearest(features, self.memories, self.squared_norms())
        with torch.no_grad():
            routes = nearest(features, self.memories, self.squared_norms())
            if self.training:
                self.accumulate(features, routes)
        return routes

    def squared_norms(self) -> torch.Tensor:
        """:func:`squared_norms` of the memories, kept between calls while the memories stay the same
        tensor at the same version (every in-place change, an update or a load, bumps it): at batch 1 the
        two ops it saves are a measurable part of routing (BENCHMARKS.md)."""
        m = self.memories
        try:
            version = m._version
        except RuntimeError:  # an inference tensor (made under torch.inference_mode) has no version counter
            return squared_norms(m)
        # the cache holds the memories tensor itself, so its identity cannot pass to a new tensor
        if self._sq_of is None or self._sq_of[0] is not m or self._sq_of[1] != version:
            self._sq, self._sq_of = squared_norms(m), (m, version)
        return self._sq

    @torch.no_grad()
    def accumulate(self, features: torch.Tensor, routes: torch.Tensor) -> None:
        """Add per-memory feature sums and counts of one (micro-)batch to the pending statistics."""
        f = features.detach().to(self.pending_sum.dtype)
        self.pending_sum.index_add_(0, routes, f)
        if self.revive_after:
            self.pending_sqsum.index_add_(0, routes, f * f)
        counts = torch.bincount(routes, minlength=self.num_memories)
        self.pending_count += counts.to(self.pending_count.dtype)
        self.load += counts

    @torch.no_grad()
    def update(self, rate: float = 1.0) -> list[tuple[int, int]]:
        """End of an optimizer step: all-reduce this step's statistics, apply the update rule (every
        ``accumulate_steps`` steps) with momentum ``1 - (1 - alpha) * rate`` (1: the rule as it is; 0: this step's
        statistics are ignored), revive starving memories. Returns the revivals as ``(revived, donor)`` pairs."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"memory update rate must be in [0, 1], got {rate}")
        stats = [self.pending_sum, self.pending_count] + ([self.pending_sqsum] if self.revive_after else [])
        distributed.all_reduce_sum(*stats)
        self.last_counts = self.pending_count.clone()
        if self.accumulate_steps > 1:
            self.acc_sum += self.pending_sum
            self.acc_count += self.pending_count
            self.acc_steps += 1
            if int(self.acc_steps) >= self.accumulate_steps:
                self._apply_rule(self.acc_sum, self.acc_count, rate)
                self.acc_sum.zero_()
                self.acc_count.zero_()
                self.acc_steps.zero_()
        else:
            self._apply_rule(self.pending_sum, self.pending_count, rate)
        revived = self._revive() if self.revive_after else []
        for t in stats:
            t.zero_()
        return revived

    def _apply_rule(self, sums: torch.Tensor, counts: torch.Tensor, rate: float = 1.0) -> None:
        a = self.momentum if rate == 1.0 else 1.0 - (1.0 - self.momentum) * rate
        if self.rule == "count_ema":
            self.ema_count.mul_(a).add_((1 - a) * counts)
            self.ema_sum.mul_(a).add_((1 - a) * sums)
            lam = self.smoothing
            new = (self.ema_sum + lam * self.memories.double()) / (self.ema_count + lam).unsqueeze(1)
            self.memories.copy_(new.to(self.memories.dtype))
            return
        # memories that received no sample keep their value; no host synchronisation on which did
        hit = (counts > 0).unsqueeze(1)
        mean = sums / counts.clamp_min(1).unsqueeze(1)
        old = self.memories.to(torch.float64)
        self.memories.copy_(torch.where(hit, a * old + (1.0 - a) * mean, old))

    def _revive(self) -> list[tuple[int, int]]:
        counts = self.last_counts.clone()
        total = float(counts.sum())
        if total <= 0:
            return []
        starving = counts / total <= self.revive_threshold
        self.idle_steps[starving] += 1
        self.idle_steps[~starving] = 0
        events = []
        for j in (self.idle_steps >= self.revive_after).nonzero().flatten().tolist():
            donor = int(torch.argmax(counts))
            if donor == j or counts[donor] < 2:
                continue
            n = counts[donor]
            mu = self.pending_sum[donor] / n
            sigma = (self.pending_sqsum[donor] / n - mu * mu).clamp_min(0).sqrt()
            d = self.split_scale * sigma
            self.memories[j] = (mu + d).to(self.memories.dtype)
            self.memories[donor] = (mu - d).to(self.memories.dtype)
            if self.rule == "count_ema":  # both halves start with half of the donor's history
                self.ema_count[j] = self.ema_count[donor] = self.ema_count[donor] / 2
                self.ema_sum[j] = self.memories[j].double() * self.ema_count[j]
                self.ema_sum[donor] = self.memories[donor].double() * self.ema_count[donor]
            self.idle_steps[j] = 0
            self.idle_steps[donor] = 0
            counts[donor] = 0  # one split per donor per step
            events.append((j, donor))
        return events

    @torch.no_grad()
    def set_memories(self, memories: torch.Tensor) -> None:
        """Replace all memories (k-means initialisation), e.g. with centres of shape [N, C]."""
        if tuple(memories.shape) != (self.num_memories, self.dim):
            raise ValueError(
                f"expected memories of shape ({self.num_memories}, {self.dim}), got {tuple(memories.shape)}"
            )
        self.memories.copy_(memories.to(self.memories))
        if self.rule == "count_ema":
            self.ema_sum.zero_()
            self.ema_count.zero_()

    @torch.no_grad()
    def reset_load(self) -> None:
        self.load.zero_()


def load_stats(load: torch.Tensor) -> dict[str, Any]:
    """Statistics of one stage's load vector ``[N]`` (samples per memory, e.g. ``MemoryBank.load``), as the
    training log reports them: ``share`` (``n_j / T``), ``entropy`` (``H(share) / log N``: 1 = balanced),
    ``dead`` (memories without a sample), ``max_over_mean``, ``max_over_min`` (None when one is empty);
    an empty load (``T = 0``) gives zero shares and entropy, all memories dead."""
    load = torch.as_tensor(load).detach().cpu().to(torch.float64).flatten()
    n = load.numel()
    if n == 0:
        raise ValueError("load vector is empty")
    if bool((load < 0).any()):
        raise ValueError("load counts must be >= 0")
    total = float(load.sum())
    dead = int((load == 0).sum())
    if total == 0:
        return {
            "num_memories": n,
            "total": 0,
            "load": [0] * n,
            "share": [0.0] * n,
            "entropy": 0.0,
            "dead": n,
            "max_over_mean": 0.0,
            "max_over_min": None,
        }
    share = load / total
    nz = share[share > 0]
    h = float(-(nz * nz.log()).sum())
    entropy = 1.0 if n == 1 else min(1.0, max(0.0, h / math.log(n)))
    mx = float(load.max())
    mn = float(load.min())
    return {
        "num_memories": n,
        "total": int(round(total)),
        "load": [int(round(v)) for v in load.tolist()],
        "share": share.tolist(),
        "entropy": entropy,
        "dead": dead,
        "max_over_mean": mx / (total / n),
        "max_over_min": (mx / mn) if mn > 0 else None,
    }
