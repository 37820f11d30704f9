"""How much the embedded demo's numbers move between seeds: ``configs/demo.yaml`` (``run.mode: both``)
trained once per seed, baseline and RMN top-1 per seed, their mean ± standard deviation and min-max.

    nice -n 10 .venv/bin/python benchmarks/demo_seeds.py --seeds 0 1 2 3 4      # about 3 minutes a seed on one thread
    .venv/bin/python benchmarks/demo_seeds.py --table-only                       # the table from the results on disk

``--seeds`` sets ``run.seed`` (weight initialisation, shuffling, augmentation and CA's random routes of
step 1); everything else is the demo config as shipped, on one thread. Each seed trains in
``runs/demo_seeds/seed<k>`` (checkpoints, logs: an interrupted seed resumes) and its ``comparison.json`` is
copied to ``results/demo_seeds/seed<k>.json``; a seed with a result is never trained again. The table (every
seed on disk) goes to stdout and to ``results/demo_seeds/table.md``, in Markdown, ready for README.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from rmn.recipe import load_config  # noqa: E402
from rmn.recipe.runner import run_experiment  # noqa: E402

DIGITS_TEST_IMAGES = 360  # the digits set's fixed held-out 20% (rmn.data.digits)


def run_seed(config: Path, seed: int, threads: int, runs: Path, results: Path) -> list[dict]:
    """Baseline and RMN summaries of one seed: trained (or resumed) unless its result is already on disk."""
    dest = results / f"seed{seed}.json"
    if dest.exists():
        return json.loads(dest.read_text())
    out = runs / f"seed{seed}"
    cfg = load_config(config, {"run.seed": seed, "run.output": str(out), "run.threads": threads,
                               "run.progress": "lines", "run.atlas": False, "run.tensorboard": False})
    print(f"== seed {seed} ({out})", flush=True)
    t0 = time.perf_counter()
    summaries = run_experiment(cfg, resume=True)
    for s in summaries:
        s["timing"]["seed_seconds"] = time.perf_counter() - t0
    results.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(summaries, indent=1))
    for kind in ("baseline", "rmn"):  # keep the disk small; logs and summaries stay
        shutil.rmtree(out / kind / "checkpoints", ignore_errors=True)
    return summaries


def spread(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f} | {min(values):.2f} to {max(values):.2f}"


def table(results: Path) -> str:
    """One row per seed on disk (top-1 and wall seconds of each model, set-up included), then mean ± std and
    min to max of baseline, RMN and their difference."""
    runs = {int(p.stem[len("seed"):]): json.loads(p.read_text()) for p in results.glob("seed*.json")}
    if not runs:
        return f"no results in {results}"
    cols: dict[str, list[float]] = {"baseline": [], "rmn": [], "diff": []}
    lines = ["| seed | baseline top-1 % | RMN top-1 % | RMN - baseline (points) | baseline s | RMN s |",
             "|---|---|---|---|---|---|"]
    for seed in sorted(runs):
        by_kind = {s["kind"]: s for s in runs[seed]}
        base, rmn = (100 * by_kind[k]["eval_top1"] for k in ("baseline", "rmn"))
        cols["baseline"].append(base)
        cols["rmn"].append(rmn)
        cols["diff"].append(rmn - base)
        secs = [by_kind[k]["timing"]["wall_seconds_this_invocation"] for k in ("baseline", "rmn")]
        lines.append(f"| {seed} | {base:.2f} | {rmn:.2f} | {rmn - base:+.2f} | {secs[0]:.0f} | {secs[1]:.0f} |")
    first = {s["kind"]: s for s in runs[min(runs)]}
    summary = ["| model | top-1 % mean ± std | min to max |", "|---|---|---|"]
    for key, name in (("baseline", f"baseline {first['baseline']['backbone']} ({first['baseline']['params'] / 1e6:.3f}M params)"),
                      ("rmn", f"RMN N={first['rmn']['num_procedures']} {first['rmn']['attention']} "
                              f"({first['rmn']['params'] / 1e6:.3f}M params)"),
                      ("diff", "RMN - baseline (points)")):
        summary.append(f"| {name} | " + spread(cols[key]) + " |")
    note = f"{len(runs)} seeds"
    if first["rmn"]["dataset"] == "digits":
        note += f"; one of the {DIGITS_TEST_IMAGES} test digits is {100 / DIGITS_TEST_IMAGES:.2f} points of top-1"
    return "\n".join(lines) + "\n\n" + "\n".join(summary) + f"\n\n{note}."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--config", default=str(ROOT / "configs/demo.yaml"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (default: 1, as the demo)")
    ap.add_argument("--runs", default=str(ROOT / "runs/demo_seeds"))
    ap.add_argument("--results", default=str(ROOT / "results/demo_seeds"))
    ap.add_argument("--table-only", action="store_true", help="only rebuild the table from the results on disk")
    args = ap.parse_args()
    results = Path(args.results)
    if not args.table_only:
        for seed in args.seeds:
            run_seed(Path(args.config), seed, args.threads, Path(args.runs), results)
    text = table(results)
    print(text)
    results.mkdir(parents=True, exist_ok=True)
    (results / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
