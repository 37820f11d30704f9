"""What the routed epochs' measurements (rmn.recipe.measures) cost, against a training step they ride on.

    .venv/bin/python benchmarks/measures_cost.py                # fashion model, N=8, batch 256, 1 thread
    .venv/bin/python benchmarks/measures_cost.py --quick        # smoke run, writes only where --out says

Per optimizer step the recipe adds the per-procedure gradient norms (``procedure_grad_norms`` and their
on-device running means); per evaluation, the route flips against the previous evaluation and the
encoding of this one's routes for the checkpoint. On the Fashion study's network (RMN N=8 without CA,
memories from k-means as after recipe step 3, as in benchmarks/train_step.py) this times, interleaved in
one process: a plain training step of the RMN, the same step followed by the gradient-norm measurement,
and the measurement alone; and the per-evaluation work on a 10,000-sample evaluation set's routes.
Reported are medians of process CPU time (what a loaded machine distorts least) and the ratios.
Writes ``benchmarks/results/measures_cost.json``.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from rmn.analysis.latency import interleaved_times  # noqa: E402
from rmn.precision import FLOAT32  # noqa: E402
from rmn.recipe.measures import GradNormMeans, remember_routes, remembered_routes, route_flips  # noqa: E402
from rmn.training import procedure_grad_norms  # noqa: E402
from train_step import MODELS, build_pair, calibration_images, train_fn  # noqa: E402
from results_file import add_timing_args, apply_quick, write_results  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "measures_cost.json"


def step_costs(args) -> dict:
    calib, source = calibration_images("fashion", 4 * args.batch)
    pair = build_pair("fashion", args.procedures, None, calib, args.batch)
    y = torch.randint(MODELS["fashion"][3], (calib.shape[0],), generator=torch.Generator().manual_seed(1))
    plain, _ = train_fn(pair["rmn"], FLOAT32, calib, y, args.batch)
    measured_step, net = train_fn(pair["rmn"], FLOAT32, calib, y, args.batch)
    means = GradNormMeans()  # "grad_norms" alone reads the gradients the last "step+grad_norms" left

    def with_measures(i: int) -> None:
        measured_step(i)
        means.add(procedure_grad_norms(net))

    def measure_only(i: int) -> None:
        means.add(procedure_grad_norms(net))

    cpu: dict[str, list[float]] = {}
    fns = {"step": plain, "step+grad_norms": with_measures, "grad_norms": measure_only}
    interleaved_times(fns, repeats=args.rounds, warmup=args.warmup, inner=args.inner, cpu=cpu)
    med = {k: 1000 * statistics.median(v) for k, v in cpu.items()}
    return {"routes_from": source, "cpu_ms": med,
            "grad_norms/step": med["grad_norms"] / med["step"],
            "(step+grad_norms)/step": med["step+grad_norms"] / med["step"]}


def evaluation_costs(args) -> dict:
    """Route flips and route encoding for ``args.eval_samples`` samples, 4 routed stages of N procedures."""
    g = torch.Generator().manual_seed(0)
    before = {i: torch.randint(args.procedures, (args.eval_samples,), generator=g) for i in range(4)}
    after = {i: torch.where(torch.rand(args.eval_samples, generator=g) < 0.05,
                            torch.randint(args.procedures, (args.eval_samples,), generator=g), r) for i, r in before.items()}
    extra: dict = {}
    remember_routes(extra, before)
    times = []
    for _ in range(args.rounds):
        c0 = time.process_time()
        route_flips(remembered_routes(extra), after)
        remember_routes(extra, after)
        times.append(time.process_time() - c0)
    size = sum(len(text) for text in extra["eval_routes"]["ranks"][0].values())
    return {"eval_samples": args.eval_samples, "cpu_ms": 1000 * statistics.median(times), "checkpoint_text_bytes": size}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procedures", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    add_timing_args(ap, RESULTS, rounds=10, warmup=2, inner=3, quick="1 round")
    ap.add_argument("--eval-samples", type=int, default=10_000)
    args = ap.parse_args(argv)
    apply_quick(args)
    torch.set_num_threads(args.threads)
    report = {"machine": {"platform": platform.platform(), "torch": torch.__version__}, "args": vars(args),
              "per_step": step_costs(args), "per_evaluation": evaluation_costs(args)}
    s, e = report["per_step"], report["per_evaluation"]
    print(f"per step (CPU ms, median): step {s['cpu_ms']['step']:.1f}, step + grad norms {s['cpu_ms']['step+grad_norms']:.1f}, "
          f"grad norms alone {s['cpu_ms']['grad_norms']:.2f} ({100 * s['grad_norms/step']:.2f}% of a step; "
          f"with/without {s['(step+grad_norms)/step']:.3f})")
    print(f"per evaluation of {e['eval_samples']} samples: route flips + routes kept {e['cpu_ms']:.2f} CPU ms, "
          f"{e['checkpoint_text_bytes']} bytes of checkpoint metadata")
    out = write_results(report, args.out, args.quick, RESULTS)
    print(f"wrote {out}" if out else "not written (--quick)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
