"""The four recipe steps, each alone and end to end, on a tiny ResNet-18 and scikit-learn's digits.

Digits: 1,437 training and 360 test images (8x8, upsampled to 16x16), so with batch 256 an epoch is 5 steps
and a whole 4-epoch run takes a few seconds on one CPU thread.
"""
from __future__ import annotations

import copy
import csv
import json
import re

import pytest
import torch
from torch import nn

from rmn.data import build_loader
from rmn.kmeans import kmeans
from rmn.recipe import build
from rmn.recipe.checkpoint import list_checkpoints, load_checkpoint
from rmn.recipe.config import load_config
from rmn.recipe.runner import run_steps
from rmn.recipe.run import RecipeError, Run
from rmn.recipe.steps import clone, init_memory, train_baseline, train_routed, train_stem
from rmn.route import is_routed, memory_banks, routed_stages

STEPS_PER_EPOCH = 1437 // 256  # 5, the last partial batch is dropped


def tiny_cfg(out, **over):
    base = {
        "model.backbone": "resnet18", "model.width_mult": 0.125, "model.num_procedures": 3,
        "data.dataset": "digits", "data.image_size": 16, "data.batch_size": 256, "data.eval_batch_size": 512,
        "optim.lr": 0.1, "optim.warmup_epochs": 1.0,
        "schedule.epochs": 4, "schedule.stem_epochs": 2,
        "run.output": str(out), "run.progress": "none", "run.tensorboard": False, "run.threads": 1,
        "run.keep_checkpoints": 20,
    }
    base.update(over)
    return load_config(None, base)


def names(run_or_dir) -> list[str]:
    d = run_or_dir.out / "checkpoints" if isinstance(run_or_dir, Run) else run_or_dir
    return [p.name for p in list_checkpoints(d)]


def stage_features(model, data, image_size):
    """Each stage's GAP'd input over the un-augmented training set, read with forward pre-hooks on the
    plain (stem) network in eval mode: independent of the recipe's own feature pass. Batches of 512
    (data.eval_batch_size) as the recipe's, so the convolutions see the same batches: bit-identical."""
    feats = [[] for _ in routed_stages(model)]
    hooks = [s.register_forward_pre_hook(lambda m, inp, i=i: feats[i].append(inp[0].mean(dim=(2, 3))))
             for i, s in enumerate(routed_stages(model))]
    loader = build_loader(data.train, 512, train=False, augment=False, image_size=image_size)
    model.eval()
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    for h in hooks:
        h.remove()
    return [torch.cat(f) for f in feats]


@pytest.fixture(scope="module")
def stepwise(tmp_path_factory):
    """One run driven step by step, with snapshots taken between the steps."""
    out = tmp_path_factory.mktemp("stepwise")
    cfg = tiny_cfg(out)
    snap = {}
    run = Run.open(cfg, resume=False)
    snap["fresh_phase"] = run.phase
    with pytest.raises(RecipeError, match="clone"):
        init_memory(run)
    with pytest.raises(RecipeError, match="init-memory"):
        train_routed(run)
    with pytest.raises(RecipeError, match="train-stem"):
        clone(run)
    train_stem(run)
    snap["after_stem"] = (run.phase, run.epoch, run.step, names(run))
    stem_model, stem_opt = run.model, run.optimizer
    snap["stem_params"] = {n: p.detach().clone() for n, p in stem_model.named_parameters()}
    snap["stem_buffers"] = {n: b.clone() for n, b in stem_model.named_buffers()}
    snap["stem_momentum"] = {n: stem_opt.state[p]["momentum_buffer"].clone() for n, p in stem_model.named_parameters()}
    snap["stem_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in stem_opt.param_groups]
    snap["features"] = stage_features(stem_model, run.data, cfg.data.image_size)

    clone(run)
    snap["after_clone"] = (run.phase, run.epoch, run.step, names(run))
    snap["cloned_params"] = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    snap["cloned_buffers"] = {n: b.clone() for n, b in run.model.named_buffers()}
    snap["cloned_momentum"] = {n: run.optimizer.state[p]["momentum_buffer"].clone() for n, p in run.model.named_parameters()
                               if p in run.optimizer.state}
    snap["momentum_ptrs"] = {n: run.optimizer.state[p]["momentum_buffer"].data_ptr() for n, p in run.model.named_parameters()
                             if p in run.optimizer.state}
    snap["cloned_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups]
    snap["cloned_param_count"] = sum(len(g["params"]) for g in run.optimizer.param_groups)
    snap["stem_optimizer_is_new"] = run.optimizer is not stem_opt

    init_memory(run)
    snap["after_memory"] = (run.phase, run.epoch, run.step, names(run))
    snap["memories"] = [b.memories.clone() if b is not None else None for b in memory_banks(run.model)]
    snap["extra"] = json.loads(json.dumps(run.extra))
    model_before = run.model
    clone(run)  # a step the run is already past is a no-op
    init_memory(run)
    snap["noop"] = run.model is model_before and run.phase == "memory" and run.seq == 4

    train_routed(run)
    snap["after_routed"] = (run.phase, run.epoch, run.step, names(run))
    snap["final_memories"] = [b.memories.clone() if b is not None else None for b in memory_banks(run.model)]
    snap["final_state"] = {k: v.clone() for k, v in run.model.state_dict().items()}
    snap["loads"] = [b.load.clone() for b in memory_banks(run.model) if b is not None]
    run.log.close()
    return cfg, out, snap


def test_step_phases_epochs_and_checkpoints(stepwise):
    cfg, out, snap = stepwise
    assert snap["fresh_phase"] == "stem"
    s = STEPS_PER_EPOCH
    assert snap["after_stem"] == ("stem", 2, 2 * s, ["ckpt-00001-stem-e1.safetensors", "ckpt-00002-stem-e2.safetensors"])
    assert snap["after_clone"][:3] == ("cloned", 2, 2 * s) and snap["after_clone"][3][-1] == "ckpt-00003-cloned-e2.safetensors"
    assert snap["after_memory"][:3] == ("memory", 2, 2 * s) and snap["after_memory"][3][-1] == "ckpt-00004-memory-e2.safetensors"
    assert snap["noop"]
    assert snap["after_routed"] == ("routed", 4, 4 * s, [f"ckpt-0000{i}-{p}.safetensors" for i, p in
                                                         [(1, "stem-e1"), (2, "stem-e2"), (3, "cloned-e2"), (4, "memory-e2"),
                                                          (5, "routed-e3"), (6, "routed-e4")]])
    # each checkpoint records where the recipe was
    metas = [load_checkpoint(p).meta for p in list_checkpoints(out / "checkpoints")]
    assert [(m["phase"], m["epoch"], m["step"], m["seq"]) for m in metas] == [
        ("stem", 1, s, 1), ("stem", 2, 2 * s, 2), ("cloned", 2, 2 * s, 3), ("memory", 2, 2 * s, 4),
        ("routed", 3, 3 * s, 5), ("routed", 4, 4 * s, 6)]
    assert all(m["config"] == cfg.to_dict() for m in metas)  # the resolved config is inside every checkpoint
    assert (out / "config.yaml").is_file() and load_config(out / "config.yaml") == cfg
    # the last checkpoint holds the final weights and memories
    last = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    for k, v in snap["final_state"].items():
        assert torch.equal(last.model_state[k], v), k


def test_clone_copies_weights_statistics_and_optimizer_momentum(stepwise):
    cfg, _, snap = stepwise
    assert snap["stem_optimizer_is_new"]
    stem_params, cloned_params = snap["stem_params"], snap["cloned_params"]

    def source(name):  # layerI.procedures.j.X was cloned from layerI.procedures.0.X of the stem network
        return re.sub(r"(layer\d+\.procedures\.)\d+\.", r"\g<1>0.", name)

    procs = {m.group(0) for n in cloned_params if (m := re.match(r"layer\d+\.procedures\.\d+", n))}
    assert len(procs) == 4 * cfg.model.num_procedures  # every stage of the ResNet routed, N copies each
    assert snap["cloned_param_count"] == len(cloned_params)  # every parameter is optimised
    for name, value in cloned_params.items():
        src = source(name)
        assert torch.equal(value, stem_params[src]), name
        assert name in snap["cloned_momentum"], f"{name} lost its momentum"
        assert torch.equal(snap["cloned_momentum"][name], snap["stem_momentum"][src]), name
    for name, value in snap["cloned_buffers"].items():
        if ".memory." in name:
            continue
        assert torch.equal(value, snap["stem_buffers"][source(name)]), name  # BatchNorm statistics too
    # the copies own their state: stepping one procedure's momentum cannot move another's
    ptrs = snap["momentum_ptrs"]
    for suffix in [n[len("stages.0.procedures.0."):] for n in ptrs if n.startswith("stages.0.procedures.0.")]:
        copies = {ptrs[f"stages.0.procedures.{j}.{suffix}"] for j in range(cfg.model.num_procedures)}
        assert len(copies) == cfg.model.num_procedures, suffix
    # hyper-parameters and the current learning rate carry over
    assert snap["cloned_groups"] == snap["stem_groups"]


def test_init_memory_sets_the_kmeans_centres_of_the_stage_inputs(stepwise):
    cfg, _, snap = stepwise
    feats = snap["features"]
    converged = []
    assert [f.shape for f in feats] == [torch.Size([1437, c]) for c in (8, 8, 16, 32)]
    for i, mem in enumerate(snap["memories"]):
        res = kmeans(feats[i], cfg.model.num_procedures, max_iter=cfg.run.kmeans_iters, seed=cfg.run.kmeans_seed)
        assert torch.equal(mem, res.centers), f"stage {i}"
        assert snap["extra"]["cluster_sizes"][f"stage{i}"] == res.counts.tolist()
        assert sum(res.counts.tolist()) == 1437 and min(res.counts.tolist()) > 0
        # independently of any k-means code: a converged centre is the mean of the features nearest to it
        converged.append(res.converged)
        if res.converged:
            nearest = torch.cdist(feats[i].double(), mem.double()).argmin(1)
            for j in range(mem.shape[0]):
                assert torch.allclose(feats[i][nearest == j].double().mean(0), mem[j].double(), rtol=1e-3, atol=1e-4)
    assert all(converged)  # 1,437 points, 100 iterations: the mean check above ran for every stage
    assert set(snap["extra"]["init_memory_seconds"]) == {"features", "kmeans"}


def test_routed_training_moves_memories_and_counts_loads(stepwise):
    _, _, snap = stepwise
    for start, end in zip(snap["memories"], snap["final_memories"]):
        assert torch.isfinite(end).all()
        assert not torch.equal(start, end)  # the moving average followed the features
    for load in snap["loads"]:  # loads of the last epoch: every training sample of it routed once per stage
        assert int(load.sum()) == STEPS_PER_EPOCH * 256


def test_logs_rows_per_epoch(stepwise):
    cfg, out, _ = stepwise
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    s = STEPS_PER_EPOCH
    assert [(r["epoch"], r["phase"], r["step"], r["seq"]) for r in rows] == [
        (1, "stem", s, 1), (2, "stem", 2 * s, 2), (3, "routed", 3 * s, 5), (4, "routed", 4 * s, 6)]
    for r in rows:
        for key in ("lr", "train_loss", "train_acc", "eval_top1", "eval_top5", "images_per_s", "epoch_seconds"):
            assert isinstance(r[key], float), key
        assert 0.0 <= r["eval_top1"] <= r["eval_top5"] <= 1.0 and r["train_loss"] > 0
    for r in rows[2:]:
        for i in range(4):
            assert len(r[f"load_stage{i}"]) == cfg.model.num_procedures
            assert sum(r[f"load_stage{i}"]) == pytest.approx(1.0, abs=1e-3)
            assert sum(r[f"eval_load_stage{i}"]) == pytest.approx(1.0, abs=1e-3)
            assert r[f"entropy_stage{i}"] >= 0
        assert isinstance(r["dead_procedures"], int)
    with open(out / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(t["epoch"]) for t in table] == [1, 2, 3, 4]
    assert float(table[3]["eval_top1"]) == rows[3]["eval_top1"]
    assert table[3]["load_stage0"].count(";") == cfg.model.num_procedures - 1


def test_pipeline_equals_the_steps_and_writes_a_summary(stepwise, tmp_path):
    cfg, _, snap = stepwise
    out = tmp_path / "whole"
    summary = run_steps(tiny_cfg(out))
    # the recipe trains and summarises; the atlas is drawn by `rmn run` afterwards (tests/test_cli.py)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml", "metrics.csv", "metrics.jsonl", "summary.json"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    for key in ("name", "kind", "dataset", "backbone", "width_mult", "attention", "num_procedures", "epochs", "steps",
                "batch_size", "seed", "eval_top1", "eval_top5", "best_eval_top1", "params", "macs_per_image",
                "dead_procedures", "routing", "cluster_sizes", "timing"):
        assert key in summary, key
    assert summary["kind"] == "rmn" and summary["epochs"] == 4 and summary["steps"] == 4 * STEPS_PER_EPOCH
    assert summary["num_procedures"] == 3 and summary["cluster_sizes"] == snap["extra"]["cluster_sizes"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["eval_top1"] == rows[-1]["eval_top1"]
    assert summary["best_eval_top1"] == max(r["eval_top1"] for r in rows)
    assert set(summary["routing"]) == {f"{k}_stage{i}" for i in range(4) for k in ("load", "entropy")}
    assert summary["params"] > 0 and summary["macs_per_image"] > 0
    # keep_checkpoints=20 here, so all six remain; the driver and the steps did the same work
    assert len(list_checkpoints(out / "checkpoints")) == 6
    final = load_checkpoint(list_checkpoints(out / "checkpoints")[-1]).model_state
    for k, v in snap["final_state"].items():
        assert torch.equal(final[k], v), k


def test_baseline_runs_the_same_schedule_without_cloning(tmp_path):
    cfg = tiny_cfg(tmp_path / "b", **{"schedule.epochs": 2, "schedule.stem_epochs": 1, "run.keep_checkpoints": 2,
                                      "run.tensorboard": True})
    run = Run.open(cfg, resume=False, baseline=True)
    assert run.phase == "baseline"
    with pytest.raises(RecipeError, match="baseline"):
        clone(run)
    train_stem(run)  # not a stem run: nothing to do
    assert run.epoch == 0
    train_baseline(run)
    assert (run.phase, run.epoch, run.step) == ("baseline", 2, 2 * STEPS_PER_EPOCH)
    assert not is_routed(run.model)
    assert names(run) == ["ckpt-00001-baseline-e1.safetensors", "ckpt-00002-baseline-e2.safetensors"]
    run.log.close()
    assert list((tmp_path / "b" / "tensorboard").glob("events.out.tfevents.*"))  # TensorBoard scalars
    with pytest.raises(RecipeError, match="already holds a run"):
        Run.open(cfg, resume=False)


def test_optimizer_defaults():
    model = nn.Linear(3, 2)
    sgd = build.build_optimizer(load_config(None, {}), model)
    assert isinstance(sgd, torch.optim.SGD)
    assert (sgd.defaults["momentum"], sgd.defaults["weight_decay"]) == (0.9, 1e-5)
    cfg = load_config(None, {"model.backbone": "efficientnet_b0"})
    assert build.optimizer_kind(cfg) == "rmsprop"
    rms = build.build_optimizer(cfg, model)
    assert isinstance(rms, torch.optim.RMSprop)
    assert (rms.defaults["alpha"], rms.defaults["eps"], rms.defaults["momentum"]) == (0.9, 1e-3, 0.9)
    assert build.optimizer_kind(load_config(None, {"model.backbone": "efficientnet_b0", "optim.optimizer": "sgd"})) == "sgd"


def test_a_diverging_run_stops_with_a_clear_error(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"optim.lr": 1e30, "optim.warmup_epochs": 0.0, "schedule.stem_epochs": 1})
    run = Run.open(cfg, resume=False)
    with pytest.raises(RecipeError, match="diverged"):
        train_stem(run)
    assert list_checkpoints(tmp_path / "checkpoints") == []


def test_procedure_grad_scale_applies_to_routed_steps_only(tmp_path, monkeypatch):
    from rmn.recipe import loop

    calls = []
    real = loop.scale_procedure_gradients
    monkeypatch.setattr(loop, "scale_procedure_gradients",
                        lambda model, f: (calls.append((is_routed(model), f)), real(model, f)))
    run_steps(tiny_cfg(tmp_path / "s", **{"schedule.epochs": 2, "schedule.stem_epochs": 1, "optim.procedure_grad_scale": 8.0,
                                          "run.atlas": False}))
    assert calls == [(True, 8.0)] * STEPS_PER_EPOCH  # once per routed optimizer step, never in step 1
    calls.clear()
    run_steps(tiny_cfg(tmp_path / "p", **{"schedule.epochs": 2, "schedule.stem_epochs": 1, "run.atlas": False}))
    assert calls == []  # the paper: gradients as they are


def test_memory_follows_lr_passes_the_lr_over_its_peak(tmp_path, monkeypatch):
    from rmn.recipe import loop

    rates, lrs = [], []
    real_update, real_set_lr = loop.update_memories, loop.set_lr
    monkeypatch.setattr(loop, "update_memories", lambda model, rate=1.0: (rates.append(rate), real_update(model, rate))[1])
    monkeypatch.setattr(loop, "set_lr", lambda run: (lrs.append(real_set_lr(run)), lrs[-1])[1])
    overrides = {"schedule.epochs": 2, "schedule.stem_epochs": 1, "run.atlas": False, "optim.lr": 0.05}
    run_steps(tiny_cfg(tmp_path / "f", **overrides, **{"model.memory_follows_lr": True}))
    routed = lrs[-STEPS_PER_EPOCH:]
    assert rates[-STEPS_PER_EPOCH:] == pytest.approx([lr / 0.05 for lr in routed])
    assert min(rates) < 0.5  # the cosine's end: the memories nearly stop
    rates.clear()
    run_steps(tiny_cfg(tmp_path / "p", **overrides))
    assert rates and set(rates) == {1.0}  # the paper: the same step whatever the LR


def test_match_batchnorm_in_step_three_keeps_the_training_function(tmp_path):
    """Right after step 3, in training mode on the same batch: the matched network stays near the plain one."""
    import copy

    outs, states = {}, {}
    for match in (False, True):
        run = Run.open(tiny_cfg(tmp_path / str(match), **{"schedule.epochs": 2, "schedule.stem_epochs": 1,
                                                          "model.match_batchnorm": match, "model.attention": "none"}))
        train_stem(run)
        x = next(iter(run.loaders[2]))[0]
        with torch.no_grad():
            plain = copy.deepcopy(run.model).train()(x)
        clone(run)
        init_memory(run)
        with torch.no_grad():
            outs[match] = ((copy.deepcopy(run.model).train()(x) - plain).norm() / plain.norm()).item()
        states[match] = run.model.state_dict()
        assert ("match_batchnorm" in run.extra["init_memory_seconds"]) == match
        run.log.close()
    assert outs[True] < 0.5 * outs[False], outs
    moved = [k for k in states[False] if "procedures" in k and k.endswith("running_mean")
             and not torch.equal(states[False][k], states[True][k])]
    assert moved  # the procedures' statistics now are their clusters'
    ckpt = load_checkpoint(list_checkpoints(tmp_path / "True" / "checkpoints")[-1])
    assert ckpt.meta["phase"] == "memory"
    for k in moved:
        assert torch.equal(ckpt.model_state[k], states[True][k])


@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop"])
def test_multi_tensor_optimizers_equal_the_per_parameter_loop(optimizer):
    """build_optimizer's foreach=True must not change a number: same steps as torch's per-parameter loop."""
    from rmn.recipe.build import build_optimizer

    cfg = load_config(None, {"optim.optimizer": optimizer, "optim.lr": 0.1})
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(), torch.nn.LazyLinear(4))
    a(torch.randn(2, 3, 6, 6))
    b = copy.deepcopy(a)
    fast = build_optimizer(cfg, a)
    assert fast.defaults["foreach"] is True
    loop = type(fast)(b.parameters(), **{**fast.defaults, "foreach": False})
    for step in range(4):
        x = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(step))
        for model, opt in ((a, fast), (b, loop)):
            opt.zero_grad()
            model(x).square().mean().backward()
            for g in opt.param_groups:
                g["lr"] = 0.1 / (step + 1)
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("preset", [None, "2048"])
def test_importing_rmn_sizes_onednns_kernel_cache(preset):
    """rmn raises oneDNN's kernel cache at import unless the user chose a size."""
    import os
    import subprocess
    import sys

    from rmn.precision import ONEDNN_CACHE_CAPACITY

    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if preset:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = preset
    out = subprocess.run([sys.executable, "-c", "import os, rmn; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == (preset or ONEDNN_CACHE_CAPACITY)


def _imported_modules(source: str, package: str) -> list[str]:
    """Absolute names of every module ``source`` (a module of ``package``) imports, and of the names it takes
    from them (``from .. import analysis`` in ``rmn.recipe`` gives ``rmn`` and ``rmn.analysis``)."""
    import ast

    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = parts[:len(parts) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names += [module] + [f"{module}.{a.name}" for a in node.names]
    return names


def test_the_recipe_never_imports_analysis():
    """Data flows one way: training never reaches into rmn.analysis (``rmn run`` draws the atlas afterwards)."""
    from pathlib import Path

    import rmn

    def analysis(names):
        return [m for m in names if m == "rmn.analysis" or m.startswith("rmn.analysis.")]

    # the check sees such an import, relative or absolute, at any depth of the module
    assert analysis(_imported_modules("from ..analysis.routing import load_stats", "rmn.recipe"))
    assert analysis(_imported_modules("def f():\n    from .. import analysis", "rmn.recipe"))
    assert analysis(_imported_modules("import rmn.analysis.atlas", "rmn.recipe"))
    assert not analysis(_imported_modules("from .analysis import x", "rmn.recipe"))  # rmn.recipe.analysis
    recipe = Path(rmn.__file__).parent / "recipe"
    files = sorted(recipe.rglob("*.py"))
    assert len(files) >= 8
    found = {f"{p.relative_to(recipe)}: {m}" for p in files
             for m in analysis(_imported_modules(p.read_text(), ".".join(("rmn", "recipe", *p.relative_to(recipe).parent.parts))))}
    assert not found
