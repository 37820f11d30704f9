"""The cost of routed dispatch over the plain backbone.

Cases (all interleaved in one process, medians over rounds, random weights):

* ``cifar``: CIFAR-size (32x32) ResNet-18, full width, 100 classes, batch 256 -- eval forward
  (``torch.inference_mode``) and one training step (forward, cross-entropy, backward, SGD step,
  memory update);
* ``b1``: ImageNet-size (224x224) ResNet-18, batch 1 -- eval latency, cycling through a pool of images.

Variants: the backbone, and RMN with N = 8 whose memories are set (``memories_for_shares``) so that
the batch splits **uniformly** (1/8 each) or **skewed** (70% to one memory, the rest evenly). In the
training step the memories' momentum is set to 1 so routes stay fixed while the update still runs;
memories for training are calibrated on training-mode features (BatchNorm batch statistics).
The route counts actually observed during the timed calls are reported.

The project's targets: batch-1 latency ratio <= 1.03, batch-256 eval ratio <= 1.08, train-step ratio <= 1.15.
"""
from __future__ import annotations

import argparse
import copy
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..backbones import create_backbone
from .calibrate import memories_for_shares
from .cost import write_report
from .latency import _loadavg, _summary, environment, interleaved_times, varied_images
from ..route import has_routing, last_routes, memory_banks, replace_stage, route, stage_groups

TARGETS = {"b1_eval": 1.03, "cifar_eval": 1.08, "cifar_train": 1.15}
SHARES = {"uniform": [1 / 8] * 8, "skewed": [0.7] + [0.3 / 7] * 7}


def _shares(kind: str, n: int) -> list[float]:
    if kind == "uniform":
        return [1.0 / n] * n
    if kind == "skewed":
        return [0.7] + [0.3 / (n - 1)] * (n - 1) if n > 1 else [1.0]
    raise ValueError(f"unknown route pattern {kind!r}")


def _observed(routes: list[torch.Tensor], n: int) -> list[list[int]]:
    """Per-stage route counts summed over the recorded forwards."""
    if not routes:
        return []
    r = torch.cat([t.cpu() for t in routes], dim=1)
    return [torch.bincount(row[row >= 0], minlength=n).tolist() for row in r]


class _Split(torch.nn.Module):
    """One stage run on consecutive sub-batches of the given sizes, then concatenated."""

    def __init__(self, stage: torch.nn.Module, counts: Sequence[int]) -> None:
        super().__init__()
        self.stage = stage
        self.counts = [int(c) for c in counts if c > 0]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.stage(c) for c in h.split(self.counts)]) if len(self.counts) > 1 else self.stage(h)


def split_backbone(backbone: torch.nn.Module, counts: Sequence[int]) -> torch.nn.Module:
    """Reference for the dispatch cost: a copy of the *plain* backbone whose every stage runs on the same
    contiguous sub-batches the routed network would form (sizes ``counts``), then concatenated.

    Same kernels and sub-batch sizes as RMN, but no routing, no permutation and a single set of
    weights: RMN / split backbone isolates what dispatch itself costs, separately from the effect of
    smaller per-procedure batches. (In training mode BatchNorm sees per-chunk statistics, as in RMN.)
    """
    model = copy.deepcopy(backbone)
    for group in stage_groups(model, None):
        mods = [model.get_submodule(n) for n in group]
        replace_stage(model, group, _Split(mods[0] if len(mods) == 1 else torch.nn.Sequential(*mods), counts))
    return model


def _models(image_size: int, n: int, attention, width_mult: float, seed: int):
    torch.manual_seed(seed)
    bb = create_backbone("resnet18", 100 if image_size <= 64 else 1000, image_size=image_size, width_mult=width_mult)
    nets = {"backbone": bb}
    for kind in ("uniform", "skewed"):
        nets[kind] = route(bb, None, n, attention, attention_init="random")
    return nets


def bench_eval(nets: dict, x_pool: torch.Tensor, batch: int, n: int, repeats: int, warmup: int, inner: int,
               log: Callable[[str], None]) -> dict[str, Any]:
    for kind in ("uniform", "skewed"):
        memories_for_shares(nets[kind], x_pool, _shares(kind, n), train=False)
    for m in nets.values():
        m.eval()
    seen: dict[str, list] = {k: [] for k in nets}
    pool = x_pool.shape[0]

    def make(key, m):
        def fn(i):
            start = (i * batch) % pool
            m(x_pool[start:start + batch])
            if has_routing(m):
                seen[key].append(last_routes(m))
        return fn

    log(f"  eval, batch {batch}: {repeats} rounds x {inner} pass(es), warm-up {warmup}")
    cpu: dict[str, list[float]] = {}
    with torch.inference_mode():
        times = interleaved_times({k: make(k, m) for k, m in nets.items()}, repeats, warmup, inner, cpu=cpu)
    return _pack(times, cpu, {k: _observed(v, n) for k, v in seen.items() if v}, batch, log)


def bench_train(nets: dict, x: torch.Tensor, y: torch.Tensor, n: int, repeats: int, warmup: int,
                log: Callable[[str], None]) -> dict[str, Any]:
    for kind in ("uniform", "skewed"):
        memories_for_shares(nets[kind], x, _shares(kind, n), train=True)
        for bank in memory_banks(nets[kind]):
            if bank is not None:
                bank.momentum = 1.0  # the update runs, the memories stay: routes stay fixed
    # a tiny learning rate keeps the routes where they were set (the step costs the same at any lr)
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-6, momentum=0.9, weight_decay=5e-5) for k, m in nets.items()}
    for m in nets.values():
        m.train()
    seen: dict[str, list] = {k: [] for k in nets}

    def make(key, m):
        opt = opts[key]

        def fn(i):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            if has_routing(m):
                seen[key].append(last_routes(m))
        return fn

    log(f"  train step, batch {x.shape[0]}: {repeats} rounds, warm-up {warmup}")
    cpu: dict[str, list[float]] = {}
    times = interleaved_times({k: make(k, m) for k, m in nets.items()}, repeats, warmup, 1, cpu=cpu)
    return _pack(times, cpu, {k: _observed(v, n) for k, v in seen.items() if v}, x.shape[0], log)


def _pack(times: dict[str, list[float]], cpu: dict[str, list[float]], routes: dict[str, list],
          batch: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    out: dict[str, Any] = {"batch": batch, "variants": {}}
    base = _summary(times["backbone"])["median"]
    base_cpu = _summary(cpu["backbone"])["median"]
    for key, ts in times.items():
        s, c = _summary(ts), _summary(cpu[key])
        out["variants"][key] = {
            "ms": 1e3 * s["median"], "q1_ms": 1e3 * s["q1"], "q3_ms": 1e3 * s["q3"], "min_ms": 1e3 * s["min"],
            "cpu_ms": 1e3 * c["median"], "samples": s["n"], "ratio": s["median"] / base,
            "cpu_ratio": c["median"] / base_cpu, "observed_routes": routes.get(key),
        }
    log("    " + "; ".join(f"{k} {v['ms']:.1f} ms (x{v['ratio']:.3f})" for k, v in out["variants"].items()))
    return out


def run_dispatch(
    cases: Sequence[str] = ("b1", "cifar"),
    num_procedures: int = 8,
    attention: bool | str = False,
    cifar_batch: int = 256,
    cifar_width: float = 1.0,
    cifar_eval_repeats: int = 8,
    cifar_train_repeats: int = 5,
    b1_repeats: int = 40,
    b1_inner: int = 5,
    warmup: int = 1,
    threads: int | None = None,
    seed: int = 0,
    split_reference: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """See the module docstring. ``split_reference`` adds the :func:`split_backbone` references
    (plain backbone on the same sub-batches) to the batch-256 cases."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    load0 = _loadavg()
    results: dict[str, Any] = {}
    if "b1" in cases:
        log("ResNet-18 224x224, batch 1 (random weights) ...")
        nets = _models(224, num_procedures, attention, 1.0, seed)
        pool = varied_images(64, 224, seed=seed)
        results["b1_eval"] = bench_eval(nets, pool, 1, num_procedures, b1_repeats, max(warmup, 2), b1_inner, log)
        del nets
    if "cifar" in cases:
        log(f"ResNet-18 32x32 (CIFAR variant, width x{cifar_width}), batch {cifar_batch} (random weights) ...")
        nets = _models(32, num_procedures, attention, cifar_width, seed)
        x = varied_images(cifar_batch, 32, seed=seed)
        y = torch.randint(0, 100, (cifar_batch,), generator=torch.Generator().manual_seed(seed))
        if split_reference:
            from .calibrate import _counts_from_shares

            for kind in ("uniform", "skewed"):
                nets[f"split_{kind}"] = split_backbone(
                    nets["backbone"], _counts_from_shares(_shares(kind, num_procedures), cifar_batch))
        results["cifar_eval"] = bench_eval(nets, x, cifar_batch, num_procedures, cifar_eval_repeats, warmup, 1, log)
        results["cifar_train"] = bench_train(nets, x, y, num_procedures, cifar_train_repeats, warmup, log)
        del nets
    for key, res in results.items():
        res["target_ratio"] = TARGETS[key]
    return {
        "benchmark": "dispatch",
        "environment": environment("cpu") | {"loadavg_1min_at_start": load0, "loadavg_1min_at_end": _loadavg()},
        "settings": {
            "num_procedures": num_procedures, "attention": attention, "cifar_batch": cifar_batch,
            "cifar_width_mult": cifar_width, "cifar_eval_repeats": cifar_eval_repeats,
            "cifar_train_repeats": cifar_train_repeats, "b1_repeats": b1_repeats, "b1_inner": b1_inner,
            "warmup_rounds": warmup, "skewed": "70% of the batch to one memory, the rest evenly",
            "statistic": "median over interleaved rounds", "wall_s": round(time.time() - t0, 1),
        },
        "results": results,
    }


CASE_LABELS = {"b1_eval": "ResNet-18 224, batch 1, eval", "cifar_eval": "ResNet-18 32 (CIFAR), batch {b}, eval",
               "cifar_train": "ResNet-18 32 (CIFAR), batch {b}, train step"}


def format_dispatch(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"{env['processor']}, torch {env['torch']}, {env['torch_threads']} threads; random weights; "
             f"N = {report['settings']['num_procedures']}, attention = {report['settings']['attention']}; "
             f"medians of interleaved rounds; load average {env.get('loadavg_1min_at_start')} -> "
             f"{env.get('loadavg_1min_at_end')}"]
    header = ["case", "backbone ms", "uniform ms", "ratio", "cpu ratio", "skewed ms", "ratio", "cpu ratio", "target"]
    rows = []
    for key, res in report["results"].items():
        v = res["variants"]
        rows.append([CASE_LABELS[key].format(b=res["batch"]), f"{v['backbone']['ms']:.1f}",
                     f"{v['uniform']['ms']:.1f}", f"{v['uniform']['ratio']:.3f}", f"{v['uniform']['cpu_ratio']:.3f}",
                     f"{v['skewed']['ms']:.1f}", f"{v['skewed']['ratio']:.3f}", f"{v['skewed']['cpu_ratio']:.3f}",
                     f"<= {res['target_ratio']:.2f}"])
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines += [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    for key, res in report["results"].items():
        v = res["variants"]
        for kind in ("uniform", "skewed"):
            ref = v.get(f"split_{kind}")
            if ref:
                lines.append(f"  {key} {kind}: plain backbone on the same sub-batches {ref['ms']:.1f} ms "
                             f"(x{ref['ratio']:.3f}); RMN over it x{v[kind]['ms'] / ref['ms']:.3f} = the dispatch cost itself")
    for key, res in report["results"].items():
        for kind in ("uniform", "skewed"):
            r = res["variants"][kind]["observed_routes"]
            if r:
                tot = sum(r[0])
                lines.append(f"  {key} {kind}: observed route shares per stage (%): "
                             + " | ".join(" ".join(f"{100 * c / tot:.0f}" for c in st) for st in r))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--cases", nargs="+", default=["b1", "cifar"], choices=["b1", "cifar"])
    p.add_argument("--procedures", type=int, default=8)
    p.add_argument("--attention", choices=["none", "ca", "se"], default="none")
    p.add_argument("--cifar-batch", type=int, default=256)
    p.add_argument("--cifar-width", type=float, default=1.0, help="width multiplier of the CIFAR ResNet-18")
    p.add_argument("--eval-repeats", type=int, default=8, help="interleaved rounds, CIFAR eval")
    p.add_argument("--train-repeats", type=int, default=5, help="interleaved rounds, CIFAR train step")
    p.add_argument("--b1-repeats", type=int, default=40, help="interleaved rounds at batch 1")
    p.add_argument("--b1-inner", type=int, default=5, help="passes per timed block at batch 1")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-split-reference", action="store_true",
                   help="skip the plain-backbone-on-the-same-sub-batches references")
    p.add_argument("--quick", action="store_true", help="small CIFAR batch and width, few rounds: a smoke run")
    p.add_argument("--json", dest="json_out", default=None, help="write the results here")
    return p


def command(args: argparse.Namespace) -> int:
    if args.quick:
        args.cifar_batch, args.cifar_width = 32, 0.25
        args.eval_repeats, args.train_repeats, args.b1_repeats, args.b1_inner = 2, 2, 3, 1
    attention = {"none": False, "ca": True, "se": "se"}[args.attention]
    report = run_dispatch(args.cases, args.procedures, attention, args.cifar_batch, args.cifar_width,
                          args.eval_repeats, args.train_repeats, args.b1_repeats, args.b1_inner, args.warmup,
                          args.threads, split_reference=not args.no_split_reference)
    print(format_dispatch(report))
    if args.json_out:
        print(f"wrote {write_report(report, args.json_out)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return command(add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0])).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
