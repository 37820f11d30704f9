"""Set the memories of a routed network from a batch, for benchmarks and demos with random weights
(recipe step 3 on a trained network is :func:`rmn.init_memories`).

* :func:`calibrate_memories` -- k-means (the paper's step 3, on a calibration batch) or Forgy random
  init (N distinct samples' features), stage after stage in one pass, so routes vary.
* :func:`memories_for_shares` -- memories that split a given batch over the procedures in chosen
  proportions (e.g. uniform, or 70% to one memory), for dispatch benchmarks.

Both work stage by stage in a single forward pass: stage ``i``'s memories are set from its input
features just before stage ``i`` runs, so stage ``i + 1`` sees the features of the routes taken.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from ..kmeans import kmeans
from ..features import walk_stages
from ..route import last_routes, routed_stages


@contextlib.contextmanager
def preserved_buffers(net: nn.Module, keep: Sequence[str] = ("memories",)):
    """Restore every buffer (BatchNorm statistics, memory loads and pending sums...) on exit,
    except those whose name ends with one of ``keep``."""
    saved = {name: b.detach().clone() for name, b in net.named_buffers() if not name.endswith(tuple(keep))}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in net.named_buffers():
                if name in saved:
                    b.copy_(saved[name])


def _stagewise(net: nn.Module, x: torch.Tensor, choose, train: bool) -> None:
    """Run ``net`` stage by stage on ``x`` (the routed path of :func:`rmn.features.walk_stages`);
    before each routed stage call ``choose(i, feats, bank)`` and make its result the memories."""
    was_training = net.training
    net.train(train)
    try:
        with torch.no_grad(), preserved_buffers(net):
            def visit(item):
                bank = getattr(item.stage, "memory", None)
                if bank is not None:
                    bank.set_memories(choose(item.index, item.feature, bank))

            walk_stages(net, x, "routed", visit=visit)
    finally:
        net.train(was_training)


def calibrate_memories(net: nn.Module, x: torch.Tensor, method: str = "kmeans", seed: int = 0, train: bool = False) -> None:
    """Memories from the stage features of the calibration batch ``x``.

    ``method="kmeans"``: k-means centres (k = N); ``"random"``: N distinct random samples' features.
    ``train``: compute the features in training mode (BatchNorm batch statistics); buffers other than
    the memories are restored afterwards either way.
    """
    if method not in ("kmeans", "random"):
        raise ValueError(f"method must be 'kmeans' or 'random', got {method!r}")
    gen = torch.Generator().manual_seed(seed)

    def choose(i, f, bank):
        n = bank.num_memories
        if f.shape[0] < n:
            raise ValueError(f"calibration batch of {f.shape[0]} samples is smaller than N = {n}")
        if method == "random":
            return f[torch.randperm(f.shape[0], generator=gen)[:n].to(f.device)]
        return kmeans(f, n, seed=seed + i, max_iter=50, distributed=False).centers

    _stagewise(net, x, choose, train)


def _counts_from_shares(shares: Sequence[float], total: int) -> list[int]:
    s = torch.tensor([float(v) for v in shares], dtype=torch.float64)
    if bool((s < 0).any()) or float(s.sum()) <= 0:
        raise ValueError(f"shares must be >= 0 with a positive sum, got {list(shares)}")
    s = s / s.sum() * total
    counts = s.floor().long()
    rest = total - int(counts.sum())
    if rest:
        counts[torch.argsort(s - counts, descending=True)[:rest]] += 1  # largest remainders
    return counts.tolist()


def _line_memories(f: torch.Tensor, counts: list[int], attempts: int = 64, seed: int = 0) -> torch.Tensor:
    """Memories on a line through the features' mean along their first principal direction, placed so
    that nearest-memory routing cuts the sorted projections into segments of the requested sizes.

    Nearest-on-a-line routing depends only on the projection ``p``: memory ``j`` at ``t_j`` wins on
    ``((t_{j-1} + t_j) / 2, (t_j + t_{j+1}) / 2)``. We need increasing ``t`` whose midpoints fall in
    the gaps between consecutive segments; they follow from the first one by reflection, so we scan.
    Memories with a zero count are put far off the line (never nearest).
    """
    f = f.detach().double()
    n = len(counts)
    mu = f.mean(0)
    z = f - mu
    # first principal direction (largest spread of p: fewest near-ties)
    _, _, v = torch.linalg.svd(z, full_matrices=False)
    u = v[0]
    p = z @ u
    ps, _ = torch.sort(p)
    live = [j for j in range(n) if counts[j] > 0]
    # biggest segment first (outermost: no constraint on its length), then the rest in index order
    big = max(live, key=lambda j: counts[j])
    order = [big] + [j for j in live if j != big]
    cum = torch.tensor([0] + [counts[j] for j in order]).cumsum(0).tolist()
    far = 10.0 * (float(z.norm(dim=1).max()) + 1.0)
    mems = torch.zeros(n, f.shape[1], dtype=torch.float64)
    # a direction orthogonal to u for the unused memories
    w = v[1] if v.shape[0] > 1 else -u
    for j in range(n):
        if counts[j] == 0:
            mems[j] = mu + far * w + far * u * (j + 1)
    if len(order) == 1:
        mems[order[0]] = mu
        return mems.float()
    lo = torch.stack([ps[k - 1] for k in cum[1:-1]])  # gap k: (lo_k, hi_k)
    hi = torch.stack([ps[k] for k in cum[1:-1]])
    gen = torch.Generator().manual_seed(seed)
    best, best_margin = None, None
    for attempt in range(attempts):
        frac = torch.full_like(lo, 0.5) if attempt == 0 else 0.05 + 0.9 * torch.rand(lo.numel(), generator=gen, dtype=torch.float64)
        b = lo + frac * (hi - lo)  # boundaries inside the gaps
        seg = b[1:] - b[:-1]  # interior segment lengths
        span = seg[0] if seg.numel() else (ps[-1] - ps[0] + 1.0)
        e1 = torch.linspace(0, 1, 4001, dtype=torch.float64)[1:-1] * span
        # t_0 = b_0 - e1, t_k = 2 b_{k-1} - t_{k-1}
        t = [b[0] - e1]
        for k in range(b.numel()):
            t.append(2 * b[k] - t[-1])
        t = torch.stack(t)  # [len(order), grid]
        # score gap of the two memories around boundary k at the nearest sample: (t_{k+1} - t_k) * half gap;
        # maximise the smallest one (robust to float32 round-off in the model's distance computation)
        half = torch.minimum(b - lo, hi - b).unsqueeze(1)
        margin = ((t[1:] - t[:-1]) * half).min(0).values
        i = int(margin.argmax())
        if best_margin is None or float(margin[i]) > best_margin:
            best, best_margin = t[:, i], float(margin[i])
    for k, j in enumerate(order):
        mems[j] = mu + best[k] * u
    return mems.float()


def memories_for_shares(net: nn.Module, x: torch.Tensor, shares: Sequence[float], train: bool = False) -> list[list[int]]:
    """Set every routed stage's memories so that the batch ``x`` splits over its procedures in the
    proportions ``shares`` (length N; e.g. ``[1/8] * 8`` or ``[0.7] + [0.3 / 7] * 7``).

    Returns the resulting per-stage route counts (measured by routing ``x`` through the network in
    the same mode afterwards; they match the requested counts up to float ties).
    """
    def choose(i, f, bank):
        if len(shares) != bank.num_memories:
            raise ValueError(f"stage {i} has {bank.num_memories} memories but {len(shares)} shares were given")
        counts = _counts_from_shares(shares, f.shape[0])
        return _line_memories(f.cpu(), counts, seed=i).to(f.device)

    _stagewise(net, x, choose, train)
    return measure_route_counts(net, x, train)


def measure_route_counts(net: nn.Module, x: torch.Tensor, train: bool = False) -> list[list[int]]:
    """Per-stage route counts of the batch ``x`` (buffers restored afterwards); [] for unrouted stages."""
    was_training = net.training
    net.train(train)
    try:
        with torch.no_grad(), preserved_buffers(net):
            auto = getattr(net, "auto_update", None)
            if auto is not None:
                net.auto_update = False
            try:
                net(x)
            finally:
                if auto is not None:
                    net.auto_update = auto
    finally:
        net.train(was_training)
    out = []
    for stage, r in zip(routed_stages(net), last_routes(net)):
        bank = getattr(stage, "memory", None)
        out.append([] if bank is None else torch.bincount(r.cpu(), minlength=bank.num_memories).tolist())
    return out
