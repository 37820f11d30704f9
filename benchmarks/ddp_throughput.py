"""Training throughput of 1 process vs 2 torchrun processes (gloo, CPU) on the same RMN run.

On a 2-core machine no gain is expected (each process gets one core, and the all-reduces cost
time); the point of multi-process support is correctness, which tests/test_distributed.py checks.

    .venv/bin/python benchmarks/ddp_throughput.py          # prints a table, writes benchmarks/results/ddp_throughput.json
    .venv/bin/python benchmarks/ddp_throughput.py --quick  # smoke run: 2 epochs (1 plain), writes nothing
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from results_file import write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ddp_throughput.json"
ARGS = ["configs/demo.yaml", "--run.mode", "rmn", "--epochs", "6", "--stem-epochs", "2", "--run.progress", "none",
        "--run.tensorboard", "false", "--run.atlas", "false", "--data.batch_size", "256"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(procs: int, threads: int, out: Path, args: list[str]) -> list[dict]:
    # this checkout's rmn in every process, whichever environment runs the script
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=path)
    if procs == 1:
        cmd = [sys.executable, "-m", "rmn", "run", *args, "--run.threads", str(threads), "--output", str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "rmn", "run", *args, "--run.threads", str(threads), "--output", str(out)]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 epochs (1 plain); writes only to --out")
    ap.add_argument("--out", default=None, help=f"results file (default {RESULTS.relative_to(ROOT)}; none with --quick)")
    opts = ap.parse_args()
    args = ARGS + (["--epochs", "2", "--stem-epochs", "1"] if opts.quick else [])  # the later flag wins
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for procs, threads in ((1, 2), (1, 1), (2, 1)):
            metrics = run(procs, threads, Path(tmp) / f"p{procs}t{threads}", args)
            for phase in ("stem", "routed"):
                rates = [m["images_per_s"] for m in metrics if m["phase"] == phase][1:] or \
                        [m["images_per_s"] for m in metrics if m["phase"] == phase]
                rows.append({"processes": procs, "threads_per_process": threads, "phase": phase,
                             "images_per_s": sum(rates) / len(rates), "final_top1": metrics[-1]["eval_top1"]})
    print(f"{'processes':>9} {'threads/proc':>12} {'phase':>7} {'images/s':>9} {'final top-1':>11}")
    for r in rows:
        print(f"{r['processes']:>9} {r['threads_per_process']:>12} {r['phase']:>7} {r['images_per_s']:>9.0f} {100 * r['final_top1']:>10.2f}%")
    out = write_results({"argv": args, "machine": f"{os.cpu_count()} CPU cores", "rows": rows}, opts.out, opts.quick, RESULTS)
    print(f"wrote {out}" if out else "not written (--quick)")


if __name__ == "__main__":
    main()
