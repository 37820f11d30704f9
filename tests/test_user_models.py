"""A user's own CNN in the CLI: ``model.imports`` imports the module that registers it, ``model.stages`` names
its stages, and ``rmn run`` / ``rmn eval`` train and evaluate it like a built-in backbone."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

USER_MODULE = '''
"""A user's model: not an rmn Backbone, just an nn.Module with its own names and forward."""
import torch
from torch import nn

import rmn


class Tiny(nn.Module):
    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.entry = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.out = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.block2(self.block1(self.entry(x)))
        return self.out(x.mean((2, 3)))


@rmn.register_backbone("user_tiny")
def user_tiny(num_classes=10, in_channels=3, **kwargs):
    return Tiny(num_classes, in_channels)
'''

CONFIG = {
    "model": {"backbone": "user_tiny", "imports": ["my_models"], "stages": ["block1", "block2"], "num_procedures": 2},
    "data": {"dataset": "digits", "batch_size": 128, "eval_batch_size": 512},
    "optim": {"lr": 0.1, "warmup_epochs": 1},
    "schedule": {"epochs": 3, "stem_epochs": 1},
    "run": {"name": "user", "progress": "none", "tensorboard": False, "atlas": False, "threads": 1},
}


def _rmn(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rmn.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_a_user_module_registers_its_model_for_run_and_eval(tmp_path):
    (tmp_path / "my_models.py").write_text(textwrap.dedent(USER_MODULE))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    done = _rmn(tmp_path, "run", "config.yaml", "--output", "out")
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["kind"] == "rmn" and summary["backbone"] == "user_tiny" and summary["num_procedures"] == 2
    assert sorted(k for k in summary["routing"] if k.startswith("load_stage")) == ["load_stage0", "load_stage1"]
    evaluated = _rmn(tmp_path, "eval", "out")  # the checkpoint's config imports the module again
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"{100 * summary['eval_top1']:.2f}%" in evaluated.stdout


def test_a_module_that_does_not_import_or_stages_that_do_not_exist_are_one_line_errors(tmp_path):
    (tmp_path / "my_models.py").write_text(textwrap.dedent(USER_MODULE))
    cases = [({"imports": ["not_my_models"]}, "model.imports: cannot import 'not_my_models'"),
             ({"stages": ["block1", "block9"]}, "model.stages: Tiny has no submodule 'block9'"),
             ({"stages": None}, "model.stages: backbone 'user_tiny' (Tiny) declares no stage_names")]
    for change, message in cases:
        cfg = {**CONFIG, "model": {**CONFIG["model"], **change}}
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
        done = _rmn(tmp_path, "run", "config.yaml", "--output", "bad")
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], done.stderr
        assert not (tmp_path / "bad" / "checkpoints").exists()
