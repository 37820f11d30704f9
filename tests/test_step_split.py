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
