"""What routed epochs measure beyond loss and loads, for a study of how routing learns. Always on: on
the Fashion study's network the gradient norms cost about 1% of a training step's CPU time and the route
flips a few milliseconds per evaluation (``benchmarks/measures_cost.py``).

* ``grad_norm_stage{i}``: per procedure of routed stage ``i``, the mean over the epoch's optimizer steps of
  the L2 norm of the gradient the optimizer step receives (unscaled, after ``optim.procedure_grad_scale``).
  The mean is over the steps in which the procedure had a gradient (received a sample), leaving out steps
  the fp16 scaler skipped; a procedure that received no sample all epoch gets 0.
* ``route_flips_stage{i}``: the fraction of evaluation samples whose procedure in stage ``i`` changed since
  the previous evaluation (the evaluation set and its order are fixed). Absent at a stage's first routed
  evaluation. The previous routes travel in the checkpoint (``extra["eval_routes"]``), so a resumed run
  logs what an uninterrupted one does.
"""
from __future__ import annotations

import base64
import zlib

import numpy as np
import torch

from .. import distributed


class GradNormMeans:
    """An epoch's per-procedure gradient-norm sums and counts, kept on the device."""

    def __init__(self) -> None:
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, torch.Tensor] = {}

    def add(self, norms: dict[int, torch.Tensor]) -> None:
        """One step's :func:`rmn.training.procedure_grad_norms` (NaN: no gradient; inf: an fp16 overflow)."""
        for i, n in norms.items():
            ok = torch.isfinite(n)
            s = torch.where(ok, n, torch.zeros_like(n)).double()
            self.sums[i] = self.sums[i] + s if i in self.sums else s
            self.counts[i] = self.counts[i] + ok.long() if i in self.counts else ok.long()

    def row(self) -> dict:
        """``grad_norm_stage{i}``: the per-procedure means (0 where a procedure had no gradient)."""
        out = {}
        for i in sorted(self.sums):
            means = (self.sums[i] / self.counts[i].clamp(min=1)).tolist()
            out[f"grad_norm_stage{i}"] = [float(f"{m:.6g}") for m in means]
        return out


def route_flips(previous: dict[int, torch.Tensor], current: dict[int, torch.Tensor]) -> dict[str, float]:
    """``route_flips_stage{i}`` for every stage routed in both evaluations (over all ranks): the share of
    samples whose procedure differs between ``previous[i]`` and ``current[i]`` (per-sample routes, in order)."""
    stages = [i for i in sorted(current) if i in previous and previous[i].shape == current[i].shape]
    if not stages:
        return {}
    device = current[stages[0]].device  # collectives want the evaluation's device (NCCL: the GPU)
    counts = torch.stack([torch.stack([(previous[i].to(device) != current[i]).sum().double(),
                                       torch.tensor(float(current[i].numel()), dtype=torch.float64, device=device)])
                          for i in stages])
    distributed.all_reduce_sum(counts)
    counts = counts.tolist()
    return {f"route_flips_stage{i}": float(c[0] / c[1]) if c[1] else 0.0 for i, c in zip(stages, counts)}


def encode_routes(routes: dict[int, torch.Tensor]) -> dict:
    """Per-sample routes as JSON-safe text for a checkpoint's metadata (int16, zlib, base64: a few bytes per
    sample and stage)."""
    return {str(i): base64.b64encode(zlib.compress(r.to(torch.int16).cpu().numpy().tobytes())).decode("ascii")
            for i, r in routes.items()}


def decode_routes(data: dict) -> dict[int, torch.Tensor]:
    return {int(i): torch.from_numpy(np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.int16).astype(np.int64))
            for i, text in data.items()}


def remember_routes(extra: dict, routes: dict[int, torch.Tensor]) -> None:
    """Store this evaluation's routes of every rank (each evaluates its own shard) in ``extra``."""
    extra["eval_routes"] = {"world_size": distributed.world_size(),
                            "ranks": distributed.all_gather_object(encode_routes(routes))}


def remembered_routes(extra: dict) -> dict[int, torch.Tensor]:
    """This rank's routes of the previous evaluation, from ``extra``; empty when there was none (or the
    run resumed with another number of processes, whose shards differ)."""
    saved = extra.get("eval_routes")
    if not saved or saved.get("world_size") != distributed.world_size():
        return {}
    return decode_routes(saved["ranks"][distributed.rank()])
