"""How exact a training step's gradients are in each precision rmn offers on CPU (float32, float32 + channels_last,
bf16, bf16 + channels_last), against float64 on the same weights and batch, and whether the error is noise (it
averages out over steps) or bias (the same every step). Why: the value study's bf16 + channels_last rows lose 0.4
(baseline) and 0.7 (RMN) points of top-1 against float32 in two of three seeds; this shows what each mode's arithmetic
does to a step, beside the training rows that separate bf16 from channels_last.

    .venv/bin/python benchmarks/grad_precision.py --epochs 3 --batches 12     # -> results/grad_precision-narrow_baseline.json
    .venv/bin/python benchmarks/grad_precision.py --row narrow_rmn --epochs 5 --batches 12    # 4 plain + 1 routed epoch
    .venv/bin/python benchmarks/grad_precision.py --quick    # digits at 8x8, seconds; writes only where --out says

Model: a value-study row (``--row``; default the narrow baseline, configs/value_study/narrow_baseline.yaml: width
1/16, Fashion-MNIST; ``narrow_rmn`` its RMN, measured after its first routed epoch) trained ``--epochs`` in float32,
then in train mode (batch statistics, as in training) the gradient of the cross-entropy of each of ``--batches``
batches in every mode. Reported per part (stem, layer1-4, fc), medians over its parameters (in an RMN, each
procedure's, where the batch routes samples to it) and the batches:
- ``error``: ||g - g64|| / ||g64||, g64 the float64 gradient;
- ``sgd_noise``: the same for the float64 gradient of the next batch: the step's own noise, the yardstick;
- ``coherence``: ||sum of errors|| / sqrt(sum of ||error||^2) over the batches: about 1 when the error averages out
  like noise, up to sqrt(batches) when every step gets the same error;
- for an RMN, ``route_changes``: per routed stage, the share of the batch's samples that a mode routes to another
  procedure than float64 does (routing is a discontinuous function of the stage input).
Then the same weights evaluated on the test set in each mode: top-1, and the share of images whose prediction or
(in an RMN) route in any stage differs from float32's. And BatchNorm alone (training mode, float32), contiguous vs
channels_last, against float64: where the channels_last error starts.
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from rmn.precision import Precision  # noqa: E402
from rmn.recipe.config import load_config  # noqa: E402
from rmn.recipe.loop import train_epochs  # noqa: E402
from rmn.recipe.run import Run  # noqa: E402
from rmn.recipe.runner import run_steps  # noqa: E402
from rmn.route import last_routes  # noqa: E402
from results_file import write_results  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"  # grad_precision-<row>.json
CONFIGS = ROOT / "configs" / "value_study"
MODES = {"float32": Precision(), "float32 + channels_last": Precision("none", True),
         "bf16": Precision("bf16", False), "bf16 + channels_last": Precision("bf16", True)}
QUICK = {"data.dataset": "digits", "data.image_size": 8, "data.batch_size": 128, "model.width_mult": 0.125}


def trained_model(row: str, epochs: int, quick: bool, out: Path) -> tuple[torch.nn.Module, list, list]:
    """The value study's ``row`` after ``epochs`` float32 epochs (an RMN: its plain epochs, then routed ones up
    to ``epochs``), its training loader and its evaluation loader."""
    cfg = load_config(CONFIGS / f"{row}.yaml", {
        "run.output": str(out), "run.threads": torch.get_num_threads(), "run.atlas": False, "run.tensorboard": False,
        "run.progress": "none", **(QUICK if quick else {})})
    cfg.schedule.epochs = epochs
    if cfg.run.mode == "baseline":
        cfg.schedule.stem_epochs = epochs
        run = Run.open(cfg, baseline=True)
        train_epochs(run, epochs)
    else:
        cfg.schedule.stem_epochs = min(cfg.schedule.stem_epochs, epochs - 1)  # at least one routed epoch
        run_steps(cfg)
        run = Run.open(cfg)
    run.log.close()
    return run.model.train(), run.loaders[0], run.loaders[1]


def gradients(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mode: Precision,
              dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Every parameter's gradient (as float64) of the batch's cross-entropy, on a copy of ``model`` (none for
    the procedures no sample of the batch was routed to), and its routes (``rmn.last_routes``; None unrouted)."""
    m = mode.model(copy.deepcopy(model).to(dtype))
    with mode.autocast():
        loss = F.cross_entropy(m(mode.batch(x.to(dtype))), y)
    loss.backward()
    return ({n: p.grad.detach().double().contiguous() for n, p in m.named_parameters() if p.grad is not None},
            last_routes(m))


def part(name: str) -> str:
    first = name.split(".", 1)[0]
    return "stem" if first in ("conv1", "bn1") else first


def step_errors(model, loader, batches: int) -> dict:
    """Per mode and part: median error, SGD noise and coherence (see the module docstring)."""
    data = []
    for x, y in loader:
        data.append((x, y))
        if len(data) == batches + 1:
            break
    err = {m: {} for m in MODES}
    flips = {m: [] for m in MODES}  # per batch, per routed stage: share of samples routed elsewhere than in float64
    noise, total = {}, {m: {} for m in MODES}
    for (x, y), (x2, y2) in zip(data, data[1:]):
        ref, ref_routes = gradients(model, x, y, Precision(), torch.float64)
        other, _ = gradients(model, x2, y2, Precision(), torch.float64)
        ref = {n: g for n, g in ref.items() if g.norm() > 0}
        for n in ref:
            noise.setdefault(n, []).append(float((other.get(n, 0 * ref[n]) - ref[n]).norm() / ref[n].norm()))
        for mode, prec in MODES.items():
            g, routes = gradients(model, x, y, prec)
            if routes is not None:
                flips[mode].append((routes != ref_routes).float().mean(1).tolist())
            for n in ref:  # (a sample routed elsewhere in this mode leaves its procedure's gradient short)
                e = g.get(n, 0 * ref[n]) - ref[n]
                err[mode].setdefault(n, []).append(float(e.norm() / ref[n].norm()))
                s, sq = total[mode].get(n, (0, 0.0))
                total[mode][n] = (s + e, sq + float(e.norm()) ** 2)
    parts = sorted({part(n) for n in noise}, key=lambda p: (p != "stem", p == "fc", p))
    report = {}
    for p in parts:
        names = [n for n in noise if part(n) == p]
        report[p] = {"sgd_noise": statistics.median(v for n in names for v in noise[n])}
        for mode in MODES:
            report[p][mode] = {
                "error": statistics.median(v for n in names for v in err[mode][n]),
                "coherence": statistics.median(float(total[mode][n][0].norm()) / total[mode][n][1] ** 0.5
                                               if total[mode][n][1] else 1.0 for n in names)}
    if all(flips.values()):
        report["route_changes"] = {m: [statistics.mean(b[k] for b in flips[m]) for k in range(len(flips[m][0]))]
                                   for m in MODES}
    return report


@torch.no_grad()
def evaluations(model: torch.nn.Module, loader) -> dict:
    """Test top-1 of the same weights evaluated in each mode, and the share of test images whose prediction (and,
    in an RMN, whose route in any stage) differs from float32's."""
    out, ref = {}, None
    for mode, prec in MODES.items():
        m = prec.model(copy.deepcopy(model)).eval()
        preds, routes, labels = [], [], []
        for x, y in loader:
            with prec.autocast():
                preds.append(m(prec.batch(x)).argmax(1))
            r = last_routes(m)
            routes.append(r if r is not None else torch.zeros(1, y.shape[0], dtype=torch.long))
            labels.append(y)
        p, r, y = torch.cat(preds), torch.cat(routes, 1), torch.cat(labels)
        ref = ref or (p, r)
        out[mode] = {"top1": float((p == y).float().mean()), "prediction_changed": float((p != ref[0]).float().mean()),
                     "route_changed": float((r != ref[1]).any(0).float().mean())}
    return out


def batchnorm_errors(shapes: list[tuple[int, int, int]], means: tuple[float, ...]) -> list[dict]:
    """BatchNorm in training mode, float32, contiguous and channels_last, against float64: output and input gradient."""
    rows = []
    g = torch.Generator().manual_seed(0)
    for n, c, side in shapes:
        for mean in means:
            x = torch.randn(n, c, side, side, generator=g) + mean
            dy = torch.randn(n, c, side, side, generator=g)
            ref_x = x.double().requires_grad_()
            ref = F.batch_norm(ref_x, None, None, training=True)
            ref.backward(dy.double())
            row = {"shape": [n, c, side, side], "input_mean": mean}
            for fmt, label in ((torch.contiguous_format, "contiguous"), (torch.channels_last, "channels_last")):
                xx = x.contiguous(memory_format=fmt).detach().requires_grad_()
                out = F.batch_norm(xx, None, None, training=True)
                out.backward(dy.contiguous(memory_format=fmt))
                row[label] = {"output": float((out.detach().double() - ref.detach()).norm() / ref.detach().norm()),
                              "input_grad": float((xx.grad.double() - ref_x.grad).norm() / ref_x.grad.norm())}
            rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row", default="narrow_baseline", help="value-study row (configs/value_study/<row>.yaml)")
    ap.add_argument("--epochs", type=int, default=2, help="float32 epochs before measuring (an RMN row: with its "
                                                          "plain ones, e.g. 5 = 4 plain + 1 routed)")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="digits at 8x8, 2 epochs, 2 batches; writes only to --out")
    ap.add_argument("--out", default=None, help="results file (default benchmarks/results/grad_precision-<row>.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.batches = 2, 2
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, loader, test = trained_model(args.row, args.epochs, args.quick, Path(tmp))
        steps = step_errors(model, loader, args.batches)
        evals = evaluations(model, test)
    shapes = [(32, 4, 8)] if args.quick else [(256, 4, 28), (256, 8, 14), (256, 32, 4), (32, 4, 28)]
    bn = batchnorm_errors(shapes, (0.0, 3.0))
    print("| part | SGD noise (next batch) | " + " | ".join(f"{m} error (coherence)" for m in MODES) + " |")
    print("|---|---|" + "---|" * len(MODES))
    for p, r in ((p, r) for p, r in steps.items() if p != "route_changes"):
        print(f"| {p} | {r['sgd_noise']:.2f} | "
              + " | ".join(f"{r[m]['error']:.1e} ({r[m]['coherence']:.1f})" for m in MODES) + " |")
    if "route_changes" in steps:
        print("\nSamples routed elsewhere than in float64, per routed stage: " + "; ".join(
            f"{m} " + " ".join(f"{100 * v:.2f}%" for v in shares) for m, shares in steps["route_changes"].items()))
    print("\nEvaluated in each mode (same weights, trained in float32): " + "; ".join(
        f"{m} top-1 {100 * e['top1']:.2f}% (prediction changed {100 * e['prediction_changed']:.2f}%, "
        f"a route changed {100 * e['route_changed']:.2f}%)" for m, e in evals.items()))
    print("\n| BatchNorm input (N, C, H, W) | input mean | contiguous: output, input grad | channels_last: output, input grad |")
    print("|---|---|---|---|")
    for r in bn:
        c, cl = r["contiguous"], r["channels_last"]
        print(f"| {tuple(r['shape'])} | {r['input_mean']:g} | {c['output']:.1e}, {c['input_grad']:.1e} | "
              f"{cl['output']:.1e}, {cl['input_grad']:.1e} |")
    report = {"row": args.row, "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": args.threads, "epochs": args.epochs, "batches": args.batches, "quick": args.quick,
              "steps": steps, "evaluation": evals, "batchnorm": bn}
    out = write_results(report, args.out, args.quick, RESULTS / f"grad_precision-{args.row}.json")
    print(f"wrote {out}" if out else "not written (--quick)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
