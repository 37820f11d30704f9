"""Where a benchmark writes its results (the convention at the top of BENCHMARKS.md): the file ``--out`` names,
else the benchmark's own file in benchmarks/results/, and nothing for a ``--quick`` smoke run."""
from __future__ import annotations

import json
from pathlib import Path


def write_results(report: dict, out: str | None, quick: bool, default: Path) -> Path | None:
    """Write ``report`` as JSON where the convention says; return the path, or None when nothing was written."""
    path = Path(out) if out else (None if quick else default)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
    return path


def add_timing_args(ap, results: Path, rounds: int, warmup: int, inner: int, quick: str) -> None:
    """The options every interleaved-timing benchmark shares: rounds, warm-up, calls per timed block, and the
    ``--quick`` / ``--out`` convention (``quick`` says what a smoke run does; :func:`apply_quick` applies it)."""
    ap.add_argument("--rounds", type=int, default=rounds, help="timed interleaved rounds")
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--inner", type=int, default=inner, help="calls per timed block")
    ap.add_argument("--quick", action="store_true", help=f"smoke run: {quick}; writes only to --out")
    ap.add_argument("--out", default=None, help=f"results file (default benchmarks/results/{results.name}; none with --quick)")


def apply_quick(args) -> None:
    """A ``--quick`` smoke run times one round of one call, without warm-up."""
    if args.quick:
        args.rounds, args.warmup, args.inner = 1, 0, 1
