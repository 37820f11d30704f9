"""benchmarks/demo_seeds.py: its table is per-seed top-1 plus mean ± std and min to max over every seed on disk
(checked against hand-computed numbers), and a seed with a result is not trained again."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_seeds(load_benchmark):
    return load_benchmark("demo_seeds")


def summary(kind: str, top1: float, seconds: float) -> dict:
    return {"kind": kind, "backbone": "resnet18", "dataset": "digits", "num_procedures": 4,
            "attention": "none" if kind == "baseline" else "ca", "params": 701818 if kind == "baseline" else 2805000,
            "eval_top1": top1, "timing": {"wall_seconds_this_invocation": seconds}}


def test_table_over_the_seeds_on_disk(demo_seeds, tmp_path):
    for seed, (base, rmn) in {0: (0.98, 0.99), 1: (0.97, 0.995), 2: (0.99, 0.975)}.items():
        (tmp_path / f"seed{seed}.json").write_text(json.dumps([summary("baseline", base, 60.4), summary("rmn", rmn, 80.6)]))
    lines = demo_seeds.table(tmp_path).splitlines()
    assert lines[2] == "| 0 | 98.00 | 99.00 | +1.00 | 60 | 81 |"
    assert lines[4] == "| 2 | 99.00 | 97.50 | -1.50 | 60 | 81 |"
    assert lines[8] == "| baseline resnet18 (0.702M params) | 98.00 ± 1.00 | 97.00 to 99.00 |"
    assert lines[9] == "| RMN N=4 ca (2.805M params) | 98.67 ± 1.04 | 97.50 to 99.50 |"
    assert lines[10] == "| RMN - baseline (points) | 0.67 ± 2.02 | -1.50 to 2.50 |"
    assert lines[-1] == "3 seeds; one of the 360 test digits is 0.28 points of top-1."


def test_a_seed_with_a_result_is_not_trained_again(demo_seeds, tmp_path, monkeypatch):
    done = [summary("baseline", 0.98, 1.0), summary("rmn", 0.99, 1.0)]
    (tmp_path / "seed3.json").write_text(json.dumps(done))
    monkeypatch.setattr(demo_seeds, "run_experiment", lambda *a, **k: pytest.fail("trained a finished seed"))
    assert demo_seeds.run_seed(ROOT / "configs" / "demo.yaml", 3, 1, tmp_path / "runs", tmp_path) == done
