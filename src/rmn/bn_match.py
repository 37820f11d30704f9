"""Statistics-matched cloning (beyond the paper, off by default): each procedure's BatchNorm starts
on the statistics of its own cluster.

Right after steps 2 and 3 every procedure is a copy of its stage. In training mode the plain
network normalised each layer over the whole batch; the routed one normalises each procedure over
the samples routed to it, one cluster of the stage input, whose per-channel mean and variance are
not the whole batch's. The function changes and the first routed epoch is spent re-learning it
(``benchmarks/clone_shift.py`` measures the jump). Matching re-expresses the plain network's
training-mode function in cluster statistics. For every BatchNorm of procedure j, with ``(mu, sigma)``
the statistics of its input over all samples and ``(mu_j, sigma_j)`` over cluster j, both measured
with the plain network in training mode:

    gamma_j = gamma * sigma_j / sigma,   beta_j = beta + gamma * (mu_j - mu) / sigma,
    running statistics <- (mu_j, sigma_j^2)

so that ``gamma_j (x - mu_j) / sigma_j + beta_j = gamma (x - mu) / sigma + beta``. In training mode a
sub-batch of cluster j brings its own ``mu_j, sigma_j``: the function is kept up to sampling noise.
In eval mode the network becomes the plain one with its running statistics re-estimated on the data
("precise BatchNorm"), which is what the running averages were estimating.
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from . import distributed
from .features import walk_stages
from .route import routed_stages


def _norms(module: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


@torch.no_grad()
def match_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], min_samples: int = 2) -> int:
    """Match the procedures' BatchNorm layers of a freshly cloned routed model to their clusters.

    ``batches`` are input images (the un-augmented training set, as step 3 uses); samples are
    assigned to clusters by the memories, so call this once they are initialised. The statistics
    come from a training-mode pass of the plain network (procedure 0 of every stage, Conditional
    Attention fed the memories' routes, on a copy: the model's running statistics are not touched by
    the pass) and are summed over all processes under torch.distributed. A procedure whose cluster got fewer than ``min_samples`` samples, and layers
    without affine parameters, are left as they are. Returns the number of layers matched.
    """
    stages = routed_stages(model)
    routed = [i for i, s in enumerate(stages) if s.memory is not None]
    if not routed:
        return 0
    plain = copy.deepcopy(model).train()
    plain_norms = {(i, k): bn for i in routed for k, bn in enumerate(_norms(routed_stages(plain)[i].procedures[0]))}
    # per routed stage and layer of procedure 0: [N, 3, C] sums of (count, x, x^2) per cluster
    sums = {key: torch.zeros(stages[key[0]].num_procedures, 3, bn.num_features, dtype=torch.float64,
                             device=bn.running_mean.device) for key, bn in plain_norms.items()}
    routes: dict[str, torch.Tensor] = {}

    def recorder(key):
        def record(bn: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().double()
            r = routes["now"]
            s = sums[key]
            per_sample = x.flatten(2)  # [B, C, HW]
            s[:, 0].index_add_(0, r, torch.full_like(per_sample[:, :, 0], per_sample.shape[2]))
            s[:, 1].index_add_(0, r, per_sample.sum(2))
            s[:, 2].index_add_(0, r, per_sample.pow(2).sum(2))
        return record

    hooks = [bn.register_forward_pre_hook(recorder(key)) for key, bn in plain_norms.items()]
    try:
        for x in batches:
            # the plain network (procedure 0 for every sample), Conditional Attention fed the routes
            # the routed network will use: the "cloned" path of the feature pass
            walk_stages(plain, x, "cloned", visit=lambda item: routes.__setitem__("now", item.routes))
    finally:
        for hook in hooks:
            hook.remove()
    keys = sorted(sums)  # the same order on every rank
    flat = torch.cat([sums[k].flatten() for k in keys])
    distributed.all_reduce_sum(flat)
    procedure_norms = {i: [_norms(proc) for proc in stages[i].procedures] for i in routed}
    matched = 0
    for (i, k), stats in zip(keys, flat.split([sums[key].numel() for key in keys])):
        stats = stats.view(sums[(i, k)].shape)
        _, mu, var = _moments(stats.sum(0))  # over all clusters: what the whole-batch statistics estimated
        for j, norms in enumerate(procedure_norms[i]):
            bn = norms[k]
            count, mu_j, var_j = _moments(stats[j])
            if count < min_samples or not bn.affine:
                continue
            sigma = (var + bn.eps).sqrt()
            sigma_j = (var_j + bn.eps).sqrt()
            gamma = bn.weight.double()
            bn.bias.copy_(bn.bias.double() + gamma * (mu_j - mu) / sigma)
            bn.weight.copy_(gamma * sigma_j / sigma)
            bn.running_mean.copy_(mu_j)
            bn.running_var.copy_(var_j)
            matched += 1
    return matched


def _moments(stats: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Count, mean and unbiased variance (as BatchNorm keeps running_var) from [count, sum, sum of squares]."""
    count = float(stats[0, 0])
    mean = stats[1] / max(count, 1.0)
    var = ((stats[2] - count * mean * mean) / max(count - 1, 1.0)).clamp_min(0)
    return count, mean, var
