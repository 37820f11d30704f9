"""``run.start_from``: step 1 taken from another run's plain-network checkpoint, or started from a
torchvision-layout state-dict file.

A run started from a stem run (or a baseline run) at ``schedule.stem_epochs`` must end exactly where
the run that trained its own step 1 ends: same weights, memories, optimizer state and metrics for
the routed epochs. Checkpoints that are not that plain network are refused with a one-line error.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import rmn
from rmn.recipe.checkpoint import list_checkpoints, load_checkpoint
from rmn.recipe.config import ConfigError
from rmn.recipe.runner import run_steps
from rmn.recipe.run import RecipeError, Run
from rmn.recipe.steps import train_stem

from test_recipe_resume import TIMING, tiny_cfg


def final(out) -> tuple:
    ckpt = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING + ("seq",)}
            for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ckpt, rows


def assert_same_end(got, want) -> None:
    (a, rows_a), (b, rows_b) = got, want
    assert (a.meta["phase"], a.meta["epoch"], a.meta["step"]) == (b.meta["phase"], b.meta["epoch"], b.meta["step"])
    assert a.model_state.keys() == b.model_state.keys()
    for k in b.model_state:
        assert torch.equal(a.model_state[k], b.model_state[k]), f"{k} differs from the run that trained its own step 1"
    for pid, st in b.optimizer_state["state"].items():
        assert torch.equal(a.optimizer_state["state"][pid]["momentum_buffer"], st["momentum_buffer"]), pid
    assert rows_a == [r for r in rows_b if r["epoch"] > 2]  # the routed epochs, identical numbers


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    run_steps(tiny_cfg(out))
    return final(out)


@pytest.fixture(scope="module")
def stem_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stem")
    run = Run.open(tiny_cfg(out))
    train_stem(run)
    run.log.close()
    return out


def test_starting_from_a_stem_run_equals_training_step_one_in_place(whole, stem_run, tmp_path):
    summary = run_steps(tiny_cfg(tmp_path, **{"run.start_from": str(stem_run)}))
    assert_same_end(final(tmp_path), whole)
    assert summary["epochs"] == 4


def test_starting_from_a_baseline_checkpoint_file(whole, tmp_path):
    src = tmp_path / "baseline"
    run_steps(tiny_cfg(src, **{"run.keep_checkpoints": 10}), baseline=True)
    at_stem = [p for p in list_checkpoints(src / "checkpoints") if "-e2." in p.name]
    assert len(at_stem) == 1
    out = tmp_path / "rmn"
    run_steps(tiny_cfg(out, **{"run.start_from": str(at_stem[0])}))
    assert_same_end(final(out), whole)


def test_routing_options_may_differ_from_the_source(stem_run, tmp_path):
    cfg = tiny_cfg(tmp_path, **{"run.start_from": str(stem_run), "model.memory_rule": "count_ema",
                                "model.revive_after": 3, "model.memory_momentum": 0.5, "optim.procedure_grad_scale": 3.0})
    run = Run.open(cfg)
    assert (run.phase, run.epoch) == ("stem", 2)
    assert run.extra["started_from"].endswith("(epoch 2)")
    run.log.close()


def test_a_resumed_run_ignores_start_from(stem_run, tmp_path):
    cfg = tiny_cfg(tmp_path, **{"run.start_from": str(stem_run)})
    Run.open(cfg).log.close()
    # the copy is the run's own first checkpoint: resuming no longer needs the source
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["ckpt-00001-stem-e2.safetensors"]
    again = Run.open(tiny_cfg(tmp_path, **{"run.start_from": str(tmp_path / "nowhere")}), resume=True)
    assert (again.phase, again.epoch, again.seq) == ("stem", 2, 1)
    again.log.close()


@pytest.mark.parametrize("change, message", [
    ({"optim.lr": 0.2}, r"run\.start_from=.*optim\.lr=0\.2 differs from 0\.1"),
    ({"model.width_mult": 0.25}, r"model\.width_mult"),
    ({"data.batch_size": 64}, r"data\.batch_size"),
    ({"model.num_procedures": 2}, r"model\.num_procedures"),  # with CA the stem's random routes depend on N
])
def test_a_different_plain_network_or_schedule_is_refused(stem_run, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        Run.open(tiny_cfg(tmp_path, **{"run.start_from": str(stem_run), **change}))


def test_without_ca_the_number_of_procedures_may_differ(tmp_path):
    src = tmp_path / "stem"
    run = Run.open(tiny_cfg(src, **{"model.attention": "none", "schedule.stem_epochs": 1}))
    train_stem(run)
    run.log.close()
    started = Run.open(tiny_cfg(tmp_path / "n2", **{"model.attention": "none", "schedule.stem_epochs": 1,
                                                    "model.num_procedures": 2, "run.start_from": str(src)}))
    assert started.epoch == 1
    started.log.close()


def test_checkpoints_that_are_not_step_one_are_refused(whole, stem_run, tmp_path):
    routed = tmp_path / "routed"
    run_steps(tiny_cfg(routed))
    with pytest.raises(RecipeError, match=r"'routed' checkpoint; step 1 needs a plain network"):
        Run.open(tiny_cfg(tmp_path / "a", **{"run.start_from": str(routed)}))
    with pytest.raises(RecipeError, match=r"epoch 2, past schedule\.stem_epochs=1"):
        Run.open(tiny_cfg(tmp_path / "b", **{"run.start_from": str(stem_run), "schedule.stem_epochs": 1}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match=r"no checkpoint there"):
        Run.open(tiny_cfg(tmp_path / "c", **{"run.start_from": str(tmp_path / "empty")}))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RecipeError, match=r"run\.start_from=.*bad\.safetensors"):
        Run.open(tiny_cfg(tmp_path / "d", **{"run.start_from": str(bad)}))


# -- a torchvision/timm-layout state-dict file as step 1's initial weights --------------------------
def tv_state(num_classes: int = 10) -> dict:
    """The weights of a torchvision-layout ResNet-18 written in the test (tiny_cfg's width, channels, variant)."""
    from torchvision_layout import ResNet18, randomize_batchnorm

    torch.manual_seed(7)
    return randomize_batchnorm(ResNet18(num_classes, width=8, in_channels=1, small=True), seed=7).state_dict()


def reference_stem_net(cfg, state):
    """What step 1 must start from: the seeded backbone with ``state`` loaded by torch's own strict load."""
    torch.manual_seed(cfg.run.seed)
    bb = rmn.create_backbone("resnet18", num_classes=10, image_size=8, in_channels=1, width_mult=0.125)
    bb.load_state_dict(state, strict=True)
    return rmn.route(bb, None, cfg.model.num_procedures, "ca", clone=False, attention_init="random",
                     attention_reduction=cfg.model.attention_reduction)


@pytest.mark.parametrize("kind", ["pth", "safetensors"])
def test_a_state_dict_file_is_the_initial_backbone_of_step_one(kind, tmp_path):
    state = tv_state()
    path = tmp_path / f"tv.{kind}"
    if kind == "pth":
        torch.save({"state_dict": state}, path)  # as training scripts wrap it
    else:
        save_file(state, str(path))
    cfg = tiny_cfg(tmp_path / "out", **{"run.start_from": str(path)})
    run = Run.open(cfg)
    run.log.close()
    assert (run.phase, run.epoch) == ("stem", 0) and run.extra["started_from"] == f"{path} (initial weights)"
    want = reference_stem_net(cfg, state).state_dict()
    got = run.model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_run_from_a_state_dict_file_trains_all_four_steps(whole, tmp_path):
    path = tmp_path / "tv.pth"
    torch.save(tv_state(), path)
    summary = run_steps(tiny_cfg(tmp_path / "out", **{"run.start_from": str(path)}))
    assert summary["epochs"] == 4
    _, rows = final(tmp_path / "out")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["train_loss"] != whole[1][0]["train_loss"]  # it did start elsewhere


def test_state_dict_files_that_do_not_fit_are_refused_in_one_line(tmp_path):
    def open_with(state_or_bytes, **over):
        path = tmp_path / "w.pth"
        if isinstance(state_or_bytes, bytes):
            path.write_bytes(state_or_bytes)
        else:
            torch.save(state_or_bytes, path)
        return Run.open(tiny_cfg(tmp_path / "out", **{"run.start_from": str(path), **over}))

    state = tv_state()
    missing = {k: v for k, v in state.items() if k != "layer1.0.conv1.weight"}
    for content, why in ((missing, r"w\.pth: does not fit ResNet's layout: keys 1 missing \(layer1\.0\.conv1\.weight\)"),
                         (b"garbage", r"w\.pth: unreadable as a state dict"),
                         (tv_state(num_classes=1000), r"w\.pth: its classifier has another number of classes \(fc\.weight is \(1000, 64\), the "
                                                      r"model's \(10, 64\)\); set run\.start_from_skip_classifier=true")):
        with pytest.raises(RecipeError, match=r"^run\.start_from: \S+" + why) as err:
            open_with(content)
        assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / "checkpoints").exists()

    imagenet = tv_state(num_classes=1000)
    run = open_with(imagenet, **{"run.start_from_skip_classifier": True})
    run.log.close()
    fresh = Run.open(tiny_cfg(tmp_path / "fresh"))
    fresh.log.close()
    assert torch.equal(run.model.conv1.weight, imagenet["conv1.weight"])
    assert torch.equal(run.model.fc.weight, fresh.model.fc.weight)  # the classifier starts afresh
