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
from .fused import applies, ops
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
        # Apply the memory update right after routing, in a training forward with gradients on (set by
        # rmn.route for plain training loops; the recipe updates once per optimizer step instead).
        self.auto_update = False
        # Pooled procedure BatchNorm (rmn.pooled_bn.set_procedure_batchnorm): in training, the procedures run
        # in lockstep through this, normalising with the whole batch's statistics. None: per-slice (the paper).
        self.lockstep = None
        # Set by a feature pass (rmn.features.walk_stages) for one forward: the path to run and its routes.
        self.walk: tuple[str, torch.Tensor | None] | None = None
        # Batch-1 inference through the compiled ops (rmn.fuse_for_inference); False: the reference ops only.
        self.fused = False

    @property
    def routed(self) -> bool:
        return self.memory is not None

    @property
    def num_procedures(self) -> int:
        return len(self.procedures)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.walk is not None and self.walk[0] != "routed":
            return self._forward_plain(x, self.walk[1])
        if self.fused and self.memory is not None and self.walk is None and applies(x, self.training):
            return self._forward_fused(x)
        if self.memory is not None:
            routes = self.memory.route(stage_feature(x))
            if self.auto_update and self.training and torch.is_grad_enabled():
                self.memory.update()
            try:
                y = dispatch(x, routes, self.procedures, run_empty=self.run_every_procedure,
                             lockstep=self.lockstep if self.training else None)
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

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """Batch-1 inference with the compiled ops (:mod:`rmn.fused`): one call routes, one call applies CA."""
        memory, ext = self.memory, ops()
        route = ext.fused_route(x, memory.memories, memory.squared_norms())
        y = self.procedures[route](x)
        self.last_routes = torch.tensor([route], device=x.device)
        attn = self.attention
        if attn is None:
            return y
        if attn.num_routes == 0 or not y.is_contiguous() or y.dtype != torch.float32:
            return attn(y, self.last_routes)
        return ext.fused_ca(y, attn.down.weight, attn.down.bias, attn.up.weight, attn.up.bias, route)

    def _forward_plain(self, x: torch.Tensor, routes: torch.Tensor | None) -> torch.Tensor:
        """Procedure 0 for every sample, the attention fed ``routes`` (None: not routed yet): the plain
        network of step 1, or (given the memories' routes) the routed network right after cloning."""
        y = self.procedures[0](x)
        self.last_routes = routes
        return y if self.attention is None else self.attention(y, routes)
