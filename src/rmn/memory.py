"""Memory heads of one routed stage (paper section 3.2).

A stage holds N memory vectors ``m_j`` living in the space of the GAP'd stage input. Each sample
goes to ``argmin_j ||GAP(x) - m_j||``; after a training step, every memory that received H > 0
samples moves towards their mean feature: ``m_j <- alpha * m_j + (1 - alpha) * mean_h f_h``.

Memories are buffers (saved with the model, never touched by the optimizer). Routing in training
mode only *accumulates* per-memory sums and counts; :meth:`MemoryBank.update` applies them. That
split lets gradient accumulation update once per optimizer step over the whole effective batch,
and lets data-parallel training all-reduce the statistics first so every replica stays identical.
"""
from __future__ import annotations

import torch
from torch import nn

from . import distributed


def nearest(features: torch.Tensor, memories: torch.Tensor) -> torch.Tensor:
    """Index of the nearest memory (Euclidean) for each row of ``features`` [B, C]."""
    f = features.float()
    m = memories.float()
    # ||f - m||^2 = ||f||^2 - 2 f.m + ||m||^2; ||f||^2 is constant per row and cannot change the argmin.
    d = m.pow(2).sum(1).unsqueeze(0) - 2.0 * (f @ m.t())
    return d.argmin(dim=1)


class MemoryBank(nn.Module):
    """N memory vectors of dimension C with moving-average updates and load counters."""

    def __init__(self, num_memories: int, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        if num_memories < 1:
            raise ValueError(f"num_memories must be >= 1, got {num_memories}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"memory momentum (alpha) must be in [0, 1], got {momentum}")
        self.num_memories = num_memories
        self.dim = dim
        self.momentum = momentum
        self.register_buffer("memories", torch.zeros(num_memories, dim))
        # Samples routed to each memory since the last reset_load() (training mode only).
        self.register_buffer("load", torch.zeros(num_memories, dtype=torch.long))
        # Statistics waiting for the next update(); not saved: checkpoints are taken between steps.
        self.register_buffer("pending_sum", torch.zeros(num_memories, dim, dtype=torch.float64), persistent=False)
        self.register_buffer("pending_count", torch.zeros(num_memories, dtype=torch.float64), persistent=False)
        # Samples each memory received in the last update (over all ranks); None before the first.
        self.last_counts: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"num_memories={self.num_memories}, dim={self.dim}, momentum={self.momentum}"

    def route(self, features: torch.Tensor) -> torch.Tensor:
        """Route GAP'd features [B, C]; in training mode also record them for the next update."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"memory of dim {self.dim} got features of shape {tuple(features.shape)}")
        with torch.no_grad():
            routes = nearest(features, self.memories)
            if self.training:
                self.accumulate(features, routes)
        return routes

    @torch.no_grad()
    def accumulate(self, features: torch.Tensor, routes: torch.Tensor) -> None:
        """Add per-memory feature sums and counts of one (micro-)batch to the pending statistics."""
        f = features.detach().to(self.pending_sum.dtype)
        self.pending_sum.index_add_(0, routes, f)
        counts = torch.bincount(routes, minlength=self.num_memories)
        self.pending_count += counts.to(self.pending_count.dtype)
        self.load += counts

    @torch.no_grad()
    def update(self) -> None:
        """Apply the moving-average update from the pending statistics, then clear them.

        Under torch.distributed the sums and counts are all-reduced first, so every rank computes
        the same memories from the whole global batch.
        """
        distributed.all_reduce_sum(self.pending_sum, self.pending_count)
        self.last_counts = self.pending_count.clone()
        hit = self.pending_count > 0
        if bool(hit.any()):
            mean = self.pending_sum[hit] / self.pending_count[hit].unsqueeze(1)
            old = self.memories[hit].to(torch.float64)
            new = self.momentum * old + (1.0 - self.momentum) * mean
            self.memories[hit] = new.to(self.memories.dtype)
        self.pending_sum.zero_()
        self.pending_count.zero_()

    @torch.no_grad()
    def set_memories(self, memories: torch.Tensor) -> None:
        """Replace all memories (k-means initialisation), e.g. with centres of shape [N, C]."""
        if tuple(memories.shape) != (self.num_memories, self.dim):
            raise ValueError(
                f"expected memories of shape ({self.num_memories}, {self.dim}), got {tuple(memories.shape)}"
            )
        self.memories.copy_(memories.to(self.memories))

    @torch.no_grad()
    def reset_load(self) -> None:
        self.load.zero_()
