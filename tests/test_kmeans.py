"""Tests for rmn.kmeans: quality vs scikit-learn on real features, exactness vs a naive reference,
determinism, empty-cluster handling, argument errors, and a real 2-process (gloo) distributed run."""
from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rmn.kmeans import KMeansResult, assign, kmeans


@pytest.fixture(autouse=True)
def _one_thread():
    """The data here is tiny; one intra-op thread avoids oversubscription under ``pytest -n 2``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def _digits() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.from_numpy(load_digits().data.astype(np.float32))  # [1797, 64], real pixels 0..16


def _digits_conv_features() -> torch.Tensor:
    """What memory init sees: digits through a fixed random conv stage, ReLU, global average pooling."""
    from sklearn.datasets import load_digits

    imgs = torch.from_numpy(load_digits().images.astype(np.float32))[:, None] / 16.0  # [n, 1, 8, 8]
    g = torch.Generator().manual_seed(1234)
    w1 = torch.randn(32, 1, 3, 3, generator=g) / 3.0
    w2 = torch.randn(48, 32, 3, 3, generator=g) / (3.0 * 32**0.5)
    h = F.relu(F.conv2d(imgs, w1, padding=1))
    h = F.relu(F.conv2d(h, w2, stride=2, padding=1))
    return h.mean(dim=(2, 3))  # [1797, 48], non-negative and uncentred like GAP'd features


def _blobs(n: int, d: int, k: int, seed: int = 0, spread: float = 8.0, noise: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * spread
    lab = torch.randint(k, (n,), generator=g)
    return centers[lab] + noise * torch.randn(n, d, generator=g)


# --------------------------------------------------------------------------------------------------
# naive reference (float64, full distance matrix, python loops)
# --------------------------------------------------------------------------------------------------
def _ref_assign(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x64, c64 = x.double(), c.double()
    dist = ((x64[:, None, :] - c64[None, :, :]) ** 2).sum(-1)  # [n, k]
    labels = torch.tensor([min(range(c.shape[0]), key=lambda j: float(row[j])) for row in dist])
    return labels, dist[torch.arange(x.shape[0]), labels]


def _ref_update(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.empty(k, x.shape[1], dtype=torch.float64)
    for j in range(k):
        members = [i for i in range(x.shape[0]) if int(labels[i]) == j]
        assert members, "reference update got an empty cluster"
        out[j] = x.double()[members].mean(0)
    return out


def _ref_lloyd(x: torch.Tensor, c0: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    c = c0.double()
    labels = None
    for _ in range(iters):
        new_labels, _ = _ref_assign(x, c)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        c = _ref_update(x, labels, c.shape[0])
    return c, _ref_assign(x, c)[0]


# --------------------------------------------------------------------------------------------------
# quality vs scikit-learn on real features
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("features", ["digits", "digits_conv"])
@pytest.mark.parametrize("k", [8, 10])
def test_inertia_matches_sklearn(features, k):
    from sklearn.cluster import KMeans

    x = _digits() if features == "digits" else _digits_conv_features()
    xn = x.numpy().astype(np.float64)
    seeds = range(4)
    ours1 = [kmeans(x, k, seed=s).inertia for s in seeds]
    sk1 = [KMeans(k, n_init=1, random_state=s).fit(xn).inertia_ for s in seeds]
    ours3 = [kmeans(x, k, seed=s, n_init=3).inertia for s in seeds]
    sk3 = [KMeans(k, n_init=3, random_state=s).fit(xn).inertia_ for s in seeds]
    assert np.mean(ours1) <= 1.01 * np.mean(sk1)
    assert np.mean(ours3) <= 1.01 * np.mean(sk3)
    assert min(ours3) <= 1.01 * min(sk3)
    # never wildly better either: both are local optima of the same objective
    assert min(ours1 + ours3) >= 0.99 * min(sk1 + sk3)
    # n_init keeps the best run; its first run is the n_init=1 run of the same seed
    assert all(o3 <= o1 for o1, o3 in zip(ours1, ours3))


def test_result_fields_and_consistency():
    x = _digits_conv_features()
    r = kmeans(x, 8, seed=0)
    assert isinstance(r, KMeansResult)
    assert r.centers.shape == (8, x.shape[1]) and r.centers.dtype == torch.float32
    assert r.counts.dtype == torch.int64 and int(r.counts.sum()) == x.shape[0]
    assert r.converged and 1 <= r.n_iter <= 100
    labels, sq = assign(x, r.centers)
    assert torch.equal(torch.bincount(labels, minlength=8), r.counts)
    assert r.inertia == pytest.approx(sq.double().sum().item(), rel=1e-9)
    assert r.inertia == pytest.approx(_ref_assign(x, r.centers)[1].sum().item(), rel=1e-5)


# --------------------------------------------------------------------------------------------------
# exactness vs the naive reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [50, 64, 10_000])
def test_assign_matches_reference(chunk_size):
    x = _blobs(257, 16, 7, seed=1) + 3.0  # uncentred on purpose
    c = x[torch.randperm(257, generator=torch.Generator().manual_seed(0))[:7]]
    labels, sq = assign(x, c, chunk_size=chunk_size)
    ref_labels, ref_sq = _ref_assign(x, c)
    assert labels.dtype == torch.int64 and sq.dtype == torch.float32
    assert torch.equal(labels, ref_labels)
    torch.testing.assert_close(sq.double(), ref_sq, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("chunk_size", [50, 10_000])
def test_one_lloyd_step_matches_reference(chunk_size):
    x = _blobs(257, 16, 7, seed=2, spread=3.0, noise=2.0)
    c0 = x[torch.randperm(257, generator=torch.Generator().manual_seed(5))[:7]].clone()
    r = kmeans(x, 7, init=c0, max_iter=1, chunk_size=chunk_size)
    ref_labels, _ = _ref_assign(x, c0)
    ref_c1 = _ref_update(x, ref_labels, 7)
    assert r.n_iter == 1
    torch.testing.assert_close(r.centers.double(), ref_c1, rtol=0, atol=1e-5)
    ref_l1, ref_sq1 = _ref_assign(x, ref_c1)
    assert torch.equal(r.counts, torch.bincount(ref_l1, minlength=7))
    assert r.inertia == pytest.approx(ref_sq1.sum().item(), rel=1e-5)


def test_full_lloyd_matches_reference():
    x = _blobs(300, 8, 5, seed=3, spread=2.5, noise=1.5)
    c0 = x[:5].clone()
    r = kmeans(x, 5, init=c0, tol=0.0, max_iter=200, chunk_size=33)
    ref_c, ref_labels = _ref_lloyd(x, c0, 200)
    assert r.converged
    torch.testing.assert_close(r.centers.double(), ref_c, rtol=0, atol=1e-5)
    assert torch.equal(assign(x, r.centers, chunk_size=33)[0], ref_labels)


def test_chunking_does_not_change_the_result():
    x = _digits_conv_features()
    a = kmeans(x, 10, seed=7, chunk_size=65536)
    b = kmeans(x, 10, seed=7, chunk_size=97)
    assert torch.equal(a.counts, b.counts) and a.n_iter == b.n_iter
    torch.testing.assert_close(a.centers, b.centers, rtol=0, atol=1e-5)


def test_cpu_worker_threads_give_identical_results():
    """With several intra-op threads, blocks run on single-threaded workers; the result must not change
    (blocks are reduced in order) and torch's thread setting must be restored."""
    x = _digits_conv_features()
    torch.set_num_threads(1)
    a, (la, sa) = kmeans(x, 8, seed=3, chunk_size=150), assign(x, x[:8], chunk_size=150)
    torch.set_num_threads(2)
    b, (lb, sb) = kmeans(x, 8, seed=3, chunk_size=150), assign(x, x[:8], chunk_size=150)
    assert torch.get_num_threads() == 2
    assert torch.equal(a.centers, b.centers) and torch.equal(a.counts, b.counts) and a.inertia == b.inertia
    assert torch.equal(la, lb) and torch.equal(sa, sb)


def test_numpy_integer_arguments():
    x = _blobs(100, 4, 3, seed=0)
    r = kmeans(x, np.int64(3), seed=np.int32(2), max_iter=np.int64(50))
    assert r.centers.shape == (3, 4)


def test_seeds_are_distinct_data_points():
    x = _digits()
    r = kmeans(x, 10, max_iter=0, seed=3)
    assert r.n_iter == 0 and not r.converged
    hits = [(x == c).all(1).nonzero().flatten() for c in r.centers]
    assert all(len(h) >= 1 for h in hits)
    assert len(torch.unique(r.centers, dim=0)) == 10


# --------------------------------------------------------------------------------------------------
# determinism, dtypes
# --------------------------------------------------------------------------------------------------
def test_deterministic_under_seed_and_seed_matters():
    x = torch.rand(600, 6, generator=torch.Generator().manual_seed(0))  # no cluster structure: many optima
    a, b = kmeans(x, 8, seed=11), kmeans(x, 8, seed=11)
    assert torch.equal(a.centers, b.centers) and torch.equal(a.counts, b.counts) and a.inertia == b.inertia
    others = [kmeans(x, 8, seed=s).centers for s in (12, 13, 14)]
    assert any(not torch.allclose(a.centers, o) for o in others)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_low_and_high_precision_inputs(dtype):
    x = _digits_conv_features()
    xc = x.to(dtype)
    r = kmeans(xc, 8, seed=0)
    ref = kmeans(xc.float(), 8, seed=0)  # same values, already float32
    assert r.centers.dtype == torch.float32 and torch.isfinite(r.centers).all()
    torch.testing.assert_close(r.centers, ref.centers, rtol=0, atol=1e-5)
    assert r.inertia == pytest.approx(ref.inertia, rel=1e-6)
    labels, sq = assign(xc, r.centers)
    assert sq.dtype == torch.float32 and torch.equal(torch.bincount(labels, minlength=8), r.counts)


# --------------------------------------------------------------------------------------------------
# empty clusters / degenerate data
# --------------------------------------------------------------------------------------------------
def _all_good(r: KMeansResult, n: int, k: int) -> None:
    assert torch.isfinite(r.centers).all() and np.isfinite(r.inertia)
    assert int(r.counts.sum()) == n and r.counts.shape == (k,)


def test_empty_clusters_from_duplicate_init_are_reseeded():
    x = _blobs(200, 4, 6, seed=4)
    init = x[:1].repeat(6, 1)  # all centers identical -> 5 empty clusters on the first step
    r = kmeans(x, 6, init=init)
    _all_good(r, 200, 6)
    assert (r.counts > 0).all() and r.converged


def test_empty_clusters_get_the_farthest_points():
    x = _blobs(150, 5, 4, seed=6)
    init = torch.cat([x[:1], x[:1] + 1e3 * torch.eye(5)[:4]])  # clusters 1..4 far away: empty at first
    r = kmeans(x, 5, init=init, max_iter=1)
    far = ((x.double() - x[0].double()) ** 2).sum(1).argsort(descending=True)[:4]
    assert torch.equal(r.centers[1:], x[far])  # farthest first, in cluster order
    rest = torch.ones(150, dtype=torch.bool)
    rest[far] = False
    torch.testing.assert_close(r.centers[0].double(), x[rest].double().mean(0), rtol=0, atol=1e-5)


def test_k_equals_n():
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
    r = kmeans(x, 12)
    _all_good(r, 12, 12)
    assert (r.counts == 1).all() and r.inertia == pytest.approx(0.0, abs=1e-6)


def test_duplicated_points_and_far_outliers():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 3, generator=g)
    x = base.repeat_interleave(40, 0)  # 5 distinct points, 40 copies each
    r = kmeans(x, 5, seed=1)
    _all_good(r, 200, 5)
    # exact duplicates: zero up to the float32 round-off of ||x||^2 - 2 x.c + ||c||^2
    assert (r.counts == 40).all() and r.inertia <= 1e-6 * float((x - x.mean(0)).pow(2).sum()) and r.converged

    y = torch.cat([_blobs(300, 3, 3, seed=5, spread=2.0), torch.tensor([[1e3, 0, 0], [0, -1e3, 0], [0, 0, 2e3]])])
    for k in (4, 6, 8):
        for seed in range(3):
            r = kmeans(y, k, seed=seed)
            _all_good(r, 303, k)
            assert (r.counts > 0).all() and r.converged


def test_k_close_to_n_with_duplicates():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 2, generator=g)
    x = torch.cat([x, x[:5], x[:5]])  # 30 rows, 20 distinct
    for seed in range(5):
        r = kmeans(x, 20, seed=seed)
        _all_good(r, 30, 20)
        assert r.converged and (r.counts > 0).all() and r.inertia <= 1e-6 * float((x - x.mean(0)).pow(2).sum())


@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_fewer_distinct_points_than_k_never_nan(offset):
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, -2.0]]).repeat(10, 1) + offset  # 30 rows, 3 distinct
    for r in (kmeans(x, 5, seed=0), kmeans(x, 5, init=torch.full((5, 2), offset)), kmeans(x, 5, init=x[:5])):
        _all_good(r, 30, 5)
        # the surplus clusters stay empty, and the run still converges (no endless re-seeding)
        assert int((r.counts > 0).sum()) == 3 and r.converged and r.n_iter < 10
        assert r.inertia <= 1e-6 * float((x - x.mean(0)).pow(2).sum() + x.pow(2).sum())


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
def test_errors():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        kmeans(x, 0)
    with pytest.raises(ValueError, match="need at least k=11 points, got n=10"):
        kmeans(x, 11)
    with pytest.raises(ValueError, match="2-D floating-point"):
        kmeans(torch.randn(10), 2)
    with pytest.raises(ValueError, match="2-D floating-point"):
        kmeans(torch.randn(2, 5, 3), 2)
    with pytest.raises(ValueError, match="2-D floating-point"):
        kmeans(torch.arange(30).view(10, 3), 2)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        kmeans(bad, 2)
    bad[3, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        kmeans(bad, 2)
    with pytest.raises(ValueError, match="init must be a"):
        kmeans(x, 2, init=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="init contains NaN"):
        kmeans(x, 2, init=torch.tensor([[0.0, 0.0, float("nan")], [1.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="n_init must be 1 when init"):
        kmeans(x, 2, init=torch.zeros(2, 3), n_init=2)
    with pytest.raises(ValueError, match="max_iter"):
        kmeans(x, 2, max_iter=-1)
    with pytest.raises(ValueError, match="tol"):
        kmeans(x, 2, tol=-1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        kmeans(x, 2, chunk_size=0)
    with pytest.raises(ValueError, match="not initialised"):
        kmeans(x, 2, distributed=True)
    with pytest.raises(TypeError, match="torch.Tensor"):
        kmeans(x.numpy(), 2)
    with pytest.raises(ValueError, match="centers must be"):
        assign(x, torch.zeros(2, 4))


# --------------------------------------------------------------------------------------------------
# distributed: two real processes, gloo over TCP on localhost
# --------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, workdir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        cases = torch.load(os.path.join(workdir, "cases.pt"))
        out = {}
        for name, case in cases.items():
            kw = dict(case["kwargs"])
            if "init" in case:
                kw["init"] = case["init"]
            if "init_per_rank" in case:
                kw["init"] = case["init_per_rank"][rank]
            try:
                r = kmeans(case["shards"][rank], case["k"], **kw)
                out[name] = {"centers": r.centers, "counts": r.counts, "inertia": r.inertia, "n_iter": r.n_iter,
                             "converged": r.converged}
            except ValueError as err:
                out[name] = {"error": str(err)}
        torch.save(out, os.path.join(workdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _dist_cases() -> dict:
    blobs = _blobs(1200, 10, 5, seed=9, spread=6.0)
    conv = _digits_conv_features()
    nan = torch.randn(40, 10)
    nan[7, 2] = float("nan")
    return {
        # total 1200 <= seed_sample: every point gathered -> must equal the single-process run
        "gather_all": {"shards": [blobs[:700], blobs[700:]], "k": 5, "kwargs": {"seed": 3, "n_init": 2}},
        "gather_all_real": {"shards": [conv[:1000], conv[1000:]], "k": 8, "kwargs": {"seed": 1, "chunk_size": 300}},
        # a rank with no rows at all
        "empty_rank": {"shards": [blobs[:0], blobs[:500]], "k": 5, "kwargs": {"seed": 0}},
        # clusters 1..4 start far away -> empty -> global farthest-point re-seeding across ranks
        "relocate": {"shards": [blobs[:600], blobs[600:]], "k": 5, "kwargs": {"tol": 0.0},
                     "init": torch.cat([blobs[650:651], blobs[650:651] + 1e3 * torch.eye(10)[:4]])},
        # more points than seed_sample: stratified weighted seeding sample
        "sampled": {"shards": [blobs[:900], blobs[900:]], "k": 5, "kwargs": {"seed": 2, "seed_sample": 200}},
        # NaN on one rank only: every rank must raise (not hang)
        "nan_on_rank1": {"shards": [torch.randn(30, 10), nan], "k": 3, "kwargs": {}},
        # init of the wrong shape on rank 1 only: every rank must raise
        "bad_init_rank1": {"shards": [blobs[:50], blobs[50:100]], "k": 3, "kwargs": {},
                           "init_per_rank": [blobs[:3], blobs[:2]]},
    }


def test_distributed_two_processes_match_single_process(tmp_path):
    import torch.multiprocessing as mp

    cases = _dist_cases()
    torch.save(cases, tmp_path / "cases.pt")
    ctx = mp.start_processes(
        _dist_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                pytest.fail("distributed k-means workers did not finish within 120 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")

    for name, case in cases.items():
        a, b = r0[name], r1[name]
        if name == "nan_on_rank1":
            assert "NaN or infinite" in a["error"] and "NaN or infinite" in b["error"]
            continue
        if name == "bad_init_rank1":
            assert "init must be a [k, d]" in a["error"] and "init must be a [k, d]" in b["error"]
            continue
        assert "error" not in a and "error" not in b, (name, a, b)
        # bit-identical on every rank
        assert torch.equal(a["centers"], b["centers"]) and torch.equal(a["counts"], b["counts"]), name
        assert a["inertia"] == b["inertia"] and a["n_iter"] == b["n_iter"] and a["converged"] == b["converged"]
        full = torch.cat(case["shards"])
        kw = dict(case["kwargs"])
        kw.pop("seed_sample", None)
        if "init" in case:
            kw["init"] = case["init"]
        single = kmeans(full, case["k"], **kw)
        assert int(a["counts"].sum()) == full.shape[0] and (a["counts"] > 0).all(), name
        if name == "sampled":  # different seeding set: same optimum on well-separated blobs
            assert a["inertia"] == pytest.approx(single.inertia, rel=1e-3)
            continue
        torch.testing.assert_close(a["centers"], single.centers, rtol=0, atol=1e-5, msg=name)
        assert torch.equal(a["counts"], single.counts), name
        assert a["inertia"] == pytest.approx(single.inertia, rel=1e-5), name
        assert a["n_iter"] == single.n_iter and a["converged"] == single.converged, name
