"""Crash-safe safetensors checkpoints: round trip, pruning, no unpickling, and interrupted writes."""
from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rmn.recipe import checkpoint as ck
from rmn.recipe.checkpoint import (CheckpointError, atomic_write_bytes, latest_checkpoint, list_checkpoints,
                                   load_checkpoint, restore_rng, save_checkpoint)


def model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-5)
    for _ in range(2):  # give the optimizer momentum buffers and BN running statistics
        opt.zero_grad()
        model(torch.randn(16, 4)).logsumexp(1).mean().backward()
        opt.step()
    return model, opt


def save(directory, seq, model, opt, keep=10, phase="stem", epoch=None):
    meta = {"config": {"note": "not a real config"}, "step": 10 * seq, "extra": {"cluster_sizes": {"stage0": [1, 2]}}}
    return save_checkpoint(directory, seq, phase, seq if epoch is None else epoch, model, opt, meta, keep=keep)


def test_round_trip_restores_weights_optimizer_meta_and_rng(tmp_path):
    model, opt = model_and_optimizer()
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    path = save(tmp_path, 3, model, opt, phase="routed", epoch=4)
    expected = (torch.rand(5), random.random(), np.random.rand(3))
    assert path.name == "ckpt-00003-routed-e4.safetensors"

    ckpt = load_checkpoint(path)
    assert ckpt.meta["seq"] == 3 and ckpt.meta["phase"] == "routed" and ckpt.meta["epoch"] == 4
    assert ckpt.meta["step"] == 30 and ckpt.meta["extra"] == {"cluster_sizes": {"stage0": [1, 2]}}
    state = model.state_dict()
    assert set(ckpt.model_state) == set(state)
    for k, v in state.items():
        assert torch.equal(ckpt.model_state[k], v), k
        assert ckpt.model_state[k].dtype == v.dtype
    other, opt2 = model_and_optimizer(seed=1)
    other.load_state_dict(ckpt.model_state)
    opt2.load_state_dict(ckpt.optimizer_state)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert s1["state"].keys() == s2["state"].keys()
    for pid in s1["state"]:
        assert torch.equal(s1["state"][pid]["momentum_buffer"], s2["state"][pid]["momentum_buffer"])

    torch.manual_seed(999)
    random.seed(999)
    np.random.seed(999)
    restore_rng(ckpt)
    got = (torch.rand(5), random.random(), np.random.rand(3))
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and np.array_equal(got[2], expected[2])

    side = json.loads(path.with_suffix(".json").read_text())  # the human-readable side-car
    assert side["phase"] == "routed" and side["epoch"] == 4 and side["optimizer_param_groups"][0]["lr"] == 0.1


def test_files_are_plain_safetensors_and_loading_never_unpickles(tmp_path, monkeypatch):
    model, opt = model_and_optimizer()
    path = save(tmp_path, 1, model, opt)
    tensors = load_file(str(path))  # any safetensors reader can open it
    assert torch.equal(tensors["model.0.weight"], model[0].weight.detach())

    def no_pickle(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt.model_state["3.bias"], model[3].bias.detach())


def test_keeps_only_the_newest_and_lists_in_write_order(tmp_path):
    model, opt = model_and_optimizer()
    for seq in range(1, 6):
        save(tmp_path, seq, model, opt, keep=2, epoch=10 - seq)  # epochs decrease: order must follow seq
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["ckpt-00004-stem-e6.safetensors", "ckpt-00005-stem-e5.safetensors"]
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["ckpt-00004-stem-e6.json", "ckpt-00005-stem-e5.json"]
    assert latest_checkpoint(tmp_path).meta["seq"] == 5
    assert list_checkpoints(tmp_path / "missing") == [] and latest_checkpoint(tmp_path / "missing") is None


def test_a_failed_rename_leaves_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    model, opt = model_and_optimizer()
    save(tmp_path, 1, model, opt, keep=1)
    before = load_checkpoint(list_checkpoints(tmp_path)[0]).model_state
    with torch.no_grad():
        model[0].weight.add_(1.0)
    real_replace = os.replace

    def crash(src, dst):
        # the new bytes are complete in the temporary file: die right before the rename
        assert os.path.basename(src).startswith(".ckpt-00002") and os.path.getsize(src) > 0
        raise OSError("simulated power cut")

    monkeypatch.setattr(ck.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        save(tmp_path, 2, model, opt, keep=1)
    monkeypatch.setattr(ck.os, "replace", real_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00001-stem-e1.json", "ckpt-00001-stem-e1.safetensors"]
    latest = latest_checkpoint(tmp_path)
    assert latest.meta["seq"] == 1
    assert torch.equal(latest.model_state["0.weight"], before["0.weight"])
    assert not torch.equal(latest.model_state["0.weight"], model[0].weight.detach())


def test_a_failed_write_midway_keeps_the_old_file_intact(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old contents")

    class Boom(Exception):
        pass

    real_fsync = os.fsync

    def crash(fd):
        raise Boom("disk full")

    monkeypatch.setattr(ck.os, "fsync", crash)
    with pytest.raises(Boom):
        atomic_write_bytes(target, b"new contents that never land")
    monkeypatch.setattr(ck.os, "fsync", real_fsync)
    assert target.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_truncated_newest_and_stray_temp_file_fall_back_to_the_previous(tmp_path):
    """What a kill -9 during a write (or a disk that lost the tail) leaves behind."""
    model, opt = model_and_optimizer()
    save(tmp_path, 1, model, opt)
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    newest = save(tmp_path, 2, model, opt)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    (tmp_path / f".ckpt-00003-stem-e3.safetensors.tmp-{os.getpid() + 1}").write_bytes(data[:100])
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00001-stem-e1.safetensors", "ckpt-00002-stem-e2.safetensors"]
    with pytest.raises(CheckpointError, match="ckpt-00002-stem-e2"):
        load_checkpoint(newest)
    latest = latest_checkpoint(tmp_path)
    assert latest.meta["seq"] == 1
    assert not torch.equal(latest.model_state["0.weight"], model[0].weight.detach())
    newest.write_bytes(b"")  # an empty file (killed right after creating it)
    assert latest_checkpoint(tmp_path).meta["seq"] == 1


def test_foreign_or_corrupt_files_are_refused_with_the_file_name(tmp_path):
    plain = tmp_path / "ckpt-00001-stem-e1.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))  # a safetensors file, but not an rmn checkpoint
    with pytest.raises(CheckpointError, match="not an rmn checkpoint") as e:
        load_checkpoint(plain)
    assert plain.name in str(e.value)
    wrong = tmp_path / "ckpt-00002-stem-e2.safetensors"
    save_file({"w": torch.zeros(2)}, str(wrong), metadata={"rmn": json.dumps({"format": "rmn-checkpoint-0"})})
    with pytest.raises(CheckpointError, match="unsupported checkpoint format"):
        load_checkpoint(wrong)
    garbage = tmp_path / "ckpt-00003-stem-e3.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="ckpt-00003"):
        load_checkpoint(garbage)
    assert latest_checkpoint(tmp_path) is None  # nothing loadable: a fresh start, not a crash
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "ckpt-00009-stem-e9.safetensors")


def damage(path, keep_bytes=None):
    """Cut ``path`` to ``keep_bytes`` (default half): what a file system that lost the tail leaves."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep_bytes is None else keep_bytes])


def test_pruning_never_deletes_a_readable_checkpoint_to_keep_a_damaged_newer_one(tmp_path):
    """Damaged files with higher sequence numbers than every valid one: new valid checkpoints are the
    ones kept, and the damaged files are left alone (never deleted by pruning)."""
    model, opt = model_and_optimizer()
    for seq in (7, 8):
        damage(save(tmp_path, seq, model, opt, keep=5))
    damaged = {p.name: p.read_bytes() for p in list_checkpoints(tmp_path)}
    for seq in (1, 2, 3):
        save(tmp_path, seq, model, opt, keep=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["ckpt-00002-stem-e2.safetensors", "ckpt-00003-stem-e3.safetensors", *damaged]
    assert {n: (tmp_path / n).read_bytes() for n in damaged} == damaged
    ckpt, skipped = ck.newest_checkpoint(tmp_path)
    assert ckpt.meta["seq"] == 3 and [p.name for p, _ in skipped] == list(damaged)[::-1]
    assert all("cut short" in why for _, why in skipped)
    assert ck.newest_readable(tmp_path).name == "ckpt-00003-stem-e3.safetensors"


def test_keep_best_keeps_the_best_eval_checkpoint_beyond_the_newest(tmp_path):
    model, opt = model_and_optimizer()
    accs = {1: 0.5, 2: 0.9, 3: 0.7, 4: None, 5: 0.6}  # epoch 4 not evaluated
    for seq, acc in accs.items():
        meta = {"config": {}, "step": seq, **({"eval_top1": acc} if acc is not None else {})}
        save_checkpoint(tmp_path, seq, "stem", seq, model, opt, meta, keep=2, keep_best=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt-00002-stem-e2.safetensors", "ckpt-00004-stem-e4.safetensors", "ckpt-00005-stem-e5.safetensors"]
    assert ck.best_checkpoint(tmp_path).name == "ckpt-00002-stem-e2.safetensors"
    save_checkpoint(tmp_path, 6, "stem", 6, model, opt, {"config": {}, "step": 6, "eval_top1": 0.95}, keep=2, keep_best=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00005-stem-e5.safetensors", "ckpt-00006-stem-e6.safetensors"]
    save_checkpoint(tmp_path, 7, "stem", 7, model, opt, {"config": {}, "step": 7}, keep=1, keep_best=False)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00007-stem-e7.safetensors"]


@pytest.mark.parametrize("kind, needle", [
    ("empty", "empty file"),
    ("text", "cut short or not safetensors"),
    ("missing_keys", "rmn metadata lacks phase, epoch"),
    ("bad_phase", "unknown phase 'warmup'"),
    ("bad_json", "not valid JSON"),
    ("optimizer", "optimizer state does not match its tensors"),
])
def test_bad_checkpoints_are_one_line_errors_naming_the_file(tmp_path, kind, needle):
    path = tmp_path / "ckpt-00001-stem-e1.safetensors"
    meta = {"format": ck.FORMAT, "seq": 1, "phase": "stem", "epoch": 1, "step": 1, "config": {}}
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("model: resnet18\nthis is a YAML file renamed by mistake\n")
    elif kind == "missing_keys":
        save_file({"model.w": torch.zeros(2)}, str(path), metadata={"rmn": json.dumps({k: v for k, v in meta.items() if k not in ("phase", "epoch")})})
    elif kind == "bad_phase":
        save_file({"model.w": torch.zeros(2)}, str(path), metadata={"rmn": json.dumps(dict(meta, phase="warmup"))})
    elif kind == "bad_json":
        save_file({"model.w": torch.zeros(2)}, str(path), metadata={"rmn": "{not json"})
    elif kind == "optimizer":  # the header promises a momentum tensor the file does not hold
        opt = {"state": {"0": {"momentum_buffer": {"tensor": True}}}, "param_groups": []}
        save_file({"model.w": torch.zeros(2)}, str(path), metadata={"rmn": json.dumps(dict(meta, optimizer=opt))})
    with pytest.raises(CheckpointError, match=needle) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert latest_checkpoint(tmp_path) is None


def test_tensors_that_do_not_fit_the_header_model_are_one_line(tmp_path):
    model, opt = model_and_optimizer()
    path = save(tmp_path, 1, model, opt)
    other = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3), nn.Linear(3, 3))
    with pytest.raises(CheckpointError) as e:
        ck.load_model_state(other, load_checkpoint(path))
    msg = str(e.value)
    assert msg.startswith(str(path)) and "\n" not in msg
    assert "2 missing (e.g. 4.weight)" in msg and "of another shape (e.g. 0.weight: (8, 4) for (16, 4))" in msg
    ck.load_model_state(model_and_optimizer(seed=3)[0], load_checkpoint(path))  # a matching model loads


def test_set_aside_moves_damaged_files_and_side_cars_without_deleting(tmp_path):
    model, opt = model_and_optimizer()
    bad = save(tmp_path, 4, model, opt)
    damage(bad)
    data = bad.read_bytes()
    target = ck.set_aside([bad])
    assert target == tmp_path / "unreadable"
    assert (target / bad.name).read_bytes() == data and (target / bad.with_suffix(".json").name).exists()
    assert not bad.exists() and list_checkpoints(tmp_path) == []
    bad.write_bytes(b"x")  # the same name again: the earlier copy is not overwritten
    ck.set_aside([bad])
    assert (target / bad.name).read_bytes() == data and (target / f"{bad.name}.1").read_bytes() == b"x"
