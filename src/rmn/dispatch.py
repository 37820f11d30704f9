"""Grouped dispatch: run each sample through exactly one procedure, at the plain network's cost.

The batch is sorted by route, each procedure runs on its contiguous slice (empty ones are
skipped), and one index operation restores the original order. These are pure functions so they
can be checked against a per-sample loop (tests/test_dispatch.py).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def group_by_route(routes: torch.Tensor, num_routes: int) -> tuple[torch.Tensor, list[int]]:
    """Stable permutation that sorts samples by route, and the number of samples per route."""
    order = torch.argsort(routes, stable=True)
    counts = torch.bincount(routes, minlength=num_routes)
    return order, counts.tolist()


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return inv


def dispatch(x: torch.Tensor, routes: torch.Tensor, procedures: Sequence[nn.Module], run_empty: bool = False) -> torch.Tensor:
    """``out[b] = procedures[routes[b]](x[b])`` for every b, computed one slice per procedure.

    ``run_empty=True`` also calls procedures that got no sample (on an empty slice): needed when a
    procedure holds collectives (synchronised BatchNorm) that every rank must enter.
    """
    n = len(procedures)
    if x.shape[0] == 0 and not run_empty:
        return procedures[0](x)
    if x.shape[0] == 1 and not run_empty:
        return procedures[int(routes[0])](x)
    order, counts = group_by_route(routes, n)
    used = [j for j, c in enumerate(counts) if c > 0 or run_empty]
    if len(used) == 1 and not run_empty:  # everybody takes the same procedure: no permutation needed
        return procedures[used[0]](x)
    chunks = x.index_select(0, order).split(counts)
    outs = [procedures[j](chunks[j]) for j in used]
    return torch.cat(outs).index_select(0, inverse_permutation(order))
