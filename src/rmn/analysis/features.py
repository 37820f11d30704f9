"""The features routing looks at: the GAP'd input of every stage, for any stem/stages/head model.

``stage_inputs(net, x)`` runs ``net.stem`` and then each stage in turn, taking ``h.mean((2, 3))``
*before* each stage: exactly the vector a routed stage compares with its memories. It works on a
plain :class:`~rmn.backbones.Backbone` and on a :class:`~rmn.RoutedNetwork` (whose stages then route
as usual, so later stages see the features of the path each sample really takes).
"""
from __future__ import annotations

import torch
from torch import nn

from ..memory import stage_feature


def stage_inputs(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """GAP'd input of every stage of ``net`` for the batch ``x``: a list of ``[B, C_i]`` tensors.

    Runs in whatever mode ``net`` is in (use eval mode unless you mean it: a routed network in
    training mode accumulates memory statistics).
    """
    h = net.stem(x)
    feats = []
    for stage in net.stages:
        feats.append(stage_feature(h))
        h = stage(h)
    return feats


def _routes_of(net: nn.Module, batch: int, device) -> torch.Tensor | None:
    """Routes of the last forward through ``net.stages`` ([S, B], -1 where unrouted), or None."""
    rows = []
    any_routed = False
    for stage in net.stages:
        r = getattr(stage, "last_routes", None)
        if r is None:
            rows.append(torch.full((batch,), -1, dtype=torch.long, device=device))
        else:
            any_routed = True
            rows.append(r.to(device))
    return torch.stack(rows) if any_routed else None


@torch.no_grad()
def collect_stage_features(
    net: nn.Module,
    images: torch.Tensor,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Stage-input features and routes of many images, in batches, in eval mode.

    Returns ``(features, routes)``: ``features[i]`` is ``[M, C_i]`` (float32, CPU) and ``routes``
    is ``[S, M]`` (long, CPU; -1 for unrouted stages), or None when ``net`` routes nothing.
    The model's training mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        p = next(iter(net.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    was_training = net.training
    net.eval()
    feats: list[list[torch.Tensor]] = []
    routes: list[torch.Tensor] = []
    routed = False
    try:
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(device)
            f = stage_inputs(net, x)
            if not feats:
                feats = [[] for _ in f]
            for acc, t in zip(feats, f):
                acc.append(t.float().cpu())
            r = _routes_of(net, x.shape[0], torch.device("cpu"))
            if r is not None:
                routed = True
                routes.append(r)
            else:
                routes.append(torch.full((len(f), x.shape[0]), -1, dtype=torch.long))
    finally:
        net.train(was_training)
    features = [torch.cat(a) for a in feats]
    return features, (torch.cat(routes, dim=1) if routed else None)
