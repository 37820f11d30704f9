"""Gradient accumulation: 4 micro-batches of 64 update the memories like one batch of 256.

The memory update of a step is ``m_j <- a m_j + (1 - a) mean{f : f routed to j}`` over the samples
of the *whole* optimizer step, with every sample routed by the memories as they were before the
step. With accumulation the recipe must sum features and counts over the micro-batches and update
once, not once per micro-batch (which would apply the momentum four times and route later
micro-batches with already-moved memories).

Why two tests. In a real ResNet the features a memory sees depend on BatchNorm in training mode,
which normalises each *micro*-batch with its own statistics, so the stage inputs of a 4 x 64 step are
not those of a 1 x 256 step (and stage 1+ inputs also depend on the procedures' BatchNorms). Comparing
two such runs could only be approximate, and a loose tolerance would also accept the wrong update.
So:

1. ``test_accumulated_step_matches_the_update_over_all_collected_features``: the real recipe on a
   ResNet-18 with BatchNorm, batch 256 as 4 x 64. Forward pre-hooks record exactly the GAP'd inputs
   each routed stage saw in the four micro-batches; the expected memories are computed from those
   256 features and the pre-step memories, independently of the library. Exact up to float64
   summation order (rtol 1e-6), for every routed stage, and the per-micro-batch alternatives are
   shown to be far off so the comparison can fail.
2. ``test_micro_batches_equal_one_batch_without_batchnorm``: end to end, 4 x 64 against 1 x 256, on a
   CNN without BatchNorm (registered here), where every sample's forward pass is independent of the
   rest of its batch. Then the features, the routes, hence the memories must agree (up to conv
   round-off: rtol 1e-5), and so must the gradients, hence the weights after the step.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rmn.backbones import Backbone, register_backbone
from rmn.data.loader import TensorLoader
from rmn.recipe.config import load_config
from rmn.recipe.run import Run
from rmn.recipe.steps import clone, init_memory, train_routed, train_stem
from rmn.route import memory_banks, routed_stages


class Stop(Exception):
    pass


def one_routed_step(cfg, capture: bool = False):
    """Open a fresh run, clone at epoch 0, init the memories, train exactly one routed optimizer step.

    Returns (run, pre-step memories, per-stage lists of the features each micro-batch routed)."""
    run = Run.open(cfg, resume=False)
    train_stem(run)  # schedule.stem_epochs = 0: nothing to do
    clone(run)
    init_memory(run)
    before = [b.memories.clone() if b is not None else None for b in memory_banks(run.model)]
    seen = [[] for _ in routed_stages(run.model)]
    hooks = []
    if capture:
        for i, stage in enumerate(routed_stages(run.model)):
            if stage.routed:
                hooks.append(stage.register_forward_pre_hook(
                    lambda m, inp, i=i: seen[i].append(inp[0].detach().mean(dim=(2, 3))) if m.training else None))
    real = TensorLoader.__iter__

    def first_batch_only(self):
        for k, batch in enumerate(real(self)):
            if self.train and k == 1:  # the first optimizer step is complete
                raise Stop
            yield batch

    TensorLoader.__iter__ = first_batch_only
    try:
        with pytest.raises(Stop):
            train_routed(run)
    finally:
        TensorLoader.__iter__ = real
        for h in hooks:
            h.remove()
    assert run.step == 1
    return run, before, seen


def expected_update(features: torch.Tensor, memories: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's update over one batch, in float64: routes by the given memories, then the moving average."""
    f, m = features.double(), memories.double()
    routes = torch.cdist(f, m).argmin(1)
    new = m.clone()
    for j in range(m.shape[0]):
        if (routes == j).any():
            new[j] = alpha * m[j] + (1 - alpha) * f[routes == j].mean(0)
    return new.float(), torch.bincount(routes, minlength=m.shape[0])


def test_accumulated_step_matches_the_update_over_all_collected_features(tmp_path):
    cfg = load_config(None, {
        "model.backbone": "resnet18", "model.width_mult": 0.125, "model.num_procedures": 4, "model.routed_stages": [0, 1, 2],
        "data.image_size": 8, "data.batch_size": 256, "data.micro_batch_size": 64,
        "schedule.epochs": 1, "schedule.stem_epochs": 0, "optim.lr": 0.1, "optim.warmup_epochs": 0.0,
        "run.output": str(tmp_path), "run.progress": "none", "run.tensorboard": False, "run.threads": 1,
    })
    run, before, seen = one_routed_step(cfg, capture=True)
    alpha = cfg.model.memory_momentum
    checked = 0
    for i, bank in enumerate(memory_banks(run.model)):
        if bank is None:
            continue
        assert [c.shape[0] for c in seen[i]] == [64, 64, 64, 64]  # really four micro-batches
        feats = torch.cat(seen[i])
        want, counts = expected_update(feats, before[i], alpha)
        assert torch.equal(bank.load, counts), f"stage {i}: routes differ from routing by the pre-step memories"
        assert torch.allclose(bank.memories, want, rtol=1e-6, atol=1e-7), f"stage {i}"
        assert not torch.equal(bank.memories, before[i])
        # the wrong ways are far from it: updating after every micro-batch, or from the last one only
        per_micro = before[i].clone()
        for chunk in seen[i]:
            per_micro, _ = expected_update(chunk, per_micro, alpha)
        last_only, _ = expected_update(seen[i][-1], before[i], alpha)
        scale = (want - before[i]).abs().max()
        assert (per_micro - want).abs().max() > 0.1 * scale
        assert (last_only - want).abs().max() > 0.01 * scale
        checked += 1
    assert checked == 3


def plain_cnn(num_classes, image_size, in_channels, width_mult=1.0):
    """Three convolutional stages and no normalisation layer: per-sample forward passes."""
    c = [8, 16, 16, 32]
    stem = nn.Sequential(nn.Conv2d(in_channels, c[0], 3, 1, 1), nn.ReLU())
    stages = [nn.Sequential(nn.Conv2d(c[i], c[i + 1], 3, 2 if i else 1, 1), nn.ReLU(), nn.Conv2d(c[i + 1], c[i + 1], 3, 1, 1),
                            nn.ReLU()) for i in range(3)]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c[-1], num_classes))
    return Backbone(stem, stages, head, c[:-1], c[1:], in_channels, min_image_size=4)


@pytest.fixture
def plain_cnn_registered():
    """Register the test backbone for one test only, so the registry tests never see it."""
    from rmn.backbones import registry

    register_backbone("test-plain-cnn")(plain_cnn)
    yield
    registry._REGISTRY.pop("test-plain-cnn", None)


def test_micro_batches_equal_one_batch_without_batchnorm(tmp_path, plain_cnn_registered):
    def cfg(micro, out):
        return load_config(None, {
            "model.backbone": "test-plain-cnn", "model.num_procedures": 4, "model.attention": "ca",
            "model.attention_reduction": 4,
            "data.batch_size": 256, "data.micro_batch_size": micro,
            "schedule.epochs": 1, "schedule.stem_epochs": 0, "optim.lr": 0.05, "optim.warmup_epochs": 0.0,
            "run.output": str(tmp_path / out), "run.progress": "none", "run.tensorboard": False, "run.threads": 1,
        })

    whole, before_whole, _ = one_routed_step(cfg(None, "whole"))
    micro, before_micro, seen = one_routed_step(cfg(64, "micro"), capture=True)
    assert [c.shape[0] for c in seen[0]] == [64] * 4
    for a, b in zip(before_whole, before_micro):
        assert torch.equal(a, b)  # same start: same seed, same k-means
    banks = list(zip(memory_banks(whole.model), memory_banks(micro.model), before_whole))
    assert len(banks) == 3
    for i, (bw, bm, start) in enumerate(banks):
        assert torch.equal(bw.load, bm.load), f"stage {i}"
        assert int(bm.load.sum()) == 256
        assert not torch.allclose(bw.memories, start)
        assert torch.allclose(bw.memories, bm.memories, rtol=1e-5, atol=1e-6), f"stage {i}"
    initial = dict(Run.open(cfg(None, "fresh"), resume=False).model.named_parameters())
    moved = 0
    for (name, pw), (_, pm) in zip(whole.model.named_parameters(), micro.model.named_parameters()):
        assert torch.allclose(pw, pm, rtol=1e-4, atol=1e-6), name
        if name in initial and not torch.equal(pw, initial[name]):
            moved += 1
    assert moved > 0  # the step did change the weights, identically
