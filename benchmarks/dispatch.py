"""Routed-dispatch overhead: RMN N=8 (uniform and skewed routes) over the plain ResNet-18,
eval and train step at CIFAR size batch 256, and eval latency at 224x224 batch 1, interleaved.

    .venv/bin/python benchmarks/dispatch.py                # full run -> benchmarks/results/dispatch.json
    .venv/bin/python benchmarks/dispatch.py --quick        # smoke run

Same as ``rmn bench dispatch``; see ``rmn.analysis.dispatch_bench`` for the method. Random weights.
"""
import sys
from pathlib import Path

from rmn.analysis.dispatch_bench import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--json" not in argv and "--quick" not in argv:
        argv += ["--json", str(Path(__file__).resolve().parent / "results" / "dispatch.json")]
    raise SystemExit(main(argv))
