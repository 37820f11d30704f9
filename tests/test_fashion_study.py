"""The Fashion-MNIST study script: its rows are the configs the issues ask for, and its table is the
mean and standard deviation over every seed on disk (checked against hand-computed numbers)."""
from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def study(load_benchmark):
    return load_benchmark("fashion_study")


def test_rows_differ_only_where_the_study_says(study, tmp_path):
    for row in study.STUDIES["small-batch"]:
        cfg = study.config(row, 1, None, 1, tmp_path)
        assert (cfg.run.mode, cfg.model.attention, cfg.model.num_procedures, cfg.schedule.epochs) == ("rmn", "none", 8, 10)
        assert cfg.data.batch_size in (128, 256)
        if row.startswith("accum"):  # a virtual batch of 1024 samples for the memories
            assert cfg.model.memory_accumulate_steps * cfg.data.batch_size == 1024
        else:
            assert cfg.model.memory_accumulate_steps == 1
        assert (cfg.model.memory_rule == "count_ema") == row.startswith("count")
        assert (cfg.model.revive_after > 0) == row.startswith("revive")
        assert cfg.model.match_batchnorm == row.startswith("bnm")
    base = study.config("baseline", 0, None, 1, tmp_path)
    for row in study.REPRODUCTION:
        cfg = study.config(row, 0, None, 1, tmp_path)
        assert (cfg.optim, cfg.schedule, cfg.model.width_mult) == (base.optim, base.schedule, base.model.width_mult)


def test_dead_procedure_rows_are_digits_at_n16_and_the_variants_share_step_one(study, tmp_path):
    rows = study.STUDIES["dead-procedures"]
    for row in rows:
        cfg = study.config(row, 0, None, 1, tmp_path)
        assert (cfg.data.dataset, cfg.model.num_procedures, cfg.model.attention, cfg.schedule.epochs) == ("digits", 16, "none", 14)
        if row.startswith("accum"):  # the memories wait for the samples of one batch of the batch-128 row
            assert cfg.model.memory_accumulate_steps * cfg.data.batch_size == rows["ema_d128"][1]["data.batch_size"]
    shared = {row for row in rows if row in study.SHARED_STEM}
    assert shared == {"ema_d16", "count_d16", "accum_d16", "revive_d16"}
    assert {study.SHARED_STEM[row] for row in shared} == {("ema_d16", "stem_d16")}
    assert study.SHARED_STEM["count_b128"] == ("ema_b128", "stem_b128")  # the Fashion stems keep their folders
    assert "dead procedures (mean, of 64)" in study.table("dead-procedures", tmp_path)  # 4 stages x 16


def _summary(kind, seed, top1, dead=0, revived=0):
    return {"kind": kind, "seed": seed, "eval_top1": top1, "dead_procedures": dead, "revived": revived,
            "params": 1_405_218, "macs_per_image": 7_423_232.0}


def test_table_is_mean_and_std_over_the_seeds_on_disk(study, tmp_path):
    runs = {"baseline-seed0": _summary("baseline", 0, 0.90), "baseline-seed1": _summary("baseline", 1, 0.92),
            "ema_b128-seed0": _summary("rmn", 0, 0.80, dead=4, revived=0),
            "ema_b128-seed2": _summary("rmn", 2, 0.86, dead=2, revived=0),
            "ema_b128-seed1": _summary("rmn", 1, 0.83, dead=3, revived=0)}
    for name, s in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(s))
    lines = study.table("small-batch", tmp_path).splitlines()
    assert lines[2] == "| baseline (batch 256) | 0,1 | 91.00 ± 1.41 | 1.405M | 7.42M | - | - |"
    assert lines[3] == "| paper EMA (batch 128) | 0,1,2 | 83.00 ± 3.00 | 1.405M | 7.42M | 3.0 | 0.0 |"
    assert len(lines) == 4  # rows without results are left out


def test_epoch_log_keeps_the_curve_revivals_and_the_least_loaded_procedure(study, tmp_path):
    rows = [{"epoch": 1, "phase": "stem", "train_loss": 1.0, "eval_top1": 0.5},
            {"epoch": 2, "phase": "routed", "train_loss": 0.5, "eval_top1": 0.7, "dead_procedures": 1, "revived": 2,
             "load_stage0": [0.5, 0.5], "load_stage1": [0.99, 0.01]}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = study.epoch_log(tmp_path)
    assert log["revived"] == 2
    assert log["per_epoch"][0] == {"epoch": 1, "phase": "stem", "train_loss": 1.0, "eval_top1": 0.5,
                                   "dead_procedures": None, "revived": None, "min_load_share": None}
    assert log["per_epoch"][1]["revived"] == 2
    assert log["per_epoch"][1]["min_load_share"] == 0.01


def test_curves_average_each_epoch_over_seeds_and_mark_routed_epochs(study, tmp_path):
    def run(seed, losses, tops, phases):
        per = [{"epoch": i + 1, "phase": ph, "train_loss": lo, "eval_top1": t} for i, (lo, t, ph) in enumerate(zip(losses, tops, phases))]
        (tmp_path / f"rmn-seed{seed}.json").write_text(json.dumps({"per_epoch": per}))

    run(0, [1.0, 0.5], [0.5, 0.7], ["stem", "routed"])
    run(1, [0.8, 0.3], [0.6, 0.8], ["stem", "routed"])
    started = [{"epoch": 2, "phase": "routed", "train_loss": 0.2, "eval_top1": 0.9}]  # step 1 from a shared run
    (tmp_path / "ema-seed0.json").write_text(json.dumps({"per_epoch": started}))
    lines = study.curves(["rmn", "ema", "missing"], tmp_path).splitlines()
    assert lines[0] == "| epoch | rmn: loss / top-1 % (2 seeds) | ema: loss / top-1 % (1 seed) |"
    assert lines[2:] == ["| 1 | 0.900 / 55.00 | - |", "| 2 | 0.400 / 75.00 * | 0.200 / 90.00 * |"]
