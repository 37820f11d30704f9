"""The features routing looks at, for analysis: the GAP'd input of every stage over many images.

Both functions are the one feature pass of :mod:`rmn.features` (``stage_inputs`` is the same
function); ``path="auto"`` gives the routed network's features once its memories are set, and
the plain network's (what recipe step 3 clusters) before.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import features
from ..features import stage_inputs

__all__ = ["collect_stage_features", "stage_inputs"]


def collect_stage_features(
    net: nn.Module, images: torch.Tensor, batch_size: int = 256, path: str = "auto",
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Stage-input features and routes of many images, in batches, in eval mode.

    Returns ``(features, routes)``: ``features[i]`` is ``[M, C_i]`` (float32, CPU) and ``routes``
    is ``[S, M]`` (long, CPU; -1 for unrouted stages), or None when the path routes nothing.
    The model's training mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = (images[start : start + batch_size] for start in range(0, images.shape[0], batch_size))
    feats, routes = features.collect_stage_features(net, batches, path, with_routes=True)
    return [f.cpu() for f in feats], (routes.cpu() if routes is not None else None)
