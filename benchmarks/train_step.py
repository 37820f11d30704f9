"""Training-step and evaluation time of baseline vs RMN (N = 8) in float32, bf16 and bf16 + channels_last.

    .venv/bin/python benchmarks/train_step.py                      # both models, 1 and 2 threads
    .venv/bin/python benchmarks/train_step.py --models fashion --threads 1 --rounds 3   # a quick look
    .venv/bin/python benchmarks/train_step.py --compile            # adds torch.compile'd variants
    .venv/bin/python benchmarks/train_step.py --quick              # smoke run: fashion, 1 thread, 1 round, writes nothing

Models: ``fashion`` is the Fashion-MNIST study's network (eighth-width CIFAR-style ResNet-18, 28x28x1,
10 classes); ``cifar-quarter`` a quarter-width CIFAR ResNet-18 (32x32x3, 100 classes). Batch 256.

Routes are spread as after the recipe's step 3: BatchNorm running statistics are first set to those
of the calibration images (real Fashion-MNIST images when the Debian package is installed, else
varied synthetic images), as training leaves them, and each routed stage's memories are k-means
centres of the stage features, so every procedure gets a share of each batch in training and in
evaluation, as in a real run (the Fashion study's per-stage loads are 6-20% per procedure; the
result file records the loads measured here). Random memories, or memories from features that
BatchNorm statistics of a random initialisation distort, send nearly every sample to one or two
procedures and hide the cost of dispatch.

A training step is what the recipe does: forward and loss under the precision's autocast, backward,
memory update, SGD step. Evaluation is a forward under ``torch.inference_mode``. All variants of one
model and thread count are timed interleaved in one process (``rmn.analysis.latency.interleaved_times``);
reported are medians of wall time and of process CPU time per call (CPU time is what a loaded machine
distorts least) and the ratios the issue asks for, taken within one run. Writes
``benchmarks/results/train_step.json``.
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's rmn, whichever environment runs the script
sys.path.insert(0, str(ROOT / "benchmarks"))

from rmn.analysis.calibrate import calibrate_memories, measure_route_counts  # noqa: E402
from rmn.analysis.latency import interleaved_times, varied_images  # noqa: E402
from rmn.backbones import create_backbone  # noqa: E402
from rmn.precision import Precision, compile_parts  # noqa: E402
from rmn.route import route, update_memories  # noqa: E402
from rmn.training import drop_idle_gradients  # noqa: E402
from results_file import add_timing_args, apply_quick, write_results  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "train_step.json"
MODELS = {  # name: (width_mult, image size, channels, classes)
    "fashion": (0.125, 28, 1, 10),
    "cifar-quarter": (0.25, 32, 3, 100),
    "cifar-full": (1.0, 32, 3, 100),  # the paper's CIFAR-100 network (benchmarks/gpu_check.py)
}
PRECISIONS = {"fp32": ("none", False), "bf16": ("bf16", False), "bf16-cl": ("bf16", True)}


def calibration_images(model: str, n: int) -> tuple[torch.Tensor, str]:
    """Real Fashion-MNIST training images (normalised) for the Fashion model when installed; else varied synthetic ones."""
    _, size, channels, _ = MODELS[model]
    if model == "fashion":
        try:
            from rmn.data import build_dataset

            ds = build_dataset("fashion-mnist", split="train")
            idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n]
            return (ds.images[idx].float() / 255 - 0.2860) / 0.3530, "Fashion-MNIST training images"
        except Exception as e:  # noqa: BLE001 - the benchmark still runs, and says what it used
            print(f"(Fashion-MNIST not readable: {e}; using synthetic images)", file=sys.stderr)
    return varied_images(n, size, channels, seed=0), "varied synthetic images"


@torch.no_grad()
def settle_batchnorm(net: torch.nn.Module, x: torch.Tensor, batch: int) -> None:
    """Set BatchNorm running statistics to the calibration data's (cumulative averages over its
    batches), as training leaves them: evaluation-mode features then match training-mode ones, so
    memories from either route both modes alike."""
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    for s in range(0, x.shape[0], batch):
        net(x[s:s + batch])
    for m in bns:
        m.momentum = 0.1


def build_pair(model: str, num_procedures: int, attention: str | None, calib: torch.Tensor, batch: int,
               device: torch.device | str = "cpu"):
    """Baseline (the plain network) and its RMN with memories set by k-means on the stage features."""
    width, size, channels, classes = MODELS[model]
    torch.manual_seed(0)
    bb = create_backbone("resnet18", num_classes=classes, image_size=size, in_channels=channels, width_mult=width)
    base = route(bb, None, num_procedures, attention, clone=False, attention_init="random").to(device)
    calib = calib.to(device)
    settle_batchnorm(base, calib, batch)
    rmn = route(base, None, num_procedures)
    # memories from the features of the mode timed: procedures' BatchNorm sees slice statistics in training
    rmn_eval = copy.deepcopy(rmn)
    calibrate_memories(rmn, calib[: 2 * batch], method="kmeans", train=True)
    calibrate_memories(rmn_eval, calib[: 2 * batch], method="kmeans", train=False)
    return {"baseline": base, "rmn": rmn, "rmn_eval": rmn_eval}


def train_fn(net, precision: Precision, x: torch.Tensor, y: torch.Tensor, batch: int):
    net = precision.model(copy.deepcopy(net)).train()
    net.auto_update = False
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-5, foreach=True)  # as the recipe
    xs = precision.batch(x)
    chunks = x.shape[0] // batch

    def step(i: int) -> None:
        s = (i % chunks) * batch
        opt.zero_grad(set_to_none=True)
        with precision.autocast():
            loss = F.cross_entropy(net(xs[s:s + batch]), y[s:s + batch])
        loss.backward()
        update_memories(net)
        drop_idle_gradients(net)
        opt.step()

    return step, net


def eval_fn(net, precision: Precision, x: torch.Tensor, batch: int):
    net = precision.model(copy.deepcopy(net)).eval()
    xs = precision.batch(x)
    chunks = x.shape[0] // batch

    def forward(i: int) -> None:
        s = (i % chunks) * batch
        with torch.inference_mode(), precision.autocast():
            net(xs[s:s + batch])

    return forward, net


def measure(model: str, threads: int, args, log=lambda text: print(text, flush=True)) -> dict:
    """Both timings of one model at one thread count; ``args`` as parsed by :func:`parser` (``args.device``)."""
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    calib, source = calibration_images(model, 4 * args.batch)
    calib = calib.to(device)
    pair = build_pair(model, args.procedures, None if args.attention == "none" else args.attention, calib, args.batch,
                      device)
    x, y = calib, torch.randint(MODELS[model][3], (calib.shape[0],), generator=torch.Generator().manual_seed(1)).to(device)
    loads = {mode: [[round(c / max(sum(row), 1), 3) for c in row]
                    for row in measure_route_counts(pair[net], x[: args.batch], train=mode == "train")]
             for mode, net in (("train", "rmn"), ("eval", "rmn_eval"))}
    precisions = {k: Precision(*PRECISIONS[k], device.type) for k in args.precisions}
    refused = []
    for k, p in list(precisions.items()):
        try:  # what rmn refuses to train (channels_last on several CPU threads crashes in torch) is not timed
            p.check_training(threads)
        except ValueError:
            refused.append(precisions.pop(k).amp + " + channels_last")
    if refused:
        log(f"({model}, {threads} threads: not timed: {', '.join(refused)}; see Precision.check_training)")
    out = {"model": model, "threads": threads, "batch": args.batch, "routes_from": source, "loads": loads}
    for kind in ("train", "eval"):
        fns = {}
        for compiled in (False, True) if args.compile else (False,):
            for pname, prec in precisions.items():
                for net_name in ("baseline", "rmn"):
                    net = pair["rmn_eval" if (net_name, kind) == ("rmn", "eval") else net_name]
                    fn, m = train_fn(net, prec, x, y, args.batch) if kind == "train" else eval_fn(net, prec, x, args.batch)
                    if compiled:
                        compile_parts(m)
                    fns[f"{net_name}/{pname}{'+compile' if compiled else ''}"] = fn
        cpu: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        sync = torch.cuda.synchronize if device.type == "cuda" else None
        wall = interleaved_times(fns, repeats=args.rounds, warmup=args.warmup, inner=args.inner, sync=sync, cpu=cpu)
        med = {k: {"wall_ms": 1000 * statistics.median(v), "cpu_ms": 1000 * statistics.median(cpu[k])} for k, v in wall.items()}
        ratios = {}
        for key in med:
            net_name, pname = key.split("/")
            if net_name == "rmn":
                base = med[f"baseline/{pname}"]
                ratios[f"rmn/baseline {pname}"] = {m: med[key][m] / base[m] for m in ("wall_ms", "cpu_ms")}
        for key in med:
            pname = key.split("/")[1]
            if key.startswith("rmn/") and pname != "fp32" and "rmn/fp32" in med:
                ratios[f"rmn fp32/{pname} (speed-up)"] = {m: med["rmn/fp32"][m] / med[key][m] for m in ("wall_ms", "cpu_ms")}
        out[kind] = {"median": med, "ratios": ratios, "seconds": time.perf_counter() - t0}
        log(format_block(model, threads, kind, out[kind]))
    return out


def format_block(model: str, threads: int, kind: str, block: dict) -> str:
    lines = [f"\n{model}, {threads} thread(s), {kind} (ms per batch, median wall / CPU)"]
    for k, v in block["median"].items():
        lines.append(f"  {k:<24} {v['wall_ms']:9.1f} {v['cpu_ms']:9.1f}")
    for k, v in block["ratios"].items():
        lines.append(f"  {k:<36} {v['wall_ms']:6.3f} {v['cpu_ms']:6.3f}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=["fashion", "cifar-quarter"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    ap.add_argument("--procedures", type=int, default=8)
    ap.add_argument("--attention", choices=("none", "ca"), default="none")
    ap.add_argument("--batch", type=int, default=256)
    add_timing_args(ap, RESULTS, rounds=8, warmup=1, inner=2, quick="fashion, 1 thread, 1 round")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd variants (slow to warm up on CPU)")
    ap.add_argument("--device", default="cpu")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    apply_quick(args)
    if args.quick:
        args.models, args.threads = ["fashion"], [1]
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                          "cpu_count": torch.get_num_threads()},
              "args": vars(args), "runs": []}
    for threads in args.threads:
        for model in args.models:
            report["runs"].append(measure(model, threads, args))
    out = write_results(report, args.out, args.quick, RESULTS)
    print(f"\nwrote {out}" if out else "\nnot written (--quick)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
