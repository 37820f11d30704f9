"""The paper's four-step training strategy as four functions over one :class:`~rmn.recipe.run.Run`.

    run = Run.open(cfg)            # fresh, or resumed from the newest checkpoint in the output
    train_stem(run)                # 1. plain network (attention fed random routes)
    clone(run)                     # 2. N procedures per stage, optimizer state cloned
    init_memory(run)               # 3. k-means on the stage inputs -> memories
    train_routed(run)              # 4. routed training, memories follow a moving average

Each step checks that the run is where it expects and is a no-op when it is already past it, so
``rmn run`` and the single-step commands can be mixed and resumed at any point. The epochs
themselves are :func:`rmn.recipe.loop.train_epochs`.
"""
from __future__ import annotations

import time

from ..bn_match import match_batchnorm
from ..features import init_memories
from ..precision import compile_parts, uncompile
from ..route import memory_banks, num_procedures
from ..training import clone_optimizer
from . import build
from .loop import train_epochs
from .run import RecipeError, Run

__all__ = ["RecipeError", "Run", "clone", "init_memory", "train_baseline", "train_routed", "train_stem"]


def train_stem(run: Run) -> Run:
    """Step 1: train the plain network (attention gets random routes) for ``schedule.stem_epochs``."""
    if run.phase != "stem":
        return run
    train_epochs(run, run.cfg.schedule.stem_epochs)
    return run


def clone(run: Run) -> Run:
    """Step 2: copy each stage N times, with BatchNorm statistics and the optimizer's state."""
    if run.phase != "stem":
        if run.phase == "baseline":
            raise RecipeError("a baseline run has no routing steps")
        return run
    if run.epoch < run.cfg.schedule.stem_epochs:
        raise RecipeError(f"stem training is at epoch {run.epoch} of {run.cfg.schedule.stem_epochs}; run train-stem first")
    routed = build.clone_network(run.cfg, uncompile(run.model)).to(run.device)
    run.optimizer = clone_optimizer(run.optimizer, run.model, routed)
    run.model = run.precision.model(routed)
    if run.cfg.run.compile:
        compile_parts(run.model)
    run.wrap()
    run.phase = "cloned"
    run.say(f"[clone] {num_procedures(routed)} procedures per routed stage; "
            f"{sum(p.numel() for p in routed.parameters()) / 1e6:.2f}M parameters")
    run.save()
    return run


def init_memory(run: Run) -> Run:
    """Step 3: k-means (k = N) on each routed stage's input features over the un-augmented training
    set; the centres become memories (:func:`rmn.init_memories`, with the run's k-means settings)."""
    if run.phase != "cloned":
        if run.phase == "stem":
            raise RecipeError("the network is not cloned yet; run clone first")
        return run
    cfg = run.cfg.run
    done = init_memories(run.model, run.loaders[2], iters=cfg.kmeans_iters, seed=cfg.kmeans_seed,
                         max_samples=cfg.kmeans_max_samples, precision=run.precision)
    for i, bank in enumerate(memory_banks(run.model)):
        if bank is not None:
            sizes = done.cluster_sizes[f"stage{i}"]
            run.say(f"[init-memory] stage {i}: {sum(sizes)} features of dim {bank.dim}, cluster sizes {sizes}")
    t2 = time.perf_counter()
    run.extra["cluster_sizes"] = done.cluster_sizes
    run.extra["init_memory_seconds"] = dict(done.seconds)
    if run.cfg.model.match_batchnorm:
        with run.precision.autocast():
            matched = match_batchnorm(run.model, (run.precision.batch(x) for x, _ in run.loaders[2]))
        run.extra["init_memory_seconds"]["match_batchnorm"] = time.perf_counter() - t2
        run.say(f"[init-memory] {matched} BatchNorm layers of the procedures matched to their clusters' statistics")
    run.phase = "memory"
    run.save()
    return run


def train_routed(run: Run) -> Run:
    """Step 4: routed training to the last epoch, same optimizer, same continuous LR schedule."""
    if run.phase not in ("memory", "routed"):
        raise RecipeError(f"the run is in phase '{run.phase}'; routed training needs initialised memories (run init-memory)")
    run.phase = "routed"
    train_epochs(run, run.total_epochs)
    return run


def train_baseline(run: Run) -> Run:
    """The comparison row: the same schedule on the plain network, no cloning."""
    if run.phase != "baseline":
        raise RecipeError(f"the run in {run.out} is an RMN run (phase '{run.phase}'), not a baseline")
    train_epochs(run, run.total_epochs)
    return run
