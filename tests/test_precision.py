"""Mixed precision and channels_last: routing stays float32, dispatch keeps the memory format, the
recipe trains, evaluates and resumes under --amp / --channels-last, fp16's gradient scaler is saved."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from rmn import kmeans
from rmn.attention import ConditionalAttention
from rmn.cli import build_parser, parse_overrides
from rmn.dispatch import dispatch, memory_format
from rmn.memory import MemoryBank, nearest, stage_feature
from rmn.precision import Precision, compile_parts, float32_only, uncompile
from rmn.recipe.checkpoint import list_checkpoints, load_checkpoint
from rmn.recipe.config import ConfigError
from rmn.recipe.runner import run_steps
from conftest import routed_net

from test_dispatch import make_procs, per_sample_reference
from test_recipe_resume import Crash, assert_same, crash_in_epoch, result, tiny_cfg
from rmn.route import last_routes, routed_stages

CL = torch.channels_last
BF16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731


def test_nearest_is_float32_under_autocast():
    # two memories 1e-3 apart around 1.0: bfloat16 (8 bits of mantissa) cannot tell them apart
    g = torch.Generator().manual_seed(0)
    memories = torch.ones(2, 64)
    memories[1] += 1e-3
    feats = 1.0 + 1e-3 * torch.rand(32, 64, generator=g)
    want = nearest(feats, memories)
    assert len(set(want.tolist())) == 2
    with BF16():
        assert torch.is_autocast_enabled("cpu")
        got = nearest(feats, memories)
    assert torch.equal(got, want)


def test_memory_bank_stays_float32_under_autocast():
    g = torch.Generator().manual_seed(1)
    bank = MemoryBank(4, 16).train()
    bank.set_memories(torch.randn(4, 16, generator=g))
    x = torch.randn(32, 16, 5, 5, generator=g)
    ref = copy.deepcopy(bank)
    ref.route(stage_feature(x))
    ref.update()
    with BF16():
        f = stage_feature(x.bfloat16())
        assert f.dtype == torch.float32
        bank.route(stage_feature(x))
    bank.update()
    assert bank.memories.dtype == torch.float32
    assert torch.equal(bank.memories, ref.memories) and torch.equal(bank.load, ref.load)


def test_stage_feature_equals_the_plain_mean_in_float32():
    x = torch.randn(8, 6, 5, 5)
    assert torch.equal(stage_feature(x), x.mean(dim=(2, 3)))
    assert not stage_feature(x.requires_grad_()).requires_grad


def test_kmeans_ignores_autocast():
    x = torch.randn(500, 12, generator=torch.Generator().manual_seed(2))
    want = kmeans(x, 5, seed=0)
    with BF16():
        got = kmeans(x, 5, seed=0)
    assert got.centers.dtype == torch.float32
    assert torch.equal(got.centers, want.centers) and torch.equal(got.counts, want.counts)


def test_float32_only_turns_autocast_off_inside_and_restores_it():
    seen = []
    probe = float32_only(lambda x: seen.append(torch.is_autocast_enabled("cpu")) or (x @ x).dtype)
    x = torch.randn(3, 3)
    with BF16():
        assert probe(x) == torch.float32
        assert torch.is_autocast_enabled("cpu") and (x @ x).dtype == torch.bfloat16
    assert probe(x) == torch.float32
    assert seen == [False, False]


@pytest.mark.parametrize("case", ["spread", "one_route", "batch_one"])
def test_dispatch_keeps_channels_last_and_equals_contiguous(case):
    n = 4
    g = torch.Generator().manual_seed(3)
    b = 1 if case == "batch_one" else 16
    routes = torch.zeros(b, dtype=torch.long) if case == "one_route" else torch.randint(n, (b,), generator=g)
    procs = make_procs(n, cin=4, cout=6).eval()
    x = torch.randn(b, 4, 5, 5, generator=g)
    x_cl = x.contiguous(memory_format=CL).requires_grad_()
    x_nc = x.clone().requires_grad_()
    procs_cl = copy.deepcopy(procs).to(memory_format=CL)
    y_cl = dispatch(x_cl, routes, procs_cl)
    y_nc = dispatch(x_nc, routes, procs)
    if b > 1:
        assert memory_format(y_cl) == CL and memory_format(y_nc) == torch.contiguous_format
    torch.testing.assert_close(y_cl, y_nc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_cl, per_sample_reference(x, routes, procs), rtol=1e-5, atol=1e-5)
    # a gradient arriving in another layout (a broadcast, as from global average pooling) comes back in the input's
    (y_cl.mean(dim=(2, 3)) ** 2).sum().backward()
    (y_nc.mean(dim=(2, 3)) ** 2).sum().backward()
    if b > 1:
        assert memory_format(x_cl.grad) == CL
    torch.testing.assert_close(x_cl.grad, x_nc.grad, rtol=1e-5, atol=1e-6)
    for p_cl, p_nc in zip(procs_cl.parameters(), procs.parameters()):
        torch.testing.assert_close(p_cl.grad, p_nc.grad, rtol=1e-4, atol=1e-5)


def test_dispatch_under_bf16_matches_float32_closely():
    n = 3
    g = torch.Generator().manual_seed(4)
    routes = torch.randint(n, (24,), generator=g)
    procs = make_procs(n, cin=4, cout=8).eval()
    x = torch.randn(24, 4, 6, 6, generator=g).contiguous(memory_format=CL)
    want = dispatch(x, routes, procs)
    with BF16():
        got = dispatch(x, routes, copy.deepcopy(procs).to(memory_format=CL))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


def test_conditional_attention_under_autocast():
    torch.manual_seed(0)
    ca = ConditionalAttention(32, 4).eval()
    y = torch.randn(8, 32, 4, 4)
    routes = torch.randint(4, (8,))
    want = ca(y, routes)
    with BF16():
        got = ca(y.bfloat16().contiguous(memory_format=CL), routes)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)


def test_routed_network_under_bf16_channels_last_routes_like_float32(toy):
    """The routes of a channels_last bf16 forward are the float32 routes, but for samples whose two
    nearest memories are closer than bf16's rounding of the stage input (none in this draw)."""
    torch.manual_seed(0)
    net = routed_net(toy, 4, attention=True).eval()
    x = torch.randn(64, 3, 16, 16)
    from rmn.analysis.calibrate import calibrate_memories

    calibrate_memories(net, x, method="kmeans")
    want = net(x)
    routes_want = last_routes(net).clone()
    p = Precision("bf16", True, "cpu")
    net_cl = p.model(copy.deepcopy(net))
    with p.autocast():
        got = net_cl(p.batch(x))
    agree = (last_routes(net_cl) == routes_want).float().mean()
    assert float(agree) > 0.95
    assert got.dtype == torch.bfloat16
    same = (last_routes(net_cl) == routes_want).all(0)
    torch.testing.assert_close(got.float()[same], want[same], rtol=0.1, atol=0.1)


def test_precision_rejects_unknown_amp():
    with pytest.raises(ValueError, match="amp must be one of"):
        Precision("fp8")


def test_cli_flags_set_the_config_keys():
    args, extra = build_parser().parse_known_args(["run", "configs/demo.yaml", "--amp", "bf16", "--channels-last", "--compile"])
    over = parse_overrides(args, extra)
    assert over["run.amp"] == "bf16" and over["run.channels_last"] is True and over["run.compile"] is True
    args, extra = build_parser().parse_known_args(["run", "configs/demo.yaml"])
    assert not any(k in parse_overrides(args, extra) for k in ("run.amp", "run.channels_last", "run.compile"))


def test_config_rejects_a_bad_amp(tmp_path):
    with pytest.raises(ConfigError, match="run.amp must be"):
        tiny_cfg(tmp_path, **{"run.amp": "float8"})


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_resume_under_amp_and_channels_last_is_exact(tmp_path, monkeypatch, amp):
    """Interrupted in routed training and resumed = uninterrupted, bit for bit, under autocast and
    channels_last; with fp16 the gradient scaler's state travels in the checkpoint."""
    over = {"run.amp": amp, "run.channels_last": True, "schedule.epochs": 3, "schedule.stem_epochs": 1}
    run_steps(tiny_cfg(tmp_path / "straight", **over), resume=False)
    want = result(tmp_path / "straight")
    crash_in_epoch(monkeypatch, epoch=2, after_batches=5)
    with pytest.raises(Crash):
        run_steps(tiny_cfg(tmp_path / "resumed", **over), resume=False)
    monkeypatch.undo()
    run_steps(tiny_cfg(tmp_path / "resumed", **over), resume=True)
    assert_same(result(tmp_path / "resumed"), want)
    meta = load_checkpoint(list_checkpoints(tmp_path / "resumed" / "checkpoints")[-1]).meta
    if amp == "fp16":
        assert set(meta["extra"]["grad_scaler"]) >= {"scale", "_growth_tracker"}
    else:
        assert "grad_scaler" not in meta["extra"]


def test_bf16_training_reaches_float32s_accuracy(tmp_path):
    """The same short run in float32 and in bf16 + channels_last: close losses and accuracies."""
    runs = {}
    for name, over in {"fp32": {}, "bf16": {"run.amp": "bf16", "run.channels_last": True}}.items():
        runs[name] = run_steps(tiny_cfg(tmp_path / name, **over), resume=False)
    assert runs["bf16"]["params"] == runs["fp32"]["params"]
    assert abs(runs["bf16"]["eval_top1"] - runs["fp32"]["eval_top1"]) < 0.05, runs


def test_compiled_parts_equal_eager_and_uncompile_makes_copies_safe(toy):
    torch.manual_seed(0)
    net = routed_net(toy, 2, attention=False).eval()
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        routed_stages(net)[0].memory.set_memories(torch.randn(2, net.stage_channels[0]))
        want = net(x)
        compiled = compile_parts(copy.deepcopy(net))
        got = compiled(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    clone = copy.deepcopy(uncompile(compiled))
    with torch.no_grad():
        clone.head[-1].weight.zero_()
        clone.head[-1].bias.fill_(1.0)
        assert torch.equal(clone(x), torch.ones_like(want))  # runs its own weights, not the source's
        assert torch.equal(compiled(x), got)


def test_channels_last_training_on_several_cpu_threads_is_refused(tmp_path):
    """Precision.check_training: torch 2.13 crashes on this machine (AMD EPYC) with
    ``Conv2d(8, 16, 1, stride=2)`` in channels_last, 2 threads, batch 3-13, backward (BENCHMARKS.md has the
    reproducer); a run that would hit it is refused before anything is written."""
    Precision("none", True, "cpu").check_training(1)
    Precision("bf16", False, "cpu").check_training(2)
    Precision("bf16", True, "cuda").check_training(8)
    with pytest.raises(ValueError, match="run.threads 1"):
        Precision("bf16", True, "cpu").check_training(2)
    from rmn.recipe.run import RecipeError, Run

    try:
        with pytest.raises(RecipeError, match="channels_last on CPU with 2 threads"):
            Run.open(tiny_cfg(tmp_path / "x", **{"run.channels_last": True, "run.threads": 2}), resume=False)
    finally:
        torch.set_num_threads(1)
    assert not (tmp_path / "x").exists()
