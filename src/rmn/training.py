"""The training side of routing: what an optimizer and a training loop need beyond the model.

* :func:`clone_optimizer` -- recipe step 2 for the optimizer: every procedure copy starts with a copy of its
  source parameter's state (momentum), as the paper clones "with the optimizer state";
* :func:`reclone_procedure` -- a revived memory gets its donor's procedure, weights and optimizer state;
* :func:`drop_idle_gradients`, :func:`scale_procedure_gradients` -- per-step gradient bookkeeping;
* :func:`procedure_grad_norms` -- how large each procedure's gradient is (do cloned procedures learn alike?).

The model itself knows nothing of optimizers: these functions take a routed model (:func:`rmn.route`) and
reach its stages through :func:`rmn.routed_stages`.
"""
from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

from .route import routed_stages, routing_of


def _copy_state(state: dict) -> dict:
    return {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in state.items()}


def clone_optimizer(optimizer: torch.optim.Optimizer, source: nn.Module, routed: nn.Module) -> torch.optim.Optimizer:
    """A new optimizer of the same kind over ``routed``'s parameters, each procedure copy starting
    with a copy of its source parameter's state (SGD momentum, RMSprop square averages, Adam moments).

    Parameters with no counterpart in ``source`` (a freshly built attention) start with empty state
    in the first parameter group.
    """
    clone_sources = routing_of(routed).clone_sources
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
            new.state[p] = _copy_state(optimizer.state[src])
    return new


@torch.no_grad()
def reclone_procedure(model: nn.Module, stage: int, target: int, donor: int,
                      optimizer: torch.optim.Optimizer | None = None) -> None:
    """Overwrite procedure ``target`` of stage ``stage`` with a copy of procedure ``donor`` (weights,
    BatchNorm statistics and, given the optimizer, its per-parameter state)."""
    procs = routed_stages(model)[stage].procedures
    procs[target].load_state_dict(procs[donor].state_dict())
    for p in procs[target].parameters():  # gradients of the old weights do not apply to the copy
        p.grad = None
    if optimizer is None:
        return
    for p_t, p_d in zip(procs[target].parameters(), procs[donor].parameters()):
        if p_d in optimizer.state:
            optimizer.state[p_t] = _copy_state(optimizer.state[p_d])
        else:
            optimizer.state.pop(p_t, None)


@torch.no_grad()
def drop_idle_gradients(model: nn.Module) -> None:
    """Clear the gradients of procedures that received no sample (on any rank) in the last memory update.

    They normally have none. With synchronised BatchNorm every procedure runs, even on an empty
    slice, and gets zero gradients; without this, momentum and weight decay would still move it.
    Call after :func:`rmn.update_memories` and before the optimizer step.
    """
    for stage in routed_stages(model):
        counts = stage.memory.last_counts if stage.memory is not None else None
        if counts is None or not stage.run_every_procedure:  # an idle procedure that never ran has no gradient
            continue
        for j in (counts == 0).nonzero().flatten().tolist():
            for p in stage.procedures[j].parameters():
                p.grad = None


@torch.no_grad()
def scale_procedure_gradients(model: nn.Module, factor: float) -> None:
    """Multiply the gradients of every routed stage's procedures by ``factor`` (shared layers and
    attention keep theirs): with SGD, a learning rate ``factor`` times higher for the procedures."""
    for stage in routed_stages(model):
        if stage.memory is None:
            continue
        for p in stage.procedures.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)


@torch.no_grad()
def tie_procedure_gradients(model: nn.Module, untied: float) -> None:
    """Give every procedure of each routed stage ``untied * g_j + (1 - untied) * sum_k g_k``: a mix of its own
    gradient ``g_j`` and the gradient a single, shared stage would receive (the sum over the procedures).

    ``untied = 0`` keeps the procedures tied: they all take the plain network's step and, with the optimizer
    state cloned in step 2, stay copies of each other (with pooled BatchNorm the routed network then trains
    exactly as the plain one). ``untied = 1`` is the paper's routed training. Rising from 0 to 1 after cloning
    (``optim.untie_epochs``), each procedure starts from the shared step and specialises gradually, instead of
    N copies drifting apart at once on their own eighths of the batch (results/value_study/post_clone-*.json).
    Held below 1 (``optim.untie_to``), the shared part keeps pulling the procedures towards one another: the
    own part is about ``untied / N`` of the plain network's gradient and the shared part ``1 - untied`` of it, so
    0.9 weighs them about equally at N = 8.
    A procedure without a gradient (no sample) counts as zero and receives the shared part. Call after
    :func:`drop_idle_gradients` and before any scaling."""
    if untied >= 1.0:
        return
    for stage in routed_stages(model):
        if stage.memory is None or stage.num_procedures < 2:
            continue
        per_procedure = [list(proc.parameters()) for proc in stage.procedures]
        for params in zip(*per_procedure):
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                continue
            shared = torch.stack(grads).sum(0).mul_(1.0 - untied)
            for p in params:
                p.grad = shared.clone() if p.grad is None else p.grad.mul_(untied).add_(shared)


@torch.no_grad()
def procedure_grad_norms(model: nn.Module) -> dict[int, torch.Tensor]:
    """Per routed stage (by its index in :func:`rmn.routed_stages`), ``[N]``: the L2 norm of each procedure's
    gradient over all its parameters, NaN for a procedure without one (it received no sample). Computed
    on the gradients' device without reading them on the host, so it costs no synchronisation."""
    out = {}
    for i, stage in enumerate(routed_stages(model)):
        if stage.memory is None:
            continue
        norms = []
        for proc in stage.procedures:
            grads = [p.grad for p in proc.parameters() if p.grad is not None]
            if grads:  # torch's own clip_grad_norm_ sums per-tensor norms this way (one kernel per dtype/device)
                norms.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float()))
            else:
                norms.append(torch.full((), float("nan"), device=stage.memory.memories.device))
        out[i] = torch.stack(norms)
    return out
