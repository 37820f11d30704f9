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
