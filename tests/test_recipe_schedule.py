"""The learning-rate schedule: linear warm-up from start_lr, cosine to end_lr at the last step, one
continuous schedule over stem and routed training (the step counter carries across the clone); and
optim.rewarm_epochs, which restarts it at the clone step."""
from __future__ import annotations

import json
import math

import pytest
import torch

from rmn.recipe.config import ConfigError, load_config
from rmn.recipe.runner import run_steps
from rmn.recipe.schedule import Schedule, lr_at, rewarmed_lr_at


@pytest.mark.parametrize("total, warmup", [(100, 10), (44, 11), (7, 0), (6, 4), (3, 1)])
def test_warmup_peak_cosine_end(total, warmup):
    peak, start, end = 0.48, 1e-5, 2e-5
    lrs = [lr_at(s, total, warmup, peak, start, end) for s in range(total)]
    if warmup:
        assert lrs[0] == start
        assert all(b > a for a, b in zip(lrs[:warmup], lrs[1:warmup + 1]))  # strictly rising to the peak
        steps_ = [b - a for a, b in zip(lrs[:warmup], lrs[1:warmup + 1])]
        assert max(steps_) - min(steps_) < 1e-12  # linearly
    assert lrs[warmup] == pytest.approx(peak, rel=1e-12)  # the peak right at the end of warm-up
    assert max(lrs) == pytest.approx(peak, rel=1e-12)
    assert all(b <= a for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # then never rising
    assert lrs[-1] == pytest.approx(end, rel=1e-9, abs=0)  # end_lr exactly at the last step
    for s in range(warmup, total):  # the cosine shape
        if total - 1 > warmup:
            p = (s - warmup) / (total - 1 - warmup)
            assert lrs[s] == pytest.approx(end + (peak - end) * 0.5 * (1 + math.cos(math.pi * p)), rel=1e-12)


def test_edges():
    assert lr_at(0, 1, 0, 0.1) == 0.1  # a single step: the peak
    assert lr_at(-5, 10, 2, 0.1, 1e-3) == 1e-3  # clamped before the start
    assert lr_at(50, 10, 2, 0.1, 1e-3, 1e-4) == pytest.approx(1e-4)  # and after the end
    # warm-up ending at the last step (or later): the run ends at the peak, there is no decay left
    assert lr_at(4, 5, 4, 1.0, 0.0) == 1.0
    lrs = [lr_at(s, 5, 50, 1.0, 0.0) for s in range(5)]
    assert lrs == sorted(lrs) and lrs[-1] == 1.0
    with pytest.raises(ValueError):
        lr_at(0, 0, 0, 0.1)


def test_the_recipe_follows_one_schedule_across_the_clone(tmp_path, monkeypatch):
    """Every optimizer step of the real pipeline (stem, then routed, with a new optimizer object after
    the clone) is taken at lr_at(step) of one schedule over all epochs; warm-up spans the clone here."""
    taken = []  # (optimizer object, lr of each group) at every step
    real_step = torch.optim.SGD.step

    def recording_step(self, *a, **k):
        taken.append((id(self), [g["lr"] for g in self.param_groups]))
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    cfg = load_config(None, {
        "model.backbone": "resnet18", "model.width_mult": 0.125, "model.num_procedures": 2, "model.routed_stages": [0, 1, 2],
        "data.image_size": 8, "data.batch_size": 256,
        "optim.lr": 0.2, "optim.start_lr": 1e-3, "optim.end_lr": 1e-4, "optim.warmup_epochs": 2.4,
        "schedule.epochs": 3, "schedule.stem_epochs": 1,
        "run.output": str(tmp_path), "run.progress": "none", "run.tensorboard": False, "run.threads": 1,
    })
    run_steps(cfg)
    per_epoch = 1437 // 256  # 5
    total, warmup = 3 * per_epoch, round(2.4 * per_epoch)
    assert len(taken) == total
    optimizers = [o for o, _ in taken]
    assert len(set(optimizers[:per_epoch])) == 1 and len(set(optimizers[per_epoch:])) == 1
    assert optimizers[per_epoch - 1] != optimizers[per_epoch]  # the clone made a new optimizer...
    lrs = []
    for _, group_lrs in taken:
        assert len(set(group_lrs)) == 1
        lrs.append(group_lrs[0])
    assert lrs == [lr_at(s, total, warmup, 0.2, 1e-3, 1e-4) for s in range(total)]  # ...and the steps went on
    assert lrs[0] == 1e-3 and lrs[warmup] == pytest.approx(0.2) and lrs[-1] == pytest.approx(1e-4)
    # across the clone (inside warm-up) the rise goes on at the same rate
    d = [b - a for a, b in zip(lrs[:warmup], lrs[1:warmup + 1])]
    assert d[per_epoch - 1] == pytest.approx(d[per_epoch - 2], rel=1e-9)


# -- optim.rewarm_epochs: the LR restarts at the clone step (beyond the paper) ----------------------------------

def test_rewarm_restarts_at_the_clone_step_then_follows_the_cosine():
    total, warmup, restart, rewarm = 20, 4, 8, 3
    lrs = [rewarmed_lr_at(s, total, warmup, 1.0, 0.0, 0.0, restart, rewarm) for s in range(total)]
    today = [lr_at(s, total, warmup, 1.0, 0.0, 0.0) for s in range(total)]
    assert lrs[:restart + 1] == today[:restart + 1]  # the same curve up to and at the clone step
    current = 0.5 * (1 + math.cos(math.pi * 4 / 15))  # today's cosine at step 8 (progress 4 of 15)
    assert lrs[restart] == pytest.approx(current, rel=1e-12)
    assert lrs[restart + 1] == pytest.approx(current + (1 - current) / 3, rel=1e-12)  # a linear re-warm...
    assert lrs[restart + rewarm] == 1.0  # ...reaching the peak after 3 steps
    assert lrs[15] == pytest.approx(0.5, rel=1e-12)  # half-way down the 8 steps of cosine left (11 -> 19)
    assert lrs[-1] == 0.0  # end_lr at the last step
    assert all(b <= a for a, b in zip(lrs[restart + rewarm:], lrs[restart + rewarm + 1:]))


def test_rewarm_edges():
    # no re-warm steps: straight back to the peak at the clone step, then the cosine
    assert rewarmed_lr_at(5, 10, 2, 1.0, 0.0, 0.0, 5, 0) == 1.0
    assert rewarmed_lr_at(9, 10, 2, 1.0, 0.0, 0.5, 5, 0) == 0.5
    # no routed steps (clone at or after the end): today's curve
    assert [rewarmed_lr_at(s, 10, 2, 1.0, 0.0, 0.0, 10, 3) for s in range(10)] == [lr_at(s, 10, 2, 1.0, 0.0, 0.0) for s in range(10)]
    # cloning at step 0 (no stem epochs): the re-warm is the warm-up, from start_lr
    assert rewarmed_lr_at(0, 10, 5, 1.0, 0.1, 0.0, 0, 2) == 0.1 and rewarmed_lr_at(2, 10, 5, 1.0, 0.1, 0.0, 0, 2) == 1.0


def test_schedule_of_a_config():
    cfg = load_config(None, {"optim.lr": 0.2, "optim.warmup_epochs": 1.5, "optim.start_lr": 1e-3, "optim.end_lr": 1e-4,
                             "schedule.epochs": 40, "schedule.stem_epochs": 7})
    off = Schedule.of(cfg, 10)
    assert (off.total_steps, off.warmup_steps, off.restart_step) == (400, 15, None)
    assert [off.lr(s) for s in range(400)] == [lr_at(s, 400, 15, 0.2, 1e-3, 1e-4) for s in range(400)]  # off: today's
    cfg.optim.rewarm_epochs = 2.0
    on = Schedule.of(cfg, 10)
    assert (on.restart_step, on.rewarm_steps) == (70, 20)
    assert [on.lr(s) for s in range(400)] == [rewarmed_lr_at(s, 400, 15, 0.2, 1e-3, 1e-4, 70, 20) for s in range(400)]
    assert on.lr(90) == 0.2 and on.lr(399) == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="optim.rewarm_epochs"):
        load_config(None, {"optim.rewarm_epochs": -1})


def test_the_recipe_rewarms_at_the_clone(tmp_path, monkeypatch):
    """A tiny digits run (5 steps an epoch, 2 plain epochs of 4): every step's LR and every logged LR follow
    the re-warmed schedule, which reaches the peak again at the end of the third epoch."""
    from test_recipe import STEPS_PER_EPOCH, tiny_cfg

    taken = []
    real_step = torch.optim.SGD.step

    def recording_step(self, *a, **k):
        taken.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    run_steps(tiny_cfg(tmp_path, **{"optim.rewarm_epochs": 0.8}))  # 4 steps of re-warm
    total, clone_step = 4 * STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH
    want = [rewarmed_lr_at(s, total, STEPS_PER_EPOCH, 0.1, 1e-5, 1e-5, clone_step, 4) for s in range(total)]
    assert taken == want
    assert want[clone_step] == lr_at(clone_step, total, STEPS_PER_EPOCH, 0.1, 1e-5, 1e-5) < 0.1  # from today's LR...
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r["lr"] for r in rows]  # the LR of each epoch's last step
    assert logged == [want[(e + 1) * STEPS_PER_EPOCH - 1] for e in range(4)]
    assert logged[2] == 0.1 and logged[3] == pytest.approx(1e-5)  # ...back at the peak, then down to end_lr
