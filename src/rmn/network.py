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
        # Apply memory updates at the end of every training forward. The recipe turns this off and
        # calls update_memories() once per optimizer step (gradient accumulation).
        self.auto_update = True
        self.last_routes: torch.Tensor | None = None
        # name of each parameter here -> name of the parameter it was cloned from (or is) in the source.
        self.clone_sources: dict[str, str] = {}

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
        if self.training and self.auto_update:
            self.update_memories()
        return self.head(h)

    # -- memories ----------------------------------------------------------------------------
    def memory_banks(self) -> list[MemoryBank | None]:
        """The memory of each stage (None for unrouted stages), in stage order."""
        return [s.memory for s in self.stages]

    @torch.no_grad()
    def update_memories(self) -> list[tuple[int, int, int]]:
        """Apply the pending memory updates of every routed stage.

        Returns the memory revivals of this step as ``(stage, revived, donor)`` (empty unless
        revival is switched on); :meth:`reclone_procedure` gives a revived memory its donor's procedure.
        """
        events = []
        for i, bank in enumerate(self.memory_banks()):
            if bank is not None:
                events += [(i, j, donor) for j, donor in bank.update()]
        return events

    @torch.no_grad()
    def reclone_procedure(self, stage: int, target: int, donor: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Overwrite procedure ``target`` of a stage with a copy of procedure ``donor`` (weights,
        BatchNorm statistics and, given the optimizer, its per-parameter state)."""
        procs = self.stages[stage].procedures
        procs[target].load_state_dict(procs[donor].state_dict())
        for p in procs[target].parameters():  # gradients of the old weights do not apply to the copy
            p.grad = None
        if optimizer is None:
            return
        for p_t, p_d in zip(procs[target].parameters(), procs[donor].parameters()):
            if p_d in optimizer.state:
                optimizer.state[p_t] = {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in optimizer.state[p_d].items()}
            else:
                optimizer.state.pop(p_t, None)

    @torch.no_grad()
    def drop_idle_gradients(self) -> None:
        """Clear the gradients of procedures that received no sample (on any rank) in the last update.

        They normally have none. With synchronised BatchNorm every procedure runs, even on an empty
        slice, and gets zero gradients; without this, momentum and weight decay would still move it.
        Call after :meth:`update_memories` and before the optimizer step.
        """
        for stage in self.stages:
            counts = stage.memory.last_counts if stage.memory is not None else None
            if counts is None or not stage.run_every_procedure:  # an idle procedure that never ran has no gradient
                continue
            for j in (counts == 0).nonzero().flatten().tolist():
                for p in stage.procedures[j].parameters():
                    p.grad = None

    def scale_procedure_gradients(self, factor: float) -> None:
        """Multiply the gradients of every routed stage's procedures by ``factor`` (shared layers and
        attention keep theirs): with SGD, a learning rate ``factor`` times higher for the procedures."""
        for stage in self.stages:
            if stage.memory is None:
                continue
            for p in stage.procedures.parameters():
                if p.grad is not None:
                    p.grad.mul_(factor)

    def reset_load(self) -> None:
        for bank in self.memory_banks():
            if bank is not None:
                bank.reset_load()

    @property
    def routed(self) -> bool:
        return any(s.routed for s in self.stages)

    def stage_inputs(self, x: torch.Tensor, as_stem: bool = False) -> list[torch.Tensor]:
        """The GAP'd input [B, C_i] of every stage for a batch (what the memories compare with).

        ``as_stem=True`` computes them as the stem network would: procedure 0 everywhere and the
        attention's not-yet-routed input. Right after cloning every procedure of a stage is the same,
        so this one pass gives the features recipe step 3 clusters, before any memory exists.
        The pass is :func:`rmn.features.stage_inputs` (path ``"stem"``, or ``"routed"``).
        """
        check_image_input(x, self.in_channels, self.min_image_size)
        return features.stage_inputs(self, x, "stem" if as_stem else "routed")

    @property
    def num_procedures(self) -> int:
        return max(s.num_procedures for s in self.stages)

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


def clone_optimizer(optimizer: torch.optim.Optimizer, source: nn.Module, routed: nn.Module) -> torch.optim.Optimizer:
    """A new optimizer of the same kind over ``routed``'s parameters, each procedure copy starting
    with a copy of its source parameter's state (SGD momentum, RMSprop square averages, Adam moments).

    Parameters with no counterpart in ``source`` (a freshly built attention) start with empty state
    in the first parameter group.
    """
    routing = getattr(routed, "rmn_routing", None)  # a model routed by rmn.route, or a RoutedNetwork
    clone_sources = routing.clone_sources if routing is not None else routed.clone_sources
    src_params = dict(source.named_parameters())
    group_of = {id(p): gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": []} for g in optimizer.param_groups]
    pairs = []
    for name, p in routed.named_parameters():
        src = src_params.get(clone_sources.get(name, name))
        gi = group_of.get(id(src), 0) if src is not None else 0
        groups[gi]["params"].append(p)
        pairs.append((p, src))
    accepted = inspect.signature(type(optimizer).__init__).parameters
    new = type(optimizer)([g for g in groups if g["params"]], **{k: v for k, v in optimizer.defaults.items() if k in accepted})
    new.defaults = dict(optimizer.defaults)
    for p, src in pairs:
        if src is not None and src in optimizer.state:
            new.state[p] = {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in optimizer.state[src].items()}
    return new
