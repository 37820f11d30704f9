"""benchmarks/slice_cost.py: its grouped block is the N procedures' blocks on their slices, and it runs."""
import torch
from torch import nn


def test_grouped_block_equals_the_procedures_on_their_slices(load_benchmark):
    bench = load_benchmark("slice_cost")
    torch.manual_seed(0)
    n, c, b = 4, 6, 5
    blocks = [nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()) for _ in range(n)]
    for blk in blocks:  # distinct affine parameters, so a mix-up of groups shows
        nn.init.uniform_(blk[1].weight, 0.5, 1.5)
        nn.init.uniform_(blk[1].bias, -0.5, 0.5)
    grouped = bench.grouped_block(blocks)
    slices = [torch.randn(b, c, 7, 7) * (j + 1) + j for j in range(n)]  # different statistics per slice
    expected = torch.cat([blk(x) for blk, x in zip(blocks, slices)], dim=1)
    got = grouped(bench.side_by_side(slices))
    assert got.shape == (b, n * c, 7, 7)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the running statistics are per procedure too
    torch.testing.assert_close(grouped[1].running_mean, torch.cat([blk[1].running_mean for blk in blocks]))


def test_quick_run_reports_all_three_columns(capsys, load_benchmark):
    bench = load_benchmark("slice_cost")
    assert bench.main(["--quick", "--batch", "16", "--slices", "4"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and "ch," in ln]
    assert len(lines) == 8 and all(ln.count("|") == 8 for ln in lines)
