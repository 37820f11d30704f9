"""Cost of recipe step 3, ``init_memory`` (feature pass + k-means), against one eval pass over the same training set.

    .venv/bin/python benchmarks/init_memory.py [--backbone vgg16] [--image-size 32] [--n 50000] [--procedures 8]
                                               [--width-mult 1] [--batch 512] [--threads T] [--check-n 2000]
    .venv/bin/python benchmarks/init_memory.py --quick      # smoke run: 2,000 samples, eighth width, writes nothing

The project bounds ``init_memory`` at 1.2x one evaluation pass over the training set, for 50,000 samples
whose routed features include 512-dim ones, with k = 8. Default setting: VGG-16-BN (a backbone of the
paper; its stage inputs are 64-, 128-, 256- and 512-dim) at CIFAR size, 32x32, every stage routed, N = k = 8,
on 50,000 CIFAR-shaped images held in memory (random pixels: the cost of a pass does not depend on
them; k-means clusters the real features those images produce in the network).

What is timed, batch by batch over the same batches (so a load change on a shared machine hits both):

* eval pass: the plain (stem) network's forward and the top-1/top-5 bookkeeping, as ``evaluate`` does;
* feature pass: ``rmn.features.stage_inputs(routed, x, "stem")`` on the cloned network, the pass
  ``init_memory`` makes (through ``rmn.init_memories``), keeping every stage's GAP'd input, then the concatenation;
* loading the batches (the same un-augmented loader for both; timed once, added to both sides);
* k-means: ``rmn.kmeans.kmeans`` with the recipe's settings (``run.kmeans_iters``, ``run.kmeans_seed``)
  on each routed stage's features, best of ``--repeats``.

The order of the two forwards alternates from batch to batch. ``--check-n`` samples then go through
the recipe's own ``init_memory`` (checkpoint write left out) to check that its feature pass costs
per sample what the one timed here does. Prints a table, writes benchmarks/results/init_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's rmn, whichever environment runs the script

from rmn.data import build_loader, dataset_spec  # noqa: E402
from rmn.data.base import InMemoryDataset  # noqa: E402
from rmn.features import stage_inputs  # noqa: E402
from rmn.kmeans import kmeans  # noqa: E402
from rmn.recipe import build, steps  # noqa: E402
from rmn.recipe.run import Run  # noqa: E402
from rmn.recipe.config import load_config  # noqa: E402
from rmn.route import memory_banks  # noqa: E402


def synthetic_set(n: int, size: int, seed: int = 0) -> InMemoryDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    targets = torch.randint(0, 10, (n,), generator=g)
    spec = dataset_spec("cifar10")
    return InMemoryDataset(images, targets, [str(i) for i in range(10)], spec, "train")


@torch.no_grad()
def eval_batch(model, x, y) -> torch.Tensor:
    logits = model(x)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return torch.stack([(top[:, 0] == y).sum(), (top == y[:, None]).any(1).sum()])


@torch.no_grad()
def feature_batch(routed, x, store) -> None:
    for i, f in enumerate(stage_inputs(routed, x, "stem")):
        store[i].append(f.float())


def interleaved_passes(stem, routed, loader):
    """(seconds loading, seconds eval, seconds features, features per stage): both passes over the same batches."""
    t_load = t_eval = t_feat = 0.0
    store = [[] for _ in routed.stages]
    hits = torch.zeros(2, dtype=torch.long)
    it = iter(loader)
    k = 0
    while True:
        t0 = time.perf_counter()
        try:
            x, y = next(it)
        except StopIteration:
            break
        t_load += time.perf_counter() - t0
        order = ("eval", "feat") if k % 2 == 0 else ("feat", "eval")
        for what in order:
            t0 = time.perf_counter()
            if what == "eval":
                hits += eval_batch(stem, x, y)
            else:
                feature_batch(routed, x, store)
            dt = time.perf_counter() - t0
            if what == "eval":
                t_eval += dt
            else:
                t_feat += dt
        k += 1
    t0 = time.perf_counter()
    feats = [torch.cat(s) for s in store]
    t_feat += time.perf_counter() - t0
    return t_load, t_eval, t_feat, feats


def check_recipe(cfg, stem, data_set, batch: int) -> dict:
    """The recipe's own init_memory on a subset: its reported feature time per sample."""
    routed = build.clone_network(cfg, stem).eval()
    loader = build_loader(data_set, batch, train=False, augment=False)
    spec = data_set.spec
    data = build.Data(spec, data_set, data_set, spec.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(cfg, Path(tmp), torch.device("cpu"), data, routed, None, "cloned", loaders=(None, None, loader))
        run.save = lambda: None  # the checkpoint write is not part of the bound
        t0 = time.perf_counter()
        steps.init_memory(run)
        total = time.perf_counter() - t0
    sec = run.extra["init_memory_seconds"]
    return {"n": len(data_set), "seconds_total": total, "seconds_features": sec["features"], "seconds_kmeans": sec["kmeans"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="vgg16")
    ap.add_argument("--width-mult", type=float, default=1.0)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--procedures", type=int, default=8, help="N = k of every routed stage")
    ap.add_argument("--batch", type=int, default=512, help="eval batch size (data.eval_batch_size)")
    ap.add_argument("--repeats", type=int, default=2, help="k-means runs per stage (best is kept)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--check-n", type=int, default=2000, help="samples for the recipe's own init_memory (0: skip)")
    ap.add_argument("--quick", action="store_true", help="smoke run: n=2000, width 1/8, no recipe check; writes only to --out")
    ap.add_argument("--out", default=None, help="results file (default benchmarks/results/init_memory.json; none with --quick)")
    args = ap.parse_args()
    if args.quick:
        args.n, args.width_mult, args.check_n = 2000, 0.125, 0
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = load_config(None, {"model.backbone": args.backbone, "model.width_mult": args.width_mult,
                             "model.num_procedures": args.procedures, "data.image_size": args.image_size,
                             "data.eval_batch_size": args.batch, "run.progress": "none"})
    torch.manual_seed(0)
    spec = dataset_spec("cifar10")
    stem = build.build_stem_network(cfg, spec, args.image_size).eval()
    routed = build.clone_network(cfg, stem).eval()
    ds = synthetic_set(args.n, args.image_size)
    loader = build_loader(ds, args.batch, train=False, augment=False)
    print(f"{args.backbone} x{args.width_mult} at {args.image_size}x{args.image_size}, n={args.n}, N=k={args.procedures}, "
          f"stage inputs {routed.stage_channels}, threads {torch.get_num_threads()}, load {os.getloadavg()}", flush=True)
    with torch.no_grad():  # warm-up (allocator, oneDNN kernels)
        x, y = next(iter(build_loader(synthetic_set(2 * args.batch, args.image_size, 1), args.batch, train=False,
                                      augment=False)))
        eval_batch(stem, x, y)
        feature_batch(routed, x, [[] for _ in routed.stages])

    t_load, t_eval, t_feat, feats = interleaved_passes(stem, routed, loader)
    print(f"passes done: load {t_load:.1f}s eval {t_eval:.1f}s features {t_feat:.1f}s", flush=True)
    stages = []
    for i, bank in enumerate(memory_banks(routed)):
        if bank is None:
            continue
        best, res = float("inf"), None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = kmeans(feats[i], bank.num_memories, max_iter=cfg.run.kmeans_iters, seed=cfg.run.kmeans_seed)
            best = min(best, time.perf_counter() - t0)
        stages.append({"stage": i, "dim": feats[i].shape[1], "n": feats[i].shape[0], "k": bank.num_memories,
                       "seconds": best, "iterations": res.n_iter, "converged": res.converged,
                       "cluster_sizes": res.counts.tolist()})
        print(f"k-means stage {i}: {feats[i].shape[1]}-dim, {res.n_iter} iterations, {best:.2f}s", flush=True)

    t_kmeans = sum(s["seconds"] for s in stages)
    eval_total = t_load + t_eval
    init_total = t_load + t_feat + t_kmeans
    big = [s for s in stages if s["dim"] == 512]
    ratio_512 = (t_load + t_feat + sum(s["seconds"] for s in big)) / eval_total if big else None
    check = check_recipe(cfg, stem, synthetic_set(args.check_n, args.image_size, 2), args.batch) if args.check_n else None

    rows = [("loading the batches (in both)", t_load), ("eval pass, plain network", t_eval),
            ("feature pass, all stage inputs", t_feat)]
    rows += [(f"k-means stage {s['stage']} ({s['dim']}-d, {s['iterations']} it)", s["seconds"]) for s in stages]
    rows += [("one eval pass (load + eval)", eval_total), ("init_memory (load + features + k-means)", init_total)]
    print()
    print(f"{'':<42} {'seconds':>9} {'ms / 1k samples':>16}")
    for name, sec in rows:
        print(f"{name:<42} {sec:>9.2f} {1e6 * sec / args.n:>16.1f}")
    print(f"{'ratio init_memory / eval pass':<42} {init_total / eval_total:>9.3f}   (bound 1.2)")
    if ratio_512 is not None:
        print(f"{'ratio, the 512-dim stage(s) alone routed':<42} {ratio_512:>9.3f}")
    print(f"k-means share of init_memory: {100 * t_kmeans / init_total:.1f}%; feature pass / eval pass: {t_feat / t_eval:.3f}")
    if check:
        print(f"recipe init_memory on {check['n']} samples: features {1e6 * check['seconds_features'] / check['n']:.1f} "
              f"ms / 1k samples (timed here: {1e6 * t_feat / args.n:.1f})")
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "load_average_end": os.getloadavg(),
            "backbone": args.backbone, "width_mult": args.width_mult, "image_size": args.image_size, "n": args.n,
            "procedures": args.procedures, "batch": args.batch, "stage_channels": routed.stage_channels,
            "kmeans_iters": cfg.run.kmeans_iters,
            "note": "wall clock on a shared machine; eval and feature forwards interleaved batch by batch"}
    result = {"meta": meta, "seconds": {"load": t_load, "eval_forward": t_eval, "feature_pass": t_feat,
                                        "kmeans_total": t_kmeans, "eval_pass": eval_total, "init_memory": init_total},
              "kmeans": stages, "ratio": init_total / eval_total, "ratio_512_stage_only": ratio_512,
              "bound": 1.2, "within_bound": init_total / eval_total <= 1.2, "recipe_check": check}
    out = Path(args.out) if args.out else None if args.quick else ROOT / "benchmarks" / "results" / "init_memory.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out or 'not written (--quick)'}")


if __name__ == "__main__":
    main()
