"""Routed-dispatch overhead: RMN N=8 (uniform and skewed routes) over the plain ResNet-18,
eval and train step at CIFAR size batch 256, and eval latency at 224x224 batch 1, interleaved.

    .venv/bin/python benchmarks/dispatch.py                # full run -> benchmarks/results/dispatch.json
    .venv/bin/python benchmarks/dispatch.py --quick        # smoke run, writes nothing (--out FILE keeps it)

Same as ``rmn bench dispatch`` (its ``--json FILE`` is ``--out FILE`` here); see ``rmn.analysis.dispatch_bench``
for the method. Random weights.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's rmn, whichever environment runs the script

from rmn.analysis.dispatch_bench import main  # noqa: E402

if __name__ == "__main__":
    argv = ["--json" + a[len("--out"):] if a == "--out" or a.startswith("--out=") else a for a in sys.argv[1:]]
    if not any(a == "--json" or a.startswith("--json=") for a in argv) and "--quick" not in argv:
        argv += ["--json", str(ROOT / "benchmarks" / "results" / "dispatch.json")]
    raise SystemExit(main(argv))
