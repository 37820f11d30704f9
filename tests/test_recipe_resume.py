"""Resume after an interruption in each recipe step reaches the uninterrupted run's result, bit for bit.

An interruption is an exception raised from inside the run (the training loader, k-means, or the
rename that publishes a checkpoint), after which the Run object is thrown away and a new one is
opened on the same output folder with ``resume=True``, as ``rmn run --resume`` does. On CPU with one
thread the result must be *identical*: every tensor of the final model (weights, BatchNorm
statistics, memories, load counters), the optimizer state, every metrics row (timings aside) and
summary.json (timings aside).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from rmn import features
from rmn.data.loader import TensorLoader
from rmn.recipe import checkpoint as ck
from rmn.recipe.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from rmn.recipe.config import ConfigError, load_config
from rmn.recipe.runner import run_steps
from rmn.recipe.run import Run

TIMING = ("images_per_s", "epoch_seconds")


def tiny_cfg(out, **over):
    base = {
        "model.backbone": "resnet18", "model.width_mult": 0.125, "model.num_procedures": 3,
        "model.routed_stages": [0, 1, 2],  # at 8x8 the last stage works on 1x1 maps: BatchNorm needs 2+ samples
        "data.dataset": "digits", "data.image_size": 8, "data.batch_size": 128, "data.eval_batch_size": 512,
        "optim.lr": 0.1, "optim.warmup_epochs": 1.0,
        "schedule.epochs": 4, "schedule.stem_epochs": 2,
        "run.output": str(out), "run.progress": "none", "run.tensorboard": False, "run.threads": 1,
    }
    base.update(over)
    return load_config(None, base)


class Crash(Exception):
    """Stands for a kill: nothing after it runs."""


def crash_in_epoch(monkeypatch, epoch: int, after_batches: int) -> None:
    """Raise from the training loader in (0-based) ``epoch`` once ``after_batches`` batches were trained."""
    real = TensorLoader.__iter__

    def iterate(self):
        for i, batch in enumerate(real(self)):
            if self.train and self.epoch == epoch and i == after_batches:
                raise Crash(f"interrupted in epoch {epoch + 1} after {after_batches} batches")
            yield batch

    monkeypatch.setattr(TensorLoader, "__iter__", iterate)


def result(out) -> dict:
    ckpt = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("timing")
    return {"ckpt": ckpt, "rows": rows, "summary": summary}


def assert_same(got: dict, want: dict) -> None:
    a, b = got["ckpt"], want["ckpt"]
    assert (a.meta["phase"], a.meta["epoch"], a.meta["step"]) == (b.meta["phase"], b.meta["epoch"], b.meta["step"])
    assert a.model_state.keys() == b.model_state.keys()
    for k in b.model_state:
        assert torch.equal(a.model_state[k], b.model_state[k]), f"{k} differs from the uninterrupted run"
    assert any(".memory.memories" in k for k in b.model_state)
    assert a.optimizer_state["param_groups"] == b.optimizer_state["param_groups"]
    assert a.optimizer_state["state"].keys() == b.optimizer_state["state"].keys()
    for pid, st in b.optimizer_state["state"].items():
        assert torch.equal(a.optimizer_state["state"][pid]["momentum_buffer"], st["momentum_buffer"]), pid
    assert got["rows"] == want["rows"]  # no epoch missing or logged twice, identical numbers
    assert got["summary"] == want["summary"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run_steps(tiny_cfg(out))
    return result(out)


def interrupt_then_resume(out, monkeypatch, interrupt) -> str:
    """Start a fresh run that ``interrupt`` breaks, then resume it to the end; the checkpoint resumed from."""
    cfg = tiny_cfg(out)
    with monkeypatch.context() as m:
        interrupt(m)
        with pytest.raises((Crash, OSError)):
            run_steps(cfg)
    assert not (out / "summary.json").exists()
    resumed_from = latest_checkpoint(out / "checkpoints").path.name
    run_steps(cfg, resume=True)
    return resumed_from


def test_resume_mid_stem_training(reference, tmp_path, monkeypatch):
    start = interrupt_then_resume(tmp_path, monkeypatch, lambda m: crash_in_epoch(m, 1, 3))
    assert start == "ckpt-00001-stem-e1.safetensors"
    assert_same(result(tmp_path), reference)


def test_resume_after_clone(reference, tmp_path, monkeypatch):
    def kmeans_dies(m):
        def boom(*a, **k):
            raise Crash("interrupted during k-means")
        m.setattr(features, "kmeans", boom)  # step 3's k-means (rmn.init_memories)

    start = interrupt_then_resume(tmp_path, monkeypatch, kmeans_dies)
    assert start == "ckpt-00003-cloned-e2.safetensors"
    assert_same(result(tmp_path), reference)


def test_resume_after_init_memory(reference, tmp_path, monkeypatch):
    start = interrupt_then_resume(tmp_path, monkeypatch, lambda m: crash_in_epoch(m, 2, 0))
    assert start == "ckpt-00004-memory-e2.safetensors"
    assert_same(result(tmp_path), reference)


def test_resume_mid_routed_training(reference, tmp_path, monkeypatch):
    start = interrupt_then_resume(tmp_path, monkeypatch, lambda m: crash_in_epoch(m, 3, 5))
    assert start == "ckpt-00005-routed-e3.safetensors"
    assert_same(result(tmp_path), reference)


def test_resume_mid_rewarm_and_route_flips(reference, tmp_path, monkeypatch):
    """optim.rewarm_epochs: the schedule is a function of the step, so a run killed during the re-warm resumes to
    the uninterrupted run's result; route flips and gradient norms are logged alike (the flips of epoch 4
    compare with epoch 3's evaluation routes, which the resumed run reads back from its checkpoint)."""
    over = {"optim.rewarm_epochs": 1.5}
    want_dir = tmp_path / "uninterrupted"
    run_steps(tiny_cfg(want_dir, **over))
    want = result(want_dir)
    assert [r["lr"] for r in want["rows"]] != [r["lr"] for r in reference["rows"]]  # the option is on
    out = tmp_path / "resumed"
    with monkeypatch.context() as m:
        crash_in_epoch(m, 3, 4)  # in epoch 4, still re-warming (1.5 epochs from the clone after epoch 2)
        with pytest.raises(Crash):
            run_steps(tiny_cfg(out, **over))
    assert latest_checkpoint(out / "checkpoints").path.name == "ckpt-00005-routed-e3.safetensors"
    run_steps(tiny_cfg(out, **over), resume=True)
    got = result(out)
    assert_same(got, want)
    assert {"route_flips_stage0", "grad_norm_stage0"} <= set(got["rows"][-1])


def test_interrupted_checkpoint_write_resumes_from_the_previous_one(reference, tmp_path, monkeypatch):
    """The rename publishing routed epoch 3 fails: its metrics row is already logged, the checkpoint is not."""
    real_replace = os.replace

    def failing_rename(m):
        def replace(src, dst):
            if str(dst).endswith("routed-e3.safetensors"):
                raise OSError("interrupted while publishing the checkpoint")
            return real_replace(src, dst)
        m.setattr(ck.os, "replace", replace)

    start = interrupt_then_resume(tmp_path, monkeypatch, failing_rename)
    assert start == "ckpt-00004-memory-e2.safetensors"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert_same(result(tmp_path), reference)


def test_truncated_newest_checkpoint_and_stray_temp_file(reference, tmp_path, monkeypatch):
    """A kill during a write that the file system did not make atomic: the newest file is cut short,
    and a temporary file is left behind. Resume falls back to the checkpoint before."""
    cfg = tiny_cfg(tmp_path)
    with monkeypatch.context() as m:
        crash_in_epoch(m, 3, 5)
        with pytest.raises(Crash):
            run_steps(cfg)
    newest = list_checkpoints(tmp_path / "checkpoints")[-1]
    assert newest.name == "ckpt-00005-routed-e3.safetensors"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "checkpoints" / f".ckpt-00006-routed-e4.safetensors.tmp-{os.getpid()}").write_bytes(data[:1000])
    assert latest_checkpoint(tmp_path / "checkpoints").path.name == "ckpt-00004-memory-e2.safetensors"
    run_steps(cfg, resume=True)
    assert_same(result(tmp_path), reference)


def test_resume_refuses_a_config_that_changes_the_run(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, **{"schedule.epochs": 2, "schedule.stem_epochs": 1})
    with monkeypatch.context() as m:
        crash_in_epoch(m, 1, 0)
        with pytest.raises(Crash):
            run_steps(cfg)
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        Run.open(tiny_cfg(tmp_path, **{"schedule.epochs": 2, "schedule.stem_epochs": 1, "optim.lr": 0.2}), resume=True)
    # run settings (device, progress, output...) may change on resume
    run = Run.open(tiny_cfg(tmp_path, **{"schedule.epochs": 2, "schedule.stem_epochs": 1, "run.progress": "lines"}))
    assert (run.phase, run.epoch) == ("memory", 1)  # the crash came in epoch 2, after step 3
    run.log.close()
