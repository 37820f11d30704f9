"""Batched, chunked, optionally distributed k-means (k-means++ seeding + Lloyd iterations).

Used to initialise each routed stage's ``N`` memories from the globally average-pooled stage features
of the whole training set, but it is a general-purpose routine:

* Pure torch, runs on ``x``'s device. Any floating input dtype is accepted; all distance math is in
  float32, per-cluster sums / inertia / the data mean are accumulated in float64. On CPU with several
  torch threads, row blocks are processed by as many single-threaded workers (robust on busy
  machines); blocks are always reduced in order, so results do not depend on the thread count.
* Memory is bounded by ``chunk_size``: squared distances are ``||x - c||^2 = ||x'||^2 - 2 x'.c' +
  ||c'||^2`` evaluated over blocks of at most ``chunk_size`` rows, with ``x' = x - mean(x)`` and
  ``c' = c - mean(x)``. The mean shift is folded into a per-center bias, so ``x`` is never copied as a
  whole (apart from the bounded all-gathered seeding set in distributed mode) while the cancellation
  of uncentred features such as post-ReLU activations is much reduced. Nothing of size ``n x n`` or
  ``n x k x d`` is ever formed; per-point state is ``O(n)`` (label, squared distance; ``O(n log k)``
  while seeding).
* Seeding is greedy k-means++ as in scikit-learn (``2 + int(log k)`` local trials per center, the trial
  that lowers the potential most wins). All random decisions come from a CPU ``torch.Generator`` seeded
  with ``seed``, so a given seed selects the same points on CPU and GPU (up to float round-off in the
  cumulative distances the draws are compared against).
* Lloyd iterations stop when the summed squared center movement is ``<= tol * mean(var(x, axis=0))``
  (scikit-learn's ``tol`` semantics), when an assignment step changes no label, or after ``max_iter``
  updates. Clusters that come out empty are re-seeded before the update with the points farthest from
  their own centers (taken only from clusters that keep at least one other member), so no center is
  ever NaN and, given at least ``k`` distinct points, the returned clustering has ``k`` non-empty
  clusters whenever it converged.

Distributed semantics (``torch.distributed`` initialised, world size > 1, ``distributed`` not False):
every rank passes *its own shard* (shards may have different sizes, even zero rows; the total must be
``>= k``) and every rank gets back the *same* :class:`KMeansResult`, describing the clustering of the
rank-ordered concatenation of all shards:

* Seeding: every rank all-gathers a seeding set and runs the same k-means++ on it (rank 0's centers are
  broadcast, so ranks cannot drift apart). If the total number of points is ``<= seed_sample`` the
  seeding set is *every* point, concatenated in rank order, unweighted -- exactly what the
  single-process call sees, so with the same ``seed`` (and ``chunk_size``) the distributed result equals
  single-process :func:`kmeans` on ``torch.cat(shards)`` up to float round-off in the cross-rank sums.
  Otherwise rank ``r`` contributes ``ceil(seed_sample * n_r / n_total)`` of its rows, drawn uniformly
  without replacement by a generator seeded from ``(seed, r)``, each weighted by ``n_r / m_r`` in the
  weighted k-means++ (so the seeding set is a stratified uniform sample of the union of about
  ``seed_sample`` points and the result no longer matches a single-process run exactly).
* Lloyd: per-cluster sums (float64), counts, inertia and label-change counts are all-reduced in one
  collective per iteration; every convergence decision is taken on all-reduced values, so all ranks
  iterate in lock-step.
* Empty clusters: for each empty cluster (ascending index) every rank proposes its farthest eligible
  point, the global maximum is chosen (ties -> lowest rank, then lowest local index, i.e. the first
  occurrence in the concatenation, as in the single-process run) and its owner broadcasts it.
* The final result is broadcast from rank 0, so it is bit-identical on all ranks. Gloo groups
  communicate through CPU tensors, other backends (NCCL) on ``x``'s device.
"""
from __future__ import annotations

import math
import operator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .precision import float32_only

__all__ = ["KMeansResult", "assign", "kmeans"]

_F32 = torch.float32
_F64 = torch.float64
# On CPU a block is further capped at 2^21 float32 elements (8 MiB): cache-resident between the distance
# and the sum pass, and small enough to give every worker thread several blocks.
_CPU_BLOCK_ELEMS = 1 << 21
# Relative size of float32 round-off in ||x'||^2 - 2 x.c' + ||c'||^2 below which a point is treated as
# sitting on its center (not a candidate for re-seeding an empty cluster).
_COINCIDENT = 1e-5


@dataclass
class KMeansResult:
    """Outcome of :func:`kmeans` (identical on every rank in distributed mode).

    ``centers``: ``[k, d]`` float32 on ``x``'s device. ``counts``: ``[k]`` int64, the cluster sizes of
    the final assignment to ``centers`` over all ranks' points. ``inertia``: the sum of squared
    distances of all points to their nearest center (all ranks). ``n_iter``: number of center updates
    of the best run. ``converged``: whether that run met the ``tol`` / no-label-change criterion
    before ``max_iter``.
    """

    centers: Tensor
    counts: Tensor
    inertia: float
    n_iter: int
    converged: bool


# --------------------------------------------------------------------------------------------------
# communication
# --------------------------------------------------------------------------------------------------
class _Comm:
    """Sum/gather/broadcast over the default process group; a no-op world of one when inactive."""

    def __init__(self, device: torch.device, active: bool) -> None:
        self.active = active
        if not active:
            self.rank, self.world, self.device = 0, 1, device
            return
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        backend = str(dist.get_backend()).lower()
        if backend == "gloo":
            self.device = torch.device("cpu")
        elif backend == "nccl" and device.type != "cuda":
            raise ValueError("kmeans: an NCCL process group needs x on a CUDA device (or pass distributed=False)")
        else:
            self.device = device

    def all_reduce(self, t: Tensor) -> Tensor:
        if not self.active:
            return t
        buf = t.to(self.device, copy=True).contiguous()
        dist.all_reduce(buf)
        return buf.to(t.device)

    def all_gather(self, t: Tensor) -> Tensor:
        """``[world, *t.shape]``; every rank must pass the same shape."""
        if not self.active:
            return t.unsqueeze(0)
        buf = t.to(self.device).contiguous()
        out = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(out, buf)
        return torch.stack(out).to(t.device)

    def broadcast(self, t: Tensor, src: int = 0) -> Tensor:
        if not self.active:
            return t
        buf = t.to(self.device, copy=True).contiguous()
        dist.broadcast(buf, src=src)
        return buf.to(t.device)


def _make_comm(device: torch.device, distributed: bool | None) -> _Comm:
    if distributed is None:
        active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    elif distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("kmeans: distributed=True but torch.distributed is not initialised")
        active = dist.get_world_size() > 1
    else:
        active = False
    return _Comm(device, active)


@contextmanager
def _cpu_workers(device: torch.device):
    """On CPU with ``T = torch.get_num_threads() > 1``: a pool of ``T`` single-threaded block workers.

    The per-block products are skinny (``k`` or ``d`` columns against thousands of rows) and memory
    bound; run as multi-threaded BLAS calls, every call is an OpenMP region that waits for all ``T``
    threads, which on a shared or oversubscribed machine makes an iteration several times slower than
    a single thread. Workers with one intra-op thread each pulling blocks avoid that. Torch's global
    thread setting is restored on exit (the workers' own setting dies with them).
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2:
        yield None
        return
    pool = ThreadPoolExecutor(threads, "rmn-kmeans", initializer=torch.set_num_threads, initargs=(1,))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True)
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# the data: chunked access plus O(n) per-point state
# --------------------------------------------------------------------------------------------------
class _Data:
    """One rank's rows of ``x`` together with the (global) mean shift and per-row ``||x - mu||^2``."""

    def __init__(
        self,
        x: Tensor,
        chunk_size: int,
        comm: _Comm,
        pool: ThreadPoolExecutor | None,
        mu: Tensor | None = None,
        who: str = "kmeans",
    ) -> None:
        self.x, self.comm, self.chunk_size, self.pool = x, comm, chunk_size, pool
        self.n, self.d = x.shape
        self.device = x.device
        self.chunk = chunk_size
        if self.device.type == "cpu":
            self.chunk = min(chunk_size, max(64, _CPU_BLOCK_ELEMS // max(self.d, 1)))
        if mu is None:  # pass 1: global mean (float32 chunk sums, float64 across chunks and ranks)
            acc = torch.zeros(self.d + 1, dtype=_F64, device=self.device)
            for part in self.map_blocks(lambda s, e, xb: xb.sum(0)):
                acc[: self.d] += part.to(_F64)
            acc[self.d] = self.n
            acc = comm.all_reduce(acc)
            self.n_total = int(acc[self.d].item())
            if not bool(torch.isfinite(acc[: self.d]).all()):
                raise ValueError(f"{who}: x contains NaN or infinite values")
            mu = acc[: self.d] / max(self.n_total, 1)
        else:
            self.n_total = self.n
        self.mu = mu.to(device=self.device, dtype=_F32)
        self.mu64 = self.mu.to(_F64)
        # pass 2: ||x - mu||^2 per row (also gives the mean per-feature variance for tol)
        self.xsq = torch.empty(self.n, dtype=_F32, device=self.device)

        def row_norms(s: int, e: int, xb: Tensor) -> Tensor:
            torch.sum((xb - self.mu).pow_(2), 1, out=self.xsq[s:e])
            return self.xsq[s:e].sum(dtype=_F64)

        tot = torch.zeros(1, dtype=_F64, device=self.device)
        for part in self.map_blocks(row_norms):
            tot += part
        self.var_total = float(comm.all_reduce(tot).item())
        if not math.isfinite(self.var_total):
            raise ValueError(f"{who}: x contains values too large for float32 squared distances")
        self.labels = torch.full((self.n,), -1, dtype=torch.int64, device=self.device)
        self.sqdist = torch.zeros(self.n, dtype=_F32, device=self.device)

    @property
    def mean_var(self) -> float:
        return self.var_total / max(self.n_total * self.d, 1)

    def map_blocks(self, fn) -> list:
        """``[fn(s, e, x[s:e] as float32) for each block]`` in block order.

        With a worker pool (CPU, several intra-op threads) the blocks are pulled dynamically by
        single-threaded workers, like scikit-learn's OpenMP loop: a busy core then only delays its own
        blocks instead of every parallel region. ``fn`` may only write to its own rows of shared state;
        callers reduce the returned values in block order, so results do not depend on the threading.
        """

        def run(span: tuple[int, int]):
            s, e = span
            xb = self.x[s:e]
            return fn(s, e, xb if xb.dtype == _F32 else xb.to(_F32))

        spans = [(s, min(s + self.chunk, self.n)) for s in range(0, self.n, self.chunk)]
        if self.pool is None or len(spans) < 2:
            return [run(sp) for sp in spans]
        return list(self.pool.map(run, spans))

    def rows(self, idx: Tensor) -> Tensor:
        return self.x[idx.to(self.device)].to(_F32)

    def _bias(self, centers: Tensor) -> tuple[Tensor, Tensor]:
        """``cc = c - mu`` and ``bias = ||cc||^2 + 2 mu.cc`` so that ``d = ||x'||^2 - 2 x.cc + bias``."""
        cc = centers.to(_F64) - self.mu64
        bias = (cc * cc).sum(1) + 2.0 * (cc @ self.mu64)
        return cc.to(_F32), bias.to(_F32)

    def sqdist_to(self, centers: Tensor) -> Tensor:
        """``[n, t]`` float32 squared distances to a few centers (used by the seeding)."""
        cc, bias = self._bias(centers)
        out = torch.empty(self.n, centers.shape[0], dtype=_F32, device=self.device)

        def block(s: int, e: int, xb: Tensor) -> None:
            g = torch.addmm(bias, xb, cc.T, alpha=-2.0)
            out[s:e] = g.add_(self.xsq[s:e, None]).clamp_min_(0.0)

        self.map_blocks(block)
        return out

    def estep(self, centers: Tensor, with_sums: bool = True) -> dict:
        """Assign every row to its nearest center; per-cluster float64 sums, counts, inertia (global)."""
        k = centers.shape[0]
        cc, bias = self._bias(centers)
        prev = self.labels.clone()
        arange_k = torch.arange(k, device=self.device)

        def block(s: int, e: int, xb: Tensor) -> Tensor | None:
            g = torch.addmm(bias, xb, cc.T, alpha=-2.0)
            dd, lab = self.sqdist[s:e], self.labels[s:e]
            torch.min(g, 1, out=(dd, lab))  # bitwise ties -> lowest center index
            dd.add_(self.xsq[s:e]).clamp_(min=0.0)
            if not with_sums:
                return None
            # per-cluster sums as a one-hot matmul: no atomics, deterministic everywhere
            return (lab[:, None] == arange_k).to(_F32).T @ xb

        sums = torch.zeros(k, self.d, dtype=_F64, device=self.device)
        for part in self.map_blocks(block):
            if part is not None:
                sums += part
        counts = torch.bincount(self.labels, minlength=k)
        inertia = self.sqdist.sum(dtype=_F64).reshape(1)
        changed = (self.labels != prev).sum().reshape(1)
        if self.comm.active:
            packed = torch.cat([sums.reshape(-1), counts.to(_F64), inertia, changed.to(_F64)])
            packed = self.comm.all_reduce(packed)
            kd = k * self.d
            sums = packed[:kd].view(k, self.d)
            counts = packed[kd : kd + k].round().to(torch.int64)
            inertia, changed = packed[kd + k : kd + k + 1], packed[kd + k + 1 :].round().to(torch.int64)
        return {"sums": sums, "counts": counts, "inertia": float(inertia.item()), "changed": int(changed.item())}

    def relocate_empty(self, st: dict, centers: Tensor) -> int:
        """Give every empty cluster the globally farthest point of a cluster with >= 2 members.

        ``st`` must come from ``estep(centers)``. Updates ``st['sums']``/``st['counts']`` (and the
        owner's label / distance of the moved point) in place; returns the number of clusters re-seeded.
        A point only qualifies if its distance to its center exceeds the float32 round-off of the
        distance formula (``_COINCIDENT`` relative), so with fewer distinct points than ``k`` the
        surplus clusters stay empty (and keep their centers) instead of being re-seeded forever.
        """
        counts, sums = st["counts"], st["sums"]
        empty = (counts == 0).nonzero().flatten().tolist()
        moved = 0
        neg = torch.tensor(-1.0, dtype=_F32, device=self.device)
        if self.n > 0:
            cc, _ = self._bias(centers)
            cn = cc.norm(dim=1)[self.labels]
            scale = (self.xsq.sqrt() + cn).square_().add_(cn * (2.0 * float(self.mu.norm())))
            margin = self.sqdist - _COINCIDENT * scale  # > 0: genuinely away from its center
        for j in empty:
            if self.n > 0:
                eligible = (counts > 1)[self.labels] & (margin > 0)
                cand = torch.where(eligible, self.sqdist, neg)
                i = int(torch.argmax(cand).item())  # first occurrence of the maximum
                v = float(cand[i].item())
            else:
                i, v = -1, -1.0
            vals = self.comm.all_gather(torch.tensor([v], dtype=_F64, device=self.device)).flatten()
            owner = int(torch.argmax(vals).item())  # lowest rank among ties
            if float(vals[owner].item()) <= 0.0:
                break
            payload = torch.zeros(self.d + 1, dtype=_F64, device=self.device)
            if owner == self.comm.rank:
                payload[: self.d] = self.x[i].to(_F64)
                payload[self.d] = float(self.labels[i].item())
                self.labels[i] = j
                self.sqdist[i] = 0.0
                margin[i] = -1.0
            payload = self.comm.broadcast(payload, src=owner)
            p, a = payload[: self.d], int(payload[self.d].item())
            sums[a] -= p
            counts[a] -= 1
            sums[j] = p
            counts[j] = 1
            moved += 1
        return moved


# --------------------------------------------------------------------------------------------------
# seeding and Lloyd
# --------------------------------------------------------------------------------------------------
def _kmeanspp(data: _Data, k: int, gen: torch.Generator, weights: Tensor | None) -> Tensor:
    """Greedy (weighted) k-means++ on the rows of ``data`` (purely local; deterministic given ``gen``)."""
    n, dev = data.n, data.device
    trials = 2 + int(math.log(k))
    u = float(torch.rand(1, generator=gen, dtype=_F64).item())
    # Cumulative sums and searchsorted run on the CPU: identical decisions on every device, and no
    # floating-point CUDA cumsum (which torch.use_deterministic_algorithms rejects).
    if weights is None:
        first = min(int(u * n), n - 1)
    else:
        cw = torch.cumsum(weights.cpu(), 0)
        first = min(int(torch.searchsorted(cw, torch.tensor([u * float(cw[-1])], dtype=_F64), right=True)), n - 1)
    centers = torch.empty(k, data.d, dtype=_F32, device=dev)
    centers[0] = data.rows(torch.tensor([first]))[0]
    closest = data.sqdist_to(centers[:1])[:, 0]
    wclosest = closest.to(_F64) if weights is None else closest.to(_F64) * weights
    pot = float(wclosest.sum().item())
    for c in range(1, k):
        r = torch.rand(trials, generator=gen, dtype=_F64) * pot
        ids = torch.searchsorted(torch.cumsum(wclosest.cpu(), 0), r, right=True).clamp_(max=n - 1)
        cand = data.rows(ids)
        dd = torch.minimum(data.sqdist_to(cand), closest[:, None])
        wdd = dd.to(_F64) if weights is None else dd.to(_F64) * weights[:, None]
        pots = wdd.sum(0)
        best = int(torch.argmin(pots).item())
        pot = float(pots[best].item())
        closest = dd[:, best].contiguous()
        wclosest = wdd[:, best].contiguous()
        centers[c] = cand[best]
    return centers


def _lloyd(data: _Data, centers: Tensor, max_iter: int, tol_abs: float) -> tuple[Tensor, Tensor, float, int, bool]:
    st = data.estep(centers)
    n_iter, shift, converged = 0, math.inf, False
    while True:
        counts, inertia = st["counts"].clone(), st["inertia"]
        moved = data.relocate_empty(st, centers) if bool((st["counts"] == 0).any()) else 0
        if n_iter > 0 and moved == 0 and (st["changed"] == 0 or shift <= tol_abs):
            converged = True
            break
        if n_iter >= max_iter:
            break
        cnt = st["counts"]
        nz = cnt > 0
        new = centers.clone()
        new[nz] = (st["sums"][nz] / cnt[nz].to(_F64)[:, None]).to(_F32)
        shift = float(((new.to(_F64) - centers.to(_F64)) ** 2).sum().item())
        centers = new
        st = data.estep(centers)
        n_iter += 1
    return centers, counts, inertia, n_iter, converged


def _seeding_set(data: _Data, comm: _Comm, ns: list[int], seed_sample: int, seed: int) -> tuple[_Data, Tensor | None]:
    """The rows k-means++ runs on: all local rows (single process) or the all-gathered set (see module doc)."""
    if not comm.active:
        return data, None
    n_total = sum(ns)
    sampled = n_total > seed_sample
    ms = [min(n, -(-seed_sample * n // n_total)) for n in ns] if sampled else list(ns)
    m = ms[comm.rank]
    if sampled and m < data.n:
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + 7_919 * (comm.rank + 1)) % (2**63 - 1))
        idx = torch.randperm(data.n, generator=g)[:m].sort().values
        local = data.rows(idx)
    else:
        local = data.x.to(_F32)
    buf = torch.zeros(max(ms), data.d, dtype=_F32, device=data.device)
    buf[:m] = local
    allg = comm.all_gather(buf)
    rows = torch.cat([allg[r, : ms[r]] for r in range(comm.world)])
    weights = None
    if sampled:
        weights = torch.cat([torch.full((ms[r],), ns[r] / ms[r], dtype=_F64) for r in range(comm.world)])
        weights = weights.to(data.device)
    local_comm = _Comm(data.device, False)
    return _Data(rows, data.chunk_size, local_comm, data.pool, mu=data.mu), weights


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------
def _check_int(name: str, v, lo: int, who: str = "kmeans") -> int:
    try:
        iv = operator.index(v)
    except TypeError:
        iv = None
    if isinstance(v, bool) or iv is None or iv < lo:
        raise ValueError(f"{who}: {name} must be an integer >= {lo}, got {v!r}")
    return iv


@torch.no_grad()
@float32_only
def kmeans(
    x: Tensor,
    k: int,
    *,
    max_iter: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    n_init: int = 1,
    chunk_size: int = 65536,
    distributed: bool | None = None,
    init: Tensor | None = None,
    seed_sample: int = 65536,
) -> KMeansResult:
    """Cluster the rows of ``x`` ``[n, d]`` into ``k`` clusters (see the module docstring for details).

    ``max_iter``: maximum number of Lloyd updates (0 returns the seeds). ``tol``: stop once the summed
    squared center shift is ``<= tol * mean(var(x, 0))``. ``seed``: seeds the CPU generator of every
    random decision. ``n_init``: independent seedings; the run with the lowest inertia is returned.
    ``chunk_size``: most rows per block (bounds the temporaries to ``O(chunk_size * (d + k))`` on top of
    ``O(n)`` per-point state; on CPU blocks are further capped at 8 MiB of float32 for cache reuse and
    spread over ``torch.get_num_threads()`` single-threaded workers, see ``_cpu_workers``).
    ``distributed``: ``None`` = automatic (use the process group when one with >1 rank exists), ``True``
    = require one, ``False`` = treat ``x`` as the whole data set. ``init``: optional ``[k, d]`` initial
    centers (skips seeding; requires ``n_init == 1``; in distributed mode rank 0's is used, but every
    rank must pass a valid one).
    ``seed_sample``: in distributed mode, the most points all-gathered for seeding.
    """
    k = _check_int("k", k, 1)
    max_iter = _check_int("max_iter", max_iter, 0)
    n_init = _check_int("n_init", n_init, 1)
    chunk_size = _check_int("chunk_size", chunk_size, 1)
    seed = _check_int("seed", seed, 0)
    seed_sample = _check_int("seed_sample", seed_sample, 1)
    try:
        tol = float(tol)
    except (TypeError, ValueError):
        tol = math.nan
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"kmeans: tol must be a finite number >= 0, got {tol!r}")
    if seed_sample < k:
        raise ValueError(f"kmeans: seed_sample ({seed_sample}) must be >= k ({k})")
    if not isinstance(x, Tensor):
        raise TypeError(f"kmeans: x must be a torch.Tensor, got {type(x).__name__}")
    if init is not None and n_init != 1:
        raise ValueError("kmeans: n_init must be 1 when init is given")
    comm = _make_comm(x.device, distributed)

    # Input checks are agreed on collectively so that no rank is left waiting in a collective.
    ok = x.dim() == 2 and x.is_floating_point()
    init_state = 0  # 0: none, 1: a valid [k, d] finite tensor, 2: wrong shape/type, 3: non-finite
    if init is not None:
        if not (isinstance(init, Tensor) and ok and init.shape == (k, x.shape[1])):
            init_state = 2
        else:
            init_state = 1 if bool(torch.isfinite(init).all()) else 3
    meta = torch.tensor([int(ok), x.shape[0] if ok else 0, x.shape[1] if ok else -1, init_state], dtype=torch.int64)
    metas = comm.all_gather(meta.to(x.device)).cpu()
    if not bool(metas[:, 0].all()):
        bad = int((metas[:, 0] == 0).nonzero()[0, 0])
        where = f" on rank {bad}" if comm.active else ""
        raise ValueError(
            f"kmeans: x must be a 2-D floating-point tensor [n, d]{where}, got shape {tuple(x.shape)} dtype {x.dtype}"
        )
    ds = metas[:, 2].tolist()
    if len(set(ds)) != 1:
        raise ValueError(f"kmeans: every rank must pass the same feature dimension, got {ds}")
    if ds[0] < 1:
        raise ValueError(f"kmeans: x must have at least one feature column, got shape {tuple(x.shape)}")
    ns = metas[:, 1].tolist()
    n_total = sum(ns)
    if n_total < k:
        raise ValueError(f"kmeans: need at least k={k} points, got n={n_total}")
    states = set(metas[:, 3].tolist())
    if 2 in states:
        shape = tuple(init.shape) if isinstance(init, Tensor) else type(init).__name__
        raise ValueError(f"kmeans: init must be a [k, d] = [{k}, {ds[0]}] tensor on every rank, got {shape}")
    if 3 in states:
        raise ValueError("kmeans: init contains NaN or infinite values")
    if len(states) != 1:
        raise ValueError("kmeans: init must be given on every rank or on none")

    with _cpu_workers(x.device) as pool:
        data = _Data(x, chunk_size, comm, pool)
        tol_abs = tol * data.mean_var
        gen = torch.Generator().manual_seed(seed)
        seed_data, weights = (None, None) if init is not None else _seeding_set(data, comm, ns, seed_sample, seed)

        best = None
        for _ in range(n_init):
            if init is not None:
                c0 = init.detach().to(device=x.device, dtype=_F32).clone()
            else:
                c0 = _kmeanspp(seed_data, k, gen, weights)
            c0 = comm.broadcast(c0, src=0)
            run = _lloyd(data, c0, max_iter, tol_abs)
            if best is None or run[2] < best[2]:
                best = run
    centers, counts, inertia, n_iter, converged = best
    if comm.active:  # make the result bit-identical on every rank
        scalars = torch.tensor([inertia, n_iter, float(converged)], dtype=_F64, device=x.device)
        packed = torch.cat([centers.to(_F64).reshape(-1), counts.to(_F64), scalars])
        packed = comm.broadcast(packed, src=0)
        kd = k * ds[0]
        centers = packed[:kd].view(k, ds[0]).to(_F32)
        counts = packed[kd : kd + k].round().to(torch.int64)
        inertia, n_iter, converged = float(packed[kd + k]), int(packed[kd + k + 1]), bool(packed[kd + k + 2] > 0.5)
    return KMeansResult(
        centers=centers.contiguous(), counts=counts, inertia=inertia, n_iter=n_iter, converged=converged
    )


@torch.no_grad()
@float32_only
def assign(x: Tensor, centers: Tensor, chunk_size: int = 65536) -> tuple[Tensor, Tensor]:
    """Nearest center of every row of ``x``: ``(labels int64 [n], squared distances float32 [n])``.

    Local only (no communication). Uses exactly the arithmetic of :func:`kmeans`'s assignment step
    (same mean shift, same chunking), so ``assign(x, kmeans(x, k).centers)`` reproduces its final
    single-process assignment. Bitwise-equal computed distances go to the lowest center index (with
    duplicated centers the matmul may still round their distances differently).
    """
    chunk_size = _check_int("chunk_size", chunk_size, 1, who="assign")
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"assign: x must be a 2-D floating-point tensor [n, d], got {shape}")
    if not isinstance(centers, Tensor) or centers.dim() != 2 or centers.shape[0] < 1 or centers.shape[1] != x.shape[1]:
        shape = tuple(centers.shape) if isinstance(centers, Tensor) else type(centers).__name__
        raise ValueError(f"assign: centers must be [k >= 1, d={x.shape[1]}], got {shape}")
    if not bool(torch.isfinite(centers).all()):
        raise ValueError("assign: centers contain NaN or infinite values")
    with _cpu_workers(x.device) as pool:
        data = _Data(x, chunk_size, _Comm(x.device, False), pool, who="assign")
        data.estep(centers.detach().to(device=x.device, dtype=_F32), with_sums=False)
    return data.labels, data.sqdist
