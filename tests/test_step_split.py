"""benchmarks/step_split.py: its variants are what it says they are, and it runs."""
import torch

from rmn.route import routed_stages


def _pair(bench):
    calib, _ = bench.calibration_images("cifar-quarter", 64)  # synthetic: needs no data set
    return bench.build_pair("cifar-quarter", 4, None, calib, 32), calib


def test_sliced_variant_is_the_baseline_run_in_equal_slices(load_benchmark):
    bench = load_benchmark("step_split")
    pair, calib = _pair(bench)
    x = calib[:16]
    sliced, distinct = bench.variant(pair, "sliced").eval(), bench.variant(pair, "distinct").eval()
    base = bench.variant(pair, "baseline").eval()
    with torch.no_grad():
        torch.testing.assert_close(sliced(x), base(x), rtol=1e-5, atol=1e-5)  # per-sample ops: slicing changes nothing
        distinct(x)
    routed = [st for st in routed_stages(sliced) if st.memory is not None]
    assert len(routed) == 4
    for stage in routed:
        assert len({id(p) for p in stage.procedures}) == 1 and stage.num_procedures == 4
        assert torch.bincount(stage.last_routes, minlength=4).tolist() == [4, 4, 4, 4]  # equal slices
    for stage in [st for st in routed_stages(distinct) if st.memory is not None]:
        assert len({id(p) for p in stage.procedures}) == 4
        assert torch.bincount(stage.last_routes, minlength=4).tolist() == [4, 4, 4, 4]


def test_quick_run_times_every_variant(capsys, load_benchmark):
    bench = load_benchmark("step_split")
    assert bench.main(["--quick", "--models", "cifar-quarter", "--precisions", "fp32", "--batch", "32",
                       "--procedures", "4"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {v}" in out for v in bench.VARIANTS) and "not written" in out


def test_grouped_variant_computes_what_the_distinct_procedures_do(load_benchmark):
    """Training mode, where BatchNorm normalises each procedure's slice with its own statistics: the grouped network
    gives the same outputs and the same gradients to every procedure."""
    bench = load_benchmark("step_split")
    pair, calib = _pair(bench)
    x = calib[:32]
    outs, grads = [], []
    for name in ("distinct", "grouped"):
        net = bench.variant(pair, name).train()
        for st in routed_stages(net):
            st.last_routes = None
        y = net(x)
        y.square().sum().backward()
        outs.append(y.detach())
        # the grouped network replaced the stages' routed forward (which records routes), not ran beside it
        assert all((st.last_routes is None) == (name == "grouped") for st in routed_stages(net) if st.memory is not None)
        grads.append({k: p.grad for k, p in net.named_parameters() if ".procedures." in k and p.grad is not None})
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-3, atol=1e-3)


def test_grouped_template_refuses_layers_it_cannot_group(load_benchmark):
    import pytest
    from torch import nn

    bench = load_benchmark("step_split")
    with pytest.raises(ValueError, match="cannot group a Linear"):
        bench.grouped_template(nn.Sequential(nn.Conv2d(2, 2, 1), nn.Linear(2, 2)), 3)
