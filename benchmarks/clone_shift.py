"""Why the first routed epoch loses ground: BatchNorm over routed sub-batches.

Right after step 2 every procedure is a copy of its stage, so in eval mode (running statistics) the
routed network computes exactly the plain network's function. In training mode it does not: each
procedure normalises with the statistics of the samples routed to it, about B/N of them and, after
step 3, drawn from one cluster of the stage input. This script takes a finished step 1 (a stem run
folder), performs steps 2 and 3 on a copy, and measures the loss on the same training images five ways:

* plain network, eval mode and train mode (BatchNorm over the whole batch of B);
* routed network, eval mode (must equal the plain network);
* routed network, train mode with uniformly random routes (BatchNorm over ~B/N random samples);
* routed network, train mode with its memories' routes (BatchNorm over ~B/N samples of one cluster);
* the same after rmn.bn_match matched each procedure's BatchNorm to its cluster (``model.match_batchnorm``),
  in eval and train mode.

    .venv/bin/python benchmarks/clone_shift.py runs/fashion_study/stem_b128/seed0 --batch 1024

Writes the table to stdout and results/fashion_study/clone_shift-<stem>-b<batch>.{md,json}.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from rmn.bn_match import match_batchnorm  # noqa: E402
from rmn.recipe.config import from_dict  # noqa: E402
from rmn.recipe.checkpoint import latest_checkpoint  # noqa: E402
from rmn.recipe.run import Run  # noqa: E402
from rmn.recipe.steps import clone, init_memory  # noqa: E402
from rmn.route import memory_banks


def training_batches(run: Run, batch: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of ``batch`` augmented training images, as step 4's first epoch would see them."""
    loader = run.loaders[0]
    loader.set_epoch(run.epoch)
    xs, ys, have = [], [], 0
    for x, y in loader:
        xs.append(x)
        ys.append(y)
        have += x.shape[0]
        if have >= batch * count:
            break
    x, y = torch.cat(xs)[: batch * count], torch.cat(ys)[: batch * count]
    return list(zip(x.split(batch), y.split(batch)))


def measure(model: torch.nn.Module, batches, train_mode: bool, random_routes: bool = False) -> dict:
    """Mean loss and accuracy over ``batches``, on a throw-away copy (statistics it updates are dropped)."""
    m = copy.deepcopy(model).train(train_mode)
    if random_routes:
        for bank in memory_banks(m):
            if bank is not None:
                bank.route = lambda f, n=bank.num_memories: torch.randint(n, (f.shape[0],))
    loss = correct = total = 0.0
    with torch.no_grad():
        for x, y in batches:
            logits = m(x)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += float((logits.argmax(1) == y).sum())
            total += y.numel()
    return {"loss": loss / total, "accuracy": correct / total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stem", help="a stem (or baseline) run folder at the end of step 1")
    ap.add_argument("--batch", type=int, default=1024, help="batch size B of the measurement")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--results", default=str(ROOT / "results/fashion_study"), help="folder of the study's results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ckpt = latest_checkpoint(Path(args.stem) / "checkpoints")
    if ckpt is None:
        sys.exit(f"clone_shift: no checkpoint in {args.stem}/checkpoints")
    cfg = from_dict(ckpt.meta["config"])
    with tempfile.TemporaryDirectory() as tmp:
        cfg.run.output, cfg.run.start_from, cfg.run.progress, cfg.run.tensorboard = tmp, args.stem, "none", False
        run = Run.open(cfg)
        batches = training_batches(run, args.batch, args.batches)
        plain = run.model
        rows = {"plain, eval": measure(plain, batches, False), f"plain, train (BN over {args.batch})": measure(plain, batches, True)}
        clone(run)
        init_memory(run)
        n = run.model.num_procedures
        rows["routed, eval"] = measure(run.model, batches, False)
        rows[f"routed, train, random routes (BN over ~{args.batch // n})"] = measure(run.model, batches, True, random_routes=True)
        rows[f"routed, train, memory routes (BN over ~{args.batch // n}, one cluster)"] = measure(run.model, batches, True)
        matched = copy.deepcopy(run.model)
        match_batchnorm(matched, (x for x, _ in run.loaders[2]))
        rows["routed, BN matched (model.match_batchnorm), eval"] = measure(matched, batches, False)
        rows["routed, BN matched (model.match_batchnorm), train, memory routes"] = measure(matched, batches, True)
        run.log.close()
    lines = [f"{args.batches} training batches of {args.batch} (augmented, as step 4 sees them), N={n}, "
             f"step 1 from {args.stem} (epoch {ckpt.meta['epoch']})", "",
             "| network, BatchNorm mode | loss | top-1 % |", "|---|---|---|"]
    lines += [f"| {name} | {r['loss']:.4f} | {100 * r['accuracy']:.2f} |" for name, r in rows.items()]
    text = "\n".join(lines)
    print(text)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    name = "-".join(Path(args.stem).resolve().parts[-2:]) + f"-b{args.batch}"
    (out / f"clone_shift-{name}.json").write_text(json.dumps(
        {"stem": args.stem, "epoch": ckpt.meta["epoch"], "batch": args.batch, "batches": args.batches, "rows": rows}, indent=1))
    (out / f"clone_shift-{name}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
