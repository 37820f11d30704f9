"""CPU-scale study: does routing-by-memory beat its baseline at equal FLOPs on real Fashion-MNIST?

Rows (the paper's Tables 1/4 and supplementary, scaled down): baseline at batch 256, baseline + SE,
baseline at batch 1024, RMN N=8 without CA and RMN N=8 with CA at batch 1024 (the paper's 256*N/2).
Every row: configs/fashion/base.yaml, the same epochs and LR schedule; several seeds.

    python benchmarks/fashion_study.py                 # all rows x 3 seeds (resumes finished/partial runs)
    python benchmarks/fashion_study.py --seeds 0 --rows rmn_ca --epochs 2    # a quick look

Each run trains in runs/fashion_study/<row>/seed<k> (checkpoints, logs; resumable) and its summary.json is
copied to results/fashion_study/<row>-seed<k>.json. The table (mean and standard deviation over seeds)
goes to results/fashion_study/table.md and to stdout.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from rmn.recipe import load_config, run_steps  # noqa: E402

DATA = Path("/usr/share/datasets/fashion-mnist")
ROWS = {
    "baseline": {"run.mode": "baseline", "data.batch_size": 256},
    "baseline_se": {"run.mode": "baseline", "data.batch_size": 256, "model.attention": "se"},
    "baseline_1024": {"run.mode": "baseline", "data.batch_size": 1024},
    "rmn": {"run.mode": "rmn", "data.batch_size": 1024, "model.attention": "none"},
    "rmn_ca": {"run.mode": "rmn", "data.batch_size": 1024, "model.attention": "ca"},
}
LABELS = {
    "baseline": "baseline (batch 256)",
    "baseline_se": "baseline + SE (batch 256)",
    "baseline_1024": "baseline (batch 1024)",
    "rmn": "RMN N=8 without CA (batch 1024)",
    "rmn_ca": "RMN N=8 with CA (batch 1024)",
}


def ensure_data() -> None:
    if (DATA / "train-images-idx3-ubyte.gz").exists():
        return
    print(f"Fashion-MNIST is not in {DATA}: installing Debian's dataset-fashion-mnist with apt-get", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"], check=True)


def run_one(row: str, seed: int, epochs: int | None, threads: int, out_root: Path, results: Path) -> dict:
    dest = results / f"{row}-seed{seed}.json"
    if dest.exists():
        return json.loads(dest.read_text())
    overrides = dict(ROWS[row])
    overrides.update({"run.seed": seed, "run.output": str(out_root / row / f"seed{seed}"), "run.name": f"{row}-seed{seed}",
                      "run.threads": threads, "run.progress": "lines", "run.atlas": False})
    if epochs is not None:
        overrides["schedule.epochs"] = epochs
        overrides["schedule.stem_epochs"] = max(1, round(epochs * 0.4))
    cfg = load_config(ROOT / "configs/fashion/base.yaml", overrides)
    t0 = time.perf_counter()
    print(f"== {row} seed {seed}", flush=True)
    summary = run_steps(cfg, resume=True, baseline=cfg.run.mode == "baseline")
    summary["timing"]["study_seconds"] = time.perf_counter() - t0
    results.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(summary, indent=1))
    shutil.rmtree(cfg.output_dir() / "checkpoints", ignore_errors=True)  # keep the disk small; logs stay
    return summary


def table(summaries: dict[str, list[dict]]) -> str:
    lines = ["| row | seeds | test top-1 % (mean ± std) | params | MACs / image | dead procedures (mean) |",
             "|---|---|---|---|---|---|"]
    for row, runs in summaries.items():
        if not runs:
            continue
        acc = [100 * r["eval_top1"] for r in runs]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        dead = statistics.mean(r["dead_procedures"] for r in runs)
        lines.append(f"| {LABELS[row]} | {len(runs)} | {statistics.mean(acc):.2f} ± {std:.2f} | {runs[0]['params'] / 1e6:.3f}M | "
                     f"{runs[0]['macs_per_image'] / 1e6:.2f}M | {dead:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="override schedule.epochs (stem epochs = 40%%)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (run two invocations with different --seeds to use two cores)")
    ap.add_argument("--runs", default=str(ROOT / "runs/fashion_study"))
    ap.add_argument("--results", default=str(ROOT / "results/fashion_study"))
    args = ap.parse_args()
    ensure_data()
    results = Path(args.results)
    summaries = {row: [] for row in args.rows}
    for seed in args.seeds:  # seeds outermost: a partial study still has every row
        for row in args.rows:
            summaries[row].append(run_one(row, seed, args.epochs, args.threads, Path(args.runs), results))
    text = table(summaries)
    print(text)
    (results / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
