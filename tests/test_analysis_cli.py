import json
import statistics
from pathlib import Path

import pytest
import torch

from rmn.analysis.calibrate import _counts_from_shares, memories_for_shares
from rmn.analysis.latency import format_latency, interleaved_times, paired_ratios, run_latency
from rmn.analysis.cost import summary_from_spec
from rmn.cli import build_parser, main
from rmn.route import memory_banks
from conftest import routed_net

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _parser():
    return build_parser()


def test_summary_command_in_process(tmp_path, capsys):
    args = _parser().parse_args(["summary", "--model", "resnet18", "--num-classes", "10", "--image-size", "32",
                                 "--width-mult", "0.25", "--procedures", "4",
                                 "--csv", str(tmp_path / "t.csv"), "--json", str(tmp_path / "t.json")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "ResNet-18 RMN with CA (N=4)" in out and "MACs (G)" in out
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["backbone", "rmn", "rmn_ca"]
    assert (tmp_path / "t.csv").read_text().count("\n") == 4


def test_summary_from_spec_and_from_a_config(capsys):
    spec = {"name": "resnet18", "num_classes": 10, "image_size": 32, "width_mult": 0.25, "num_procedures": 2}
    rows = summary_from_spec(spec)
    assert rows[1]["num_procedures"] == 2
    assert main(["summary", str(DEMO), "--procedures", "3"]) == 0
    out = capsys.readouterr().out
    assert "resnet18: 10 classes, 16x16x1, width x0.25, N = 3" in out  # the file's model, the flag's N
    assert "(N=3)" in out


def test_bench_and_atlas_subcommands_parse():
    p = _parser()
    a = p.parse_args(["bench", "latency", "--quick", "--models", "resnet18"])
    assert a.quick and a.models == ["resnet18"] and callable(a.func)
    a = p.parse_args(["bench", "dispatch", "--quick"])
    assert a.quick and callable(a.func)
    a = p.parse_args(["atlas", "ck.safetensors", "--dataset", "digits", "--top-k", "3"])
    assert a.checkpoint == "ck.safetensors" and a.top_k == 3


def test_interleaved_times_round_robin():
    calls = []
    fns = {k: (lambda i, k=k: calls.append((k, i))) for k in "abc"}
    times = interleaved_times(fns, repeats=3, warmup=1, inner=2)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert len(calls) == 4 * 3 * 2
    firsts = [calls[r * 6][0] for r in range(4)]
    assert firsts == ["a", "b", "c", "a"]  # the starting variant rotates
    assert [i for k, i in calls if k == "b"] == list(range(8))


def test_paired_ratios_cancel_slow_spells_that_both_share():
    """A variant 10% slower on a machine whose speed drifts by up to 3x from round to round (both timings of a
    round share its speed, up to 2% of their own noise): over 11 rounds, the median of paired ratios lands far
    closer to 1.1 than the ratio of the two medians (worst of 200 trials: 3.4% off against 8.7%)."""
    g = torch.Generator().manual_seed(0)
    paired, unpaired = [], []
    for _ in range(200):
        speed = 1 + 2 * torch.rand(11, generator=g)
        backbone = (10.0 * speed * (1 + 0.02 * torch.randn(11, generator=g))).tolist()
        variant = (11.0 * speed * (1 + 0.02 * torch.randn(11, generator=g))).tolist()
        assert paired_ratios(variant, backbone) == pytest.approx([v / b for v, b in zip(variant, backbone)])
        paired.append(statistics.median(paired_ratios(variant, backbone)))
        unpaired.append(statistics.median(variant) / statistics.median(backbone))
    err = lambda xs: max(abs(x - 1.1) for x in xs)  # noqa: E731
    assert err(paired) < 0.05 and err(unpaired) > 2 * err(paired)


def test_memories_for_shares_gives_requested_split(toy):
    
    torch.manual_seed(0)
    net = routed_net(toy, num_procedures=4, attention=False)
    x = torch.randn(64, 3, 16, 16)
    for shares in ([0.25] * 4, [0.7, 0.1, 0.1, 0.1], [0.5, 0.5, 0.0, 0.0]):
        want = _counts_from_shares(shares, 64)
        for train in (False, True):
            got = memories_for_shares(net, x, shares, train=train)
            for stage_counts in got:
                assert sum(stage_counts) == 64
                assert max(abs(a - b) for a, b in zip(stage_counts, want)) <= 2, (shares, train, got)
    assert all(int(b.load.sum()) == 0 for b in memory_banks(net))  # calibration left no trace


def test_latency_smoke_small():
    report = run_latency(models=["resnet18"], image_size=32, batch_sizes=(1, 4), repeats=2, large_repeats=1,
                         warmup=0, inner=1, width_mult=0.125, pool=16, log=lambda s: None)
    res = report["results"][0]
    assert set(res["variants"]) == {"backbone", "backbone_copy", "rmn", "rmn_ca"}
    assert res["variants"]["backbone"]["batch1"]["ratio"] == 1.0
    assert res["variants"]["backbone"]["batch1"]["paired_ratio"] == 1.0
    assert "paired" in format_latency(report)
    assert "backbone_copy" not in res["routes"]  # the control is the plain network, its own copy
    assert all(e["batch4"]["images_per_s"] > 0 for e in res["variants"].values())
    assert len(res["routes"]["rmn"]) == 4
    assert "random weights" in format_latency(report)
    assert statistics.fmean(sum(s) for s in res["routes"]["rmn_ca"]) == 16


def test_split_backbone_reference_equals_backbone_in_eval(toy):
    from rmn.analysis.dispatch_bench import split_backbone

    toy.eval()
    x = torch.randn(7, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(split_backbone(toy, [3, 0, 4]).eval()(x), toy(x))


def test_dispatch_benchmark_smoke():
    from rmn.analysis.dispatch_bench import format_dispatch, run_dispatch

    report = run_dispatch(cases=("cifar",), cifar_batch=16, cifar_width=0.125, cifar_eval_repeats=1,
                          cifar_train_repeats=1, warmup=0, log=lambda s: None)
    for case in ("cifar_eval", "cifar_train"):
        v = report["results"][case]["variants"]
        assert set(v) == {"backbone", "uniform", "skewed", "split_uniform", "split_skewed"}
        assert v["backbone"]["ratio"] == 1.0
        assert [sum(s) for s in v["uniform"]["observed_routes"]] == [16] * 4
    assert "dispatch cost itself" in format_dispatch(report)


def test_dispatch_command_writes_its_json_report(tmp_path, capsys):
    from rmn.analysis.dispatch_bench import main as dispatch_main

    out = tmp_path / "deep" / "dispatch.json"
    assert dispatch_main(["--cases", "cifar", "--quick", "--cifar-width", "0.125", "--cifar-batch", "16",
                          "--eval-repeats", "1", "--train-repeats", "1", "--warmup", "0", "--json", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert set(json.loads(out.read_text())["results"]) == {"cifar_eval", "cifar_train"}


def test_latency_control_is_the_backbone_in_its_own_memory():
    from rmn.analysis.latency import build_variants

    models = build_variants("resnet18", 32, num_classes=10, variants=("backbone", "backbone_copy"), width_mult=0.125)
    a, b = models["backbone"], models["backbone_copy"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(a.parameters(), b.parameters()))
