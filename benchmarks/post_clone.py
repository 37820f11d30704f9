"""Why the routed network falls behind right after cloning: the first routed steps, one variant at a time.

Every variant starts from the same finished step 1 (a stem run folder) and takes the same ``--steps`` optimizer
steps on the same augmented training batches, with the recipe's own ``train_step`` and LR schedule. Per step it
records the training loss of the batch (as the training loop sees it); at the end, the test loss and top-1.

* ``plain``: the plain network trained on (the baseline's continuation);
* ``plain, stage gradients / N``: the plain network, but the gradients of the routed stages' parameters divided
  by N. After cloning, a procedure's gradient is the sum over only its own ~B/N samples divided by B, about 1/N of
  the plain network's; this control has exactly that smaller step *without* any routing;
* ``routed``: recipe steps 2 and 3 then routed training, as configured (the paper: BatchNorm per slice);
* ``routed, pooled BN``: procedures' BatchNorm over the whole batch (``model.procedure_batchnorm: pooled``), which
  computes the plain network's function at cloning;
* ``routed, pooled BN, memories frozen``: and the memories fixed at their k-means values (routes change only
  as the features do);
* ``routed, pooled BN, random routes``: a fresh uniformly random procedure for every sample and step (and in the
  test), so each procedure trains on a random eighth of every batch instead of one cluster;
* ``routed, pooled BN, untied over the epoch``: each procedure's gradient a mix of its own and the shared
  stage's, from tied to untied over the epoch (``optim.untie_epochs: 1``, rmn.training.tie_procedure_gradients);
* ``routed, pooled BN, gradients x N``: and each procedure's gradient scaled back to the plain network's size
  (``optim.procedure_grad_scale: N``).

If ``routed, pooled BN`` tracks ``plain, stage gradients / N``, what the routed network loses after cloning is
the smaller step its procedures take, not routing itself.

    .venv/bin/python benchmarks/post_clone.py STEM_RUN_FOLDER [--steps 235] [--variants ...]
        # -> results/value_study/post_clone-<stem>.json and a figure docs/value_study_post_clone.png
    .venv/bin/python benchmarks/post_clone.py runs/post_clone/stem --config configs/value_study/narrow_rmn.yaml
        # trains step 1 of that config (seed 0) into the folder first, if it has no checkpoint yet
A results file for the same step 1 and batches keeps its other variants: ``--variants X`` adds or redoes X.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from clone_shift import training_batches  # noqa: E402
from rmn.recipe.checkpoint import latest_checkpoint  # noqa: E402
from rmn.recipe.config import from_dict, load_config  # noqa: E402
from rmn.recipe.loop import Tally, train_step  # noqa: E402
from rmn.recipe.run import Run  # noqa: E402
from rmn.recipe.steps import clone, init_memory, train_stem  # noqa: E402
from rmn.route import memory_banks, routed_stages, set_auto_update  # noqa: E402

VARIANTS = {  # name -> (routed?, config overrides, divide the plain network's stage gradients by N?)
    "plain": (False, {}, False),
    "plain, stage gradients / N": (False, {}, True),
    "routed": (True, {}, False),
    "routed, pooled BN": (True, {"procedure_batchnorm": "pooled"}, False),
    "routed, pooled BN, memories frozen": (True, {"procedure_batchnorm": "pooled", "memory_momentum": 1.0}, False),
    "routed, pooled BN, random routes": (True, {"procedure_batchnorm": "pooled", "random_routes": True}, False),
    "routed, pooled BN, gradients x N": (True, {"procedure_batchnorm": "pooled", "procedure_grad_scale": None}, False),
    "routed, pooled BN, untied over the epoch": (True, {"procedure_batchnorm": "pooled", "untie_epochs": 1.0}, False),
}


def open_run(stem: Path, tmp: str, overrides: dict, procedures: int | None = None) -> Run:
    ckpt = latest_checkpoint(stem / "checkpoints")
    cfg = from_dict(ckpt.meta["config"])
    cfg.run.output, cfg.run.start_from, cfg.run.progress, cfg.run.tensorboard = tmp, str(stem), "none", False
    cfg.run.mode = "rmn"
    if procedures:  # step 1 does not depend on N without CA
        cfg.model.num_procedures = procedures
    for key, value in overrides.items():
        if key == "random_routes":
            continue  # applied after step 3, in run_variant
        if key == "procedure_grad_scale":
            cfg.optim.procedure_grad_scale = float(value or cfg.model.num_procedures)
        elif key == "untie_epochs":
            cfg.optim.untie_epochs = value
        else:
            setattr(cfg.model, key, value)
    return Run.open(cfg)


def stage_parameters(run: Run) -> list[torch.nn.Parameter]:
    """The parameters of the stages step 2 would clone (the plain network's, before cloning)."""
    return [p for stage in routed_stages(run.model) for p in stage.parameters()]


@torch.no_grad()
def test_metrics(run: Run) -> dict:
    run.model.eval()
    loss = correct = total = 0.0
    for x, y in run.loaders[1]:
        logits = run.model(run.precision.batch(x))
        loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += float((logits.argmax(1) == y).sum())
        total += y.numel()
    return {"test_loss": loss / total, "test_top1": 100 * correct / total}


def run_variant(stem: Path, name: str, batches, procedures: int | None) -> dict:
    routed, overrides, divide = VARIANTS[name]
    with tempfile.TemporaryDirectory() as tmp:
        run = open_run(stem, tmp, overrides, procedures)
        n = run.cfg.model.num_procedures
        if routed:
            clone(run)
            init_memory(run)
            set_auto_update(run.model, False)
            if overrides.get("random_routes"):  # a fresh uniform route per sample and forward; memories never move
                for bank in memory_banks(run.model):
                    bank.route = lambda f, n=bank.num_memories: torch.randint(n, (f.shape[0],), device=f.device)
        elif divide:
            for p in stage_parameters(run):
                p.register_hook(lambda g, n=n: g / n)
        run.model.train()
        tally = Tally.zeros(run.device)
        losses = []
        for x, y in batches:
            loss, _ = train_step(run, x, y, tally)
            losses.append(float(loss))
        out = {"step_losses": losses, **test_metrics(run), "start_step": run.step - len(batches)}
        run.log.close()
    return out


def smooth(values: list[float], width: int) -> list[float]:
    return [sum(values[max(0, i - width + 1):i + 1]) / len(values[max(0, i - width + 1):i + 1]) for i in range(len(values))]


def draw(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, r in report["variants"].items():
        ax.plot(smooth(r["step_losses"], 20), label=f"{name}: test top-1 {r['test_top1']:.2f}%")
    ax.set(xlabel=f"optimizer step after step 1 (batch {report['batch']})", ylabel="training loss (mean of 20 steps)",
           title=f"The first routed epoch, same batches for every variant (step 1: {Path(report['stem']).name})",
           yscale="log", ylim=(0.3, 4.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stem", help="a stem run folder at the end of step 1")
    ap.add_argument("--steps", type=int, default=235, help="optimizer steps per variant (235: one epoch at batch 256)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--config", help="train step 1 of this config into STEM first (if it has no checkpoint)")
    ap.add_argument("--seed", type=int, default=0, help="with --config")
    ap.add_argument("--procedures", type=int, default=None, help="N (default: the stem's config); without CA step 1 "
                                                                   "is the same for every N")
    ap.add_argument("--out", default=str(ROOT / "results" / "value_study"), help="folder of the results file")
    ap.add_argument("--figure", default=str(ROOT / "docs" / "value_study_post_clone.png"))
    ap.add_argument("--draw", metavar="RESULTS_JSON", help="only redraw the figure from a results file")
    args = ap.parse_args()
    if args.draw:
        draw(json.loads(Path(args.draw).read_text()), Path(args.figure))
        return
    torch.set_num_threads(1)
    stem = Path(args.stem)
    if args.config and latest_checkpoint(stem / "checkpoints") is None:
        cfg = load_config(args.config, {"run.seed": args.seed, "run.output": str(stem), "run.threads": 1,
                                        "run.progress": "lines", "run.tensorboard": False, "run.atlas": False})
        run = train_stem(Run.open(cfg))
        run.log.close()
    if latest_checkpoint(stem / "checkpoints") is None:
        sys.exit(f"post_clone: no checkpoint in {stem}/checkpoints")
    with tempfile.TemporaryDirectory() as tmp:
        first = open_run(stem, tmp, {})
        batches = training_batches(first, first.cfg.data.batch_size, args.steps)
        first.log.close()
    out = Path(args.out)
    path = out / f"post_clone-{stem.resolve().name}.json"
    report = {"stem": str(stem), "batch": batches[0][0].shape[0], "steps": len(batches), "variants": {}}
    if path.is_file():  # the same step 1 and batches: keep the variants measured before, add (or redo) these
        old = json.loads(path.read_text())
        if (old["stem"], old["batch"], old["steps"]) == (report["stem"], report["batch"], report["steps"]):
            report["variants"] = {k: v for k, v in old["variants"].items() if k in VARIANTS}
    for name in args.variants:
        report["variants"][name] = r = run_variant(stem, name, batches, args.procedures)
        print(f"{name:36s} first 20 steps {sum(r['step_losses'][:20]) / 20:.4f}  last 20 {sum(r['step_losses'][-20:]) / 20:.4f}"
              f"  test loss {r['test_loss']:.4f}  top-1 {r['test_top1']:.2f}%", flush=True)
    report["variants"] = {k: report["variants"][k] for k in VARIANTS if k in report["variants"]}  # one order
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    draw(report, Path(args.figure))
    print(f"wrote {path} and {args.figure}")


if __name__ == "__main__":
    main()
