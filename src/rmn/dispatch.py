"""Grouped dispatch: run each sample through exactly one procedure, at the plain network's cost.

The batch is sorted by route, each procedure runs on its contiguous slice (empty ones are
skipped), and one gather restores the original order. These are pure functions so they can be
checked against a per-sample loop (tests/test_dispatch.py).

Two details keep it cheap on fast kernels (bf16, channels_last, GPUs):

* the row permutations keep the memory format: a channels_last batch stays channels_last in every
  procedure (``index_select`` would silently return a contiguous NCHW copy, and every convolution
  of the stage would then convert back and forth);
* their gradient is a gather by the inverse permutation, not a scatter-add.

The only host synchronisation is reading the per-route counts, which slicing the batch needs.
"""
from __future__ import annotations

from typing import Callable, Sequence

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


class _PermuteRows(torch.autograd.Function):
    """``x[index]`` for a permutation ``index``; the gradient is ``grad[inverse]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.format = memory_format(x)
        return gather_rows(x, index, ctx.format)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        # the incoming gradient may be in another layout (a broadcast from the head's pooling, say):
        # hand back the input's, so the procedures' backward kernels do not mix formats
        return gather_rows(grad, inverse, ctx.format), None, None


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-d tensor stored that way (and not also plain contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def gather_rows(x: torch.Tensor, index: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """``x[index]`` in memory format ``fmt``, as a row copy (``index_select``), which is several times
    faster than advanced indexing. A channels_last [B, C, H, W] tensor is a contiguous [B, H, W, C]
    one, so it is gathered in that view."""
    if fmt == torch.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        return x.permute(0, 2, 3, 1).index_select(0, index).permute(0, 3, 1, 2)
    return x.contiguous().index_select(0, index)


def permute_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` in the order of the permutation ``index`` (``inverse`` is its inverse),
    in ``x``'s memory format, with a gather (not a scatter) as gradient."""
    return _PermuteRows.apply(x, index, inverse)


def dispatch(x: torch.Tensor, routes: torch.Tensor, procedures: Sequence[nn.Module], run_empty: bool = False,
             lockstep: Callable | None = None) -> torch.Tensor:
    """``out[b] = procedures[routes[b]](x[b])`` for every b, computed one slice per procedure.

    ``run_empty=True`` also calls procedures that got no sample (on an empty slice): needed when a
    procedure holds collectives (synchronised BatchNorm) that every rank must enter. ``lockstep``
    (a :class:`rmn.pooled_bn.Lockstep`) runs the used procedures together, ``lockstep(procedures,
    used, slices)``, instead of one after the other; it is called even when one procedure takes all.
    """
    n = len(procedures)
    if lockstep is None and not run_empty:
        if x.shape[0] == 0:
            return procedures[0](x)
        if x.shape[0] == 1:
            return procedures[routes.item()](x)
    order, counts = group_by_route(routes, n)
    used = [j for j, c in enumerate(counts) if c > 0 or run_empty]
    if not used:  # an empty batch
        used = [0]
    if len(used) == 1 and not run_empty:  # everybody takes the same procedure: no permutation needed
        return lockstep(procedures, used, [x])[0] if lockstep is not None else procedures[used[0]](x)
    inverse = inverse_permutation(order)
    chunks = permute_rows(x, order, inverse).split(counts)
    if lockstep is not None:
        outs = lockstep(procedures, used, [chunks[j] for j in used])
    else:
        outs = [procedures[j](chunks[j]) for j in used]
    return permute_rows(torch.cat(outs), inverse, order)
