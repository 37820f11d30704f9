"""One call on a GPU machine: the CUDA tests, RMN/baseline speed in bf16 + channels_last, batch-1 latency.

    .venv/bin/python benchmarks/gpu_check.py          # one GPU, a few minutes -> benchmarks/results/gpu_check.json
    .venv/bin/python benchmarks/gpu_check.py --quick  # the same code paths on CPU at toy sizes, under a minute,
                                                      # written only to --out (--dry-run is the same option)

1. ``pytest -m cuda tests/test_cuda.py``: dispatch, memory update, a two-epoch recipe on digits, bf16 and fp16
   training, the fp16 gradient scaler across a resume, a one-process NCCL group (they skip without a GPU).
2. Training-step and evaluation time of baseline vs RMN (N = 8) for the paper's CIFAR network (full-width
   CIFAR ResNet-18, 32x32, 100 classes) at batch 256 and 1024, float32 and bf16 + channels_last, interleaved
   (``benchmarks/train_step.py``, routes spread as after k-means).
3. Batch-1 latency at 224x224 of ResNet-18 vs RMN without and with Conditional Attention
   (``rmn.analysis.latency``).

The results file records the device, torch and CUDA versions and how long each part took.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's rmn, whichever environment runs the script
sys.path.insert(0, str(ROOT / "benchmarks"))

import train_step  # noqa: E402

from rmn.analysis.latency import run_latency  # noqa: E402
from results_file import write_results  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "gpu_check.json"


def run_cuda_tests(log) -> dict:
    """The suite's CUDA tests in a subprocess; their counts and the tail of their output."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/test_cuda.py"],
                          cwd=ROOT, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", out.splitlines()[-1] if out else "")}
    log(f"[tests] {out.strip().splitlines()[-1] if out.strip() else 'no output'}")
    return {"returncode": proc.returncode, "counts": counts, "seconds": time.perf_counter() - t0, "tail": out[-3000:]}


def run_throughput(device: str, quick: bool, log) -> list[dict]:
    """RMN/baseline training-step and evaluation ratios (train_step.measure) per batch size."""
    model, batches, rounds = ("cifar-quarter", (16,), 1) if quick else ("cifar-full", (256, 1024), 10)
    runs = []
    for batch in batches:
        args = train_step.parser().parse_args(["--device", device, "--batch", str(batch), "--rounds", str(rounds),
                                               "--warmup", "1" if quick else "3", "--inner", "1",
                                               "--precisions", "fp32", "bf16-cl"])
        runs.append(train_step.measure(model, 1 if quick else torch.get_num_threads(), args, log=log))
    return runs


def run_batch1_latency(device: str, quick: bool, log) -> dict:
    if quick:
        return run_latency(models=("resnet18",), image_size=32, batch_sizes=(1,), repeats=2, warmup=1, inner=1,
                           pool=16, device=device, log=log, width_mult=0.25)
    return run_latency(models=("resnet18",), image_size=224, batch_sizes=(1,), repeats=30, warmup=3, inner=10,
                       device=device, log=log)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", "--dry-run", action="store_true",
                    help="CPU, toy sizes: checks the script itself; writes only to --out")
    ap.add_argument("--out", default=None, help=f"results file (default {RESULTS.relative_to(ROOT)}; none with --quick)")
    args = ap.parse_args(argv)
    if not args.quick and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); use --quick on CPU", file=sys.stderr)
        return 2
    device = "cpu" if args.quick else "cuda"
    log = lambda text: print(text, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    report = {
        "quick": args.quick,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "tests": run_cuda_tests(log),
        "train_step": run_throughput(device, args.quick, log),
        "latency": run_batch1_latency(device, args.quick, log),
    }
    report["seconds"] = time.perf_counter() - t0
    out = write_results(report, args.out, args.quick, RESULTS)
    log(f"wrote {out} ({report['seconds']:.0f} s)" if out else f"not written (--quick; {report['seconds']:.0f} s)")
    failed = report["tests"]["returncode"] not in (0, 5)  # 5: every test deselected or skipped elsewhere
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
