"""benchmarks/gpu_check.py runs end to end on CPU with --quick (alias --dry-run; so the script a GPU session runs once is
known to work before it gets there), and refuses to run without a GPU otherwise."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_dry_run_writes_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["quick"] is True
    tests = report["tests"]
    assert tests["returncode"] in (0, 5) and sum(tests["counts"].values()) >= 7  # every CUDA test collected
    if not torch.cuda.is_available():
        assert tests["counts"].get("skipped") == sum(tests["counts"].values())
    (run,) = report["train_step"]
    for kind in ("train", "eval"):
        assert set(run[kind]["median"]) == {"baseline/fp32", "rmn/fp32", "baseline/bf16-cl", "rmn/bf16-cl"}
        assert all(v["wall_ms"] > 0 for v in run[kind]["median"].values())
        assert "rmn/baseline bf16-cl" in run[kind]["ratios"]
    assert all(sum(stage) > 0.99 for stage in run["loads"]["train"])  # k-means memories route every sample
    variants = report["latency"]["results"][0]["variants"]
    assert {"backbone", "rmn", "rmn_ca"} <= set(variants) and variants["rmn_ca"]["batch1"]["ratio"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json")], capture_output=True, text=True)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "--quick" in proc.stderr
    assert not (tmp_path / "x.json").exists()
