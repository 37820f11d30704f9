"""What routing's small ops cost *between* the convolutions of a real network, at batch 1.

A routed stage adds a few small ops before its procedure: the stage input's GAP, the distance to N memories, an
argmin and a host read of the route; with Conditional Attention, an SE block after it. Alone, in a loop, they take
a few microseconds each. This benchmark puts them (as forward hooks, computed and thrown away; rmn's own route and
CA among them) at the four stage boundaries of the *plain* ResNet-18 at 224x224 and times the network against
itself without hooks, interleaved: what remains is the cost of those ops in context, with no routing, no procedure
copies and no weights changing between calls. Each hook is also timed alone, in a hot loop on the tensors it sees
in the network. Minor page faults per image are counted too (``getrusage``), to tell an allocator returning
memory to the system from the ops themselves.

    .venv/bin/python benchmarks/ops_in_context.py [--rounds 30]   # -> benchmarks/results/ops_in_context.json
    .venv/bin/python benchmarks/ops_in_context.py --quick         # smoke run: 3 rounds, writes nothing
    .venv/bin/python benchmarks/ops_in_context.py --fused         # also rmn.fused's ops -> ops_in_context_fused.json

``--fused`` adds rmn's fused batch-1 ops (:mod:`rmn.fused`, ``src/rmn/csrc/stage_ops.cpp``): the route and CA
each as one C++ call, built on first use (needs ``pip install ninja`` and a C++ compiler). Before timing it checks
both against rmn's reference ops on the network's real stage tensors.

Ratios are process CPU time per image over the hook-free network's, medians of interleaved rounds of 5 passes;
the paired ratio is the median over rounds of each round's ratio (``rmn.analysis.latency.paired_ratios``).
"""
from __future__ import annotations

import argparse
import copy
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))  # results_file, when imported rather than run
from results_file import write_results  # noqa: E402
from rmn.analysis.latency import build_variants, paired_ratios, varied_images  # noqa: E402
from rmn import fused as rmn_fused  # noqa: E402
from rmn.attention import ConditionalAttention  # noqa: E402
from rmn.memory import nearest, squared_norms, stage_feature  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "ops_in_context.json"
RESULTS_FUSED = ROOT / "benchmarks" / "results" / "ops_in_context_fused.json"
STAGES = ("layer1", "layer2", "layer3", "layer4")
IN_CHANNELS, OUT_CHANNELS = (64, 64, 128, 256), (64, 128, 256, 512)  # ResNet-18's stages


def hooks(memories: dict[str, torch.Tensor], attention: dict[str, ConditionalAttention]) -> dict:
    """Per variant, the work done at each stage boundary and on what: ``(fn(stage, tensor), "input" | "output")``
    (None: the plain network). The route and the attention are rmn's own code, as a routed stage runs it."""
    sq = {n: squared_norms(m) for n, m in memories.items()}
    route = {n: torch.zeros(1, dtype=torch.long) for n in memories}
    return {
        "plain": None,
        "one tiny op (||m||^2 + 1)": (lambda n, x: sq[n] + 1, "input"),
        "argmin + host read": (lambda n, x: int(sq[n].argmin()), "input"),
        "GAP": (lambda n, x: x.mean((2, 3)), "input"),
        "GAP + distance": (lambda n, x: sq[n] - 2.0 * (x.mean((2, 3)) @ memories[n].t()), "input"),
        "GAP + distance + argmin + host read (a route)":
            (lambda n, x: int((sq[n] - 2.0 * (x.mean((2, 3)) @ memories[n].t())).argmin()), "input"),
        "rmn's route (stage_feature, nearest, host read)":
            (lambda n, x: nearest(stage_feature(x), memories[n], sq[n]).item(), "input"),
        "rmn's Conditional Attention on the stage output": (lambda n, y: attention[n](y, route[n]), "output"),
    }


def fused_hooks(ext, memories: dict[str, torch.Tensor], attention: dict[str, ConditionalAttention]) -> dict:
    """rmn's fused ops as two variants, in :func:`hooks`' form (with the same squared norms as rmn's route)."""
    sq = {n: squared_norms(m) for n, m in memories.items()}
    return {
        "fused route (rmn.fused)": (lambda n, x: ext.fused_route(x, memories[n], sq[n]), "input"),
        "fused Conditional Attention (rmn.fused)":
            (lambda n, y: ext.fused_ca(y, attention[n].down.weight, attention[n].down.bias, attention[n].up.weight,
                                       attention[n].up.bias, 0), "output"),
    }


def build_fused():
    """rmn's compiled batch-1 ops (:mod:`rmn.fused`), or a one-line exit saying why they cannot be built."""
    ext = rmn_fused.load()
    if ext is None:
        raise SystemExit(f"ops_in_context.py --fused: rmn's fused ops could not be built ({rmn_fused.build_error()}); "
                         "pip install ninja")
    return ext


def check_fused(ext, variants: dict, seen: dict) -> None:
    """The fused ops compute what the reference ops compute: the same route, CA outputs equal to float tolerance."""
    rmn_route = variants["rmn's route (stage_feature, nearest, host read)"][0]
    rmn_ca = variants["rmn's Conditional Attention on the stage output"][0]
    fused_route = variants["fused route (rmn.fused)"][0]
    fused_ca = variants["fused Conditional Attention (rmn.fused)"][0]
    with torch.inference_mode():
        for n in STAGES:
            if fused_route(n, seen["input"][n]) != rmn_route(n, seen["input"][n]):
                raise SystemExit(f"fused route differs from rmn's at {n}")
            torch.testing.assert_close(fused_ca(n, seen["output"][n]), rmn_ca(n, seen["output"][n]),
                                       rtol=1e-5, atol=1e-5)


def alone_us(fn, tensors: dict[str, torch.Tensor], reps: int = 300) -> float:
    """``fn`` on the four stages' real tensors in a hot loop: microseconds per stage, best of 5."""
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(reps):
            for n, t in tensors.items():
                fn(n, t)
        best = min(best, (time.process_time() - start) / (reps * len(tensors)))
    return 1e6 * best


def hooked_models(plain: torch.nn.Module, example: torch.Tensor, fused=None) -> tuple[dict, dict]:
    """Per variant, a copy of ``plain`` with that variant's hooks, and the hook's cost alone (us per stage).
    ``fused``: rmn's compiled ops (:func:`build_fused`), whose two variants are added and checked."""
    memories = {n: torch.randn(8, c) for n, c in zip(STAGES, IN_CHANNELS)}
    attention = {n: ConditionalAttention(c, 8).eval() for n, c in zip(STAGES, OUT_CHANNELS)}
    variants = hooks(memories, attention)
    if fused is not None:
        variants.update(fused_hooks(fused, memories, attention))
    seen: dict[str, dict[str, torch.Tensor]] = {"input": {}, "output": {}}
    grab = [getattr(plain, n).register_forward_hook(
        lambda mod, args, out, n=n: seen["input"].update({n: args[0]}) or seen["output"].update({n: out}))
        for n in STAGES]
    with torch.inference_mode():
        plain(example)
    for h in grab:
        h.remove()
    if fused is not None:
        check_fused(fused, variants, seen)
    models, alone = {}, {}
    for key, spec in variants.items():
        m = copy.deepcopy(plain)  # every variant its own copy, allocated the same way
        if spec is not None:
            fn, on = spec
            with torch.inference_mode():
                alone[key] = alone_us(fn, seen[on])
            for n in STAGES:
                if on == "input":
                    getattr(m, n).register_forward_pre_hook(lambda mod, args, n=n, fn=fn: (fn(n, args[0]), None)[1])
                else:
                    getattr(m, n).register_forward_hook(lambda mod, args, out, n=n, fn=fn: (fn(n, out), None)[1])
        models[key] = m
    return models, alone


def measure(rounds: int, passes: int = 5, image_size: int = 224, fused=None) -> dict:
    torch.manual_seed(0)
    pool = varied_images(64, image_size)
    plain = build_variants("resnet18", image_size, variants=("backbone",))["backbone"]
    models, alone = hooked_models(plain, pool[:1], fused)
    times: dict[str, list[float]] = {k: [] for k in models}
    faults: dict[str, int] = {k: 0 for k in models}
    with torch.inference_mode():
        for m in models.values():
            for i in range(3):
                m(pool[i:i + 1])
        for r in range(rounds):
            order = list(models.items()) if r % 2 else list(models.items())[::-1]
            for key, m in order:
                minflt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.process_time()
                for i in range(passes):
                    j = (r * passes + i) % pool.shape[0]
                    m(pool[j:j + 1])
                times[key].append((time.process_time() - start) / passes)
                faults[key] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - minflt
    base = statistics.median(times["plain"])
    paired = {key: statistics.median(paired_ratios(t, times["plain"])) for key, t in times.items()}
    return {key: {"cpu_ms_per_image": 1e3 * statistics.median(t), "ratio": statistics.median(t) / base,
                  "paired_ratio": paired[key],
                  "per_stage_us": 1e6 * (statistics.median(t) - base) / len(STAGES),
                  "paired_per_stage_us": 1e6 * base * (paired[key] - 1) / len(STAGES),
                  "alone_us_per_stage": alone.get(key, 0.0),
                  "page_faults_per_image": faults[key] / (rounds * passes)}
            for key, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="3 rounds at 64x64, writes nothing")
    ap.add_argument("--out", help="results file (default: benchmarks/results/ops_in_context.json, or "
                                  "ops_in_context_fused.json with --fused)")
    ap.add_argument("--fused", action="store_true",
                    help="also time rmn's fused batch-1 ops (rmn.fused; needs ninja and a C++ compiler)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else args.rounds
    fused = build_fused() if args.fused else None
    rows = measure(rounds, image_size=64 if args.quick else 224, fused=fused)
    for key, row in rows.items():
        print(f"{key:48s} {row['cpu_ms_per_image']:7.2f} ms  x{row['ratio']:.3f} (paired x{row['paired_ratio']:.3f})"
              f"  {row['paired_per_stage_us']:+7.0f} us per stage (alone {row['alone_us_per_stage']:5.1f})"
              f"  {row['page_faults_per_image']:5.1f} page faults per image")
    report = {"benchmark": "ops_in_context", "rows": rows, "threads": args.threads, "rounds": rounds,
              "fused": args.fused, "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__}
    path = write_results(report, args.out, args.quick, RESULTS_FUSED if args.fused else RESULTS)
    if path:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
