"""Latency per image and throughput: backbone vs RMN (N = 8) without and with Conditional Attention.

The paper's supplementary table: CPU latency per 224x224 image of ResNet-18 / ResNet-50 /
EfficientNet-B0, plain vs routed. Everything here uses **random weights** (latency does not depend on
the values), with memories set by k-means on a calibration batch of varied random images so that
routes differ from image to image (the batch-1 loop cycles through that pool).

Measurement: all variants of one backbone live in one process and are timed **interleaved**
(round-robin, the starting variant rotating each round) after a warm-up, under
``torch.inference_mode``; each timed block runs ``inner`` forward passes of the same variant and
records the mean time per pass; the statistic reported is the median over blocks, and beside it the
*paired* ratio: the median over rounds of a variant's block time over the backbone's in the same round,
which cancels the machine's slow and fast spells that both share. On CUDA every block is bracketed by
``torch.cuda.synchronize()``.

The ``backbone_copy`` variant is a control: a second copy of the backbone, timed like the others. Its
ratio to the backbone would be 1 on a quiet, deterministic machine; how far it lands from 1 is the noise
floor of that run (0.985 to 1.022 in three runs on a shared 2-core VM, BENCHMARKS.md), and no ratio of a
routed variant means more than that.

``python -m rmn.analysis.latency --help`` (also ``rmn bench latency`` and ``benchmarks/latency.py``).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..backbones import create_backbone
from ..fused import fuse_for_inference
from ..route import has_routing, route
from .calibrate import calibrate_memories, measure_route_counts
from .cost import pretty_name, write_report

VARIANT_LABELS = {"backbone": "backbone", "backbone_copy": "backbone, 2nd copy (control)", "rmn": "RMN without CA",
                  "rmn_ca": "RMN with CA", "rmn_se": "RMN + SE", "rmn_one": "RMN w/o CA, 1 route",
                  "rmn_fused": "RMN without CA, fused ops", "rmn_ca_fused": "RMN with CA, fused ops"}
DEFAULT_MODELS = ("resnet18", "resnet50", "efficientnet_b0")
# The paper's supplementary table (CPU, ms per 224x224 image) and the project's targets for the overhead.
PAPER_MS = {
    "resnet18": {"backbone": 25.1, "rmn": 26.4, "rmn_ca": 27.1},
    "resnet50": {"backbone": 51.6, "rmn": 54.2, "rmn_ca": 55.2},
    "efficientnet_b0": {"backbone": 30.2, "rmn": 33.0, "rmn_ca": 33.6},
}
TARGET_RATIO = {"resnet18": 1.03, "resnet50": 1.03, "efficientnet_b0": 1.05}


def varied_images(n: int, image_size: int, in_channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Random 'images' that differ in more than noise: per-image channel offsets, contrast and a
    smooth low-frequency pattern, so GAP'd features spread and routes vary."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, in_channels, 4, 4, generator=g)
    smooth = nn.functional.interpolate(low, size=(image_size, image_size), mode="bilinear", align_corners=False)
    noise = torch.randn(n, in_channels, image_size, image_size, generator=g)
    offset = torch.randn(n, in_channels, 1, 1, generator=g)
    contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=g)
    return (offset + contrast * (smooth + 0.5 * noise)).contiguous()


def build_variants(
    name: str,
    image_size: int = 224,
    num_classes: int = 1000,
    num_procedures: int = 8,
    variants: Sequence[str] = ("backbone", "backbone_copy", "rmn", "rmn_ca"),
    calibration: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    width_mult: float = 1.0,
) -> dict[str, nn.Module]:
    """The plain backbone and its routed versions (random weights, memories by k-means on
    ``calibration``), in eval mode on ``device``."""
    torch.manual_seed(seed)
    bb = create_backbone(name, num_classes, image_size=image_size, width_mult=width_mult).eval()
    out: dict[str, nn.Module] = {}
    for key in variants:
        if key == "backbone":
            model = bb
        elif key == "backbone_copy":  # the control: same network, its own weights in memory
            model = copy.deepcopy(bb)
        elif key in ("rmn", "rmn_ca", "rmn_se", "rmn_one", "rmn_fused", "rmn_ca_fused"):
            attention = {"rmn": False, "rmn_ca": True, "rmn_se": "se", "rmn_one": False, "rmn_fused": False,
                         "rmn_ca_fused": True}[key]
            model = route(bb, None, num_procedures, attention, attention_init="random").eval()
            # "rmn_one" keeps its all-zero memories: every image ties and takes procedure 0, which
            # isolates the routing work from the cost of touching N different weight copies.
            if calibration is not None and key != "rmn_one":
                calibrate_memories(model, calibration, method="kmeans", seed=seed)
            if key.endswith("_fused"):  # rmn.fused's compiled batch-1 ops (needs ninja and a C++ compiler)
                fuse_for_inference(model)
        else:
            raise ValueError(f"unknown variant {key!r}: choose from {sorted(VARIANT_LABELS)}")
        out[key] = model.to(device).eval()
    return out


def interleaved_times(
    fns: dict[str, Callable[[int], Any]],
    repeats: int,
    warmup: int = 2,
    inner: int = 1,
    sync: Callable[[], None] | None = None,
    cpu: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Time each ``fn(i)`` round-robin: ``warmup`` untimed rounds, then ``repeats`` timed rounds.

    In every round each function runs one block of ``inner`` calls (``i`` counts the calls, so the
    caller can cycle inputs); the recorded value is the block's wall time / ``inner`` in seconds. The
    order in which the functions run rotates from round to round, so no variant always goes first.
    If ``cpu`` is a dict it also receives the process CPU time per call (``time.process_time``: all
    threads of this process; time spent waiting for a core held by another process is not in it).
    """
    keys = list(fns)
    times: dict[str, list[float]] = {k: [] for k in keys}
    if cpu is not None:
        cpu.update({k: [] for k in keys})
    counter = {k: 0 for k in keys}
    sync = sync or (lambda: None)
    for rnd in range(warmup + repeats):
        rot = rnd % len(keys)
        for k in keys[rot:] + keys[:rot]:
            sync()
            c0 = time.process_time()
            t0 = time.perf_counter()
            for _ in range(inner):
                fns[k](counter[k])
                counter[k] += 1
            sync()
            dt = (time.perf_counter() - t0) / inner
            dc = (time.process_time() - c0) / inner
            if rnd >= warmup:
                times[k].append(dt)
                if cpu is not None:
                    cpu[k].append(dc)
    return times


def paired_ratios(variant: list[float], backbone: list[float]) -> list[float]:
    """Round by round, the variant's time over the backbone's in the same round. Both ran within one round of
    each other, so a slow spell of the machine (it moves a batch-1 time by 10-30% here) mostly cancels."""
    return [v / b for v, b in zip(variant, backbone)]


def _summary(ts: list[float]) -> dict[str, float]:
    q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
    return {"median": statistics.median(ts), "q1": q[0], "q3": q[2], "min": min(ts), "n": len(ts)}


def bench_backbone(
    name: str,
    image_size: int = 224,
    batch_sizes: Sequence[int] = (1, 64),
    repeats: dict[int, int] | int = 30,
    warmup: int = 2,
    inner: dict[int, int] | int = 1,
    variants: Sequence[str] = ("backbone", "backbone_copy", "rmn", "rmn_ca"),
    num_procedures: int = 8,
    pool: int = 64,
    device: torch.device | str = "cpu",
    seed: int = 0,
    width_mult: float = 1.0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Latency (batch 1) and throughput (larger batches) of one backbone's variants, interleaved."""
    device = torch.device(device)
    images = varied_images(max(pool, max(batch_sizes), num_procedures), image_size, seed=seed)
    models = build_variants(name, image_size, num_procedures=num_procedures, variants=variants,
                            calibration=images[:pool], seed=seed, width_mult=width_mult)
    models = {k: m.to(device) for k, m in models.items()}
    images = images.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    result: dict[str, Any] = {"model": name, "image_size": image_size, "width_mult": width_mult,
                              "variants": {}, "routes": {}}
    for key, m in models.items():
        if has_routing(m):
            result["routes"][key] = measure_route_counts(m, images[:pool])
    for bs in batch_sizes:
        reps = repeats[bs] if isinstance(repeats, dict) else repeats
        inn = inner[bs] if isinstance(inner, dict) else inner
        n_img = images.shape[0]

        def make(m, bs=bs):
            def fn(i):
                start = (i * bs) % n_img
                x = images[start : start + bs] if start + bs <= n_img else images[:bs]
                m(x)
            return fn

        log(f"  {pretty_name(name)} batch {bs}: {reps} interleaved rounds x {inn} pass(es), warm-up {warmup}")
        cpu: dict[str, list[float]] = {}
        with torch.inference_mode():
            times = interleaved_times({k: make(m) for k, m in models.items()}, reps, warmup, inn, sync, cpu)
        for key, ts in times.items():
            s, c = _summary(ts), _summary(cpu[key])
            entry = result["variants"].setdefault(key, {"label": VARIANT_LABELS[key]})
            entry[f"batch{bs}"] = {
                "ms_per_batch": 1e3 * s["median"],
                "ms_per_image": 1e3 * s["median"] / bs,
                "images_per_s": bs / s["median"],
                "q1_ms": 1e3 * s["q1"],
                "q3_ms": 1e3 * s["q3"],
                "min_ms": 1e3 * s["min"],
                "cpu_ms_per_batch": 1e3 * c["median"],
                "cpu_ms_per_image": 1e3 * c["median"] / bs,
                "samples": s["n"],
            }
        base = result["variants"].get("backbone", {}).get(f"batch{bs}")
        if base:
            for key, entry in result["variants"].items():
                e = entry[f"batch{bs}"]
                e["ratio"] = e["ms_per_batch"] / base["ms_per_batch"]
                e["cpu_ratio"] = e["cpu_ms_per_batch"] / base["cpu_ms_per_batch"]
                paired = _summary(paired_ratios(times[key], times["backbone"]))
                e["paired_ratio"], e["paired_q1"], e["paired_q3"] = paired["median"], paired["q1"], paired["q3"]
        log("    " + "; ".join(f"{VARIANT_LABELS[k]} {e[f'batch{bs}']['ms_per_image']:.2f} ms/img"
                                + (f" (x{e[f'batch{bs}']['ratio']:.3f}, cpu x{e[f'batch{bs}']['cpu_ratio']:.3f})"
                                   if "ratio" in e[f"batch{bs}"] else "")
                                for k, e in result["variants"].items()))
    del models
    return result


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    device = torch.device(device)
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "weights": "random (latency does not depend on weight values)",
        "loadavg_1min_at_start": _loadavg(),
    }
    if device.type == "cuda":
        env["cuda_device"] = torch.cuda.get_device_name(device)
    return env


def _loadavg() -> float | None:
    """1-minute load average of the machine (other processes competing for the cores), if known."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_latency(
    models: Sequence[str] = DEFAULT_MODELS,
    image_size: int = 224,
    batch_sizes: Sequence[int] = (1, 64),
    repeats: int = 30,
    large_repeats: int = 8,
    warmup: int = 2,
    inner: int = 5,
    variants: Sequence[str] = ("backbone", "backbone_copy", "rmn", "rmn_ca"),
    num_procedures: int = 8,
    device: str = "cpu",
    threads: int | None = None,
    width_mult: float = 1.0,
    pool: int = 64,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The whole latency table: every backbone in ``models``, each with its variants interleaved.

    Batch 1 uses ``repeats`` rounds of ``inner`` passes; larger batches ``large_repeats`` rounds of one pass.
    """
    if threads:
        torch.set_num_threads(threads)
    rep = {bs: (repeats if bs == 1 else large_repeats) for bs in batch_sizes}
    inn = {bs: (inner if bs == 1 else 1) for bs in batch_sizes}
    t0 = time.time()
    load0 = _loadavg()
    results = []
    for name in models:
        log(f"{pretty_name(name)} at {image_size}x{image_size} (random weights) ...")
        results.append(bench_backbone(name, image_size, batch_sizes, rep, warmup, inn, variants,
                                      num_procedures, pool=pool, device=device, width_mult=width_mult, log=log))
    env = environment(device)
    env["loadavg_1min_at_start"] = load0
    env["loadavg_1min_at_end"] = _loadavg()
    return {
        "benchmark": "latency",
        "environment": env,
        "settings": {
            "image_size": image_size, "batch_sizes": list(batch_sizes), "repeats": rep, "inner": inn,
            "warmup_rounds": warmup, "num_procedures": num_procedures, "variants": list(variants),
            "width_mult": width_mult, "calibration_pool": pool, "statistic": "median over interleaved rounds; paired_ratio: median of per-round ratios",
            "wall_s": round(time.time() - t0, 1),
        },
        "results": results,
        "paper_cpu_ms": {k: v for k, v in PAPER_MS.items() if k in models},
        "target_ratio_batch1": {k: v for k, v in TARGET_RATIO.items() if k in models},
    }


def format_latency(report: dict[str, Any]) -> str:
    """Text table: per backbone and variant, ms/image at batch 1, ratio, images/s at the large batch."""
    env = report["environment"]
    lines = [
        f"device {env['device']} ({env['processor']}), torch {env['torch']}, {env['torch_threads']} threads; "
        f"random weights; medians of interleaved rounds; machine load average "
        f"{env.get('loadavg_1min_at_start')} -> {env.get('loadavg_1min_at_end')}",
    ]
    bss = report["settings"]["batch_sizes"]
    header = ["model", "variant"]
    for bs in bss:
        header += ([f"ms/img b{bs}", "ratio", "cpu ratio", "paired (q1-q3)"] if bs == 1 else [f"img/s b{bs}", "ratio"])
    header += ["paper ms", "paper ratio", "target"]
    rows = []
    for res in report["results"]:
        name = res["model"]
        paper = PAPER_MS.get(name, {})
        for key, entry in res["variants"].items():
            row = [pretty_name(name), entry["label"]]
            for bs in bss:
                e = entry[f"batch{bs}"]
                row += [f"{e['ms_per_image']:.2f}" if bs == 1 else f"{e['images_per_s']:.1f}",
                        f"{e.get('ratio', float('nan')):.3f}"]
                if bs == 1:
                    row.append(f"{e.get('cpu_ratio', float('nan')):.3f}")
                    row.append(f"{e['paired_ratio']:.3f} ({e['paired_q1']:.3f}-{e['paired_q3']:.3f})"
                               if "paired_ratio" in e else "")
            p = paper.get(key)
            row += [f"{p:.1f}" if p else "",
                    f"{p / paper['backbone']:.3f}" if p and paper.get("backbone") else "",
                    f"<= {TARGET_RATIO[name]:.2f}" if key in ("rmn", "rmn_ca") and name in TARGET_RATIO else ""]
            rows.append(row)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines += [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    lines.append("ratio = wall time per batch / backbone's (for throughput: backbone images/s over variant's); "
                 "cpu ratio = the same with process CPU time (insensitive to waiting for a busy core); paired = "
                 "median (quartiles) over rounds of the variant's time over the backbone's in the same round.")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="backbones (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], help="1 = latency, larger = throughput")
    p.add_argument("--repeats", type=int, default=30, help="interleaved timed rounds at batch 1")
    p.add_argument("--large-repeats", type=int, default=8, help="interleaved timed rounds at larger batches")
    p.add_argument("--inner", type=int, default=5, help="forward passes per timed block at batch 1")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--procedures", type=int, default=8)
    p.add_argument("--width-mult", type=float, default=1.0, help="channel width multiplier (1 = the standard models)")
    p.add_argument("--variants", nargs="+", default=["backbone", "backbone_copy", "rmn", "rmn_ca"],
                   choices=sorted(VARIANT_LABELS), help="backbone_copy: a second copy of the backbone, the run's noise floor")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="resnet18 only, few repeats: a smoke run")
    p.add_argument("--json", dest="json_out", default=None, help="write the results here")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing: torch.profiler op-by-op difference backbone vs each RMN variant")
    return p


def command(args: argparse.Namespace) -> int:
    if args.profile:
        if args.threads:
            torch.set_num_threads(args.threads)
        for name in (["resnet18"] if args.quick else args.models):
            for variant in [v for v in args.variants if v != "backbone"]:
                for bs in args.batch_sizes:
                    print(format_profile(profile_difference(name, variant, args.image_size, bs,
                                                            passes=20 if bs == 1 else 3)))
        return 0
    if args.quick:
        args.models, args.repeats, args.large_repeats, args.inner, args.warmup = ["resnet18"], 3, 2, 2, 1
        args.batch_sizes = [1, 8] if args.batch_sizes == [1, 64] else args.batch_sizes
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here")
        return 2
    report = run_latency(args.models, args.image_size, args.batch_sizes, args.repeats, args.large_repeats,
                         args.warmup, args.inner, args.variants, args.procedures, args.device, args.threads,
                         args.width_mult)
    print(format_latency(report))
    if args.json_out:
        print(f"wrote {write_report(report, args.json_out)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    return command(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())


def profile_difference(
    name: str,
    variant: str = "rmn_ca",
    image_size: int = 224,
    batch: int = 1,
    passes: int = 20,
    seed: int = 0,
    top: int = 12,
) -> dict[str, Any]:
    """Where the routed model's extra time goes: ``torch.profiler`` self-CPU time per op, per forward,
    for the backbone and ``variant`` (same inputs cycling through a pool), and the per-op difference.

    Returns ``{"backbone_ms", "variant_ms", "ops": [(op, backbone_us, variant_us, diff_us), ...]}``
    sorted by the absolute difference (profiler overhead inflates small ops; read it as attribution,
    not as the latency itself).
    """
    from torch.profiler import ProfilerActivity, profile

    pool = varied_images(max(64, batch), image_size, seed=seed)
    models = build_variants(name, image_size, variants=("backbone", variant), calibration=pool, seed=seed)
    per_op: dict[str, dict[str, float]] = {}
    totals = {}
    with torch.inference_mode():
        for key, m in models.items():
            for i in range(3):
                m(pool[i * batch:(i + 1) * batch])
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for i in range(passes):
                    s = (i * batch) % (pool.shape[0] - batch + 1)
                    m(pool[s:s + batch])
            ev = prof.key_averages()
            totals[key] = sum(e.self_cpu_time_total for e in ev) / passes / 1e3
            for e in ev:
                per_op.setdefault(e.key, {})[key] = e.self_cpu_time_total / passes
    rows = [(op, d.get("backbone", 0.0), d.get(variant, 0.0), d.get(variant, 0.0) - d.get("backbone", 0.0))
            for op, d in per_op.items()]
    rows.sort(key=lambda r: -abs(r[3]))
    return {"model": name, "variant": variant, "batch": batch, "backbone_ms": totals["backbone"],
            "variant_ms": totals[variant], "ops": rows[:top]}


def format_profile(p: dict[str, Any]) -> str:
    lines = [f"{pretty_name(p['model'])} batch {p['batch']}: profiled self-CPU per forward "
             f"backbone {p['backbone_ms']:.2f} ms, {VARIANT_LABELS[p['variant']]} {p['variant_ms']:.2f} ms",
             f"  {'op':<32} {'backbone us':>12} {'variant us':>12} {'diff us':>10}"]
    for op, a, b, d in p["ops"]:
        lines.append(f"  {op[:32]:<32} {a:12.1f} {b:12.1f} {d:+10.1f}")
    return "\n".join(lines)
