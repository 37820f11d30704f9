"""What a model costs: its parameters, and the multiply-adds per image on the path it executes.

MACs are counted by *executing* the model in eval mode under
:class:`torch.utils.flop_counter.FlopCounterMode` (flops / 2, divided by the batch), so a routed
network is charged for the procedure each sample really runs, not for all N of them.
The counter sees convolutions, linear layers and matrix products (the same convention as the
usual "FLOPs" tables: BatchNorm, activations, pooling and the memory look-up's tiny GEMM aside).
The run summary and the paper's cost tables (:mod:`rmn.analysis.cost`) both count with these.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .backbones.base import device_of


def count_params(model: nn.Module) -> int:
    """Number of distinct trainable-or-not parameters (shared modules counted once); buffers excluded."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def macs_per_image(
    model: nn.Module,
    input_shape: Sequence[int] = (3, 224, 224),
    batch: int = 2,
    inputs: torch.Tensor | None = None,
) -> float:
    """Multiply-adds per image on the executed path (eval mode), counted with FlopCounterMode.

    ``inputs`` (a batch) overrides ``input_shape``/``batch``; otherwise a random normal batch is used.
    The model's training mode is restored afterwards.
    """
    if inputs is None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        inputs = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0))
    inputs = inputs.to(device_of(model))
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(inputs)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / inputs.shape[0]
