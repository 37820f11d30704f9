"""The one intermediate-feature pass: the GAP'd input of every stage, what the memories compare with.

Everything that reads stage inputs goes through :func:`walk_stages`: recipe step 3 and
:func:`rmn.init_memories`, the analysis features and the memory atlas, BatchNorm matching, and the
calibration of benchmark memories. It runs the model's *own* forward (so it works on any model routed
by :func:`rmn.route`), and forward hooks hand the consumer each stage's :class:`StageInput` (the stage's
input and its feature, :func:`rmn.memory.stage_feature`, float32 whatever the autocast) before the stage
runs; the consumer may act there (set the stage's memories, record routes). The pass stops once the
last stage has run: the head is never computed.

How a stage runs on the way (``path``):

* ``"routed"``: as the network's own forward runs it (the memories route, attention gets the routes).
* ``"stem"``: as the plain network of step 1: procedure 0, attention fed no route (uniform in eval,
  random in training). Right after cloning every procedure is a copy of procedure 0, so these are
  the features of the network recipe step 3 clusters.
* ``"cloned"``: procedure 0 for every sample, attention fed the routes the memories give: the routed
  network right after steps 2 and 3, with BatchNorm over the whole batch (BatchNorm matching).
* ``"auto"``: ``"stem"`` while no routed stage has its memories set (all equal, as a fresh clone's
  zeros, which would send every sample to memory 0), ``"routed"`` once one has.

The stages may also be plain modules (an :class:`rmn.Backbone`, a model declaring ``stage_names``):
they then run as they are.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import distributed
from .backbones.base import device_of
from .kmeans import kmeans
from .memory import nearest, stage_feature
from .precision import FLOAT32, Precision
from .route import as_groups
from .stage import RoutedStage

PATHS = ("auto", "routed", "stem", "cloned")


@dataclass
class StageInput:
    """Stage ``index`` about to run on ``input``. ``routes`` (the procedure each sample takes, None
    for an unrouted stage) is known before the stage runs on the ``"cloned"`` path and filled in
    once it has run on the ``"routed"`` path; the ``"stem"`` path routes nothing."""

    index: int
    stage: nn.Module
    input: torch.Tensor
    feature: torch.Tensor
    routes: torch.Tensor | None = None


def memories_set(bank: nn.Module) -> bool:
    """Whether a memory bank can route: its memories are not all equal (a fresh bank's are zeros)."""
    m = bank.memories
    return bool((m != m[:1]).any())


def stage_entries(model: nn.Module) -> list[tuple[nn.Module, nn.Module, nn.Module]]:
    """``(stage, first, last)`` per stage, in forward order: the stage's module (what holds its memory),
    and the modules whose input and output are the stage's. A model routed by :func:`rmn.route` names its
    routed stages; a model declaring ``stage_names`` (rmn's backbones, a user's CNN) names its stages, a
    group of consecutive modules being one stage."""
    routing = getattr(model, "rmn_routing", None)
    if routing is not None:
        return [(m, m, m) for m in (model.get_submodule(n) for n in routing.stages)]
    names = getattr(model, "stage_names", None)
    if names is not None:
        entries = []
        for g in as_groups(names):
            first, last = model.get_submodule(g[0]), model.get_submodule(g[-1])
            entries.append((first if len(g) == 1 else None, first, last))
        return entries
    raise ValueError(f"{type(model).__name__} has no stages: route it with rmn.route(model, stages), "
                     "or declare stage_names")


def resolve_path(model: nn.Module, path: str = "auto") -> str:
    """``path`` checked, and ``"auto"`` decided on ``model``'s memories as they are now."""
    if path not in PATHS:
        raise ValueError(f"feature path must be one of {', '.join(PATHS)}, got {path!r}")
    if path != "auto":
        return path
    banks = [getattr(stage, "memory", None) for stage, _, _ in stage_entries(model)]
    return "routed" if any(b is not None and memories_set(b) for b in banks) else "stem"


class _StopWalk(Exception):
    """Raised from a hook once the last stage has run: the head's output feeds no feature."""


def walk_stages(
    model: nn.Module,
    x: torch.Tensor,
    path: str = "auto",
    run_last: bool = True,
    visit: Callable[[StageInput], None] | None = None,
) -> list[StageInput]:
    """Run ``model``'s own forward on ``x`` up to its last stage; ``visit`` gets each stage's
    :class:`StageInput` before the stage runs (it may set the stage's memories there). Returns them all.

    Runs in whatever mode and autocast the caller set (a training-mode pass with gradients on moves the
    memories, as the model's forward would). ``run_last=False`` stops before the last stage runs: its
    output feeds nothing but the head. Works on any model with named or listed stages (:func:`stage_entries`).
    """
    path = resolve_path(model, path)
    entries = stage_entries(model)
    last = len(entries) - 1
    items: list[StageInput] = []
    hooks = []

    def before(i: int, stage: nn.Module | None):
        def hook(_module, args):
            h = args[0]
            item = StageInput(i, stage, h, stage_feature(h))
            memory = getattr(stage, "memory", None)
            if path == "cloned" and memory is not None:
                item.routes = nearest(item.feature, memory.memories)
            items.append(item)
            if visit is not None:
                visit(item)
            if i == last and not run_last:
                raise _StopWalk
            if isinstance(stage, RoutedStage):
                stage.walk = (path, item.routes)
        return hook

    def after(i: int, stage: nn.Module | None):
        def hook(_module, _args, _output):
            if isinstance(stage, RoutedStage):
                stage.walk = None
                if path == "routed":
                    items[i].routes = stage.last_routes
            if i == last:
                raise _StopWalk
        return hook

    for i, (stage, first, end) in enumerate(entries):
        hooks.append(first.register_forward_pre_hook(before(i, stage)))
        hooks.append(end.register_forward_hook(after(i, stage)))
    try:
        model(x)
    except _StopWalk:
        pass
    finally:
        for h in hooks:
            h.remove()
        for stage, _, _ in entries:
            if isinstance(stage, RoutedStage):
                stage.walk = None
    if len(items) != len(entries):
        raise ValueError(f"{len(entries) - len(items)} of {type(model).__name__}'s stages did not run in its forward")
    return items


def stage_inputs(model: nn.Module, x: torch.Tensor, path: str = "auto") -> list[torch.Tensor]:
    """GAP'd input ``[B, C_i]`` of every stage for one batch, in the model's current mode."""
    return [item.feature for item in walk_stages(model, x, path, run_last=False)]


def batch_images(batch: Any) -> torch.Tensor:
    """The images of a batch: a tensor, or the first element of an ``(x, y, ...)`` pair or list."""
    if torch.is_tensor(batch):
        return batch
    if isinstance(batch, (tuple, list)) and batch and torch.is_tensor(batch[0]):
        return batch[0]
    raise TypeError(f"a batch must be an image tensor or an (images, targets) pair, got {type(batch).__name__}")


@torch.no_grad()
def collect_stage_features(
    model: nn.Module,
    batches: Iterable[Any],
    path: str = "auto",
    precision: Precision = FLOAT32,
    with_routes: bool = False,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Every stage's GAP'd input over ``batches`` (tensors or ``(x, y)`` pairs), in eval mode.

    Each batch goes to the model's device in ``precision``'s memory format and runs under its
    autocast. Returns ``(features, routes)``: ``features[i]`` is ``[M, C_i]`` (float32, on the model's
    device); ``routes`` (only with ``with_routes``) is ``[S, M]`` (-1 for unrouted stages), or None
    when the path routes nothing. ``"auto"`` is decided once, before the first batch. The model's
    training mode is restored afterwards.
    """
    path = resolve_path(model, path)
    device = device_of(model)
    was_training = model.training
    model.eval()
    feats: list[list[torch.Tensor]] = [[] for _ in stage_entries(model)]
    routes: list[torch.Tensor] = []
    routed = False
    try:
        for batch in batches:
            x = precision.batch(batch_images(batch).to(device))
            rows = []
            with precision.autocast():
                for item in walk_stages(model, x, path, run_last=with_routes):
                    feats[item.index].append(item.feature)
                    rows.append(item)
            if with_routes:
                routed = routed or any(item.routes is not None for item in rows)
                routes.append(torch.stack([item.routes if item.routes is not None else
                                           torch.full((x.shape[0],), -1, dtype=torch.long, device=device) for item in rows]))
    finally:
        model.train(was_training)
    if not feats or not feats[0]:
        raise ValueError("no batches to compute stage features from")
    return [torch.cat(f) for f in feats], (torch.cat(routes, dim=1) if routed else None)


@dataclass
class MemoryInit:
    """What :func:`init_memories` did: the k-means cluster sizes of every routed stage (``"stage{i}"``,
    over all processes), and the seconds spent in the feature pass and in k-means."""

    cluster_sizes: dict[str, list[int]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def init_memories(
    model: nn.Module,
    batches: Iterable[Any],
    iters: int = 100,
    seed: int = 0,
    max_samples: int | None = None,
    precision: Precision = FLOAT32,
) -> MemoryInit:
    """Recipe step 3 in one call: each routed stage's memories become the k-means centres (k = N) of
    its GAP'd inputs over ``batches`` (a DataLoader, or any iterable of image tensors or ``(x, y)``
    pairs; the un-augmented training set is what the recipe gives).

    The features are the plain network's (path ``"stem"``: what a freshly cloned network computes),
    in eval mode under ``precision``'s autocast. ``iters``, ``seed``: k-means's ``max_iter`` and
    ``seed``. ``max_samples`` caps the features clustered per stage (a seeded random subset).
    Under torch.distributed each process passes its own shard of the data: k-means all-reduces its
    sums, every process gets the same memories, and the cap is split between the processes.
    """
    banks = [getattr(stage, "memory", None) for stage, _, _ in stage_entries(model)]
    if not any(b is not None for b in banks):
        raise ValueError(f"init_memories: {type(model).__name__} has no routed stage (route it with "
                         "rmn.route(model, stages, num_procedures=N) first)")
    t0 = time.perf_counter()
    feats, _ = collect_stage_features(model, batches, "stem", precision)
    t1 = time.perf_counter()
    cap = max_samples
    if cap:
        cap = max(1, cap // distributed.world_size())
    result = MemoryInit()
    for i, bank in enumerate(banks):
        if bank is None:
            continue
        x = feats[i]
        if cap and x.shape[0] > cap:
            g = torch.Generator().manual_seed(seed)
            x = x[torch.randperm(x.shape[0], generator=g)[:cap].to(x.device)]
        res = kmeans(x, bank.num_memories, max_iter=iters, seed=seed)
        bank.set_memories(res.centers)
        result.cluster_sizes[f"stage{i}"] = res.counts.tolist()
    result.seconds = {"features": t1 - t0, "kmeans": time.perf_counter() - t1}
    return result
