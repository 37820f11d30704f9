"""The Routing-by-Memory Network and procedure cloning (recipe step 2).

``RoutedNetwork`` = shared stem -> routed stages -> shared head. It is built from any module that
exposes ``stem``, ``stages`` and ``head`` (every :mod:`rmn.backbones` model, or a user's own CNN):

    stem_net = RoutedNetwork.from_backbone(backbone, num_procedures=8, attention=True, routed_stages=())
    ...train stem_net (step 1; attention gets random routes)...
    rmn_net = RoutedNetwork.from_backbone(stem_net, num_procedures=8)     # step 2: clone
    optimizer = clone_optimizer(optimizer, stem_net, rmn_net)            # momentum comes along

The stem, head, attention modules and unrouted stages are shared with the source (same objects);
each routed stage's procedures are N deep copies of the source stage, BatchNorm statistics included.
"""
from __future__ import annotations

import copy
import inspect
from typing import Iterable

import torch
from torch import nn

from . import features
from .backbones.base import check_image_input
from .memory import MemoryBank
from .route import attention_kind, build_stage
from .stage import RoutedStage


class RoutedNetwork(nn.Module):
    def __init__(
        self,
        stem: nn.Module,
        stages: Iterable[RoutedStage],
        head: nn.Module,
        in_channels: int,
        min_image_size: int = 1,
        stage_channels: list[int] | None = None,
        out_channels: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.head = head
        self.in_channels = in_channels
        self.min_image_size = min_image_size
        self.stage_channels = list(stage_channels or [])
        self.out_channels = list(out_channels or [])
        self.last_routes: torch.Tensor | None = None
        # name of each parameter here -> name of the parameter it was cloned from (or is) in the source.
        self.clone_sources: dict[str, str] = {}
        self.auto_update = True

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_input(x, self.in_channels, self.min_image_size)
        h = self.stem(x)
        routes = []
        for stage in self.stages:
            h = stage(h)
            r = stage.last_routes
            routes.append(r if r is not None else torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device))
        self.last_routes = torch.stack(routes) if routes else None
        return self.head(h)

    @property
    def auto_update(self) -> bool:
        """Whether the routed stages update their memories in every training forward with gradients on
        (see :func:`rmn.route.set_auto_update`); off, :meth:`update_memories` applies them."""
        return all(s.auto_update for s in self.stages)

    @auto_update.setter
    def auto_update(self, on: bool) -> None:
        for s in self.stages:
            s.auto_update = bool(on)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_backbone(
        cls,
        backbone: nn.Module,
        num_procedures: int = 8,
        attention: bool | str | None = True,
        routed_stages: Iterable[int] | None = None,
        memory_momentum: float = 0.9,
        attention_reduction: int = 16,
        example_input: torch.Tensor | None = None,
        memory_options: dict | None = None,
    ) -> "RoutedNetwork":
        """Clone each stage of ``backbone`` into ``num_procedures`` procedures with memory heads.

        ``backbone`` is a plain backbone (``stem``/``stages``/``head``) or an unrouted
        ``RoutedNetwork`` (the trained stem network: its attention modules are kept).
        ``routed_stages``: indices of the stages to route (default all; ``()`` routes none, which
        gives the stem network). ``attention``: True/'ca', 'se' (no route input) or False.
        ``example_input`` is only needed for a user's CNN that does not declare its channel counts.
        ``memory_options`` go to every :class:`MemoryBank` (update rule, accumulation, revival).
        """
        if not isinstance(num_procedures, int) or num_procedures < 1:
            raise ValueError(f"num_procedures must be an integer >= 1, got {num_procedures!r}")
        for attr in ("stem", "stages", "head"):
            if not hasattr(backbone, attr):
                raise ValueError(f"cannot route {type(backbone).__name__}: it has no '{attr}' (needs stem, stages, head)")
        kind = attention_kind(attention)
        num_stages = len(backbone.stages)
        routed = set(range(num_stages) if routed_stages is None else routed_stages)
        bad = sorted(i for i in routed if not 0 <= i < num_stages)
        if bad:
            raise ValueError(f"routed_stages {bad} out of range: the backbone has {num_stages} stages (0..{num_stages - 1})")
        stage_channels, out_channels = _channels(backbone, example_input)
        in_channels = getattr(backbone, "in_channels", None)
        if in_channels is None:
            if example_input is None:
                raise ValueError("the backbone declares no in_channels: pass example_input")
            in_channels = example_input.shape[1]

        source_name = {id(p): n for n, p in backbone.named_parameters()}  # the source's own names, whatever its layout
        stages, sources = [], {}
        for i, src_stage in enumerate(backbone.stages):
            stage, relative = build_stage(src_stage, num_procedures, i in routed, kind, stage_channels[i], out_channels[i],
                                          attention_reduction, "random", memory_momentum, memory_options, name=str(i))
            stages.append(stage)
            for k, v in relative.items():  # the stage view's names -> the source's own (layer1.0.conv1.weight)
                src = source_name.get(id(src_stage.get_parameter(v)))
                if src is not None:
                    sources[f"stages.{i}.{k}"] = src
        net = cls(
            backbone.stem,
            stages,
            backbone.head,
            in_channels=in_channels,
            min_image_size=getattr(backbone, "min_image_size", 1),
            stage_channels=stage_channels,
            out_channels=out_channels,
        )
        for name, param in net.named_parameters():  # shared with the source (stem, head, attention)
            if name not in sources and id(param) in source_name:
                sources[name] = source_name[id(param)]
        net.clone_sources = sources
        if hasattr(backbone, "info"):
            net.info = backbone.info
        return net.train(backbone.training)


def _channels(backbone: nn.Module, example_input: torch.Tensor | None) -> tuple[list[int], list[int]]:
    """Stage input/output channels: declared by the backbone, or read off one forward pass."""
    declared_in = getattr(backbone, "stage_channels", None)
    declared_out = getattr(backbone, "out_channels", None)
    if declared_in and declared_out:
        return list(declared_in), list(declared_out)
    if example_input is None:
        raise ValueError(
            f"{type(backbone).__name__} does not declare stage_channels/out_channels: pass example_input"
        )
    ins, outs = [], []
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        h = backbone.stem(example_input)
        for stage in backbone.stages:
            ins.append(h.shape[1])
            h = stage(h)
            outs.append(h.shape[1])
    backbone.train(was_training)
    return ins, outs
