"""examples/ run as written: a plain PyTorch loop routes a torchvision ResNet-18 (the four steps) and an
EfficientNet-B0 (stages as groups). Where torchvision cannot be imported (the test machines), a stand-in
module provides models with torchvision's layout (tests/torchvision_layout.py); where it can, the real ones."""
from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
from torchvision_layout import EfficientNetLayout, ResNet18

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # not installed, or a build that cannot load here
        return False
    return True


@pytest.fixture
def torchvision_or_stand_in(monkeypatch):
    if _has_torchvision():
        return "torchvision"
    tv = types.ModuleType("torchvision")
    tv.models = types.SimpleNamespace(resnet18=lambda num_classes=1000, weights=None: ResNet18(num_classes, width=8),
                                      efficientnet_b0=lambda num_classes=1000, weights=None: EfficientNetLayout(num_classes))
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    return "stand-in"


def _run(name: str, argv: list[str], monkeypatch) -> dict:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def test_resnet18_example_runs_the_four_steps(torchvision_or_stand_in, monkeypatch, capsys):
    out = _run("route_resnet18", ["--epochs", "1", "--max-steps", "6", "--procedures", "4"], monkeypatch)
    assert sorted(out["cluster_sizes"]) == ["stage0", "stage1", "stage2", "stage3"]
    assert all(sum(sizes) == 1437 for sizes in out["cluster_sizes"].values())  # the whole training set
    assert math.isfinite(out["final_loss"]) and 0 <= out["routed_top1"] <= 100
    assert all(sum(load) == 6 * 64 for load in out["load"])  # every routed training sample was counted
    assert sum(sum(1 for n in load if n) > 1 for load in out["load"]) >= 2  # routes spread over procedures
    assert "routed (N=4)" in capsys.readouterr().out


def test_efficientnet_example_routes_groups(torchvision_or_stand_in, monkeypatch):
    out = _run("route_efficientnet_b0", ["--epochs", "1", "--max-steps", "4", "--procedures", "3"], monkeypatch)
    assert sorted(out["cluster_sizes"]) == [f"stage{i}" for i in range(5)]
    assert all(len(load) == 3 and sum(load) == 4 * 64 for load in out["load"])
    assert math.isfinite(out["final_loss"])
