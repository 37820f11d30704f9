"""The value study's driver (benchmarks/value_study.py): its rows are the config files the issue asks for, its
summary is the mean and standard deviation of the per-run results (checked against hand-computed numbers), and
REPRODUCTION.md shows exactly what it generates from results/value_study/summary.json."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from rmn import data as rdata
from rmn.analysis.cost import count_params
from rmn.recipe import load_config
from rmn.recipe.build import build_stem_network, clone_network
from rmn.recipe.run import plain_network_difference

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study(load_benchmark):
    return load_benchmark("value_study")


def test_config_files_are_what_the_script_writes(study):
    assert study.stale_configs() == [], "run: python benchmarks/value_study.py configs"
    assert sorted(p.stem for p in (ROOT / study.CONFIGS).glob("*.yaml")) == sorted(study.ROWS)


def test_rows_differ_from_the_base_only_where_declared(study, tmp_path):
    base = load_config(ROOT / study.BASE)
    for row, spec in study.ROWS.items():
        cfg = study.run_config(row, 3, 1, tmp_path)
        assert (cfg.run.seed, cfg.output_dir()) == (3, tmp_path / row / "seed3")
        # one learning-rate schedule for every row but the re-warmed ones; the procedures' gradient scale differs
        assert (replace(cfg.optim, procedure_grad_scale=1.0, rewarm_epochs=0.0, untie_epochs=0.0, untie_to=1.0), cfg.data.dataset) == (
            base.optim, "fashion-mnist")
        rewarm = row.endswith("_rewarm")
        # the capacity control is at width 1/8 (the Fashion study's); everything after it at 1/16
        assert cfg.model.width_mult == (0.0625 if spec.part != "capacity" and row != "narrow_wide2x" else
                                        cfg.model.width_mult)
        assert (cfg.run.amp, cfg.run.channels_last) == {"_bf16": ("bf16", True), "_cl": ("none", True),
                                                        "_contig": ("bf16", False)}.get(row[row.rfind("_"):], ("none", False))
        if spec.part in ("capacity", "narrow", "screen", "precision"):  # the 10-epoch schedule of the capacity control
            assert (cfg.schedule.epochs, cfg.data.batch_size) == (10, 256)
            assert cfg.schedule.stem_epochs == (2 if rewarm else 4)
            assert cfg.optim.rewarm_epochs == (1.0 if rewarm else 0.0)
            assert cfg.run.mode == "baseline" or spec.part != "capacity"
        elif spec.part == "longer":  # the paper's regime twice as long, a third plain
            assert (cfg.schedule.epochs, cfg.schedule.stem_epochs, cfg.data.batch_size) == (80, 27, 256)
        else:  # the paper's regime: a third of 40 epochs plain, or cloning earlier (upcycling practice)
            early = row.endswith(("_early", "_rewarm"))
            assert (cfg.schedule.epochs, cfg.schedule.stem_epochs) == (40, 7 if early else 13)
            assert cfg.optim.rewarm_epochs == (2.0 if rewarm else 0.0)
            assert spec.part == "beyond" or not early
        if row.endswith(("_combo", "_combo_n1")):  # the screen's four best changes together (and their N=1 control)
            assert (cfg.model.num_procedures, cfg.model.routed_stages, cfg.optim.procedure_grad_scale,
                    cfg.model.match_batchnorm) == (1 if row.endswith("_n1") else 4, [2, 3], 2.0, True)
            assert (cfg.model.attention, cfg.model.procedure_batchnorm, cfg.optim.untie_epochs) == ("none", "slice", 0.0)
            assert cfg.data.batch_size == (1024 if "_1024" in row else 256)
        elif cfg.run.mode == "rmn":
            assert cfg.model.match_batchnorm == row.endswith("_bnm")
            assert cfg.model.procedure_batchnorm == ("pooled" if "_pooledbn" in row else "slice")
            assert cfg.optim.untie_epochs == (2.0 if row.endswith("_untie") else 0.0)
            assert cfg.optim.untie_to == (float(row.rsplit("_tie", 1)[1]) if "_tie0" in row else 1.0)
            assert cfg.optim.procedure_grad_scale == (2.83 if row.endswith("_gs2.83") else 1.0)
            assert cfg.model.routed_stages == ([2, 3] if "_late" in row else [3] if "_last" in row else None)
            assert cfg.model.num_procedures == {"_n4": 4, "_n2": 2}.get(row[row.rfind("_"):], 8)
            assert cfg.model.attention == ("ca" if "_ca" in row else "none")
            assert cfg.model.memory_momentum == {"frozen": 1.0, "slowmem": 0.99}.get(row.rsplit("_", 1)[1], 0.9)


def test_a_stem_source_trains_its_rows_step_one(study, tmp_path):
    """Rows that start from a baseline row's checkpoint: rmn itself would refuse a source that is not their step 1
    (run.plain_network_difference); the source keeps the checkpoint at the end of their plain epochs."""
    served = {}
    for row, spec in study.ROWS.items():
        if spec.stem_from:
            cfg, src = (load_config(ROOT / study.config_path(r)) for r in (row, spec.stem_from))
            assert (src.run.mode, cfg.run.mode, cfg.model.attention) == ("baseline", "rmn", "none"), row
            assert plain_network_difference(src, cfg) is None, row
            served.setdefault(spec.stem_from, set()).add(cfg.schedule.stem_epochs)
    assert served == {"e40_baseline": {13}, "e40_baseline_1024": {13}, "e80_baseline": {27}}
    for source, epochs in served.items():
        assert study.kept_epochs(source) == tuple(sorted(epochs))
        cfg = study.run_config(source, 0, 1, tmp_path)
        assert cfg.run.keep_checkpoints > cfg.schedule.epochs  # every epoch's, while it trains
    assert study.kept_epochs("narrow_baseline") == ()
    early = load_config(ROOT / study.config_path("e40_rmn_256_early"))  # clones at 7: not the source's stem epochs
    assert plain_network_difference(load_config(ROOT / study.config_path("e40_baseline")), early) is not None


def test_a_row_starts_from_its_source_s_kept_checkpoint(study, tmp_path):
    kept = tmp_path / "e40_baseline_1024" / "seed1" / "kept"
    kept.mkdir(parents=True)
    for name in ("ckpt-00012-baseline-e12.safetensors", "ckpt-00013-baseline-e13.safetensors"):
        (kept / name).write_bytes(b"")
    assert study.stem_checkpoint("e40_rmn_1024", 1, tmp_path) == kept / "ckpt-00013-baseline-e13.safetensors"
    assert study.stem_checkpoint("e40_rmn_1024", 0, tmp_path) is None  # that seed's source kept nothing
    assert study.stem_checkpoint("e40_rmn_ca_1024", 1, tmp_path) is None  # CA's step 1 differs: no source
    cfg = study.run_config("e40_rmn_1024", 1, 1, tmp_path, kept / "ckpt-00013-baseline-e13.safetensors")
    assert cfg.run.start_from == str(kept / "ckpt-00013-baseline-e13.safetensors")


def test_reused_baseline_results_come_from_the_same_config(study, tmp_path, load_benchmark):
    fashion = load_benchmark("fashion_study")
    ours = study.run_config("baseline", 0, 1, tmp_path)
    theirs = fashion.config("baseline", 0, None, 1, tmp_path)
    assert (ours.model, ours.data, ours.optim, ours.schedule, ours.run.mode) == (
        theirs.model, theirs.data, theirs.optim, theirs.schedule, theirs.run.mode)
    assert [p.name for p in study.result_files("baseline")] == [f"baseline-seed{k}.json" for k in range(3)]


def test_the_wide_row_has_rmn_s_parameter_count(study):
    spec = rdata.dataset_spec("fashion-mnist")
    rmn_cfg = load_config(ROOT / study.config_path("e40_rmn_256"), {"model.width_mult": 0.125})
    rmn = count_params(clone_network(rmn_cfg, build_stem_network(rmn_cfg, spec, 28)))
    wide = count_params(build_stem_network(load_config(ROOT / study.config_path("wide_params")), spec, 28))
    assert (rmn, wide) == (1_405_218, 1_404_210)
    for w in (study.WIDTH_AT_RMN_PARAMS - 0.001, study.WIDTH_AT_RMN_PARAMS + 0.001):  # no closer width
        other = count_params(build_stem_network(load_config(ROOT / study.BASE, {"model.width_mult": w}), spec, 28))
        assert abs(other - rmn) > abs(wide - rmn)


def test_routed_steps_of_the_paper_regime(study, tmp_path):
    steps = {row: study.routed_steps(study.run_config(row, 0, 1, tmp_path), 60_000 // b * 40)
             for row, b in (("e40_rmn_256", 256), ("e40_rmn_1024", 1024), ("e40_baseline", 256), ("e40_rmn_256_rewarm", 256))}
    assert steps == {"e40_rmn_256": 234 * 27, "e40_rmn_1024": 58 * 27, "e40_baseline": 0, "e40_rmn_256_rewarm": 234 * 33}
    assert study.routed_steps(study.run_config("e80_rmn_256", 0, 1, tmp_path), 234 * 80) == 234 * 53
    assert steps["e40_rmn_256"] >= 3000  # the floor


def _run(row, seed, top1, losses, kind="rmn", dead=0, steps=2340):
    return {"row": row, "kind": kind, "seed": seed, "eval_top1": top1, "dead_procedures": dead, "steps": steps,
            "params": 1_405_218, "macs_per_image": 7_423_232.0, "commit": "abc",
            "per_epoch": [{"epoch": e + 1, "train_loss": x, "eval_top1": top1 - 0.01 * (len(losses) - e - 1)}
                          for e, x in enumerate(losses)]}


def test_summary_is_mean_and_std_over_the_seeds_on_disk(study, tmp_path):
    runs = [_run("e40_rmn_256", 0, 0.80, [1.0, 0.30], dead=4, steps=234 * 40),
            _run("e40_rmn_256", 2, 0.86, [1.0, 0.20], dead=2, steps=234 * 40),
            _run("e40_rmn_256", 1, 0.83, [1.0, 0.25], dead=3, steps=234 * 40)]
    for r in runs:
        (tmp_path / f"{r['row']}-seed{r['seed']}.json").write_text(json.dumps(r))
    (tmp_path / "unknown_row-seed0.json").write_text("{}")  # not a row of the study: ignored
    summary = study.summarize(tmp_path)
    # the reused baselines (the 1/8 baseline is also the narrow part's 2x width), then ours
    assert [s["row"] for s in summary] == ["baseline", "e40_rmn_256", "narrow_wide2x"]
    s = summary[1]
    assert (s["seeds"], s["top1_mean"], s["top1_std"], s["final_train_loss"], s["dead_procedures"]) == (
        [0, 1, 2], 83.0, 3.0, 0.25, 3)
    assert (s["kind"], s["routed_steps"], s["config"], s["commits"]) == (
        "rmn", 234 * 27, "configs/value_study/e40_rmn_256.yaml", ["abc"])
    assert set(s) >= {"row", "kind", "seeds", "top1_mean", "top1_std", "routed_steps", "params", "macs_per_image",
                      "final_train_loss", "dead_procedures", "config"}
    epochs, loss, top1 = study.curves(s)
    assert (epochs, loss, top1) == ([1, 2], [1.0, 0.25], pytest.approx([82.0, 83.0]))
    lines = study.table(summary).splitlines()
    assert lines[0] == f"**{study.PARTS['capacity']}**"
    rmn_line = next(line for line in lines if line.startswith("| RMN"))
    assert rmn_line == ("| RMN N=8 without CA (batch 256) | 0,1,2 | 83.00 ± 3.00 | 1.405M | 7.42M | 6318 | 0.2500 "
                         "| 3.0 | `configs/value_study/e40_rmn_256.yaml` |")
    assert "docs/value_study_paper.png" in study.render(summary)
    assert "value_study_beyond" not in study.render(summary)  # no row of that part on disk


def test_reproduction_md_shows_the_summary_on_disk(study):
    summary = json.loads((study.RESULTS / "summary.json").read_text())
    assert summary == json.loads(json.dumps(study.summarize())), "run: python benchmarks/value_study.py collect"
    _, block, _ = study.split_reproduction((ROOT / "REPRODUCTION.md").read_text())
    assert block == study.render(summary), "run: python benchmarks/value_study.py collect"
    for part in study.PARTS:
        if f"value_study_{part}.png" in block:
            assert study.figure_path(part).is_file()
