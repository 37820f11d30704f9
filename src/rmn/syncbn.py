"""Synchronised BatchNorm for routed networks, on any backend (gloo on CPU, NCCL on GPUs).

The paper synchronises BatchNorm across GPUs. With routing, each procedure's BatchNorm then
normalises over *its* samples of all ranks. torch's ``SyncBatchNorm`` only runs on GPUs, so this
module all-reduces per-channel sums, squared sums and counts with the differentiable
``torch.distributed.nn.all_reduce`` (gradients flow back through the statistics, as in
SyncBatchNorm). A procedure with no sample on some rank must still take part in the collective,
so converting a network also makes its routed stages run every procedure, empty slices included.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from . import distributed


# torch 2.13 deprecates the autograd-aware all_reduce in favour of functional collectives that
# carry no autograd formula; the gradient through the statistics needs the former.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated")


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the whole process group."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and distributed.is_distributed()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        n_local = x.numel() // c if c else 0
        local = torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), x.new_full((1,), float(n_local))])
        total = all_reduce(local.double())
        n = total[-1]
        count = float(n.detach())
        if count == 0:  # nobody had a sample for this procedure: nothing to normalise or track
            return x
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean * mean).clamp_min(0)
        track_running_stats(self, mean, var, count)
        scale = torch.rsqrt(var + self.eps).to(x.dtype)
        y = (x - mean.to(x.dtype)[None, :, None, None]) * scale[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


@torch.no_grad()
def track_running_stats(bn: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
    """What BatchNorm does with its running statistics in a training forward, given the batch's per-channel mean
    and (biased) variance over ``count`` values: nothing when it keeps none, else one momentum step (or a
    cumulative average when its momentum is None) towards the mean and the unbiased variance."""
    if not bn.track_running_stats:
        return
    bn.num_batches_tracked += 1
    m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    unbiased = var * (count / max(count - 1, 1))
    bn.running_mean.mul_(1 - m).add_(m * mean.detach().to(bn.running_mean.dtype))
    bn.running_var.mul_(1 - m).add_(m * unbiased.detach().to(bn.running_var.dtype))


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by :class:`GlobalBatchNorm2d` (weights and statistics kept) and make
    routed stages run all their procedures, so the collectives line up on every rank."""
    for name, child in list(model.named_children()):
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.to(next(child.buffers()).device if list(child.buffers()) else "cpu")
            setattr(model, name, new)
        else:
            convert_sync_batchnorm(child)
    for m in model.modules():
        if hasattr(m, "run_every_procedure"):
            m.run_every_procedure = True
    return model
