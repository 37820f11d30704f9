"""Grouped dispatch: run each sample through exactly one procedure, at the plain network's cost.

The batch is grouped by route, each procedure runs on its group as one contiguous tensor (empty
groups are skipped), and the results are written back to their rows' places. These are pure functions so they can be
checked against a per-sample loop (tests/test_dispatch.py).

Two details keep it cheap on fast kernels (bf16, channels_last, GPUs):

* grouping and ungrouping keep the memory format: a channels_last batch stays channels_last in every
  procedure (``index_select`` on the 4-d tensor would silently return a contiguous NCHW copy, and
  every convolution of the stage would then convert back and forth);
* each is one row copy forward and one backward (no concatenation, no scatter-add).

The only host synchronisation is reading the per-route counts, which slicing the batch needs.
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


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-d tensor stored that way (and not also plain contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _rows(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """A view of ``t`` (made dense in ``fmt`` first) whose dim 0 is the batch and whose rows are
    contiguous: a channels_last [B, C, H, W] tensor is a contiguous [B, H, W, C] one. Row copies
    (``index_select``, ``index_copy_``) on it are several times faster than advanced indexing."""
    if fmt == torch.channels_last:
        return t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    return t.contiguous()


def _unrows(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    return t.permute(0, 3, 1, 2) if fmt == torch.channels_last else t


class _GroupRows(torch.autograd.Function):
    """One tensor per route with that route's rows of ``x`` (``index`` lists them, route by route,
    ``counts`` how many each): one row copy forward, one backward, in ``x``'s memory format."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, counts: list[int], fmt: torch.memory_format):
        ctx.save_for_backward(index)
        ctx.counts, ctx.fmt, ctx.shape = counts, fmt, x.shape
        rows = _rows(x, fmt)
        return tuple(_unrows(rows.index_select(0, i), fmt) for i in index.split(counts))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        (index,) = ctx.saved_tensors
        out = torch.empty(ctx.shape, dtype=grads[0].dtype, device=grads[0].device, memory_format=ctx.fmt)
        rows = _rows(out, ctx.fmt)
        for i, g in zip(index.split(ctx.counts), grads):  # every row is written once: index is a permutation
            rows.index_copy_(0, i, _rows(g, ctx.fmt))
        return out, None, None, None


class _UngroupRows(torch.autograd.Function):
    """The inverse of :class:`_GroupRows`: per-route results written back to their rows' places."""

    @staticmethod
    def forward(ctx, index: torch.Tensor, counts: list[int], fmt: torch.memory_format, *ys: torch.Tensor):
        ctx.save_for_backward(index)
        ctx.counts, ctx.fmt = counts, fmt
        out = torch.empty((index.numel(),) + ys[0].shape[1:], dtype=ys[0].dtype, device=ys[0].device, memory_format=fmt)
        rows = _rows(out, fmt)
        for i, y in zip(index.split(counts), ys):
            rows.index_copy_(0, i, _rows(y, fmt))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        # the incoming gradient may be in another layout (a broadcast from the head's pooling, say):
        # the procedures get theirs in the stage's, so their backward kernels do not mix formats
        rows = _rows(grad, ctx.fmt)
        return (None, None, None) + tuple(_unrows(rows.index_select(0, i), ctx.fmt) for i in index.split(ctx.counts))


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
    fmt = memory_format(x)
    chunks = _GroupRows.apply(x, order, counts, fmt)
    outs = [procedures[j](chunks[j]) for j in used]
    return _UngroupRows.apply(order, [counts[j] for j in used], fmt, *outs)
