"""Whole runs: the four steps (or the baseline) end to end, then ``summary.json``.

``run.mode: both`` trains the baseline and the RMN side by side in ``<output>/baseline`` and
``<output>/rmn`` and prints the comparison table of the paper's layout. The baseline is the paper's:
the plain network, whatever ``model.attention`` the RMN uses (``run.baseline_attention: se`` makes it
the "+SE" row instead).

Training ends here; what is drawn from a finished run (the memory atlas, ``run.atlas``) is the
``rmn`` command's, from the run's checkpoint (:mod:`rmn.cli`).
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from .. import distributed
from ..cost import count_params, macs_per_image
from ..route import num_procedures
from .checkpoint import atomic_write_bytes, best_checkpoint
from .config import Config
from .loop import evaluate, routing_row
from .run import Run
from .steps import clone, init_memory, train_baseline, train_routed, train_stem


def run_steps(cfg: Config, resume: bool = False, baseline: bool = False) -> dict:
    """Train one model to the end (resuming where it stopped) and write its summary.json."""
    t0 = time.perf_counter()
    run = Run.open(cfg, resume=resume, baseline=baseline)
    done = run.out / "summary.json"
    if run.finished:
        where = f"{run.out} is finished ({run.phase}, epoch {run.epoch} of {run.total_epochs})"
        if done.is_file():
            run.say(f"[resume] {where}; its summary is {done} (a larger --epochs with --resume extends the run)")
            run.log.close()
            return json.loads(done.read_text())
        run.say(f"[resume] {where}; writing its summary")
    if run.phase == "baseline":
        train_baseline(run)
    else:
        train_stem(run)
        clone(run)
        init_memory(run)
        train_routed(run)
    summary = write_summary(run, time.perf_counter() - t0)
    run.log.close()
    return summary


def write_summary(run: Run, seconds: float) -> dict:
    final = evaluate(run)  # on every rank: it holds collectives under torch.distributed
    spec, size = run.data.spec, run.data.image_size
    stats = routing_row(run.model)
    summary = {
        "name": run.cfg.run.name,
        "kind": "baseline" if run.phase == "baseline" else "rmn",
        "dataset": run.cfg.data.dataset,
        "backbone": run.cfg.model.backbone,
        "width_mult": run.cfg.model.width_mult,
        "attention": run.cfg.model.attention,
        "num_procedures": num_procedures(run.model),
        "epochs": run.epoch,
        "steps": run.step,
        "batch_size": run.cfg.data.batch_size,
        "seed": run.cfg.run.seed,
        "eval_top1": final.get("eval_top1"),
        "eval_top5": final.get("eval_top5"),
        "best_eval_top1": max((r["eval_top1"] for r in run.log.rows if "eval_top1" in r), default=final.get("eval_top1")),
        "best_checkpoint": _name(best_checkpoint(run.out / "checkpoints")) if run.cfg.run.keep_best else None,
        "params": count_params(run.model),
        "macs_per_image": macs_per_image(run.model, (spec.in_channels, size, size)),
        "dead_procedures": stats.get("dead_procedures", 0),
        "routing": {k: v for k, v in stats.items() if k != "dead_procedures"},
        "cluster_sizes": run.extra.get("cluster_sizes"),
        "timing": {"wall_seconds_this_invocation": seconds, **run.extra.get("init_memory_seconds", {})},
    }
    if distributed.rank() == 0:
        atomic_write_bytes(run.out / "summary.json", json.dumps(summary, indent=1).encode())
    return summary


def _name(path: Path | None) -> str | None:
    return None if path is None else path.name


def run_experiment(cfg: Config, resume: bool = False) -> list[dict]:
    """``rmn run``: the configured mode; 'both' trains baseline and RMN and prints the comparison."""
    if cfg.run.mode != "both":
        return [run_steps(cfg, resume=resume, baseline=cfg.run.mode == "baseline")]
    summaries = []
    for kind in ("baseline", "rmn"):
        sub = copy.deepcopy(cfg)
        sub.run.output = str(cfg.output_dir() / kind)
        sub.run.name = f"{cfg.run.name}-{kind}"
        sub.run.mode = kind
        if kind == "baseline":  # the plain network (or plain + SE), never CA fed random routes
            sub.model.attention = cfg.run.baseline_attention
        print(f"== {kind} ({sub.run.output})", flush=True)
        summaries.append(run_steps(sub, resume=resume, baseline=kind == "baseline"))
    table = comparison_table(summaries)
    if distributed.rank() == 0:
        print(table, flush=True)
        atomic_write_bytes(cfg.output_dir() / "comparison.txt", (table + "\n").encode())
        atomic_write_bytes(cfg.output_dir() / "comparison.json", json.dumps(summaries, indent=1).encode())
    return summaries


def comparison_table(summaries: list[dict]) -> str:
    """Baseline vs RMN: accuracy, parameters, multiply-adds per image, routing load per stage."""
    head = f"{'model':<28} {'top-1 %':>8} {'top-5 %':>8} {'params':>9} {'MACs/img':>10} {'dead':>5}  routing load per stage (share of samples per memory)"
    lines = [head, "-" * len(head)]
    for s in summaries:
        if s["kind"] == "rmn":
            label = f"rmn {s['backbone']} N={s['num_procedures']} {s['attention']}"
        else:
            label = f"baseline {s['backbone']}" + {"se": " +SE", "ca": " +CA"}.get(s["attention"], "")
        loads = "  ".join(
            f"s{k[len('load_stage'):]}:[" + " ".join(f"{v:.2f}" for v in s["routing"][k]) + "]"
            for k in sorted(s["routing"]) if k.startswith("load_stage")
        ) or "-"
        lines.append(f"{label:<28} {100 * s['eval_top1']:>8.2f} {100 * s['eval_top5']:>8.2f} {s['params'] / 1e6:>8.3f}M "
                     f"{s['macs_per_image'] / 1e6:>9.2f}M {s['dead_procedures']:>5}  {loads}")
    return "\n".join(lines)


def summary_path(cfg: Config) -> Path:
    return cfg.output_dir() / "summary.json"
