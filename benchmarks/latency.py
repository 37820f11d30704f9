"""CPU (and CUDA) latency per image and throughput: backbone vs RMN N=8 without / with CA.

    .venv/bin/python benchmarks/latency.py                 # full run -> benchmarks/results/latency.json
    .venv/bin/python benchmarks/latency.py --quick         # smoke run (ResNet-18, few rounds)
    .venv/bin/python benchmarks/latency.py --device cuda

Same as ``rmn bench latency``; see ``rmn.analysis.latency`` for the method. Random weights.
"""
import sys
from pathlib import Path

from rmn.analysis.latency import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--json" not in argv and "--quick" not in argv:
        argv += ["--json", str(Path(__file__).resolve().parent / "results" / "latency.json")]
    raise SystemExit(main(argv))
