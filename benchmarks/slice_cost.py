"""What a routed stage pays for running its batch in slices: one conv + BatchNorm + ReLU block, forward and
backward, on one batch of 256 vs on 8 slices of 32 (what N = 8 procedures see), per layer shape of the
Fashion study's network (eighth-width ResNet-18 at 28x28), in float32 and bf16 + channels_last.

A third column runs the 8 slices as one *grouped* block: the 8 procedures' weights stacked into one convolution
with ``groups=8`` and one BatchNorm over 8x the channels, on the slices laid side by side along the channels
(``grouped_block``, built as step_split's grouped variant is; the same outputs, checked in
tests/test_slice_cost.py). That is the best case for fusing a stage's procedures into one kernel call: equal
slices need no padding. If it is not cheaper than 8 calls, fusing
the procedures cannot remove the slices' cost either.

    .venv/bin/python benchmarks/slice_cost.py [--threads 1] [--reps 20]   # -> benchmarks/results/slice_cost.json
    .venv/bin/python benchmarks/slice_cost.py --quick                     # smoke run: 1 rep, 1 round, writes nothing

The ratio is CPU time of the 8 slices over the one batch, interleaved, median of ``--rounds`` rounds. Above 1 is
the kernels' own per-call and small-batch cost, which no dispatch code can remove: it is why an RMN of this
small network trains slower than its baseline on a CPU (BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # results_file, when imported rather than run
from results_file import write_results  # noqa: E402
from step_split import grouped_template, stacked_state  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "slice_cost.json"
SHAPES = ((8, 28), (16, 14), (32, 7), (64, 4))  # (channels, side) of the four stages


def block_time(block: nn.Module, xs: list[torch.Tensor], bf16: bool, reps: int) -> float:
    """CPU seconds of forward + backward over every tensor of ``xs``, per repetition."""
    def once():
        for x in xs:
            x = x.detach().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = block(x)
            y.float().sum().backward()
    once()
    t0 = time.process_time()
    for _ in range(reps):
        once()
    return (time.process_time() - t0) / reps


def grouped_block(blocks: list[nn.Sequential]) -> nn.Module:
    """One conv + BatchNorm + ReLU block computing ``blocks[j]`` on channel group ``j`` of its input: the N
    procedures of a stage as one grouped convolution and one BatchNorm (per-channel, so per-procedure statistics)."""
    grouped = grouped_template(blocks[0], len(blocks))
    grouped.load_state_dict({k: v.detach().clone() for k, v in stacked_state(blocks).items()})
    return grouped


def side_by_side(slices: list[torch.Tensor]) -> torch.Tensor:
    """Equal slices [b, C, H, W] laid side by side along the channels: [b, N*C, H, W], slice j in group j."""
    return torch.cat(slices, dim=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 rep, 1 round; writes only to --out")
    ap.add_argument("--out", default=None, help="results file (default benchmarks/results/slice_cost.json; none with --quick)")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.rounds = 1, 1
    rows = []
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    k, b = args.slices, args.batch // args.slices
    print(f"| layer | precision | batch {args.batch} ms | {k} x {b} ms | ratio | {k} x {b} grouped ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    for precision in ("float32", "bf16 + channels_last"):
        bf16 = precision != "float32"
        fmt = torch.channels_last if bf16 else torch.contiguous_format
        for c, side in SHAPES:
            block = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
            block = block.to(memory_format=fmt)
            grouped = grouped_block([block] * k).to(memory_format=fmt)
            x = torch.randn(args.batch, c, side, side).contiguous(memory_format=fmt)
            whole, sliced = [x], list(x.split(b))
            stacked = [side_by_side(sliced).contiguous(memory_format=fmt)]
            t = {"batch": [], "slices": [], "grouped": []}
            for _ in range(args.rounds):  # interleaved
                t["batch"].append(block_time(block, whole, bf16, args.reps))
                t["slices"].append(block_time(block, sliced, bf16, args.reps))
                t["grouped"].append(block_time(grouped, stacked, bf16, args.reps))
            ta, tb, tg = (statistics.median(t[key]) for key in ("batch", "slices", "grouped"))
            print(f"| {c} ch, {side}x{side} | {precision} | {1e3 * ta:.2f} | {1e3 * tb:.2f} | {tb / ta:.2f} "
                  f"| {1e3 * tg:.2f} | {tg / ta:.2f} |", flush=True)
            rows.append({"channels": c, "side": side, "precision": precision, "batch_ms": 1e3 * ta,
                         "slices_ms": 1e3 * tb, "ratio": tb / ta, "grouped_ms": 1e3 * tg, "grouped_ratio": tg / ta})
    out = write_results({"args": vars(args), "torch": torch.__version__, "processor": platform.processor(), "rows": rows},
                        args.out, args.quick, RESULTS)
    if out is not None:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
