"""Pooled procedure BatchNorm (beyond the paper, off by default): ``procedure_batchnorm="pooled"``.

In the paper each procedure's BatchNorm normalises over the samples routed to it ("slice"): right
after cloning the routed network is no longer the plain one in training mode (each layer now sees
cluster statistics), and a procedure that gets a few samples normalises over a handful of them.
"pooled" normalises every BatchNorm of a stage's procedures with the statistics of the *whole
batch* at that layer, each procedure keeping its own weight and bias: at cloning the routed network
computes exactly what the plain one did, and no statistic comes from a cluster-sized slice.

Procedure j's layer k needs every procedure's input at layer k, but procedures are separate
modules. So in training the used procedures run in lockstep: the procedure is traced once with
``torch.fx`` (all procedures of a stage are copies, so one graph serves them all) and the graph is
run node by node, each node for every procedure in turn. At a BatchNorm node the procedures'
inputs (slices of the batch sorted by route) are concatenated, normalised by one
``F.batch_norm`` in training mode without affine parameters, split back, and each slice gets its
procedure's affine. This is exact: every other node is the procedure's own operation on its own
slice, and at a BatchNorm node the concatenation is the whole batch at that layer, so the
normalisation (and, through autograd, its gradient to every procedure) is the one BatchNorm over
the whole batch computes, up to the order of the batch. It is one thread: autocast, grad mode and
determinism are those of the caller. Running statistics are updated by that call in procedure 0's
layer (as the plain network's layer would be) and copied into every procedure's, so in eval mode
(which runs the usual per-slice dispatch, statistics being per sample then) all procedures of a stage
share them. A BatchNorm left in eval mode inside a training procedure runs as it is.

Limits: a procedure must trace with torch.fx (no control flow on tensor values) and take one input;
the statistics are those of one process (refused under torch.distributed with several processes);
BatchNorm layers' own forward hooks do not fire in pooled training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import distributed

PROCEDURE_BATCHNORMS = ("slice", "pooled")


class Lockstep:
    """A procedure's traced graph, run for several copies of the procedure in lockstep with pooled
    BatchNorm statistics (what a routed stage does in training under ``procedure_batchnorm="pooled"``)."""

    def __init__(self, procedure: nn.Module, name: str = "") -> None:
        self.graph = _trace(procedure, name)
        # values no longer needed after each node (freed as the plain forward would free them)
        self.last_uses: dict[fx.Node, list[fx.Node]] = {}
        seen: set[fx.Node] = set()
        for node in reversed(self.graph.nodes):
            for used in node.all_input_nodes:
                if used not in seen:
                    seen.add(used)
                    self.last_uses.setdefault(node, []).append(used)

    def __deepcopy__(self, memo) -> "Lockstep":
        return self  # the graph names submodules, it holds none: copies of a stage can share it

    def __call__(self, procedures, used: list[int], chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """``[procedures[j](chunk) for j, chunk in zip(used, chunks)]``, each BatchNorm in training mode
        normalising with the statistics of all the chunks together."""
        check_single_process()
        envs: list[dict[fx.Node, object]] = [{} for _ in used]
        mods = [procedures[j] for j in used]
        for node in self.graph.nodes:
            if node.op == "placeholder":  # the input, then any defaulted arguments
                for env, chunk in zip(envs, chunks):
                    env[node] = node.args[0] if env else chunk
            elif node.op == "output":
                return [fx.node.map_arg(node.args[0], env.__getitem__) for env in envs]
            elif node.op == "call_module" and _pooled_norm(procedures[0].get_submodule(node.target)):
                xs = [env[node.args[0]] for env in envs]
                ys = _pooled_batch_norm([p.get_submodule(node.target) for p in procedures], used, xs)
                for env, y in zip(envs, ys):
                    env[node] = y
            else:
                for env, mod in zip(envs, mods):
                    env[node] = _run_node(node, mod, env)
            for done in self.last_uses.get(node, ()):
                for env in envs:
                    env.pop(done, None)
        raise AssertionError("a traced graph ends with an output node")


def check_single_process() -> None:
    if distributed.is_distributed():
        raise ValueError("procedure_batchnorm='pooled' pools statistics over one process's batch: it does not run "
                         f"under torch.distributed with {distributed.world_size()} processes (use 'slice')")


def set_procedure_batchnorm(model: nn.Module, kind: str) -> nn.Module:
    """How the routed stages of ``model`` (:func:`rmn.route`) normalise inside their procedures in training:
    "slice" (the paper: over each procedure's samples) or "pooled" (over the whole batch at each layer,
    each procedure's own affine). Returns ``model``."""
    from .route import routing_of, routed_stages

    check_kind(kind)
    for name, stage in zip(routing_of(model).stages, routed_stages(model)):
        pooled = kind == "pooled" and stage.routed
        stage.lockstep = Lockstep(stage.procedures[0], name) if pooled else None
    return model


def check_kind(kind: str) -> None:
    if kind not in PROCEDURE_BATCHNORMS:
        raise ValueError(f"procedure_batchnorm must be one of {', '.join(PROCEDURE_BATCHNORMS)}, got {kind!r}")


def procedure_batchnorm(model: nn.Module) -> str:
    """"pooled" when any routed stage of ``model`` pools its procedures' BatchNorm statistics, else "slice"."""
    from .route import routed_stages

    return "pooled" if any(s.lockstep is not None for s in routed_stages(model)) else "slice"


def _trace(procedure: nn.Module, name: str) -> fx.Graph:
    modes = {m: m.training for m in procedure.modules()}
    procedure.train()  # the graph is only run in training: trace that branch of any `if self.training`
    try:
        graph = fx.Tracer().trace(procedure)
    except Exception as e:  # whatever the procedure's forward raised on proxies
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"procedure_batchnorm='pooled': stage {name or type(procedure).__name__} does not trace "
                         f"with torch.fx ({type(e).__name__}: {first}); use 'slice'") from None
    finally:
        for m, mode in modes.items():
            m.training = mode
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1 and any(not n.args for n in inputs[1:]):
        raise ValueError(f"procedure_batchnorm='pooled': stage {name}'s procedure takes more than one input")
    functional = [n for n in graph.nodes if n.op == "call_function" and n.target in (F.batch_norm, torch.batch_norm)]
    if functional:
        raise ValueError(f"procedure_batchnorm='pooled': stage {name} calls batch_norm as a function ({functional[0].name}); "
                         "only BatchNorm modules can be pooled (use 'slice')")
    return graph


def _pooled_norm(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm) and (module.training or not module.track_running_stats)


def _pooled_batch_norm(norms: list[_BatchNorm], used: list[int], xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """One BatchNorm layer across procedures: ``norms[j]`` is procedure j's layer, ``xs`` the inputs of
    the procedures ``used``. Normalised over all of ``xs``; each output gets its own procedure's affine."""
    shared = norms[0]
    x = torch.cat(xs) if len(xs) > 1 else xs[0]
    stats = shared.track_running_stats
    if stats:
        shared.num_batches_tracked.add_(1)
    momentum = shared.momentum if shared.momentum is not None else 1.0 / float(shared.num_batches_tracked)
    y = F.batch_norm(x, shared.running_mean if stats else None, shared.running_var if stats else None,
                     None, None, True, momentum if stats else 0.0, shared.eps)
    if stats:
        with torch.no_grad():
            for other in norms[1:]:
                other.running_mean.copy_(shared.running_mean)
                other.running_var.copy_(shared.running_var)
                other.num_batches_tracked.copy_(shared.num_batches_tracked)
    ys = y.split([t.shape[0] for t in xs]) if len(xs) > 1 else [y]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return [_affine(yj, norms[j], shape) for j, yj in zip(used, ys)]


def _affine(y: torch.Tensor, norm: _BatchNorm, shape: tuple[int, ...]) -> torch.Tensor:
    if not norm.affine:
        return y
    # in the output's dtype, as BatchNorm returns it (bfloat16 under autocast)
    return torch.addcmul(norm.bias.to(y.dtype).view(shape), y, norm.weight.to(y.dtype).view(shape))


def _run_node(node: fx.Node, module: nn.Module, env: dict) -> object:
    args = fx.node.map_arg(node.args, env.__getitem__)
    kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
    if node.op == "call_module":
        return module.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "get_attr":
        obj = module
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj
    raise AssertionError(f"unknown fx node kind {node.op}")
