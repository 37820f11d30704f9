"""Procedures that start tied and untie gradually (``optim.untie_epochs``, rmn.training.tie_procedure_gradients):
the gradient mix, the schedule, and the property that makes it a continuation of step 1: with the procedures'
BatchNorm pooled and untied = 0, routed training *is* the plain network's training, step for step."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import rmn
from rmn.recipe.config import ConfigError, load_config
from rmn.recipe.schedule import untied_at
from rmn.route import routed_stages
from rmn.training import clone_optimizer, tie_procedure_gradients
from tests.test_pooled_bn import PAIRS, N, cloned, spread, used_per_stage


def test_the_mix_is_own_times_untied_plus_the_shared_sum():
    _, _, net, x = cloned("toy", "slice")
    net(x).square().sum().backward()
    stage = routed_stages(net)[0]
    before = [[None if p.grad is None else p.grad.clone() for p in proc.parameters()] for proc in stage.procedures]
    idle = [j for j, g in enumerate(before) if g[0] is None]
    tie_procedure_gradients(net, 0.25)
    for i, params in enumerate(zip(*[list(proc.parameters()) for proc in stage.procedures])):
        total = sum(g[i] for g in before if g[i] is not None)
        for j, p in enumerate(params):
            own = before[j][i] if before[j][i] is not None else torch.zeros_like(total)
            torch.testing.assert_close(p.grad, 0.25 * own + 0.75 * total)
    assert all(p.grad is not None for j in idle for p in stage.procedures[j].parameters())  # the shared part


def test_untied_leaves_the_gradients_alone():
    _, _, net, x = cloned("toy", "slice")
    net(x).square().sum().backward()
    before = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    tie_procedure_gradients(net, 1.0)
    assert all(torch.equal(p.grad, before[n]) for n, p in net.named_parameters() if p.grad is not None)
    assert {n for n, p in net.named_parameters() if p.grad is not None} == set(before)


def test_schedule_rises_linearly_from_the_clone_step():
    assert [untied_at(s, 100, 4) for s in (99, 100, 101, 102, 103, 200)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert untied_at(0, 100, 0) == untied_at(100, 100, 0) == 1.0  # off: the paper


def test_schedule_ends_partly_tied_with_untie_to():
    assert [untied_at(s, 100, 4, 0.8) for s in (99, 100, 101, 103, 200)] == pytest.approx([0.0, 0.2, 0.4, 0.8, 0.8])
    assert untied_at(100, 100, 0, 0.9) == untied_at(10**6, 100, 0, 0.9) == 0.9  # tied that much from the clone on


@pytest.mark.parametrize("which", ["toy", "resnet"])
def test_tied_pooled_routed_training_is_the_plain_network_s_training(which):
    """Three SGD steps (momentum, weight decay) from cloned optimizer state, routes spread over the procedures:
    every output and every procedure's weights equal the plain network's; the procedures stay copies."""
    make, size = PAIRS[which]
    plain, plain_stages, route = make()
    x = torch.randn(48, 3, size, size, generator=torch.Generator().manual_seed(1))
    plain.train()
    y = torch.randint(0, plain(x).shape[1], (x.shape[0],), generator=torch.Generator().manual_seed(2))
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    F.cross_entropy(plain(x), y).backward()
    opt_plain.step()  # momentum to clone, as step 2 clones it
    net = route("pooled")
    spread(net, x)
    net.train()
    opt_net = clone_optimizer(opt_plain, plain, net)
    for step in range(3):
        xs, ys = x.roll(7 * step, 0), y.roll(7 * step, 0)
        for model, opt in ((plain, opt_plain), (net, opt_net)):
            opt.zero_grad()
            F.cross_entropy(model(xs), ys).backward()
            if model is net:
                assert min(used_per_stage(net)) >= 3
                tie_procedure_gradients(net, 0.0)
            opt.step()
        with torch.no_grad():
            torch.testing.assert_close(net(xs), plain(xs), rtol=1e-4, atol=1e-5)
    for plain_stage, stage in zip(plain_stages, routed_stages(net)):
        for proc in stage.procedures:
            for a, b in zip(proc.parameters(), plain_stage.parameters(), strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_untying_lets_the_procedures_specialise():
    """The control: untied (the paper), the same steps leave the procedures different from each other."""
    _, _, net, x = cloned("resnet", "pooled")
    y = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        tie_procedure_gradients(net, 1.0)
        opt.step()
    procs = routed_stages(net)[0].procedures
    assert not torch.allclose(next(procs[0].parameters()), next(procs[1].parameters()))


def test_config_refuses_negative_untie_epochs():
    with pytest.raises(ConfigError, match="optim.untie_epochs must be >= 0"):
        load_config(None, {"optim.untie_epochs": -1})
    with pytest.raises(ConfigError, match="optim.untie_to must be between 0 and 1"):
        load_config(None, {"optim.untie_to": 1.5})


def test_the_recipe_unties_over_the_configured_epochs(tmp_path, monkeypatch):
    """Each routed step of the recipe ties with the schedule's fraction: rising over optim.untie_epochs from the
    clone step, then 1 (no call); and the run is resumable like any other (the fraction is a function of the step)."""
    from rmn.recipe import loop
    from rmn.recipe.runner import run_steps
    from tests.test_recipe_resume import tiny_cfg

    seen = []
    real = loop.tie_procedure_gradients
    monkeypatch.setattr(loop, "tie_procedure_gradients", lambda model, untied: (seen.append(untied), real(model, untied)))
    cfg = tiny_cfg(tmp_path / "run", **{"optim.untie_epochs": 1.0})
    summary = run_steps(cfg)
    steps_per_epoch = summary["steps"] // cfg.schedule.epochs
    assert seen == [min(1.0, (k + 1) / steps_per_epoch) for k in range(2 * steps_per_epoch)]
    assert 0 < summary["eval_top1"] <= 1


def test_the_recipe_keeps_the_procedures_partly_tied_with_untie_to(tmp_path, monkeypatch):
    """optim.untie_to below 1: every routed step ties with that share to the end (no ramp without untie_epochs)."""
    from rmn.recipe import loop
    from rmn.recipe.runner import run_steps
    from tests.test_recipe_resume import tiny_cfg

    seen = []
    real = loop.tie_procedure_gradients
    monkeypatch.setattr(loop, "tie_procedure_gradients", lambda model, untied: (seen.append(untied), real(model, untied)))
    summary = run_steps(tiny_cfg(tmp_path / "run", **{"optim.untie_to": 0.9}))
    assert seen == [0.9] * (summary["steps"] // 2)  # the two routed epochs of four
