"""Per-run logs: metrics.jsonl (the source of truth), metrics.csv, TensorBoard scalars, progress.

Every row carries the sequence number of the checkpoint written right after it. On resume, rows
newer than the checkpoint resumed from are dropped, so a run killed between logging and
checkpointing never shows an epoch twice.
"""
from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from .checkpoint import atomic_write_bytes


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: ignore it
                continue
    return rows


def _flat(row: dict) -> dict:
    out = {}
    for k, v in row.items():
        out[k] = ";".join(f"{x:.4f}" if isinstance(x, float) else str(x) for x in v) if isinstance(v, (list, tuple)) else v
    return out


class RunLog:
    def __init__(self, out: Path, keep_up_to_seq: int | None, tensorboard: bool, enabled: bool = True) -> None:
        self.out = Path(out)
        self.enabled = enabled
        self.jsonl = self.out / "metrics.jsonl"
        self.csv = self.out / "metrics.csv"
        self.tb = None
        self.rows: list[dict] = []
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        rows = [r for r in read_jsonl(self.jsonl) if keep_up_to_seq is not None and r.get("seq", 0) <= keep_up_to_seq]
        atomic_write_bytes(self.jsonl, "".join(json.dumps(r) + "\n" for r in rows).encode())
        self.rows = rows
        self._write_csv()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = rows[-1]["epoch"] + 1 if rows else 0
                self.tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=purge)
            except ImportError:  # tensorboard is a dependency, but a stripped-down install may lack it
                self.tb = None

    def _write_csv(self) -> None:
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        for r in self.rows:
            w.writerow(_flat(r))
        atomic_write_bytes(self.csv, buf.getvalue().encode())

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        self._write_csv()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "seq"):
                    self.tb.add_scalar(f"{row.get('phase', 'train')}/{k}" if k.startswith("train") else k, v, row["epoch"])
                elif isinstance(v, list) and k.startswith("load_stage"):
                    for j, share in enumerate(v):
                        self.tb.add_scalar(f"routing/{k}/memory{j}", share, row["epoch"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def progress_mode(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bar" if sys.stderr.isatty() else "lines"


def progress(iterable: Iterable, total: int, desc: str, mode: str):
    """tqdm on a terminal; nothing per batch otherwise (epoch lines are printed by the caller)."""
    if mode == "bar":
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
    return iterable


class Throughput:
    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.images = 0

    def add(self, n: int) -> None:
        self.images += n

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        return self.images / max(self.seconds, 1e-9)
