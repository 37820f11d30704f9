"""What pooled procedure BatchNorm (``model.procedure_batchnorm: pooled``, rmn.pooled_bn) costs per training step
against the paper's per-slice BatchNorm, on the Fashion study's network (eighth-width ResNet-18 at 28x28, N = 8,
batch 256, float32), with the baseline beside them, at 1 and 2 CPU threads.

    .venv/bin/python benchmarks/pooled_bn.py                  # -> benchmarks/results/pooled_bn.json
    .venv/bin/python benchmarks/pooled_bn.py --quick          # smoke run: 1 thread, 1 round, writes nothing

Pooled training runs the procedures of a stage in lockstep through one torch.fx graph (a Python loop over
nodes and procedures) and concatenates and splits every BatchNorm's input. Routes are spread as after step 3
(benchmarks/train_step.py's set-up: k-means memories on real Fashion-MNIST when installed); a training step is
the recipe's (forward, loss, backward, memory update, SGD step). Variants are timed interleaved in one process;
reported are medians of wall and process CPU time per step and the pooled/slice ratio.
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_step import MODELS, build_pair, calibration_images, train_fn  # noqa: E402

from rmn.analysis.calibrate import measure_route_counts  # noqa: E402
from rmn.analysis.latency import interleaved_times  # noqa: E402
from rmn.pooled_bn import set_procedure_batchnorm  # noqa: E402
from rmn.precision import FLOAT32  # noqa: E402
from results_file import add_timing_args, apply_quick, write_results  # noqa: E402

RESULTS = HERE / "results" / "pooled_bn.json"


def measure(threads: int, args) -> dict:
    torch.set_num_threads(threads)
    x, source = calibration_images("fashion", 4 * args.batch)
    pair = build_pair("fashion", args.procedures, None, x, args.batch)
    nets = {"baseline": pair["baseline"], "rmn slice": pair["rmn"],
            "rmn pooled": set_procedure_batchnorm(copy.deepcopy(pair["rmn"]), "pooled")}
    y = torch.randint(MODELS["fashion"][3], (x.shape[0],), generator=torch.Generator().manual_seed(1))
    loads = {k: [[round(c / max(sum(row), 1), 3) for c in row] for row in measure_route_counts(nets[k], x[: args.batch], train=True)]
             for k in ("rmn slice", "rmn pooled")}
    fns = {k: train_fn(net, FLOAT32, x, y, args.batch)[0] for k, net in nets.items()}
    cpu: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    wall = interleaved_times(fns, repeats=args.rounds, warmup=args.warmup, inner=args.inner, cpu=cpu)
    med = {k: {"wall_ms": 1000 * statistics.median(v), "cpu_ms": 1000 * statistics.median(cpu[k])} for k, v in wall.items()}
    ratio = {m: med["rmn pooled"][m] / med["rmn slice"][m] for m in ("wall_ms", "cpu_ms")}
    print(f"\nfashion, {threads} thread(s), training step, batch {args.batch} (ms, median wall / CPU)")
    for k, v in med.items():
        print(f"  {k:<12} {v['wall_ms']:8.1f} {v['cpu_ms']:8.1f}")
    print(f"  pooled/slice {ratio['wall_ms']:8.3f} {ratio['cpu_ms']:8.3f}", flush=True)
    return {"threads": threads, "batch": args.batch, "procedures": args.procedures, "routes_from": source,
            "train_loads": loads, "median": med, "pooled_over_slice": ratio, "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--procedures", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    add_timing_args(ap, RESULTS, rounds=8, warmup=1, inner=2, quick="1 thread, 1 round")
    args = ap.parse_args(argv)
    apply_quick(args)
    if args.quick:
        args.threads = [1]
    rows = [measure(t, args) for t in args.threads]
    report = {"command": "benchmarks/pooled_bn.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "rows": rows}
    out = write_results(report, args.out, args.quick, RESULTS)
    if out is not None:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
