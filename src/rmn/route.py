"""Route any CNN in place: ``rmn.route(model, stages)`` turns named stages of a model into routed stages.

    net = rmn.route(resnet, ["layer1", "layer2", "layer3", "layer4"], num_procedures=8)
    net = rmn.route(effnet, [["features.1"], ["features.2"], ["features.3"],
                             ["features.4", "features.5"], ["features.6", "features.7", "features.8"]])

Each stage is a named submodule, or a group of consecutive siblings (one stage made of several
children of the same parent, e.g. two ``nn.Sequential`` entries). It is replaced *where it sits* by a
:class:`RoutedStage`: the model's own ``forward`` runs unchanged, and parameter names keep their
prefix (``layer1.weight`` -> ``layer1.procedures.3.weight``). A group's first member becomes the routed
stage (its procedures are ``nn.Sequential`` of the members) and the others become ``nn.Identity``.

The returned model is a deep copy: the caller's model is never modified or shared (``inplace=True``
routes the model itself). Routing an already routed model with one procedure per stage (the plain
network of recipe step 1, ``num_procedures=1``) clones its procedure into N (step 2) and keeps its
attention. What a routed model carries for the rest of rmn is :class:`Routing` (``model.rmn_routing``).

Attention inserted into a trained model (``attention_init="identity"``, the default here) starts as a
near-identity gate: ``W_up = 0`` and its bias 4, so every channel is multiplied by sigmoid(4) = 0.982
whatever the input and route, and a pretrained network's predictions survive the insertion; the gate
then learns as any SE block. ``attention_init="random"`` is PyTorch's default initialisation (gates near
0.5), what the paper's step 1 trains from scratch.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from .attention import ConditionalAttention
from .backbones.base import device_of
from .memory import MemoryBank
from .pooled_bn import check_kind, set_procedure_batchnorm
from .stage import RoutedStage

StageSpec = str | Sequence[str]
ATTENTION_KINDS = ("ca", "se", "none")
ATTENTION_INITS = ("identity", "random")
# bias of the attention's last layer under attention_init="identity": gate sigmoid(4) = 0.982
IDENTITY_GATE_BIAS = 4.0


@dataclass
class Routing:
    """What :func:`route` did to a model, kept on it as ``model.rmn_routing`` (plain data, no tensors).

    ``groups``: the names each stage was made of, in forward order; ``stages``: each stage's module name
    (its group's first member, where the routed stage sits); ``attention``: 'ca', 'se' or None; ``num_procedures``: N (also for a step-1 network, whose
    attention expects N routes); ``stage_channels`` / ``out_channels``: the channels of
    each stage's input (what its memories live in) and output; ``clone_sources``: the name of every
    parameter of the routed model -> the name of the parameter it was cloned from in the source
    (what :func:`rmn.clone_optimizer` uses to copy optimizer state)."""

    groups: list[list[str]]
    stage_channels: list[int]
    out_channels: list[int]
    num_procedures: int
    attention: str | None = None
    clone_sources: dict[str, str] = field(default_factory=dict)

    @property
    def stages(self) -> list[str]:
        return [g[0] for g in self.groups]


def attention_kind(attention: bool | str | None) -> str | None:
    """Normalise the ``attention`` option: True/'ca' = Conditional Attention, 'se' = route-free SE, else None."""
    if attention is True or attention == "ca":
        return "ca"
    if attention == "se":
        return "se"
    if attention is False or attention is None or attention == "none":
        return None
    raise ValueError(f"attention must be true, false, 'ca', 'se' or 'none', got {attention!r}")


def routed_stages(model: nn.Module) -> list[RoutedStage]:
    """The stages of a routed model (:func:`route`) in forward order, unrouted ones (one procedure, no
    memory) included: index ``i`` is stage ``i`` everywhere in rmn."""
    return [model.get_submodule(name) for name in routing_of(model).stages]


def is_routed(model: nn.Module) -> bool:
    """Whether any stage routes (has memories): false for the plain network of step 1 and the baseline."""
    return any(s.routed for s in routed_stages(model))


def num_procedures(model: nn.Module) -> int:
    """The most procedures any stage has (1 for a plain network)."""
    return max(s.num_procedures for s in routed_stages(model))


def set_auto_update(model: nn.Module, on: bool) -> None:
    """Whether routed stages apply their memory update in every training forward (``on``, the default of
    :func:`route`), or leave it to an explicit :func:`update_memories` once per optimizer step (what the
    recipe does: with gradient accumulation or several processes, one update over the whole batch)."""
    for stage in routed_stages(model):
        stage.auto_update = bool(on)


def memory_banks(model: nn.Module) -> list[MemoryBank | None]:
    """The memory of each stage (None for unrouted ones), in stage order."""
    return [s.memory for s in routed_stages(model)]


def reset_load(model: nn.Module) -> None:
    """Zero every memory's count of the samples routed to it (the recipe does so at each epoch's start)."""
    for bank in memory_banks(model):
        if bank is not None:
            bank.reset_load()


def has_routing(model: nn.Module) -> bool:
    """Whether ``model`` was made by :func:`route` (plain network of step 1 included)."""
    return isinstance(getattr(model, "rmn_routing", None), Routing)


def routing_of(model: nn.Module) -> Routing:
    routing = getattr(model, "rmn_routing", None)
    if not isinstance(routing, Routing):
        raise ValueError(f"{type(model).__name__} has not been routed: call rmn.route(model, stages) first")
    return routing


@torch.no_grad()
def update_memories(model: nn.Module, rate: float = 1.0) -> list[tuple[int, int, int]]:
    """Apply the pending memory statistics of every routed stage (once per optimizer step when the
    stages' ``auto_update`` is off), each move scaled by ``rate`` (:meth:`MemoryBank.update`).
    Returns revivals as ``(stage, revived, donor)``."""
    events = []
    for i, bank in enumerate(memory_banks(model)):
        if bank is not None:
            events += [(i, j, donor) for j, donor in bank.update(rate)]
    return events


def last_routes(model: nn.Module) -> torch.Tensor | None:
    """``[S, B]``: the procedure each sample of the last forward took in each stage (-1 where unrouted)."""
    rows = []
    for stage in routed_stages(model):
        rows.append(stage.last_routes)
    known = [r for r in rows if r is not None]
    if not known:
        return None
    fill = torch.full_like(known[0], -1)
    return torch.stack([r if r is not None else fill for r in rows])


def route(
    model: nn.Module,
    stages: Sequence[StageSpec] | None = None,
    num_procedures: int | None = None,
    attention: bool | str | None = "auto",
    *,
    clone: bool = True,
    attention_init: str = "identity",
    attention_reduction: int = 16,
    memory_momentum: float = 0.9,
    memory_options: dict | None = None,
    example_input: torch.Tensor | None = None,
    inplace: bool = False,
    procedure_batchnorm: str = "slice",
) -> nn.Module:
    """A routed copy of ``model``: each of ``stages`` becomes ``num_procedures`` procedures with memories.

    ``stages``: module names (or groups of consecutive sibling names), in the order the model's forward
    runs them; default: the model's ``stage_names`` attribute (rmn's backbones declare theirs).
    ``clone=False`` gives the plain network of recipe step 1: one procedure per stage, attention for
    ``num_procedures`` routes (fed random routes in training), no memories; routing that network again
    (``stages`` default: all of its stages, or a subset) clones its procedures and keeps its attention:
    step 2. ``num_procedures`` default: the step-1 network's N, else 8. ``attention``: 'ca' (Conditional
    Attention), 'se' (route-free SE) or 'none'; default: the step-1 network's, else 'ca'.
    Channel counts come from one eval-mode probe pass on ``example_input`` (default: zeros of
    ``model.in_channels`` or the first convolution's input channels, at ``max(32, model.min_image_size)`` pixels).
    ``memory_options`` go to every :class:`MemoryBank` (update rule, accumulation, revival).
    Memories start at zero (every sample takes procedure 0): set them with :func:`rmn.init_memories`. Each
    routed stage updates its memories in every training forward with gradients on (``auto_update``).
    ``procedure_batchnorm``: "slice" (the paper: each procedure's BatchNorm normalises over its own samples)
    or "pooled" (over the whole batch at each layer, each procedure's own affine: :mod:`rmn.pooled_bn`).
    """
    previous = getattr(model, "rmn_routing", None)
    if num_procedures is None:
        num_procedures = previous.num_procedures if previous is not None else 8
    if isinstance(num_procedures, bool) or not isinstance(num_procedures, int) or num_procedures < 1:
        raise ValueError(f"num_procedures must be an integer >= 1, got {num_procedures!r}")
    check_kind(procedure_batchnorm)
    if attention_init not in ATTENTION_INITS:
        raise ValueError(f"attention_init must be one of {', '.join(ATTENTION_INITS)}, got {attention_init!r}")
    if attention == "auto":
        attention = previous.attention if previous is not None else "ca"
    kind = attention_kind(attention)
    if previous is not None:  # step 2 on the plain network: clone the chosen stages
        if not clone:
            raise ValueError(f"{type(model).__name__} is already routed: clone=False only wraps a plain model")
        groups, chosen = previous.groups, _chosen_stages(previous, stages)
        ins, outs = list(previous.stage_channels), list(previous.out_channels)
    else:
        groups = stage_groups(model, stages)
        chosen = set(range(len(groups)))
    out = model if inplace else copy.deepcopy(model)
    # a routed model's stage sits in its group's first place (the others are Identity)
    members = [[out.get_submodule(name) for name in (group if previous is None else group[:1])] for group in groups]
    if previous is None:
        ins, outs = _declared_channels(model, groups) or _probe_channels(out, members, example_input)
    routing = Routing(groups=[list(g) for g in groups], stage_channels=ins,
                      out_channels=outs, num_procedures=num_procedures, attention=kind)
    for i, (group, mods) in enumerate(zip(groups, members)):
        if previous is not None and i not in chosen:
            stage, sources = mods[0], {p: p for p, _ in mods[0].named_parameters()}
        else:
            source = mods[0] if len(mods) == 1 else nn.Sequential(*mods)
            stage, sources = build_stage(source, num_procedures, clone, kind, ins[i], outs[i], attention_reduction,
                                         attention_init, memory_momentum, memory_options, name=group[0])
            stage.auto_update = True
            replace_stage(out, group, stage)
        for pname, src in sources.items():
            routing.clone_sources[f"{group[0]}.{pname}"] = _source_name(group, src, previous is not None)
    out.rmn_routing = routing
    set_procedure_batchnorm(out, procedure_batchnorm)
    return out.train(model.training)


def _chosen_stages(previous: Routing, stages: Sequence[StageSpec] | None) -> set[int]:
    if stages is None:
        return set(range(len(previous.stages)))
    index = {name: i for i, name in enumerate(previous.stages)}
    chosen = set()
    for spec in stages:
        name = spec if isinstance(spec, str) else (list(spec)[0] if len(spec) else None)
        if name not in index:
            raise ValueError(f"{name!r} is not a stage of this routed model (its stages: {', '.join(previous.stages)})")
        chosen.add(index[name])
    return chosen


def build_stage(
    source: nn.Module,
    num_procedures: int,
    routed: bool,
    kind: str | None,
    in_channels: int,
    out_channels: int,
    reduction: int = 16,
    attention_init: str = "random",
    memory_momentum: float = 0.9,
    memory_options: dict | None = None,
    name: str = "",
) -> tuple[RoutedStage, dict[str, str]]:
    """One stage from ``source`` (a plain module, or an unrouted :class:`RoutedStage` of the step-1 network,
    whose attention is kept): ``routed`` gives ``num_procedures`` copies with a memory bank, else one
    procedure with attention for ``num_procedures`` routes. Returns the stage and, for each of its
    procedure parameters, the name of the source parameter it copies (both relative to the stage)."""
    if isinstance(source, RoutedStage):
        if source.routed and source.num_procedures > 1:
            raise ValueError(f"stage {name} of the source is already routed with {source.num_procedures} procedures")
        proc, prefix, src_attn = source.procedures[0], "procedures.0.", source.attention
    else:
        proc, prefix, src_attn = source, "", None
    device = device_of(proc)
    attn = _attention(kind, src_attn, out_channels, num_procedures, reduction, attention_init, name, device)
    if routed:
        procs = [copy.deepcopy(proc) for _ in range(num_procedures)]
        memory = MemoryBank(num_procedures, in_channels, memory_momentum, **(memory_options or {})).to(device)
    else:
        procs, memory = [proc], None
    sources = {f"procedures.{j}.{p}": prefix + p for j in range(len(procs)) for p, _ in proc.named_parameters()}
    return RoutedStage(procs, memory, attn), sources


def _attention(kind, source, channels, num_routes, reduction, init, name, device) -> ConditionalAttention | None:
    """Reuse the source's attention when it fits the request, else build a fresh one."""
    if kind is None:
        return None
    want_routes = num_routes if kind == "ca" else 0
    if source is not None:
        if source.num_routes != want_routes:
            raise ValueError(
                f"stage {name}: the source's attention expects {source.num_routes} routes, but {want_routes} "
                f"were asked for (num_procedures and attention must match stem training)")
        return source
    attn = ConditionalAttention(channels, want_routes, reduction).to(device)
    if init == "identity":
        with torch.no_grad():
            attn.up.weight.zero_()
            attn.up.bias.fill_(IDENTITY_GATE_BIAS)
    return attn


def as_groups(stages: Sequence[StageSpec]) -> list[list[str]]:
    """Stage specs as lists of names: ``"layer1"`` -> ``["layer1"]``, a group stays a list."""
    return [[s] if isinstance(s, str) else list(s) for s in stages]


def stage_groups(model: nn.Module, stages: Sequence[StageSpec] | None) -> list[list[str]]:
    """``stages`` (default: ``model.stage_names``) as lists of names, checked: every name a submodule, a group's members consecutive children of one parent."""
    if stages is None:
        stages = getattr(model, "stage_names", None)
        if stages is None:
            raise ValueError(f"{type(model).__name__} declares no stage_names: pass stages, e.g. "
                             "['layer1', 'layer2', 'layer3', 'layer4'] for a ResNet")
    if isinstance(stages, str) or not len(stages):
        raise ValueError(f"stages must be a non-empty list of module names (or of lists of names), got {stages!r}")
    groups = as_groups(stages)
    seen: set[str] = set()
    for group in groups:
        if not group or not all(isinstance(n, str) and n for n in group):
            raise ValueError(f"a stage must be a module name or a non-empty list of names, got {group!r}")
        for n in group:
            try:
                model.get_submodule(n)
            except AttributeError:
                raise ValueError(f"{type(model).__name__} has no submodule {n!r} (stages name submodules, "
                                 f"as in model.named_modules())") from None
            if n in seen:
                raise ValueError(f"module {n!r} appears in two stages")
            seen.add(n)
        parents = {n.rpartition(".")[0] for n in group}
        if len(parents) > 1:
            raise ValueError(f"stage {group}: a group's modules must be children of one parent module")
        if len(group) > 1:
            parent = model.get_submodule(group[0].rpartition(".")[0]) if "." in group[0] else model
            order = list(parent._modules)
            pos = [order.index(n.rpartition(".")[2]) for n in group]
            if pos != list(range(pos[0], pos[0] + len(pos))):
                raise ValueError(f"stage {group}: a group's modules must be consecutive children of their parent")
    return groups


def replace_stage(model: nn.Module, group: list[str], stage: nn.Module) -> None:
    """Put ``stage`` where the group's first module sits and ``nn.Identity`` in the others' places."""
    for k, name in enumerate(group):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, stage if k == 0 else nn.Identity())


def _source_name(group: list[str], src: str, from_routed: bool) -> str:
    """The source model's name of a procedure parameter (``src`` is relative to the stage's source)."""
    if from_routed or len(group) == 1:
        return f"{group[0]}.{src}"
    index, _, rest = src.partition(".")  # a group's procedure is nn.Sequential(*members)
    return f"{group[int(index)]}.{rest}"


def _declared_channels(model: nn.Module, groups: list[list[str]]) -> tuple[list[int], list[int]] | None:
    """The channels a backbone declares for its own ``stage_names`` (rmn's backbones do), else None."""
    names = getattr(model, "stage_names", None)
    ins, outs = getattr(model, "stage_channels", None), getattr(model, "out_channels", None)
    if names is None or ins is None or outs is None:
        return None
    if as_groups(names) != groups:
        return None
    return list(ins), list(outs)


class _StopProbe(Exception):
    pass


@torch.no_grad()
def _probe_channels(model: nn.Module, members: list[list[nn.Module]], example_input) -> tuple[list[int], list[int]]:
    """Input and output channels of every stage, read off one eval-mode pass that stops after the last."""
    if example_input is None:
        example_input = _default_input(model)
    ins: list[int | None] = [None] * len(members)
    outs: list[int | None] = [None] * len(members)
    hooks = []

    def on_input(i):
        def hook(_module, args):
            ins[i] = _channels(args[0], i, "input")
        return hook

    def on_output(i, last):
        def hook(_module, _args, output):
            outs[i] = _channels(output, i, "output")
            if last:
                raise _StopProbe
        return hook

    for i, mods in enumerate(members):
        hooks.append(mods[0].register_forward_pre_hook(on_input(i)))
        hooks.append(mods[-1].register_forward_hook(on_output(i, i == len(members) - 1)))
    was_training = model.training
    model.eval()
    try:
        model(example_input.to(device_of(model)))
    except _StopProbe:
        pass
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    missing = [i for i in range(len(members)) if ins[i] is None or outs[i] is None]
    if missing:
        raise ValueError(f"stages {missing} did not run in the model's forward (or ran out of order): "
                         "list the stages in the order the model runs them")
    return ins, outs


def _channels(t, index: int, what: str) -> int:
    if not torch.is_tensor(t) or t.dim() != 4:
        raise ValueError(f"stage {index}'s {what} is not a [B, C, H, W] feature map: only convolutional stages can be routed")
    return int(t.shape[1])


def _default_input(model: nn.Module) -> torch.Tensor:
    channels = getattr(model, "in_channels", None)
    if channels is None:
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None:
            raise ValueError(f"cannot tell the input channels of {type(model).__name__}: pass example_input")
        channels = conv.in_channels
    size = max(32, int(getattr(model, "min_image_size", 1)))
    return torch.zeros(1, channels, size, size)
