"""A routed stage: N procedures (real copies of the backbone's stage), their memory heads, and an
optional Conditional Attention shared by all of them.

A stage without memory is *unrouted*: it runs its single procedure, and its attention (if any)
gets the stem-training route input (random in training, uniform in eval). That is what the plain
network of recipe step 1 is made of, and what stages left out of routing stay.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .attention import ConditionalAttention
from .dispatch import dispatch
from .memory import MemoryBank, stage_feature


class RoutedStage(nn.Module):
    def __init__(
        self,
        procedures: Sequence[nn.Module],
        memory: MemoryBank | None = None,
        attention: ConditionalAttention | None = None,
    ) -> None:
        super().__init__()
        if len(procedures) < 1:
            raise ValueError("a stage needs at least one procedure")
        if memory is not None and memory.num_memories != len(procedures):
            raise ValueError(
                f"{len(procedures)} procedures but {memory.num_memories} memories: they must match"
            )
        if memory is None and len(procedures) != 1:
            raise ValueError("an unrouted stage (no memory) must have exactly one procedure")
        self.procedures = nn.ModuleList(procedures)
        self.memory = memory
        self.attention = attention
        self.last_routes: torch.Tensor | None = None
        # Call every procedure, even on an empty slice (set by rmn.syncbn.convert_sync_batchnorm).
        self.run_every_procedure = False

    @property
    def routed(self) -> bool:
        return self.memory is not None

    @property
    def num_procedures(self) -> int:
        return len(self.procedures)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.memory is not None:
            routes = self.memory.route(stage_feature(x))
            try:
                y = dispatch(x, routes, self.procedures, run_empty=self.run_every_procedure)
            except ValueError as e:
                if "Expected more than 1 value per channel" not in str(e):
                    raise
                raise ValueError(
                    "a procedure received a single sample whose feature map is 1x1, which BatchNorm cannot "
                    "normalise in training; use larger images (data.image_size) or a larger batch"
                ) from None
        else:
            routes = None
            y = self.procedures[0](x)
        if self.attention is not None:
            y = self.attention(y, routes)
        self.last_routes = routes
        return y
