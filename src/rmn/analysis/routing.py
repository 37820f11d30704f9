"""Routing statistics: how the load spreads over the memories, and what each memory gathers.

Two sources of routes:

* a load vector ``[N]`` (samples per memory), e.g. ``MemoryBank.load`` -- the count of *training*
  samples routed since the last ``reset_load()`` (the recipe resets it every epoch, so a memory with
  load 0 is a procedure that received no sample in the last epoch: "dead");
* a route tensor ``[S, B]`` such as ``rmn.last_routes(model)`` (-1 marks an unrouted stage),
  together with labels ``[B]`` for the class-by-memory counts and each memory's class purity.

Definitions (N memories, load ``n_j``, total ``T = sum n_j``; :func:`rmn.memory.load_stats` computes the
first five, for the training log as well):

* ``share[j] = n_j / T`` (all zeros when ``T = 0``);
* ``entropy = H(share) / log N`` in ``[0, 1]`` (1 = perfectly balanced; 0 when ``T = 0``; 1 for N = 1);
* ``dead`` = number of memories with ``n_j = 0`` (all N when ``T = 0``);
* ``max_over_mean = max_j n_j / (T / N)`` (1 = balanced, N = everything on one memory; 0 when ``T = 0``);
* ``max_over_min = max_j n_j / min_j n_j``, None when some memory is empty;
* ``purity[j]`` = share of memory j's samples that belong to its most frequent class (NaN when the
  memory received no sample).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..memory import load_stats  # noqa: F401  (re-exported: the statistic lives with the memories)
from ..route import memory_banks


def network_load_stats(net: nn.Module) -> list[dict[str, Any] | None]:
    """:func:`load_stats` of every stage's ``MemoryBank.load`` (None for unrouted stages)."""
    out = []
    for bank in memory_banks(net):
        out.append(None if bank is None else load_stats(bank.load))
    return out


def route_counts(routes: torch.Tensor, num_memories: int) -> torch.Tensor:
    """Samples per memory ``[N]`` of one stage's routes ``[B]``."""
    routes = _check_routes(routes, num_memories)
    return torch.bincount(routes, minlength=num_memories)


def route_stats(routes: torch.Tensor, num_memories: int) -> list[dict[str, Any] | None]:
    """:func:`load_stats` per stage of a route tensor ``[S, B]`` (rows of -1 = unrouted -> None)."""
    routes = torch.as_tensor(routes).detach().cpu()
    if routes.dim() == 1:
        routes = routes.unsqueeze(0)
    if routes.dim() != 2:
        raise ValueError(f"routes must be [S, B] or [B], got shape {tuple(routes.shape)}")
    out = []
    for row in routes:
        if row.numel() > 0 and bool((row < 0).all()):
            out.append(None)
        else:
            out.append(load_stats(route_counts(row, num_memories)))
    return out


def class_memory_counts(routes: torch.Tensor, labels: torch.Tensor, num_memories: int, num_classes: int) -> torch.Tensor:
    """Class-by-memory count matrix ``[num_classes, N]``: ``counts[c, j]`` = samples of class c routed to j."""
    routes = _check_routes(routes, num_memories)
    labels = torch.as_tensor(labels).detach().cpu().long().flatten()
    if labels.shape != routes.shape:
        raise ValueError(f"routes {tuple(routes.shape)} and labels {tuple(labels.shape)} must have the same length")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes - 1}]")
    flat = labels * num_memories + routes
    return torch.bincount(flat, minlength=num_classes * num_memories).view(num_classes, num_memories)


def purity(counts: torch.Tensor) -> torch.Tensor:
    """Per-memory class purity ``[N]`` from a ``[num_classes, N]`` count matrix (NaN for empty memories)."""
    counts = torch.as_tensor(counts).detach().cpu().to(torch.float64)
    if counts.dim() != 2:
        raise ValueError(f"counts must be [num_classes, N], got shape {tuple(counts.shape)}")
    total = counts.sum(0)
    top = counts.max(0).values if counts.shape[0] else torch.zeros(counts.shape[1], dtype=torch.float64)
    out = torch.full_like(total, float("nan"))
    hit = total > 0
    out[hit] = top[hit] / total[hit]
    return out


def mean_purity(counts: torch.Tensor) -> float:
    """Load-weighted purity of all memories: ``sum_j max_c counts[c, j] / sum counts`` (NaN if empty)."""
    counts = torch.as_tensor(counts).detach().cpu().to(torch.float64)
    total = float(counts.sum())
    if total == 0:
        return float("nan")
    return float(counts.max(0).values.sum()) / total


def routing_report(
    routes: torch.Tensor, labels: torch.Tensor | None, num_memories: int, num_classes: int | None = None
) -> list[dict[str, Any] | None]:
    """Per-stage summary of a route tensor ``[S, B]``: load statistics, plus (with labels) the
    class-by-memory ``counts`` (nested lists), ``purity`` per memory and ``mean_purity``."""
    routes = torch.as_tensor(routes).detach().cpu()
    if routes.dim() == 1:
        routes = routes.unsqueeze(0)
    stats = route_stats(routes, num_memories)
    if labels is None:
        return stats
    labels = torch.as_tensor(labels).detach().cpu().long()
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.numel() else 1
    for i, st in enumerate(stats):
        if st is None:
            continue
        counts = class_memory_counts(routes[i], labels, num_memories, num_classes)
        st["counts"] = counts.tolist()
        st["purity"] = purity(counts).tolist()
        st["mean_purity"] = mean_purity(counts)
    return stats


def _check_routes(routes: torch.Tensor, num_memories: int) -> torch.Tensor:
    routes = torch.as_tensor(routes).detach().cpu().long().flatten()
    if num_memories < 1:
        raise ValueError(f"num_memories must be >= 1, got {num_memories}")
    if routes.numel() and (int(routes.min()) < 0 or int(routes.max()) >= num_memories):
        raise ValueError(f"routes must be in [0, {num_memories - 1}] (got {int(routes.min())}..{int(routes.max())})")
    return routes
