"""No run is ever lost: damaged checkpoints on resume, pruning next to damaged files, Ctrl-C, kill -9 in
the middle of a checkpoint write, extending a finished run, and one-line answers to bad checkpoints and
devices. After each data-loss case no readable checkpoint that should be kept and no metrics row is lost.

The run: digits at 8x8, 4 epochs of 11 steps (2 stem, 2 routed), so checkpoints are 1 stem-e1,
2 stem-e2, 3 cloned-e2, 4 memory-e2, 5 routed-e3, 6 routed-e4; two newest kept plus the best.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rmn.cli import main
from rmn.data.loader import TensorLoader
from rmn.recipe import build
from rmn.recipe.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from rmn.recipe.config import load_config

from conftest import write_config

CONFIG = {
    "model": {"backbone": "resnet18", "width_mult": 0.125, "num_procedures": 3, "routed_stages": [0, 1, 2]},
    "data": {"dataset": "digits", "image_size": 8, "batch_size": 128, "eval_batch_size": 512},
    "optim": {"lr": 0.1, "warmup_epochs": 1},
    "schedule": {"epochs": 4, "stem_epochs": 2},
    "run": {"name": "safety", "progress": "lines", "tensorboard": False, "threads": 1, "atlas": False},
}
TIMING = ("images_per_s", "epoch_seconds")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    return write_config(tmp_path_factory, "safety.yaml", CONFIG)


@pytest.fixture(scope="module")
def finished(config_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", str(config_file), "--output", str(out)]) == 0
    return out


def copy_of(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def rows(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def summary(out: Path) -> dict:
    s = json.loads((out / "summary.json").read_text())
    s.pop("timing")
    return s


def readable(out: Path) -> list[str]:
    names = []
    for p in list_checkpoints(out / "checkpoints"):
        try:
            load_checkpoint(p)
            names.append(p.name)
        except ValueError:
            pass
    return names


def damage(path: Path) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path.read_bytes()


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rmn: error: "), err
    return lines[0]


# -- data loss -------------------------------------------------------------------------------------
def test_damaged_newest_is_skipped_set_aside_and_redone(finished, config_file, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    ckpts = out / "checkpoints"
    assert readable(out) == ["ckpt-00005-routed-e3.safetensors", "ckpt-00006-routed-e4.safetensors"]
    cut = damage(ckpts / "ckpt-00006-routed-e4.safetensors")
    kept = (ckpts / "ckpt-00005-routed-e3.safetensors").read_bytes()
    code, said, _ = run(["run", str(config_file), "--output", str(out), "--resume"], capsys)
    assert code == 0
    assert "[resume] skipped ckpt-00006-routed-e4.safetensors: cut short or not safetensors" in said
    assert f"moved to {ckpts / 'unreadable'}/" in said
    assert f"[resume] continuing from {ckpts / 'ckpt-00005-routed-e3.safetensors'} (routed, epoch 3 of 4" in said
    assert "1 metrics row(s) written after it will be recomputed" in said
    assert (ckpts / "unreadable" / "ckpt-00006-routed-e4.safetensors").read_bytes() == cut  # kept, not deleted
    assert (ckpts / "ckpt-00005-routed-e3.safetensors").read_bytes() == kept
    assert readable(out) == ["ckpt-00005-routed-e3.safetensors", "ckpt-00006-routed-e4.safetensors"]
    assert rows(out) == rows(finished) and summary(out) == summary(finished)  # every row back, same numbers

    code, _, err = run(["eval", str(out), "--device", "cpu"], capsys)  # nothing damaged left to skip
    assert code == 0 and err == ""


def test_all_damaged_stops_and_changes_nothing(finished, config_file, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    for p in list_checkpoints(out / "checkpoints"):
        damage(p)
    before = files(out)
    for extra in (["--resume"], []):
        code, said, err = run(["run", str(config_file), "--output", str(out), *extra], capsys)
        assert code == 2 and said == ""
        line = one_line_error(err)
        assert str(out / "checkpoints") in line and "none" in line and "readable" in line
        for p in list_checkpoints(out / "checkpoints"):
            assert f"{p.name}: cut short or not safetensors" in line
        assert files(out) == before  # no file deleted, moved or rewritten: metrics.jsonl/csv as they were
    code, _, err = run(["eval", str(out), "--device", "cpu"], capsys)
    assert code == 2 and "holds no readable checkpoint" in one_line_error(err)
    assert files(out) == before


def test_damaged_files_with_higher_numbers_never_cost_a_new_checkpoint(finished, config_file, tmp_path, capsys):
    """Damaged files numbered above every valid one (the old e6, and strays numbered 9 and 10): the
    resumed run's new checkpoints are the ones kept; the damaged ones are moved aside, byte for byte."""
    out = copy_of(finished, tmp_path)
    ckpts = out / "checkpoints"
    newest = ckpts / "ckpt-00006-routed-e4.safetensors"
    data = newest.read_bytes()
    strays = {"ckpt-00009-routed-e7.safetensors": data[:1000], "ckpt-00010-routed-e8.safetensors": data[: len(data) - 1]}
    for name, b in strays.items():
        (ckpts / name).write_bytes(b)
    strays[newest.name] = damage(newest)
    code, said, _ = run(["run", str(config_file), "--output", str(out), "--resume"], capsys)
    assert code == 0
    for name in strays:
        assert f"[resume] skipped {name}: " in said
        assert (ckpts / "unreadable" / name).read_bytes() == strays[name]
    assert [p.name for p in list_checkpoints(ckpts)] == readable(out) == [
        "ckpt-00005-routed-e3.safetensors", "ckpt-00006-routed-e4.safetensors"]
    assert rows(out) == rows(finished) and summary(out) == summary(finished)


def test_ctrl_c_names_a_checkpoint_that_is_really_there(finished, config_file, tmp_path, capsys, monkeypatch):
    out = copy_of(finished, tmp_path)
    damage(out / "checkpoints" / "ckpt-00006-routed-e4.safetensors")
    (out / "checkpoints" / "ckpt-00009-routed-e7.safetensors").write_bytes(b"\0" * 64)
    real = TensorLoader.__iter__

    def interrupted(self):
        for i, batch in enumerate(real(self)):
            if self.train and self.epoch == 3 and i == 4:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(TensorLoader, "__iter__", interrupted)
    code, _, err = run(["run", str(config_file), "--output", str(out), "--resume"], capsys)
    assert code == 130
    named = out / "checkpoints" / "ckpt-00005-routed-e3.safetensors"
    assert err.strip() == f"rmn: interrupted; newest complete checkpoint kept: {named} (continue with --resume)"
    assert load_checkpoint(named).meta["epoch"] == 3
    monkeypatch.undo()
    assert run(["run", str(config_file), "--output", str(out), "--resume"], capsys)[0] == 0
    assert rows(out) == rows(finished) and summary(out) == summary(finished)


KILL_IN_WRITE = r"""
import os, signal, sys
real_fsync = os.fsync
def fsync(fd):  # the temporary file is complete on disk; die before the rename publishes it
    if ".ckpt-00006-routed-e4.safetensors.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
        real_fsync(fd)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_fsync(fd)
os.fsync = fsync
from rmn.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to find the file being written")
def test_kill_9_during_the_checkpoint_write(finished, config_file, tmp_path, capsys):
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", KILL_IN_WRITE, "run", str(config_file), "--output", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    ckpts = out / "checkpoints"
    assert [p.name for p in ckpts.glob(".ckpt-00006-routed-e4.safetensors.tmp-*")]  # the write was under way
    assert readable(out) == [p.name for p in list_checkpoints(ckpts)] == [  # e3 is also the best so far
        "ckpt-00004-memory-e2.safetensors", "ckpt-00005-routed-e3.safetensors"]
    assert [r["epoch"] for r in rows(out)] == [1, 2, 3, 4]  # epoch 4's row was logged before its checkpoint
    code, said, _ = run(["run", str(config_file), "--output", str(out), "--resume"], capsys)
    assert code == 0 and "continuing from" in said and "ckpt-00005-routed-e3.safetensors" in said
    assert rows(out) == rows(finished) and summary(out) == summary(finished)
    assert readable(out)[-2:] == ["ckpt-00005-routed-e3.safetensors", "ckpt-00006-routed-e4.safetensors"]


# -- finished runs -------------------------------------------------------------------------------
def test_resuming_a_finished_run_says_so_and_extending_it_says_what_the_lr_does(finished, config_file, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    assert run(["run", str(config_file), "--output", str(out), "--resume"], capsys)[0] == 0  # config.yaml: new output
    before = files(out)
    code, said, _ = run(["run", str(config_file), "--output", str(out), "--resume"], capsys)
    assert code == 0
    assert said.strip() == (f"[resume] {out} is finished (routed, epoch 4 of 4); its summary is {out / 'summary.json'} "
                            "(a larger --epochs with --resume extends the run)")
    assert files(out) == before

    code, _, err = run(["run", str(config_file), "--output", str(out), "--resume", "--epochs", "3"], capsys)
    assert code == 2 and "schedule.epochs=3 (--epochs) is fewer than the 4 epochs" in one_line_error(err)
    code, _, err = run(["run", str(config_file), "--output", str(out), "--resume", "--epochs", "6", "--stem-epochs", "3"], capsys)
    assert code == 2 and "the run was cloned after epoch 2 and step 1 cannot change now" in one_line_error(err)
    assert files(out) == before

    code, said, _ = run(["run", str(config_file), "--output", str(out), "--resume", "--epochs", "5"], capsys)
    assert code == 0
    assert "[resume] schedule.epochs 4 -> 5: the learning rate follows the cosine schedule of 5 epochs from step 44 on" in said
    assert "[routed] epoch 5 " in said and "[routed] epoch 4 " not in said
    got = rows(out)
    assert got[:4] == rows(finished) and got[4]["epoch"] == 5 and got[4]["lr"] == pytest.approx(1e-5)
    assert summary(out)["epochs"] == 5
    assert load_checkpoint(list_checkpoints(out / "checkpoints")[-1]).meta["config"]["schedule"]["epochs"] == 5


def test_keep_best_survives_pruning_and_is_named_in_the_summary(finished):
    s = summary(finished)
    best = max(rows(finished), key=lambda r: (r.get("eval_top1", -1), r["seq"]))
    assert s["best_eval_top1"] == best["eval_top1"]
    name = s["best_checkpoint"]
    assert name is not None and name.startswith(f"ckpt-{best['seq']:05d}-")
    assert name in [p.name for p in list_checkpoints(finished / "checkpoints")]
    assert load_checkpoint(finished / "checkpoints" / name).meta["eval_top1"] == best["eval_top1"]


# -- one-line answers ------------------------------------------------------------------------------
@pytest.mark.parametrize("device, needle", [
    ("tpu", "run.device='tpu' is not a device"),
    ("nonsense", "run.device='nonsense' is not a device"),
    ("mps", "run.device='mps' but Apple's MPS backend is not available"),
    ("cuda:7", "run.device='cuda:7' but"),
    ("meta", "rmn runs on cpu, cuda or mps, not meta"),
])
def test_bad_devices_are_one_line(device, needle, config_file, finished, tmp_path, capsys):
    import torch

    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    code, said, err = run(["run", str(config_file), "--output", str(tmp_path / "o"), "--device", device], capsys)
    assert code == 2 and said == "" and needle in one_line_error(err)
    assert not (tmp_path / "o").exists()
    code, _, err = run(["eval", str(finished), "--device", device], capsys)
    assert code == 2 and needle.replace("run.device", "--device") in one_line_error(err)


def test_an_output_that_is_a_file_is_refused_before_training(config_file, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    code, said, err = run(["run", str(config_file), "--output", str(taken)], capsys)
    assert code == 2 and said == "" and f"run.output={taken} exists and is not a folder" in one_line_error(err)
    assert taken.read_text() == "mine"


def test_bad_checkpoints_are_one_line(finished, tmp_path, capsys):
    """A resnet18 header over vgg16 tensors, an empty file, a text file, a file without the run's metadata."""
    newest = load_checkpoint(list_checkpoints(finished / "checkpoints")[-1])
    cfg = load_config(None, {"model.backbone": "vgg16", "model.width_mult": 0.125, "data.image_size": 32})
    vgg = build.build_stem_network(cfg, build.build_data(cfg).spec, 32)
    mixed = save_checkpoint(tmp_path / "mixed", 6, "stem", 4, vgg, None, {k: newest.meta[k] for k in ("config", "step", "data_shape")})
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    text = tmp_path / "notes.safetensors"
    text.write_text("not a checkpoint\n")
    for path, needle in [(mixed, "its tensors do not fit the resnet18 model its header describes"),
                         (tmp_path / "mixed", "its tensors do not fit"), (empty, "empty file"),
                         (text, "cut short or not safetensors"), (tmp_path / "none.safetensors", "checkpoint not found")]:
        code, said, err = run(["eval", str(path), "--device", "cpu"], capsys)
        line = one_line_error(err)
        assert code == 2 and said == "" and needle in line, line
    code, _, err = run(["summary", str(mixed)], capsys)
    assert code == 2 and "its tensors do not fit" in one_line_error(err)


def test_eval_says_which_checkpoint_it_uses_when_the_newest_is_damaged(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    damage(out / "checkpoints" / "ckpt-00006-routed-e4.safetensors")
    code, said, err = run(["eval", str(out), "--device", "cpu"], capsys)
    assert code == 0
    assert err.splitlines() == [
        "rmn: skipped ckpt-00006-routed-e4.safetensors: cut short or not safetensors (incomplete metadata, file not fully covered)",
        "rmn: using ckpt-00005-routed-e3.safetensors, the newest readable checkpoint"]
    assert "ckpt-00005-routed-e3.safetensors" in said


# -- TensorBoard and ETA -------------------------------------------------------------------------
def test_tensorboard_has_step_loss_route_histograms_and_the_atlas(config_file, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    code, said, _ = run(["run", str(config_file), "--output", str(out), "--epochs", "2", "--stem-epochs", "1",
                         "--run.tensorboard", "true", "--run.atlas", "true"], capsys)
    assert code == 0
    assert "[stem] epoch 1 " in said and "| run ETA " in said.splitlines()[0]
    steps = EventAccumulator(str(out / "tensorboard" / "steps")).Reload()
    assert [e.step for e in steps.Scalars("train/loss")] == list(range(1, 23))  # 2 epochs of 11 steps
    epochs = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = epochs.Tags()
    assert {"routes/stage0", "routes/stage1", "routes/stage2"} <= set(tags["histograms"])
    hist = epochs.Histograms("routes/stage0")[-1]
    assert hist.step == 2 and hist.histogram_value.num == 11 * 128  # every training sample of the routed epoch (11 full batches)
    assert "atlas/load" in tags["images"] and "eval_top1" in tags["scalars"]
