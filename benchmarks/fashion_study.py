"""CPU-scale studies on real data: does routing-by-memory beat its baseline at equal FLOPs, and can it
train at the baseline's batch size? The Fashion-MNIST studies' rows: configs/fashion/base.yaml (eighth-width
CIFAR-style ResNet-18, N=8, 10 epochs of which 4 plain), the same LR schedule; several seeds.

``--study reproduction`` (REPRODUCTION.md, "CPU-scale study"; the paper's Tables 1/4 and supplementary, scaled down):
baseline at batch 256, baseline + SE, baseline at 1024, RMN without CA and with CA at 1024 (256*N/2).

``--study investigation``: RMN at 1024 with one change each, to test a cause of its gap to the baseline:
procedures' gradients scaled by N (optim.procedure_grad_scale; do they learn too slowly?) and BatchNorm
matched to the clusters at cloning (model.match_batchnorm; is the first routed epoch lost to the clone shift?).

``--study small-batch`` (REPRODUCTION.md, "Beyond the paper"): RMN without CA at batch 128 and 256 with the
paper's memory EMA and each variant of rmn.memory: count-weighted EMA, statistics accumulated to a
virtual batch of 1024, dead-procedure revival. The variants of one batch size and seed share step 1:
a stem run (runs/fashion_study/stem_b<B>/seed<k>) trained once, which each variant continues with
``run.start_from`` (bit-identical to training step 1 in place; tests/test_recipe_start_from.py).

``--study precision``: the reproduction's baseline (batch 256) and RMN without CA (batch 1024) trained with
``run.amp: bf16`` and ``run.channels_last``, beside their float32 rows: is bf16 accuracy-neutral here?

``--study dead-procedures``: where the paper's EMA does let procedures die, does each variant keep them alive?
On scikit-learn's digits (configs/digits/dead_procedures.yaml: N=16, batch 16, 4 plain + 10 routed epochs,
about 2 minutes a run): every rule at batch 16 (sharing step 1 as above), the paper's EMA with and without
revival at batch 128 (8x, as the paper's 1024 is 8x its baseline's 128) and the baseline at batch 16.

    .venv/bin/python benchmarks/fashion_study.py                       # reproduction rows x 3 seeds (resumable)
    .venv/bin/python benchmarks/fashion_study.py --study small-batch --seeds 0
    .venv/bin/python benchmarks/fashion_study.py --study dead-procedures --seeds 0 1 2
    .venv/bin/python benchmarks/fashion_study.py --seeds 0 --rows rmn_ca --epochs 2    # a quick look (its own files: rmn_ca-e2-seed0)

Each run trains in runs/fashion_study/<row>/seed<k> (checkpoints, logs; resumable) and its summary.json is
copied to results/fashion_study/<row>-seed<k>.json; a finished run is never trained again. The study's
table (mean and standard deviation over all seeds on disk) goes to results/fashion_study/<table>.md and
to stdout.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from rmn.recipe import load_config  # noqa: E402
from rmn.recipe.run import Run  # noqa: E402
from rmn.recipe.steps import train_stem  # noqa: E402
from study_runs import ensure_data, epoch_log, train_and_record  # noqa: E402,F401  (epoch_log: tests use it here)
REPRODUCTION = {
    "baseline": ("baseline (batch 256)", {"run.mode": "baseline", "data.batch_size": 256}),
    "baseline_se": ("baseline + SE (batch 256)", {"run.mode": "baseline", "data.batch_size": 256, "model.attention": "se"}),
    "baseline_1024": ("baseline (batch 1024)", {"run.mode": "baseline", "data.batch_size": 1024}),
    "rmn": ("RMN N=8 without CA (batch 1024)", {"run.mode": "rmn", "data.batch_size": 1024, "model.attention": "none"}),
    "rmn_ca": ("RMN N=8 with CA (batch 1024)", {"run.mode": "rmn", "data.batch_size": 1024, "model.attention": "ca"}),
}
VARIANTS = {  # rmn.memory's update rules; the paper's EMA first
    "ema": ("paper EMA", {}),
    "count": ("count-weighted EMA", {"model.memory_rule": "count_ema"}),
    "accum": ("statistics over {virtual} samples", {"model.memory_accumulate_steps": None}),  # None: virtual // batch
    "revive": ("paper EMA + revival", {"model.revive_after": 20, "model.revive_threshold": 0.0}),
}


def variants(suffix: str, batch: int, virtual: int, what: str = "") -> dict:
    """Each memory rule at one batch size; ``virtual``: the samples the accumulating rule waits for."""
    return {f"{v}_{suffix}": (f"{label.format(virtual=virtual)} ({what}batch {batch})",
                              {"run.mode": "rmn", "data.batch_size": batch, "model.attention": "none",
                               **{k: (virtual // batch if x is None else x) for k, x in over.items()}})
            for v, (label, over) in VARIANTS.items()}


B256 = variants("b256", 256, 1024)
SMALL_BATCH = {**variants("b128", 128, 1024), **B256,
               # both fixes beyond the paper at the baseline's batch: does RMN then reach its baseline?
               "bnm_b256": ("paper EMA, BatchNorm matched at cloning (batch 256)",
                            {**B256["ema_b256"][1], "model.match_batchnorm": True})}
INVESTIGATION = {  # why RMN trails its baseline here: one cause at a time
    "rmn_gs8": ("RMN N=8 without CA, procedure gradients x8 (batch 1024)",
                {**REPRODUCTION["rmn"][1], "optim.procedure_grad_scale": 8.0}),
    "rmn_bnm": ("RMN N=8 without CA, BatchNorm matched at cloning (batch 1024)",
                {**REPRODUCTION["rmn"][1], "model.match_batchnorm": True}),
    "rmn_ca_bnm": ("RMN N=8 with CA, BatchNorm matched at cloning (batch 1024)",
                   {**REPRODUCTION["rmn_ca"][1], "model.match_batchnorm": True}),
}
DIGITS_VARIANTS = variants("d16", 16, 128, "digits, ")
DEAD_PROCEDURES = {  # digits, N=16: a setting where the paper's EMA loses procedures
    **DIGITS_VARIANTS,
    "ema_d128": ("paper EMA (digits, batch 128)", {"run.mode": "rmn", "data.batch_size": 128}),
    "revive_d128": ("paper EMA + revival (digits, batch 128)",
                    {"run.mode": "rmn", "data.batch_size": 128, **VARIANTS["revive"][1]}),
    "baseline_d16": ("baseline (digits, batch 16)", {"run.mode": "baseline", "data.batch_size": 16}),
}
PRECISION = {  # mixed precision (run.amp): do the reproduction's baseline and RMN rows keep their accuracy in bf16?
    f"{row}_bf16": (f"{REPRODUCTION[row][0]}, bf16 + channels_last",
                    {**REPRODUCTION[row][1], "run.amp": "bf16", "run.channels_last": True})
    for row in ("baseline", "rmn")}
STUDIES = {"reproduction": REPRODUCTION, "small-batch": SMALL_BATCH, "investigation": INVESTIGATION, "precision": PRECISION,
           "dead-procedures": DEAD_PROCEDURES}
ROWS = {row: spec for study in STUDIES.values() for row, spec in study.items()}
TABLES = {"reproduction": "table", "small-batch": "small_batch", "investigation": "investigation", "precision": "precision",
          "dead-procedures": "dead_procedures"}
REFERENCE_ROWS = {"small-batch": ("baseline", "rmn"), "investigation": ("baseline_1024", "rmn", "rmn_ca"),
                  "precision": ("baseline", "rmn")}  # shown beside
BASE_CONFIG = {row: ROOT / ("configs/digits/dead_procedures.yaml" if row in DEAD_PROCEDURES else "configs/fashion/base.yaml")
               for row in ROWS}
# rows continued from a shared step 1: row -> (the row whose config trains it, the stem's folder name)
SHARED_STEM = {row: (f"ema_{row.split('_')[1]}", f"stem_{row.split('_')[1]}")
               for row in [*SMALL_BATCH, *DIGITS_VARIANTS]}
STAGES = 4  # routed stages of the CIFAR-style ResNet-18 every study uses


def routed_procedures(study: str) -> int:
    """Procedures a run of ``study`` routes to (every row of a study has its base config's N)."""
    return STAGES * load_config(BASE_CONFIG[next(iter(STUDIES[study]))]).model.num_procedures


def tagged(row: str, epochs: int | None) -> str:
    """A row's name in run folders and result files: runs with other --epochs never mix with the study's."""
    return row if epochs is None else f"{row}-e{epochs}"


def config(row: str, seed: int, epochs: int | None, threads: int, out_root: Path, **extra):
    overrides = dict(ROWS[row][1])
    name = tagged(row, epochs)
    overrides.update({"run.seed": seed, "run.output": str(out_root / name / f"seed{seed}"), "run.name": f"{name}-seed{seed}",
                      "run.threads": threads, "run.progress": "lines", "run.atlas": False, **extra})
    if epochs is not None:
        overrides["schedule.epochs"] = epochs
        overrides["schedule.stem_epochs"] = max(1, round(epochs * 0.4))
    return load_config(BASE_CONFIG[row], overrides)


def shared_stem(row: str, seed: int, epochs: int | None, threads: int, out_root: Path) -> Path:
    """Step 1 of a variant row, trained once per batch size and seed (the variants share it)."""
    stem_row, stem = SHARED_STEM[row]
    stem = tagged(stem, epochs)
    # one config for the stem of every variant (they differ in routing options only, which step 1 ignores)
    cfg = config(stem_row, seed, epochs, threads, out_root, **{"run.output": str(out_root / stem / f"seed{seed}"),
                                                       "run.name": f"{stem}-seed{seed}", "run.keep_checkpoints": 1})
    run = Run.open(cfg, resume=True)
    if run.epoch < cfg.schedule.stem_epochs:
        print(f"== step 1 of {stem}, seed {seed} (shared by the variants)", flush=True)
        train_stem(run)
    run.log.close()
    return cfg.output_dir()


def run_one(row: str, seed: int, epochs: int | None, threads: int, out_root: Path, results: Path) -> dict:
    dest = results / f"{tagged(row, epochs)}-seed{seed}.json"
    if dest.exists():
        return json.loads(dest.read_text())
    extra = {"run.start_from": str(shared_stem(row, seed, epochs, threads, out_root))} if row in SHARED_STEM else {}
    cfg = config(row, seed, epochs, threads, out_root, **extra)
    print(f"== {row} seed {seed}", flush=True)
    return train_and_record(cfg, dest)


def table(study: str, results: Path, epochs: int | None = None) -> str:
    """Mean and standard deviation over every seed on disk of each row of ``study``."""
    rows = {tagged(name, epochs): label for name, (label, _) in STUDIES[study].items()}
    refs = {tagged(name, epochs): REPRODUCTION[name][0] for name in REFERENCE_ROWS.get(study, ())}
    revivals = study in ("small-batch", "dead-procedures")
    lines = [f"| row | seeds | test top-1 % (mean ± std) | params | MACs / image | dead procedures (mean, of {routed_procedures(study)}) |"
             + (" revivals (mean) |" if revivals else ""),
             "|---|---|---|---|---|---|" + ("---|" if revivals else "")]
    for name, label in {**refs, **rows}.items():
        runs = [json.loads(p.read_text()) for p in sorted(results.glob(f"{name}-seed*.json"))]
        if not runs:
            continue
        acc = [100 * r["eval_top1"] for r in runs]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        baseline = runs[0]["kind"] == "baseline"
        dead = "-" if baseline else f"{statistics.mean(r['dead_procedures'] for r in runs):.1f}"
        seeds = ",".join(str(r["seed"]) for r in runs)
        line = (f"| {label} | {seeds} | {statistics.mean(acc):.2f} ± {std:.2f} | {runs[0]['params'] / 1e6:.3f}M | "
                f"{runs[0]['macs_per_image'] / 1e6:.2f}M | {dead} |")
        if revivals:
            line += " - |" if baseline else f" {statistics.mean(r.get('revived', 0) for r in runs):.1f} |"
        lines.append(line)
    return "\n".join(lines)


def curves(rows: list[str], results: Path, seeds: list[int] | None = None) -> str:
    """Per-epoch training loss and test top-1 of ``rows`` (mean over ``seeds``, default every seed on disk):
    where RMN gains or loses."""
    runs = {row: [json.loads(p.read_text()) for p in sorted(results.glob(f"{row}-seed*.json"))
                  if seeds is None or int(p.stem.rsplit("-seed", 1)[1]) in seeds] for row in rows}
    runs = {row: r for row, r in runs.items() if r}
    if not runs:
        return ""
    epochs = max(x["epoch"] for r in runs.values() for run in r for x in run["per_epoch"])
    head = "| epoch | " + " | ".join(f"{row}: loss / top-1 % ({len(r)} seed{'s' if len(r) > 1 else ''})" for row, r in runs.items()) + " |"
    lines = [head, "|---|" + "---|" * len(runs)]
    for e in range(epochs):
        cells = []
        for r in runs.values():
            # runs continued from a shared step 1 (run.start_from) log their own epochs only
            got = [x for run in r for x in run["per_epoch"] if x["epoch"] == e + 1]
            if not got:
                cells.append("-")
                continue
            loss = statistics.mean(g["train_loss"] for g in got)
            top1 = statistics.mean(100 * g["eval_top1"] for g in got)
            cells.append(f"{loss:.3f} / {top1:.2f}" + (" *" if got[0]["phase"] == "routed" else ""))
        lines.append(f"| {e + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", choices=list(STUDIES), default="reproduction")
    ap.add_argument("--rows", nargs="+", default=None, help="rows of the study (default: all)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds to train (or to average, with --curves)")
    ap.add_argument("--epochs", type=int, default=None, help="override schedule.epochs (stem epochs = 40%%)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (run two invocations with different --seeds to use two cores)")
    ap.add_argument("--runs", default=str(ROOT / "runs/fashion_study"))
    ap.add_argument("--results", default=str(ROOT / "results/fashion_study"))
    ap.add_argument("--table-only", action="store_true", help="only rebuild the table from the results on disk")
    ap.add_argument("--curves", nargs="+", metavar="ROW", help="print the per-epoch curves of these result rows "
                    "(e.g. baseline_1024 rmn rmn-e20) to stdout and results/.../curves-<rows>.md, then stop")
    args = ap.parse_args()
    rows = args.rows or list(STUDIES[args.study])
    unknown = [r for r in rows if r not in STUDIES[args.study]]
    if unknown:
        ap.error(f"--rows: {', '.join(unknown)} not in study {args.study} (rows: {', '.join(STUDIES[args.study])})")
    results = Path(args.results)
    if args.curves:
        text = curves(args.curves, results, args.seeds)
        print(text + "\n(* = routed epoch)")
        (results / f"curves-{'-'.join(args.curves)}-seeds{''.join(map(str, args.seeds))}.md").write_text(text + "\n")
        return
    if not args.table_only:
        if any(load_config(BASE_CONFIG[row]).data.dataset == "fashion-mnist" for row in rows):
            ensure_data()
        for seed in args.seeds:  # seeds outermost: a partial study still has every row
            for row in rows:
                run_one(row, seed, args.epochs, args.threads, Path(args.runs), results)
    text = table(args.study, results, args.epochs)
    print(text)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{tagged(TABLES[args.study], args.epochs)}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
