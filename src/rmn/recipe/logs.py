"""Per-run logs: metrics.jsonl (the source of truth), metrics.csv, TensorBoard, progress and ETA.

Every row carries the sequence number of the checkpoint written right after it. On resume, rows
newer than the checkpoint resumed from are dropped, so a run killed between logging and
checkpointing never shows an epoch twice.

TensorBoard (the ``tensorboard`` extra, imported only when ``run.tensorboard`` is on) gets the per-epoch scalars on
the epoch axis in ``tensorboard/``, the per-step training loss and LR on the optimizer-step axis in
``tensorboard/steps/`` (its own writer, so a resume purges each axis at its own position), per-epoch
route histograms, and the memory atlas images.
"""
from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from ..extras import require
from .checkpoint import atomic_write_bytes


def tensorboard_writer():
    """torch's ``SummaryWriter``, or a one-line :class:`rmn.extras.MissingExtra` naming the extra."""
    require("tensorboard", extra="tensorboard", feature="TensorBoard logging",
            instead="or set run.tensorboard false")
    return require("torch.utils.tensorboard", extra="tensorboard", feature="TensorBoard logging").SummaryWriter


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


def images_to_tensorboard(out: Path, epoch: int, paths: Iterable[Path]) -> None:
    """PNG files (the memory atlas drawn after a run) as TensorBoard images in ``out/tensorboard``, tagged
    ``atlas/<file name>``, at ``epoch``; a writer of its own, so the run's event files stay as they are."""
    imread = require("matplotlib.image", extra="plots", feature="the memory atlas").imread
    writer = tensorboard_writer()(str(Path(out) / "tensorboard"))
    try:
        for p in paths:
            img = imread(str(p))
            if img.ndim == 2:
                img = img[:, :, None].repeat(3, axis=2)
            writer.add_image(f"atlas/{Path(p).stem}", img[:, :, :3], epoch, dataformats="HWC")
    finally:
        writer.close()


class RunLog:
    def __init__(self, out: Path, keep_up_to_seq: int | None, tensorboard: bool, enabled: bool = True) -> None:
        self.out = Path(out)
        self.enabled = enabled
        self.jsonl = self.out / "metrics.jsonl"
        self.csv = self.out / "metrics.csv"
        self.tb = None
        self.tb_steps = None
        self.rows: list[dict] = []
        self.dropped = 0  # rows newer than the checkpoint resumed from (they will be recomputed)
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        before = read_jsonl(self.jsonl)
        rows = [r for r in before if keep_up_to_seq is not None and r.get("seq", 0) <= keep_up_to_seq]
        self.dropped = len(before) - len(rows)
        atomic_write_bytes(self.jsonl, "".join(json.dumps(r) + "\n" for r in rows).encode())
        self.rows = rows
        self._write_csv()
        if tensorboard:
            SummaryWriter = tensorboard_writer()
            self.tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=rows[-1]["epoch"] + 1 if rows else 0)
            self.tb_steps = SummaryWriter(str(self.out / "tensorboard" / "steps"),
                                          purge_step=rows[-1]["step"] + 1 if rows else 0)

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
                elif isinstance(v, list) and k.startswith(("load_stage", "grad_norm_stage")):  # one value per memory
                    for j, share in enumerate(v):
                        self.tb.add_scalar(f"routing/{k}/memory{j}", share, row["epoch"])
            self.tb.flush()

    def step(self, step: int, loss: float, lr: float) -> None:
        """One optimizer step's training loss and LR (TensorBoard only; metrics.jsonl stays per epoch)."""
        if self.tb_steps is not None:
            self.tb_steps.add_scalar("train/loss", loss, step)
            self.tb_steps.add_scalar("train/lr", lr, step)

    def route_histograms(self, epoch: int, counts: dict[str, list[int]]) -> None:
        """Per routed stage, how many training samples of the epoch went to each memory (one bucket per memory)."""
        if self.tb is None:
            return
        for name, c in counts.items():
            total = sum(c)
            if total == 0:
                continue
            used = [i for i, n in enumerate(c) if n]
            self.tb.add_histogram_raw(f"routes/{name}", min=used[0], max=used[-1], num=total,
                                      sum=sum(i * n for i, n in enumerate(c)), sum_squares=sum(i * i * n for i, n in enumerate(c)),
                                      bucket_limits=[i + 0.5 for i in range(len(c))], bucket_counts=list(c), global_step=epoch)
        self.tb.flush()

    def close(self) -> None:
        for w in (self.tb, self.tb_steps):
            if w is not None:
                w.close()


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


def format_duration(seconds: float) -> str:
    """'2h05m', '3m12s', '45s'."""
    s = max(0, int(round(seconds)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class RunClock:
    """Whole-run ETA from this invocation's pace: seconds per optimizer step so far (evaluation included)
    times the steps left to the run's last epoch. Clone and k-means are not counted."""

    def __init__(self, start_step: int, total_steps: int) -> None:
        self.start = time.perf_counter()
        self.start_step = start_step
        self.total_steps = total_steps

    def eta(self, step: int) -> float | None:
        done = step - self.start_step
        if done <= 0:
            return None
        return (time.perf_counter() - self.start) / done * max(self.total_steps - step, 0)

    def text(self, step: int) -> str:
        eta = self.eta(step)
        return "?" if eta is None else format_duration(eta)


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
