"""Where a routed training step's extra time goes: forward + backward of the baseline against four RMNs that each change
one thing (issue #15: RMN / baseline under bf16 + channels_last).

    .venv/bin/python benchmarks/step_split.py                       # fashion, bf16 + channels_last and float32
    .venv/bin/python benchmarks/step_split.py --quick               # smoke run: 1 round, writes nothing

Variants, all from ``train_step.build_pair`` (memories by k-means on the stage features, N = 8, no CA):

* ``baseline``: the plain network, one batch of 256 per stage;
* ``sliced``: every stage's procedures are *one shared module* (the baseline's stage) and the routes are forced to
  equal slices (sample ``b`` to procedure ``b mod N``). It adds only the batch running in 8 slices of 32, through
  dispatch. In evaluation mode it computes exactly the baseline (tests/test_step_split.py);
* ``distinct``: the RMN's own 8 procedures, still on forced equal slices. It adds 8 sets of weights: 8x the
  autocast casts and weight gradients, and caches holding 8 copies;
* ``routed``: the RMN as it trains: routes from the memories, so slices of unequal sizes that change every step,
  and the memory update;
* ``grouped``: ``distinct``'s procedures on the same equal slices, but each routed stage runs them as *one* network
  whose convolutions are grouped (N x the groups) and whose BatchNorms have N x the channels
  (:func:`grouped_template`), the slices laid side by side along the channels and the N procedures' weights
  concatenated at every step (so gradients reach each procedure). The same outputs as ``distinct``
  (tests/test_step_split.py). Equal slices need no padding and no BatchNorm that skips padding rows, so this is
  what fusing a stage's procedures into grouped kernel calls could buy *at best*. It is a measurement, not an rmn
  feature: running statistics are not updated.

No optimizer step (``train_step.py`` times it with one). Interleaved rounds, median process CPU time per step, ratios
over the baseline's. Writes ``benchmarks/results/step_split.json``.
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from rmn.analysis.latency import interleaved_times  # noqa: E402
from rmn.dispatch import memory_format  # noqa: E402
from rmn.precision import Precision  # noqa: E402
from rmn.route import routed_stages, update_memories  # noqa: E402
from results_file import add_timing_args, apply_quick, write_results  # noqa: E402
from train_step import MODELS, PRECISIONS, build_pair, calibration_images  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "step_split.json"
VARIANTS = ("baseline", "sliced", "distinct", "routed", "grouped")


def equal_routes(num_procedures: int):
    """A stand-in for ``MemoryBank.route``: sample ``b`` goes to procedure ``b mod N``, so every slice has the same
    size (within one) whatever the features."""
    def route(features: torch.Tensor) -> torch.Tensor:
        return torch.arange(features.shape[0], device=features.device) % num_procedures
    return route


def grouped_template(procedure: nn.Module, n: int) -> nn.Module:
    """``procedure``'s structure with every Conv2d grouped N times over (N x the channels and the groups) and every
    BatchNorm2d over N x the channels: run on N inputs laid side by side along the channels, with the N procedures'
    parameters concatenated, it computes each procedure on its own input."""
    template = copy.deepcopy(procedure)
    for name, m in list(template.named_modules()):
        if isinstance(m, nn.Conv2d):
            new = nn.Conv2d(n * m.in_channels, n * m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                            n * m.groups, m.bias is not None)
        elif isinstance(m, nn.BatchNorm2d):
            new = nn.BatchNorm2d(n * m.num_features, m.eps, m.momentum)
        elif any(True for _ in m.parameters(recurse=False)):
            raise ValueError(f"cannot group a {type(m).__name__} ({name}): only Conv2d and BatchNorm2d have parameters")
        else:
            continue
        parent = template.get_submodule(name.rsplit(".", 1)[0]) if "." in name else template
        setattr(parent, name.rsplit(".", 1)[-1], new)
    return template


def stacked_state(modules) -> dict[str, torch.Tensor]:
    """The parameters and buffers of ``grouped_template(modules[0], len(modules))`` that make it compute each of
    ``modules`` on its own group: theirs concatenated (a step counter, 0-d, is the first one's)."""
    own = [dict(m.named_parameters()) | dict(m.named_buffers()) for m in modules]
    return {k: torch.cat([o[k] for o in own]) if own[0][k].dim() else own[0][k] for k in own[0]}


class GroupedProcedures(nn.Module):
    """A routed stage's N procedures run as one grouped network on equal slices (sample ``b`` to procedure ``b mod N``)."""

    def __init__(self, procedures: nn.ModuleList) -> None:
        super().__init__()
        self.procedures = procedures
        self.template = [grouped_template(procedures[0], len(procedures))]  # a list: not a submodule, no parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, fmt = len(self.procedures), memory_format(x)
        b, c = x.shape[0] // n, x.shape[1]
        state = stacked_state(self.procedures)  # every step, so gradients reach each procedure
        xg = x.reshape(b, n * c, *x.shape[2:]).contiguous(memory_format=fmt)  # row k*n + j -> group j of row k
        self.template[0].train(self.procedures.training)
        y = torch.func.functional_call(self.template[0], state, (xg,))
        return y.reshape(b * n, y.shape[1] // n, *y.shape[2:]).contiguous(memory_format=fmt)


def variant(pair: dict, name: str) -> nn.Module:
    """A copy of the network that ``name`` times (see the module docstring)."""
    if name == "baseline":
        return copy.deepcopy(pair["baseline"])
    net = copy.deepcopy(pair["rmn"])
    if name == "routed":
        return net
    plain = routed_stages(copy.deepcopy(pair["baseline"])) if name == "sliced" else None
    for i, stage in enumerate(routed_stages(net)):
        if stage.memory is None:
            continue
        if plain is not None:  # one module N times over: the baseline's stage
            stage.procedures = nn.ModuleList([plain[i].procedures[0]] * stage.num_procedures)
        stage.memory.route = equal_routes(stage.num_procedures)
        if name == "grouped":  # the stage's forward is the grouped network (no routing: the slices are fixed)
            object.__setattr__(stage, "forward", GroupedProcedures(stage.procedures))  # an instance attribute, unregistered
    return net


def step_fn(net: nn.Module, precision: Precision, x: torch.Tensor, y: torch.Tensor, batch: int, update: bool):
    net = precision.model(net).train()
    net.auto_update = False
    xs = precision.batch(x)
    chunks = x.shape[0] // batch

    def step(i: int) -> None:
        s = (i % chunks) * batch
        with precision.autocast():
            loss = F.cross_entropy(net(xs[s:s + batch]), y[s:s + batch])
        loss.backward()
        if update:
            update_memories(net)
        for p in net.parameters():
            p.grad = None

    return step


def measure(model: str, precision: str, args) -> dict:
    calib, source = calibration_images(model, 4 * args.batch)
    pair = build_pair(model, args.procedures, None, calib, args.batch)
    y = torch.randint(MODELS[model][3], (calib.shape[0],), generator=torch.Generator().manual_seed(1))
    prec = Precision(*PRECISIONS[precision])
    fns = {k: step_fn(variant(pair, k), prec, calib, y, args.batch, update=k == "routed") for k in VARIANTS}
    cpu: dict[str, list[float]] = {}
    interleaved_times(fns, repeats=args.rounds, warmup=args.warmup, inner=args.inner, cpu=cpu)
    ms = {k: 1000 * statistics.median(v) for k, v in cpu.items()}
    out = {"model": model, "precision": precision, "routes_from": source, "cpu_ms": ms,
           "ratio": {k: ms[k] / ms["baseline"] for k in ms}}
    print(f"\n{model}, {precision}, forward + backward (median CPU ms per step, ratio over the baseline)")
    for k in VARIANTS:
        print(f"  {k:<9} {ms[k]:8.1f}  {ms[k] / ms['baseline']:.3f}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=["fashion"])
    ap.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=["bf16-cl", "fp32"])
    ap.add_argument("--procedures", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    add_timing_args(ap, RESULTS, rounds=10, warmup=1, inner=4, quick="1 round of 1 step")
    args = ap.parse_args(argv)
    apply_quick(args)
    torch.set_num_threads(args.threads)
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__},
              "args": vars(args), "runs": [measure(m, p, args) for m in args.models for p in args.precisions]}
    out = write_results(report, args.out, args.quick, RESULTS)
    print(f"\nwrote {out}" if out else "\nnot written (--quick)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
