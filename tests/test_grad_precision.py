"""benchmarks/grad_precision.py on digits (--quick): float32 gradients agree with float64's, bf16's do not to
that degree, and float32 routes every sample where float64 does; for a baseline and for an RMN."""
from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("row", ["narrow_baseline", "narrow_rmn"])
def test_quick_run_measures_what_it_says(row, tmp_path, load_benchmark):
    bench = load_benchmark("grad_precision")
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--row", row, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    steps = {p: r for p, r in report["steps"].items() if p != "route_changes"}
    assert set(steps) == {"stem", "layer1", "layer2", "layer3", "layer4", "fc"}
    for r in steps.values():
        assert r["float32"]["error"] < 1e-4 < r["bf16"]["error"] < r["sgd_noise"]
    assert report["evaluation"]["float32"] == {"top1": report["evaluation"]["float32"]["top1"],
                                              "prediction_changed": 0.0, "route_changed": 0.0}
    if row == "narrow_rmn":
        assert report["steps"]["route_changes"]["float32"] == [0.0] * 4
    else:
        assert "route_changes" not in report["steps"]
