"""The three-phase interface every routable CNN exposes: ``stem`` -> ``stages`` -> ``head``.

The paper sees a CNN as a stem ``P0`` (shared), feature-processing stages ``P1..PS`` split at the
down-sampling operations (routed), and a classifier (shared). Any ``nn.Module`` with these three
attributes can be turned into a Routing-by-Memory Network; :class:`Backbone` is the plain container.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class BackboneInfo:
    """What was asked for, so a checkpoint can rebuild the same backbone."""

    name: str
    num_classes: int
    image_size: int
    in_channels: int
    width_mult: float


class Backbone(nn.Module):
    """A plain CNN as ``head(stages[S-1](...stages[0](stem(x))))``.

    ``stage_channels[i]`` is the channel count of the *input* of ``stages[i]`` (what its memories
    live in) and ``out_channels[i]`` that of its output (what Conditional Attention re-weights).
    ``min_image_size`` is the smallest input side the architecture accepts.
    """

    def __init__(
        self,
        stem: nn.Module,
        stages: list[nn.Module],
        head: nn.Module,
        stage_channels: list[int],
        out_channels: list[int],
        in_channels: int,
        min_image_size: int = 1,
        info: BackboneInfo | None = None,
    ) -> None:
        super().__init__()
        if not (len(stages) == len(stage_channels) == len(out_channels)):
            raise ValueError("stages, stage_channels and out_channels must have the same length")
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.head = head
        self.stage_channels = list(stage_channels)
        self.out_channels = list(out_channels)
        self.in_channels = in_channels
        self.min_image_size = min_image_size
        self.info = info

    def check_input(self, x: torch.Tensor) -> None:
        """Reject inputs the architecture cannot take, with a message that says why."""
        check_image_input(x, self.in_channels, self.min_image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


def check_image_input(x: torch.Tensor, in_channels: int, min_image_size: int) -> None:
    """One-line errors for the usual mistakes: wrong rank, wrong channels, too small an image."""
    if x.dim() != 4:
        raise ValueError(f"expected a batch of images [B, C, H, W], got a tensor of shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(
            f"input has {x.shape[1]} channels but the model was built for in_channels={in_channels}"
        )
    if min(x.shape[2], x.shape[3]) < min_image_size:
        raise ValueError(
            f"input of {x.shape[2]}x{x.shape[3]} pixels is too small for this backbone "
            f"(needs at least {min_image_size}x{min_image_size})"
        )


def device_of(module: nn.Module) -> torch.device:
    """Where ``module`` lives: the device of its first parameter or buffer (CPU for an empty module)."""
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")
