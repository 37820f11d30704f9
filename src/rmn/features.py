"""The one intermediate-feature pass: the GAP'd input of every stage, what the memories compare with.

Everything that reads stage inputs goes through :func:`walk_stages`: recipe step 3 and
:func:`rmn.init_memories`, the analysis features and the memory atlas, BatchNorm matching, and the
calibration of benchmark memories. It runs the model's stem, then before each stage yields a
:class:`StageInput` (the stage's input and its feature, :func:`rmn.memory.stage_feature`, float32
whatever the autocast); the consumer may act there (set the stage's memories, record routes) before
the stage runs on the way to the next one.

How a stage runs on the way (``path``):

* ``"routed"``: as the network's own forward runs it (the memories route, attention gets the routes).
* ``"stem"``: as the plain network of step 1: procedure 0, attention fed no route (uniform in eval,
  random in training). Right after cloning every procedure is a copy of procedure 0, so these are
  the features of the network recipe step 3 clusters.
* ``"cloned"``: procedure 0 for every sample, attention fed the routes the memories give: the routed
  network right after steps 2 and 3, with BatchNorm over the whole batch (BatchNorm matching).
* ``"auto"``: ``"stem"`` while no routed stage has its memories set (all equal, as a fresh clone's
  zeros, which would send every sample to memory 0), ``"routed"`` once one has.

The stages may also be plain modules (an :class:`rmn.Backbone`): they then run as they are.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from . import distributed
from .backbones.base import device_of
from .kmeans import kmeans
from .memory import nearest, stage_feature
from .precision import FLOAT32, Precision

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


def resolve_path(model: nn.Module, path: str = "auto") -> str:
    """``path`` checked, and ``"auto"`` decided on ``model``'s memories as they are now."""
    if path not in PATHS:
        raise ValueError(f"feature path must be one of {', '.join(PATHS)}, got {path!r}")
    if path != "auto":
        return path
    banks = [getattr(stage, "memory", None) for stage in model.stages]
    return "routed" if any(b is not None and memories_set(b) for b in banks) else "stem"


def walk_stages(model: nn.Module, x: torch.Tensor, path: str = "auto", run_last: bool = True) -> Iterator[StageInput]:
    """Run ``model.stem`` on ``x``, then yield each stage's :class:`StageInput` before running it.

    Runs in whatever mode and autocast the caller set (a routed stage in training mode accumulates
    memory statistics). ``run_last=False`` stops after the last stage's input: its output feeds
    nothing but the head. Works on any model with ``stem`` and ``stages``.
    """
    path = resolve_path(model, path)
    h = model.stem(x)
    last = len(model.stages) - 1
    for i, stage in enumerate(model.stages):
        item = StageInput(i, stage, h, stage_feature(h))
        memory = getattr(stage, "memory", None)
        if path == "cloned" and memory is not None:
            item.routes = nearest(item.feature, memory.memories)
        yield item
        if i == last and not run_last:
            return
        h = _run_stage(stage, h, path, item.routes)
        if path == "routed":
            item.routes = getattr(stage, "last_routes", None)


def _run_stage(stage: nn.Module, h: torch.Tensor, path: str, routes: torch.Tensor | None) -> torch.Tensor:
    procedures = getattr(stage, "procedures", None)
    if path == "routed" or procedures is None:
        return stage(h)
    y = procedures[0](h)  # the plain network: every sample through the same weights
    if stage.attention is None:
        return y
    return stage.attention(y, routes if path == "cloned" else None)


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
    feats: list[list[torch.Tensor]] = [[] for _ in model.stages]
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
    banks = [getattr(stage, "memory", None) for stage in getattr(model, "stages", ())]
    if not any(b is not None for b in banks):
        raise ValueError(f"init_memories: {type(model).__name__} has no routed stage (clone it with RoutedNetwork.from_backbone first)")
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
