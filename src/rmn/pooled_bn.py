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
inputs (slices of the batch sorted by route) are normalised with the mean and variance of all of
them together (per-slice statistics combined exactly), each slice with its procedure's affine, and
the backward (:class:`_PooledNorm`) is BatchNorm's over the whole batch, gradients through the
statistics reaching every procedure. This is exact: every other node is the procedure's own
operation on its own slice, and at a BatchNorm node the function and its gradient are those of one
BatchNorm over the whole batch at that layer (tests/test_pooled_bn.py checks both against the plain
network at cloning and against a reference written out). It runs in the caller's thread: autocast,
grad mode and determinism are the caller's, and an exception in a procedure propagates as usual.
Every procedure's running statistics take the step the whole batch's statistics give (the idle
procedures' too), so procedures cloned together keep sharing them; eval mode runs the usual
per-slice dispatch (running statistics are per sample). A BatchNorm left in eval mode inside a
training procedure runs as it is. The cost: 1.2-1.3x the slice BatchNorm's training step on the
Fashion study's network on one CPU thread (``benchmarks/pooled_bn.py``).

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
from .syncbn import track_running_stats

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
    the procedures ``used``. Normalised over all of ``xs``; each output gets its own procedure's affine;
    every procedure's running statistics take the step the whole batch's would."""
    taking = [i for i, x in enumerate(xs) if x.shape[0] > 0]  # empty slices (run_empty) take no part
    if not taking:
        return list(xs)
    layer = [norms[used[i]] for i in taking]
    affine = norms[0].affine
    ws = [bn.weight if affine else None for bn in layer]
    bs = [bn.bias if affine else None for bn in layer]
    out = _PooledNorm.apply(norms[0].eps, len(taking), *(xs[i] for i in taking), *ws, *bs)
    mean, var = out[-2], out[-1]
    count = sum(x.numel() for x in xs) // xs[0].shape[1]
    for bn in norms:
        track_running_stats(bn, mean, var, count)
    ys = list(xs)
    for i, y in zip(taking, out[: len(taking)]):
        ys[i] = y
    return ys


class _PooledNorm(torch.autograd.Function):
    """BatchNorm of the slices ``x_1..x_k`` with the statistics of all of them together, slice j with its own
    ``(w_j, b_j)``, without concatenating them: per-slice statistics combined exactly, then one fused
    eval-mode BatchNorm kernel per slice with the pooled statistics. The backward is BatchNorm's over the
    whole batch: the per-slice eval-mode backward gives ``dy * w_j / sigma`` and the per-slice sums
    ``sum(dy)``, ``sum(dy * xhat)``, from which the terms through the statistics follow,
    ``dx -= (sum_j w_j sum(dy) + xhat * sum_j w_j sum(dy * xhat)) / (n sigma)``, summed in procedure order.
    Also returns the pooled mean and biased variance (no gradient), for the running statistics."""

    @staticmethod
    def forward(ctx, eps: float, k: int, *tensors):
        xs, ws, bs = tensors[:k], tensors[k : 2 * k], tensors[2 * k :]
        low = xs[0].dtype in (torch.float16, torch.bfloat16)
        stat_dtype = torch.float32 if low else xs[0].dtype
        dims = [0] + list(range(2, xs[0].dim()))
        counts = [x.numel() // x.shape[1] for x in xs]
        n = sum(counts)
        # per-slice mean and variance, combined exactly (in float64, in procedure order)
        means, vars_ = (torch.stack(t).double() for t in zip(*(_mean_var(x, dims, stat_dtype) for x in xs)))
        share = torch.tensor([c / n for c in counts], dtype=torch.float64, device=means.device)[:, None]
        mean = (share * means).sum(0)
        var = (share * (vars_ + (means - mean) ** 2)).sum(0)
        mean, var = mean.to(stat_dtype), var.to(stat_dtype)
        ones = torch.ones_like(mean)
        ws = [w if w is not None else ones for w in ws]
        ys = [F.batch_norm(x, mean, var, w, b, False, 0.0, eps) for x, w, b in zip(xs, ws, bs)]
        ctx.eps, ctx.k, ctx.n = eps, k, n
        ctx.affine = [w is not ones for w in ws]
        ctx.save_for_backward(mean, var, *xs, *ws)
        ctx.mark_non_differentiable(mean, var)
        return (*ys, mean, var)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        mean, var, *rest = ctx.saved_tensors
        k = ctx.k
        xs, ws = rest[:k], rest[k:]
        invstd = torch.rsqrt(var + ctx.eps)
        dxs, dws, dbs = [], [], []
        for x, w, dy in zip(xs, ws, grads[:k]):
            dy = torch.zeros_like(x) if dy is None else dy
            dx, dw, db = torch.ops.aten.native_batch_norm_backward(dy, x, w, mean, var, None, None, False, ctx.eps,
                                                                   [True, True, True])
            dxs.append(dx)
            dws.append(dw)
            dbs.append(db)
        w = torch.stack(ws)
        g_sum = (w * torch.stack(dbs)).sum(0)  # sum_j w_j sum(dy_j)
        gx_sum = (w * torch.stack(dws)).sum(0)  # sum_j w_j sum(dy_j xhat_j)
        # dx_j -= invstd / n * (g_sum + xhat_j * gx_sum), xhat_j = (x_j - mean) * invstd: an affine map of x_j
        alpha = -gx_sum * invstd * invstd / ctx.n
        beta = -(g_sum * invstd / ctx.n) - alpha * mean
        shape = (1, -1) + (1,) * (xs[0].dim() - 2)
        dxs = [dx.addcmul_(x, alpha.view(shape)).add_(beta.view(shape)) for dx, x in zip(dxs, xs)]
        dws = [dw if a else None for dw, a in zip(dws, ctx.affine)]
        dbs = [db if a else None for db, a in zip(dbs, ctx.affine)]
        return (None, None, *dxs, *dws, *dbs)


def _mean_var(x: torch.Tensor, dims: list[int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of one slice, in two passes (accurate, and several times faster
    on CPU than ``torch.var_mean`` over the batch and spatial dimensions)."""
    mean = x.mean(dims, dtype=dtype)
    centred = x - mean.view((1, -1) + (1,) * (x.dim() - 2))
    return mean, (centred * centred).mean(dims)


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
