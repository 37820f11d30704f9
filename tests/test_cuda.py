"""CUDA paths: dispatch, memory updates, the recipe, mixed precision, the gradient scaler's resume and an
NCCL group. Each test skips without a GPU; ``benchmarks/gpu_check.py`` runs them on one
(``pytest -m cuda``)."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rmn.dispatch import dispatch, memory_format
from rmn.memory import MemoryBank
from rmn.recipe.checkpoint import list_checkpoints, load_checkpoint
from rmn.recipe.runner import run_steps

from test_dispatch import make_procs, per_sample_reference
from test_recipe_resume import Crash, crash_in_epoch, tiny_cfg

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.py runs these)")]
CUDA = torch.device("cuda")
CL = torch.channels_last


def test_dispatch_on_cuda_matches_the_cpu_reference():
    n = 5
    g = torch.Generator().manual_seed(0)
    routes = torch.randint(n, (33,), generator=g)
    x = torch.randn(33, 4, 6, 6, generator=g)
    procs = make_procs(n).eval()
    want = per_sample_reference(x, routes, procs)
    x_gpu = x.to(CUDA).contiguous(memory_format=CL).requires_grad_()
    got = dispatch(x_gpu, routes.to(CUDA), copy.deepcopy(procs).to(CUDA).to(memory_format=CL))
    assert memory_format(got) == CL
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    got.square().mean().backward()
    assert memory_format(x_gpu.grad) == CL


def test_memory_update_on_cuda_equals_cpu():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(256, 16, generator=g)
    init = torch.randn(6, 16, generator=g)
    banks = []
    for device in ("cpu", CUDA):
        bank = MemoryBank(6, 16).to(device).train()
        bank.set_memories(init.to(device))
        for step in range(3):
            bank.route(feats[step * 64:(step + 1) * 64].to(device))
            bank.update()
        banks.append(bank)
    torch.testing.assert_close(banks[1].memories.cpu(), banks[0].memories, rtol=1e-6, atol=1e-6)
    assert torch.equal(banks[1].load.cpu(), banks[0].load)


def test_two_epoch_recipe_on_cuda(tmp_path):
    summary = run_steps(tiny_cfg(tmp_path, **{"run.device": "cuda", "schedule.epochs": 2, "schedule.stem_epochs": 1}))
    assert summary["kind"] == "rmn" and summary["epochs"] == 2 and summary["eval_top1"] > 0.3
    state = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1]).model_state
    assert any(".memory.memories" in k for k in state)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_on_cuda_trains_like_float32(tmp_path, amp):
    over = {"run.device": "cuda", "schedule.epochs": 3, "schedule.stem_epochs": 1}
    ref = run_steps(tiny_cfg(tmp_path / "fp32", **over))
    got = run_steps(tiny_cfg(tmp_path / amp, **over, **{"run.amp": amp, "run.channels_last": True}))
    assert abs(got["eval_top1"] - ref["eval_top1"]) < 0.08, (got["eval_top1"], ref["eval_top1"])


def test_fp16_scaler_state_survives_a_resume_on_cuda(tmp_path, monkeypatch):
    over = {"run.device": "cuda", "run.amp": "fp16", "schedule.epochs": 3, "schedule.stem_epochs": 1}
    crash_in_epoch(monkeypatch, epoch=2, after_batches=3)
    with pytest.raises(Crash):
        run_steps(tiny_cfg(tmp_path, **over))
    monkeypatch.undo()
    saved = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1]).meta["extra"]["grad_scaler"]
    from rmn.recipe.run import Run

    run = Run.open(tiny_cfg(tmp_path, **over), resume=True)
    assert run.scaler.is_enabled() and run.scaler.state_dict() == saved
    run.log.close()
    summary = run_steps(tiny_cfg(tmp_path, **over), resume=True)
    assert summary["epochs"] == 3


def test_single_process_nccl_group_runs_the_recipe(tmp_path):
    """torchrun with one process: rmn joins an NCCL group, routes, all-reduces memory statistics, finishes."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({
        "model": {"backbone": "resnet18", "width_mult": 0.125, "num_procedures": 3, "routed_stages": [0, 1, 2]},
        "data": {"dataset": "digits", "image_size": 8, "batch_size": 64},
        "schedule": {"epochs": 2, "stem_epochs": 1},
        "run": {"output": str(tmp_path / "run"), "progress": "none", "tensorboard": False, "device": "cuda"},
    }))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "rmn", "run", str(cfg)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs"] == 2
