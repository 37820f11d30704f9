"""The ``rmn`` command: errors, overrides, single steps, eval, mode both, and kill -9 then --resume."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rmn.cli import main
from rmn.recipe.checkpoint import list_checkpoints, load_checkpoint
from rmn.recipe.config import ConfigError, load_config

from conftest import write_config

CONFIG = {  # 6 epochs of 11 steps on digits at 8x8; a whole run is a few seconds on one thread
    "model": {"backbone": "resnet18", "width_mult": 0.125, "num_procedures": 3, "routed_stages": [0, 1, 2]},
    "data": {"dataset": "digits", "image_size": 8, "batch_size": 128, "eval_batch_size": 512},
    "optim": {"lr": 0.1, "warmup_epochs": 1},
    "schedule": {"epochs": 6, "stem_epochs": 2},
    "run": {"name": "cli", "progress": "none", "tensorboard": False, "threads": 1},
}


def without_timing(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "timing"}


def read_summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def final_state(out: Path) -> dict:
    return load_checkpoint(list_checkpoints(out / "checkpoints")[-1]).model_state


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    return write_config(tmp_path_factory, "tiny.yaml", CONFIG)


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory) -> Path:
    """An uninterrupted ``rmn run`` (in this process)."""
    out = tmp_path_factory.mktemp("reference")
    assert main(["run", str(config_file), "--output", str(out)]) == 0
    return out


# -- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["run", "{missing}"], "config file not found"),
    (["run", "{cfg}", "--optim.lrr", "0.1"], "optim.lrr"),
    (["run", "{cfg}", "--optimiser.lr", "0.1"], "optimiser"),
    (["run", "{cfg}", "--epochs", "three"], "schedule.epochs"),
    (["run", "{cfg}", "--batch-size", "1.5"], "data.batch_size"),
    (["run", "{cfg}", "--optim.lr=fast"], "optim.lr"),
    (["run", "{cfg}", "--data.augment", "maybe"], "data.augment"),
    (["run", "{cfg}", "stray"], "'stray'"),
    (["run", "{cfg}", "--optim.lr"], "--optim.lr needs a value"),
    (["run", "{cfg}", "--run.mode", "fast"], "run.mode"),
    (["run", "{cfg}", "--stem-epochs", "99"], "schedule.stem_epochs"),
    (["run", "{cfg}", "--model.routed_stages", "[7]"], "model.routed_stages=[7] out of range: resnet18 has 4 stages"),
    (["run", "{bad_yaml}"], "not valid YAML: expected ',' or '}', but got '<stream end>' at line 2, column 1 "
                            "(while parsing a flow mapping started at line 1, column 8)"),
    (["run", "{bad_indent}"], "not valid YAML: mapping values are not allowed here at line 3, column 16"),
    (["train-stem", "{cfg}", "--run.mode", "both"], "add --run.mode rmn"),
    (["run", "{bad_section}"], "modle"),
    (["run", "{bad_key}"], "model.procedures"),
    (["train-stem"], "give a CONFIG"),
    (["clone"], "holds no run"),
    (["eval", "{missing}"], "not found"),
    (["eval", "{cfg}", "--optim.lr", "1"], "unrecognised argument"),
])
def test_errors_are_one_line_with_exit_code_2(args, needle, config_file, tmp_path, capsys):
    files = {
        "cfg": str(config_file),
        "missing": str(tmp_path / "missing.yaml"),
        "bad_yaml": tmp_path / "bad.yaml",
        "bad_section": tmp_path / "section.yaml",
        "bad_key": tmp_path / "key.yaml",
        "bad_indent": tmp_path / "indent.yaml",
    }
    files["bad_indent"].write_text("model:\n  backbone: vgg16\n  attention: ca: 1\n")
    files["bad_yaml"].write_text("model: {backbone: resnet18\n")
    files["bad_section"].write_text("modle:\n  backbone: resnet18\n")
    files["bad_key"].write_text("model:\n  procedures: 4\n")
    argv = [a.format(**files) for a in args]
    if argv[0] != "eval":  # never train by accident in the working directory
        argv += ["--output", str(tmp_path / "out")]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rmn: error: ") and needle in lines[0], lines[0]
    assert not list_checkpoints(tmp_path / "out" / "checkpoints")


def test_overrides_in_every_spelling_and_position(config_file, tmp_path, monkeypatch):
    seen = {}

    def fake_run_experiment(cfg, resume=False):
        seen["cfg"], seen["resume"] = cfg, resume
        return []

    monkeypatch.setattr("rmn.recipe.runner.run_experiment", fake_run_experiment)
    out = tmp_path / "o"
    argv = ["run", "--optim.lr", "0.3", str(config_file),  # a dotted override before the CONFIG positional
            "--output", str(out), "--epochs", "9", "--optim.warmup_epochs=2", "--model.routed_stages", "[0, 1]",
            "--seed", "7", "--device", "cpu", "--optim.start_lr", "1e-4", "--model.attention", "se", "--resume"]
    assert main(argv) == 0
    cfg = seen["cfg"]
    assert seen["resume"] is True
    assert cfg.optim.lr == 0.3 and cfg.schedule.epochs == 9 and cfg.optim.warmup_epochs == 2.0
    assert cfg.model.routed_stages == [0, 1] and cfg.model.attention == "se"
    assert cfg.run.seed == 7 and cfg.run.device == "cpu" and cfg.optim.start_lr == 1e-4
    assert cfg.run.output == str(out)
    assert cfg.model.num_procedures == 3 and cfg.schedule.stem_epochs == 2  # the file's values stay


# -- the steps from the command line -----------------------------------------------------------------
def test_single_step_commands_reach_the_same_run(reference, config_file, tmp_path, capsys):
    out = str(tmp_path / "steps")
    assert main(["init-memory", str(config_file), "--output", out]) == 2  # out of order: says what to run
    assert "clone" in capsys.readouterr().err
    assert main(["train-stem", str(config_file), "--output", out]) == 0
    assert [p.name for p in list_checkpoints(Path(out) / "checkpoints")][-1] == "ckpt-00002-stem-e2.safetensors"
    assert main(["train-routed", "--output", out]) == 2
    assert "init-memory" in capsys.readouterr().err
    for command, newest in [("clone", "ckpt-00003-cloned-e2"), ("init-memory", "ckpt-00004-memory-e2"),
                            ("train-routed", "ckpt-00008-routed-e6")]:
        assert main([command, "--output", out]) == 0  # later steps read the run folder's config.yaml
        assert list_checkpoints(Path(out) / "checkpoints")[-1].name == newest + ".safetensors"
    assert without_timing(read_summary(Path(out))) == without_timing(read_summary(reference))
    assert_same_state(final_state(Path(out)), final_state(reference))


def test_run_refuses_an_existing_output_and_resumes_a_finished_run_as_a_no_op(reference, config_file, capsys):
    before = read_summary(reference)
    assert main(["run", str(config_file), "--output", str(reference)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["run", str(config_file), "--output", str(reference), "--resume"]) == 0
    assert without_timing(read_summary(reference)) == without_timing(before)


def test_eval_prints_the_final_top1_in_percent(reference, capsys):
    summary = read_summary(reference)
    for target in (reference, list_checkpoints(reference / "checkpoints")[-1]):
        assert main(["eval", str(target), "--device", "cpu"]) == 0
        printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.strip().splitlines())
        assert printed["top-1"] == f"{100 * summary['eval_top1']:.2f}%"
        assert printed["top-5"] == f"{100 * summary['eval_top5']:.2f}%"
        assert printed["phase"] == "routed" and printed["epoch"] == "6"
        assert len(printed["evaluation load, stage 0"].split()) == CONFIG["model"]["num_procedures"]


def test_eval_of_a_mode_both_folder_evaluates_both_models(both_run, capsys):
    out, _ = both_run
    assert main(["eval", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    for kind in ("baseline", "rmn"):
        section = printed.split(f"== {kind} ({out / kind})\n", 1)[1].split("==", 1)[0]
        lines = dict(line.split(": ", 1) for line in section.strip().splitlines())
        assert lines["top-1"] == f"{100 * read_summary(out / kind)['eval_top1']:.2f}%"
        assert lines["phase"] == kind if kind == "baseline" else lines["phase"] == "routed"


def test_step_commands_and_summary_on_a_mode_both_folder(both_run, capsys):
    out, _ = both_run
    assert main(["train-routed", "--output", str(out)]) == 2
    assert f"its RMN run is --output {out / 'rmn'}" in capsys.readouterr().err
    assert main(["summary", str(out)]) == 0  # the folder's RMN
    assert "N = 3" in capsys.readouterr().out


def test_run_draws_the_atlas_of_its_rmn_after_training_and_keeps_it_on_resume(config_file, both_run, capsys):
    out, printed = both_run
    html = out / "rmn" / "atlas" / "atlas.html"
    assert html.is_file() and not (out / "baseline" / "atlas").exists()  # only the routed run has memories
    assert f"wrote {html}" in printed and printed.index("wrote") > printed.index("== rmn")
    drawn = html.stat().st_mtime_ns
    assert main(["run", str(config_file), "--output", str(out), "--run.mode", "both", "--epochs", "2",
                 "--stem-epochs", "1", "--resume"]) == 0
    assert "atlas" not in capsys.readouterr().out and html.stat().st_mtime_ns == drawn  # a finished run's atlas stays


def test_atlas_writes_into_the_run_and_takes_data_dir(both_run, tmp_path, monkeypatch, capsys):
    out, _ = both_run
    shutil.rmtree(out / "rmn" / "atlas", ignore_errors=True)  # drawn by the run itself; draw it again
    monkeypatch.chdir(tmp_path)
    assert main(["atlas", str(out), "--max-images", "64", "--top-k", "2", "--data-dir", str(tmp_path)]) == 0
    assert (out / "rmn" / "atlas" / "atlas.html").is_file()  # a both folder: its RMN, into that run's folder
    assert not (tmp_path / "atlas").exists()
    assert main(["atlas", str(out / "rmn"), "--max-images", "32", "--top-k", "1", "--data-root", str(tmp_path),
                 "--out", "elsewhere"]) == 0  # the old spelling still works
    assert (tmp_path / "elsewhere" / "atlas.html").is_file()


def test_version_and_summary_usage_errors(capsys):
    import rmn

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"rmn {rmn.__version__}"
    assert main(["summary", "--model", "resnet18"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rmn: error: ") and "--num-classes" in err and len(err.splitlines()) == 1


def test_no_user_facing_text_names_an_internal_issue():
    import rmn

    src = Path(rmn.__file__).parent
    hits = [f"{p.relative_to(src)}:{i}" for p in src.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if "issue" in line.lower()]
    assert not hits, hits


def plain_backbone_params(config_file: Path, **overrides) -> int:
    from rmn.data import dataset_spec
    from rmn.recipe.build import build_backbone
    from rmn.recipe.config import load_config

    cfg = load_config(config_file, overrides)
    return sum(p.numel() for p in build_backbone(cfg, dataset_spec(cfg.data.dataset), cfg.data.image_size).parameters())


@pytest.fixture(scope="module")
def both_run(config_file, tmp_path_factory) -> tuple[Path, str]:
    """A short ``run.mode: both`` run (the RMN with CA, the config's default) and what it printed."""
    out = tmp_path_factory.mktemp("both")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["run", str(config_file), "--output", str(out), "--run.mode", "both", "--epochs", "2",
                     "--stem-epochs", "1"]) == 0
    return out, printed.getvalue()


def test_mode_both_writes_the_comparison_against_the_plain_network(config_file, both_run):
    out, printed = both_run  # the RMN uses CA; the baseline must not
    base, rmn = read_summary(out / "baseline"), read_summary(out / "rmn")
    assert (base["kind"], rmn["kind"]) == ("baseline", "rmn")
    assert (base["attention"], rmn["attention"]) == ("none", "ca")
    assert base["params"] == plain_backbone_params(config_file)  # the paper's baseline: the plain network
    assert base["params"] < rmn["params"] and base["routing"] == {} and set(rmn["routing"]) >= {"load_stage0"}
    lines = (out / "comparison.txt").read_text().splitlines()
    assert len(lines) == 4 and set(lines[1]) == {"-"}
    assert lines[2].split()[:3] == ["baseline", "resnet18", f"{100 * base['eval_top1']:.2f}"]
    assert lines[3].startswith("rmn resnet18 N=3 ca")
    assert lines[3].split()[4] == f"{100 * rmn['eval_top1']:.2f}"
    assert "s0:[" in lines[3] and "s3:" not in lines[3]  # the load of each routed stage (stage 3 unrouted)
    assert "\n".join(lines) in printed
    assert [s["kind"] for s in json.loads((out / "comparison.json").read_text())] == ["baseline", "rmn"]


def test_mode_both_baseline_is_the_rmn_step_1_without_attention(config_file, tmp_path, capsys):
    """Without attention the baseline's first epoch is the RMN's stem epoch, to the last digit."""
    out = tmp_path / "plain"
    assert main(["run", str(config_file), "--output", str(out), "--run.mode", "both", "--epochs", "2",
                 "--stem-epochs", "1", "--model.attention", "none"]) == 0
    strip = ("phase", "seq", "images_per_s", "epoch_seconds")
    first = [{k: v for k, v in json.loads((out / kind / "metrics.jsonl").read_text().splitlines()[0]).items()
              if k not in strip} for kind in ("baseline", "rmn")]
    assert first[0] == first[1]


def test_mode_both_se_baseline_is_its_own_row(config_file, monkeypatch, tmp_path):
    from rmn.recipe import runner

    seen = []

    def fake_run_steps(cfg, resume=False, baseline=False):
        seen.append((cfg.run.mode, cfg.model.attention, baseline))
        return {"kind": cfg.run.mode, "backbone": "resnet18", "num_procedures": 3, "attention": cfg.model.attention,
                "eval_top1": 0.5, "eval_top5": 1.0, "params": 1, "macs_per_image": 1, "dead_procedures": 0, "routing": {}}

    monkeypatch.setattr(runner, "run_steps", fake_run_steps)
    cfg = load_config(config_file, {"run.mode": "both", "run.baseline_attention": "se", "run.output": str(tmp_path)})
    runner.run_experiment(cfg)
    assert seen == [("baseline", "se", True), ("rmn", "ca", False)]
    assert (tmp_path / "comparison.txt").read_text().splitlines()[2].startswith("baseline resnet18 +SE ")
    with pytest.raises(ConfigError, match="run.baseline_attention"):
        load_config(config_file, {"run.baseline_attention": "ca"})


# -- kill -9 ---------------------------------------------------------------------------------------
def test_kill_9_then_resume_gives_the_uninterrupted_summary(reference, config_file, tmp_path):
    """The real CLI in a subprocess is SIGKILLed during routed training (epoch 4 of 6, right after the
    epoch-3 checkpoint landed), then ``rmn run --resume`` finishes it: summary.json equals the
    uninterrupted run's (timings aside), and so do all final weights and memories."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "rmn", "run", str(config_file), "--output", str(out), "--run.progress", "lines"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    try:
        for line in proc.stdout:  # blocks until the run prints; ends if the process dies
            seen.append(line)
            if line.startswith("[routed] epoch 3 "):
                break
        else:
            pytest.fail("the run ended before routed epoch 3:\n" + "".join(seen))
        # the epoch line comes right before the checkpoint write; wait for the file to be published
        deadline = time.monotonic() + 60
        while not list((out / "checkpoints").glob("ckpt-*-routed-e3.safetensors")):
            assert proc.poll() is None, "".join(seen)
            assert time.monotonic() < deadline, "no routed epoch-3 checkpoint within 60 s"
            time.sleep(0.005)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert not (out / "summary.json").exists()
    newest = list_checkpoints(out / "checkpoints")[-1].name
    assert newest.startswith("ckpt-0000") and "-routed-e" in newest and not newest.endswith("-e6.safetensors"), newest
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[routed] epoch 6 " in done.stdout and "[stem]" not in done.stdout  # continued, not restarted
    assert without_timing(read_summary(out)) == without_timing(read_summary(reference))
    assert_same_state(final_state(out), final_state(reference))
    rows = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 5, 6]


def test_analysis_commands_are_reachable(capsys):
    assert main(["summary", "--model", "resnet18", "--num-classes", "10", "--image-size", "32", "--width-mult", "0.125",
                 "--procedures", "2"]) == 0
    assert "RMN with CA (N=2)" in capsys.readouterr().out
    assert main(["summary", "--model", "resnet18", "--num-classes", "10", "--optim.lr", "1"]) == 2
    assert "unrecognised argument '--optim.lr'" in capsys.readouterr().err
