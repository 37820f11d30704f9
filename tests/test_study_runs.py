"""The studies' shared run recorder (benchmarks/study_runs.py): a run that takes its plain epochs from another
run's kept checkpoint records the same per-epoch log and result as the run that trained them itself."""
from __future__ import annotations

from test_recipe_resume import tiny_cfg


def test_a_run_started_from_a_kept_stem_records_the_whole_run(tmp_path, load_benchmark):
    study_runs = load_benchmark("study_runs")
    whole = study_runs.train_and_record(tiny_cfg(tmp_path / "whole"), tmp_path / "whole.json")
    base = tiny_cfg(tmp_path / "base", **{"run.mode": "baseline", "run.keep_checkpoints": 10})
    study_runs.train_and_record(base, tmp_path / "base.json", keep_epochs=(2,))
    assert not (tmp_path / "base" / "checkpoints").exists()
    kept = sorted((tmp_path / "base" / "kept").iterdir())
    assert [p.name.split("-", 2)[2] for p in kept] == ["baseline-e2.json", "baseline-e2.safetensors"]
    shared = study_runs.train_and_record(tiny_cfg(tmp_path / "shared", **{"run.start_from": str(kept[1])}),
                                         tmp_path / "shared.json", started_from=tmp_path / "base")
    assert shared["stem_from"] == str(tmp_path / "base") and "stem_from" not in whole
    assert (shared["eval_top1"], shared["steps"]) == (whole["eval_top1"], whole["steps"])
    # epochs 1-2 come from the baseline's log (phase "baseline" there), the routed ones from the run itself
    assert [e["phase"] for e in shared["per_epoch"]] == ["baseline", "baseline", "routed", "routed"]
    assert [{**e, "phase": None} for e in shared["per_epoch"]] == [{**e, "phase": None} for e in whole["per_epoch"]]
