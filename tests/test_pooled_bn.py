"""Pooled procedure BatchNorm (rmn.pooled_bn): against the plain network at cloning, against a plain
reference of what it computes, running statistics, errors, and a recipe run that resumes bit for bit."""
from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision_layout import ResNet18, randomize_batchnorm

import rmn
from rmn import distributed
from rmn.dispatch import dispatch
from rmn.features import stage_inputs
from rmn.pooled_bn import Lockstep, procedure_batchnorm
from rmn.recipe.config import ConfigError, load_config
from rmn.recipe.run import Run
from rmn.recipe.runner import run_steps
from rmn.route import last_routes, memory_banks, routed_stages, set_auto_update
from tests.conftest import conv_bn, routed_net, toy_backbone
from rmn.recipe.checkpoint import latest_checkpoint
from tests.test_recipe_resume import Crash, assert_same, crash_in_epoch, result, tiny_cfg

N = 4


def norms(module: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def toy_pair():
    """The plain network of step 1 (no attention: its random routes would differ) and its stages' modules."""
    torch.manual_seed(0)
    plain = routed_net(randomize_batchnorm(toy_backbone()), num_procedures=N, attention=False, routed_stages=())
    return plain, [s.procedures[0] for s in routed_stages(plain)], lambda kind: rmn.route(plain, None, N, procedure_batchnorm=kind)


def resnet_pair():
    torch.manual_seed(0)
    plain = randomize_batchnorm(ResNet18(num_classes=10, width=8))
    layers = ["layer1", "layer2", "layer3", "layer4"]
    return plain, [plain.get_submodule(n) for n in layers], lambda kind: rmn.route(
        plain, layers, N, attention="none", procedure_batchnorm=kind)


PAIRS = {"toy": (toy_pair, 16), "resnet": (resnet_pair, 32)}


def spread(net: nn.Module, x: torch.Tensor) -> None:
    """Memories at N training-mode stage inputs, so the batch spreads over the procedures of every stage."""
    set_auto_update(net, False)
    feats = stage_inputs(copy.deepcopy(net).train(), x, "stem")
    for bank, f in zip(memory_banks(net), feats):
        bank.set_memories(f[torch.linspace(0, len(f) - 1, N).long()])


def cloned(which: str, kind: str):
    make, size = PAIRS[which]
    plain, plain_stages, route = make()
    x = torch.randn(48, 3, size, size, generator=torch.Generator().manual_seed(1))
    net = route(kind)
    spread(net, x)
    return plain.train(), plain_stages, net.train(), x


def used_per_stage(net) -> list[int]:
    return [int((r.bincount(minlength=N) > 0).sum()) for r in last_routes(net)]


@pytest.mark.parametrize("which", PAIRS)
def test_pooled_is_the_plain_network_right_after_cloning(which):
    """Training mode, routes spread over >= 3 procedures per stage: output, input gradient and, after the step,
    every procedure's running statistics are the plain network's on the whole batch; eval mode then agrees too."""
    plain, plain_stages, net, x = cloned(which, "pooled")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = plain(xa), net(xb)
    assert min(used_per_stage(net)) >= 3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want.square().sum().backward()
    got.square().sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    for plain_stage, stage in zip(plain_stages, routed_stages(net)):
        for j, proc in enumerate(stage.procedures):
            for a, b in zip(norms(proc), norms(plain_stage), strict=True):
                torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-5, atol=1e-6)
                assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 1
    plain.eval(), net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", PAIRS)
def test_slice_batchnorm_is_not_the_plain_network(which):
    """The control: the paper's per-procedure statistics change the training-mode function at cloning."""
    plain, _, net, x = cloned(which, "slice")
    with torch.no_grad():
        got, want = net(x), plain(x)
    assert min(used_per_stage(net)) >= 3
    assert (got - want).abs().max() > 1e-2
    assert procedure_batchnorm(net) == "slice"


def test_each_procedure_keeps_its_own_affine():
    """A bias change in procedure j's last BatchNorm moves exactly the samples routed to j, by that bias."""
    _, _, net, x = cloned("toy", "pooled")
    stage = routed_stages(net)[0]
    h = net.stem(x).detach()
    with torch.no_grad():
        before = stage(h)
        routes = stage.last_routes
        j = int(routes.bincount(minlength=N).argmax())
        last = norms(stage.procedures[j])[-1]
        last.bias += 0.5  # followed by a ReLU: the samples of j move where they were above -0.5
        after = stage(h)
    assert torch.equal(routes, stage.last_routes)
    assert torch.equal(after[routes != j], before[routes != j])
    moved = after[routes == j] - before[routes == j]
    assert (moved >= 0).all() and torch.allclose(moved.max(), torch.tensor(0.5))


def plain_reference(x, routes, procs, stats=None):
    """What pooled BatchNorm computes, written out: per-procedure convolutions on each procedure's samples,
    statistics over all of them together, each procedure's own affine, outputs back in batch order.
    ``stats`` receives each layer's (mean, unbiased variance)."""
    index = [torch.nonzero(routes == j).flatten() for j in range(len(procs))]
    hs = [x[i] for i in index]
    for k in range(len(procs[0])):
        hs = [p[k][0](h) for p, h in zip(procs, hs)]
        every = torch.cat(hs)
        mean = every.mean(dim=(0, 2, 3), keepdim=True)
        var = ((every - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        if stats is not None:
            n = every.numel() // every.shape[1]
            stats.append((mean.detach().flatten(), var.detach().flatten() * n / (n - 1)))
        bns = [p[k][1] for p in procs]
        hs = [torch.relu((h - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1))
              for h, bn in zip(hs, bns)]
    order = torch.cat(index)
    return torch.cat(hs)[torch.argsort(order)]


def test_outputs_and_gradients_match_a_plain_reference():
    """Different procedures (weights and affines), one of them empty and one with a single sample: the output and
    the gradients with respect to the input and every procedure's convolution and affine match the reference."""
    torch.manual_seed(0)
    procs = nn.ModuleList([nn.Sequential(conv_bn(8, 16, 2), conv_bn(16, 16)) for _ in range(N + 1)])
    randomize_batchnorm(procs)
    for bn in norms(procs):
        bn.reset_running_stats()
    ref = copy.deepcopy(procs)
    # procedure 2 gets a single sample, procedure 4 none
    routes = torch.tensor([0, 1, 3, 1, 0, 2, 1, 3, 3, 0, 1, 0, 3, 1, 0, 3])
    x = torch.randn(len(routes), 8, 8, 8)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = dispatch(xa, routes, procs, lockstep=Lockstep(procs[0]))
    stats = []
    want = plain_reference(xb, routes, ref, stats)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(got)
    (got * w).sum().backward()
    (want * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    for j in range(N):
        for (name, a), (_, b) in zip(procs[j].named_parameters(), ref[j].named_parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=f"procedure {j} {name}")
    assert all(p.grad is None for p in procs[N].parameters())  # the empty procedure took no part
    # every procedure's running statistics (the idle one's too) took the whole batch's step
    for k, (mean, var) in enumerate(stats):
        for p in procs:
            torch.testing.assert_close(p[k][1].running_mean, 0.1 * mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(p[k][1].running_var, 0.9 + 0.1 * var, rtol=1e-5, atol=1e-6)


def test_eval_mode_runs_the_usual_slices_and_a_network_without_routes_has_nothing_to_pool():
    _, _, net, x = cloned("toy", "pooled")
    assert procedure_batchnorm(net) == "pooled"
    stage = routed_stages(net)[0]
    calls = []
    real = stage.lockstep
    stage.lockstep = lambda *a: calls.append(1) or real(*a)
    net.eval()
    with torch.no_grad():
        net(x)
    assert not calls
    net.train()
    with torch.no_grad():
        net(x)
    assert calls == [1]
    plain = routed_net(toy_backbone(), num_procedures=N, routed_stages=())
    assert procedure_batchnorm(rmn.set_procedure_batchnorm(plain, "pooled")) == "slice"  # no routed stage
    assert procedure_batchnorm(rmn.set_procedure_batchnorm(copy.deepcopy(net), "slice")) == "slice"


def test_bfloat16_autocast_and_channels_last_keep_the_function():
    """Under bf16 autocast, with channels_last tensors, the output keeps BatchNorm's dtype and layout, and output and
    input gradient are as far from the float32 plain network's as the plain network's own under bf16 (no further)."""
    plain, _, net, x = cloned("toy", "pooled")

    def run(model, amp, fmt=torch.contiguous_format):
        model = copy.deepcopy(model).to(memory_format=fmt)
        xg = x.clone(memory_format=fmt).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(xg)
        out.float().square().sum().backward()
        return out, xg.grad

    want, want_grad = run(plain, False)
    plain_bf16, plain_bf16_grad = run(plain, True)
    got, got_grad = run(net, True, torch.channels_last)
    assert got.dtype == plain_bf16.dtype == torch.bfloat16
    assert got_grad.is_contiguous(memory_format=torch.channels_last)

    def err(a, b):
        a, b = a.detach().float(), b.detach().float()
        return float((a - b).norm() / b.norm())

    assert err(got, want) < 1.5 * err(plain_bf16, want) + 1e-3
    assert err(got_grad, want_grad) < 1.5 * err(plain_bf16_grad, want_grad) + 1e-3


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom in procedure 2")


def test_an_exception_in_a_procedure_propagates_and_nothing_hangs():
    _, _, net, x = cloned("toy", "pooled")
    stage = routed_stages(net)[1]
    relu = stage.procedures[2][0][2]
    stage.procedures[2][0][2] = Boom()
    caught = []

    def forward():
        try:
            net(x)
        except Exception as e:  # what the caller of the forward sees
            caught.append(e)

    worker = threading.Thread(target=forward, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the forward hung"
    assert len(caught) == 1 and isinstance(caught[0], RuntimeError) and "boom in procedure 2" in str(caught[0])
    stage.procedures[2][0][2] = relu
    assert net(x).isfinite().all()  # nothing was left half done


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = conv_bn(8, 8)

    def forward(self, x):
        return self.body(x) if x.sum() > 0 else x


def test_errors_are_one_line():
    model = nn.Sequential(conv_bn(3, 8), DataDependent(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"stage 1 does not trace with torch.fx .*use 'slice'") as e:
        rmn.route(model, ["1"], 2, attention="none", procedure_batchnorm="pooled", example_input=torch.zeros(1, 3, 8, 8))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="procedure_batchnorm must be one of slice, pooled"):
        rmn.route(model, ["1"], 2, procedure_batchnorm="global")
    with pytest.raises(ConfigError, match="model.procedure_batchnorm must be 'slice' or 'pooled'"):
        load_config(None, {"model.procedure_batchnorm": "whole"})
    with pytest.raises(ConfigError, match="model.match_batchnorm .* set one of them"):
        load_config(None, {"model.procedure_batchnorm": "pooled", "model.match_batchnorm": True})


def test_refused_under_several_processes(tmp_path, monkeypatch):
    _, _, net, x = cloned("toy", "pooled")
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ValueError, match="does not run under torch.distributed with 2 processes"):
        net(x)
    with pytest.raises(ConfigError, match=r"^model.procedure_batchnorm='pooled' pools statistics over one process"):
        Run.open(tiny_cfg(tmp_path, **{"model.procedure_batchnorm": "pooled"}))


def test_recipe_run_trains_and_resumes_bit_exactly(tmp_path, monkeypatch):
    """A tiny digits run with pooled BatchNorm, and the same run interrupted mid routed training and resumed."""
    over = {"model.procedure_batchnorm": "pooled", "schedule.epochs": 3, "schedule.stem_epochs": 1}
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_steps(tiny_cfg(whole, **over))
    want = result(whole)
    losses = [r["train_loss"] for r in want["rows"] if "train_loss" in r]
    assert len(losses) == 3 and all(0 < v < 10 for v in losses)
    cfg = tiny_cfg(broken, **over)
    with monkeypatch.context() as m:
        crash_in_epoch(m, 2, 3)
        with pytest.raises(Crash):
            run_steps(cfg)
    resumed = latest_checkpoint(broken / "checkpoints").meta
    assert (resumed["phase"], resumed["epoch"]) == ("routed", 2)  # after one routed epoch of pooled BatchNorm
    run_steps(cfg, resume=True)
    assert_same(result(broken), want)


def test_empty_slices_take_no_part_when_every_procedure_is_called():
    """``run_every_procedure`` (set by run.sync_bn) hands idle procedures empty slices: same output and gradients."""
    torch.manual_seed(0)
    procs = nn.ModuleList([nn.Sequential(conv_bn(8, 16, 2), conv_bn(16, 16)) for _ in range(3)])
    routes = torch.tensor([0, 1, 0, 1, 1, 0])
    x = torch.randn(6, 8, 8, 8)
    results = []
    for run_empty in (False, True):
        xg = x.clone().requires_grad_()
        y = dispatch(xg, routes, procs, run_empty=run_empty, lockstep=Lockstep(procs[0]))
        y.square().sum().backward()
        results.append((y.detach(), xg.grad, {k: p.grad.clone() for k, p in procs.named_parameters() if p.grad is not None}))
        procs.zero_grad(set_to_none=True)
    (y0, g0, p0), (y1, g1, p1) = results
    assert torch.equal(y0, y1) and torch.equal(g0, g1)
    assert all(torch.equal(p1[k], g) for k, g in p0.items())
    assert not any(k.startswith("2.") for k in p0)
    assert all(k.startswith("2.") and not g.any() for k, g in p1.items() if k not in p0)  # the idle one: zero
