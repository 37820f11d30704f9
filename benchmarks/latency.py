"""CPU (and CUDA) latency per image and throughput: backbone vs RMN N=8 without / with CA.

    .venv/bin/python benchmarks/latency.py                 # full run -> benchmarks/results/latency.json
    .venv/bin/python benchmarks/latency.py --quick         # smoke run (ResNet-18, few rounds), writes nothing
    .venv/bin/python benchmarks/latency.py --device cuda

Same as ``rmn bench latency`` (its ``--json FILE`` is ``--out FILE`` here); see ``rmn.analysis.latency``
for the method. Random weights.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's rmn, whichever environment runs the script

from rmn.analysis.latency import main  # noqa: E402

if __name__ == "__main__":
    argv = ["--json" + a[len("--out"):] if a == "--out" or a.startswith("--out=") else a for a in sys.argv[1:]]
    if not any(a == "--json" or a.startswith("--json=") for a in argv) and "--quick" not in argv:
        argv += ["--json", str(ROOT / "benchmarks" / "results" / "latency.json")]
    raise SystemExit(main(argv))
