"""What every real-data study script shares: the data check, one resumable training run recorded to a
result file, and the per-epoch log kept in it (benchmarks/fashion_study.py, benchmarks/value_study.py)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from rmn.recipe import run_steps  # noqa: E402

DATA = Path("/usr/share/datasets/fashion-mnist")


def ensure_data() -> None:
    if (DATA / "train-images-idx3-ubyte.gz").exists():
        return
    print(f"Fashion-MNIST is not in {DATA}: installing Debian's dataset-fashion-mnist with apt-get", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"], check=True)


def epoch_log(out: Path) -> dict:
    """Per-epoch training loss, test accuracy and dead procedures of a finished run, and its revivals."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = ("epoch", "phase", "train_loss", "eval_top1", "dead_procedures", "revived")

    def smallest_share(r: dict) -> float | None:  # the least-loaded procedure of any stage: near-dead ones show here
        shares = [v for k, load in r.items() if k.startswith("load_stage") for v in load]
        return min(shares) if shares else None

    return {"revived": sum(r.get("revived", 0) for r in rows),
            "per_epoch": [{**{k: r.get(k) for k in keys}, "min_load_share": smallest_share(r), **routing_measures(r)}
                          for r in rows]}


def routing_measures(r: dict) -> dict:
    """A routed epoch's measurements (rmn.recipe.measures) per routed stage, in stage order: the share of test
    samples whose route changed since the last evaluation, and the mean over procedures of the gradient norm."""
    def per_stage(prefix: str) -> list:
        return [r[k] for k in sorted((k for k in r if k.startswith(prefix)), key=lambda k: int(k[len(prefix):]))]

    flips = per_stage("route_flips_stage")
    norms = [sum(v) / len(v) if v else 0.0 for v in per_stage("grad_norm_stage")]
    return {**({"route_flips": flips} if flips else {}), **({"grad_norm": norms} if norms else {})}


def train_and_record(cfg, dest: Path, keep_epochs: tuple[int, ...] = (), started_from: Path | None = None,
                     **fields) -> dict:
    """Train ``cfg`` to its end (resuming its run folder) and write its summary, per-epoch log and ``fields``
    to ``dest``; the checkpoints are then deleted (the logs stay) to keep the disk small, except those at the
    end of ``keep_epochs``, moved to ``<run>/kept/`` (another run may start from them). ``started_from``: the
    run folder whose first epochs this run took (``run.start_from``); its log supplies them."""
    t0 = time.perf_counter()
    summary = run_steps(cfg, resume=True, baseline=cfg.run.mode == "baseline")
    summary["timing"]["study_seconds"] = time.perf_counter() - t0
    summary.update(epoch_log(cfg.output_dir()))
    first = summary["per_epoch"][0]["epoch"] if summary["per_epoch"] else 1
    if started_from is not None and first > 1:  # (a run resumed from its own checkpoints trained them itself)
        summary["per_epoch"] = [e for e in epoch_log(started_from)["per_epoch"] if e["epoch"] < first] + summary["per_epoch"]
        summary["stem_from"] = str(started_from)
    summary.update(fields)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(dest)  # a kill never leaves half a result file (which would count as finished)
    checkpoints = cfg.output_dir() / "checkpoints"
    for epoch in keep_epochs:
        for f in checkpoints.glob(f"ckpt-*-e{epoch}.*"):
            (cfg.output_dir() / "kept").mkdir(exist_ok=True)
            f.replace(cfg.output_dir() / "kept" / f.name)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return summary
