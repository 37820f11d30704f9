"""The core install is torch, numpy, pyyaml, safetensors and tqdm; the rest are extras imported where used.

A subprocess blocks matplotlib, tensorboard, scikit-learn and Pillow (``sys.modules[name] = None``: their
import fails with ModuleNotFoundError and ``importlib.util.find_spec`` finds nothing, as when not installed), then imports every part of rmn, builds and runs a
backbone, trains a routed network end to end with ``rmn run`` on MNIST-format files, and asks for each
optional feature, which must answer with one line naming the extra to install.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rmn.extras import MissingExtra, require

from test_data_mnist import write_mnist

ROOT = Path(__file__).resolve().parents[1]
CORE = {"torch", "numpy", "pyyaml", "safetensors", "tqdm"}

BLOCKED_SCRIPT = r'''
import contextlib, io, json, sys
from pathlib import Path

BLOCKED = {"matplotlib", "tensorboard", "sklearn", "PIL"}
for name in BLOCKED:  # `import name` raises ModuleNotFoundError, importlib.util.find_spec(name) is None
    sys.modules[name] = None
tmp = Path(sys.argv[1])
result = {}

import torch
import rmn, rmn.analysis, rmn.cli, rmn.data, rmn.recipe
from rmn.extras import MissingExtra

rmn.cli.build_parser()
torch.manual_seed(0)
net = rmn.create_backbone("resnet18", num_classes=10, image_size=32, width_mult=0.125)
result["logits"] = list(net(torch.randn(2, 3, 32, 32)).shape)
ds = rmn.data.build_dataset("mnist", root=tmp / "mnist", split="train")
batch = next(iter(rmn.data.build_loader(ds, 8, train=True, augment=True)))
result["batch"] = list(batch[0].shape)


def error(call):
    try:
        call()
    except MissingExtra as e:
        return str(e)
    return None


result["digits"] = error(lambda: rmn.data.build_dataset("digits"))
(tmp / "folder" / "cat").mkdir(parents=True)
(tmp / "folder" / "cat" / "a.png").write_bytes(b"not read")
result["folder"] = error(lambda: rmn.data.build_dataset("folder", root=tmp / "folder"))
result["atlas"] = error(lambda: rmn.analysis.memory_atlas(None, None, None))
from rmn.recipe.logs import RunLog
result["tensorboard"] = error(lambda: RunLog(tmp / "log", None, tensorboard=True))


def cli(*args):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = rmn.cli.main(["run", str(tmp / "run.yaml"), *args])
    return [code, err.getvalue()]


result["cli_atlas"] = cli("--output", str(tmp / "refused"))
result["cli_tensorboard"] = cli("--output", str(tmp / "refused"), "--run.atlas", "false")
result["refused_wrote"] = (tmp / "refused").exists()
result["cli_trained"] = cli("--output", str(tmp / "trained"), "--run.atlas", "false", "--run.tensorboard", "false")
result["summary"] = json.loads((tmp / "trained" / "summary.json").read_text())["kind"]
result["leaked"] = sorted(m for m, v in sys.modules.items() if m.split(".")[0] in BLOCKED and v is not None)
print(json.dumps(result))
'''


@pytest.fixture(scope="module")
def blocked(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("blocked")
    write_mnist(tmp / "mnist", gz=False, n_train=40, n_test=16)
    (tmp / "run.yaml").write_text(textwrap.dedent(f"""\
        model: {{backbone: resnet18, width_mult: 0.125, num_procedures: 2, routed_stages: [0, 1]}}
        data: {{dataset: mnist, root: {tmp / 'mnist'}, image_size: 8, batch_size: 16, eval_batch_size: 16}}
        optim: {{lr: 0.1, warmup_epochs: 0}}
        schedule: {{epochs: 2, stem_epochs: 1}}
        run: {{name: core, progress: none, threads: 1}}
        """))
    proc = subprocess.run([sys.executable, "-c", BLOCKED_SCRIPT, str(tmp)], capture_output=True, text=True,
                          timeout=300, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_core_install_builds_runs_and_trains_without_the_extras(blocked):
    assert blocked["logits"] == [2, 10]
    assert blocked["batch"] == [8, 1, 28, 28]
    assert blocked["cli_trained"] == [0, ""]
    assert blocked["summary"] == "rmn"
    assert blocked["leaked"] == []


@pytest.mark.parametrize("feature, message", [
    ("digits", "the digits dataset needs scikit-learn: pip install 'rmn[digits]'"),
    ("folder", "image-file datasets (folder, tiny-imagenet, imagenet) needs pillow: pip install 'rmn[images]'"),
    ("atlas", "the memory atlas needs matplotlib: pip install 'rmn[plots]'"),
    ("tensorboard", "TensorBoard logging needs tensorboard: pip install 'rmn[tensorboard]' "
                    "(or set run.tensorboard false)"),
])
def test_each_optional_feature_names_its_extra(blocked, feature, message):
    assert blocked[feature] == message


def test_the_cli_refuses_before_writing_anything_with_one_line_and_exit_code_2(blocked):
    assert blocked["cli_atlas"] == [2, "rmn: error: the memory atlas needs matplotlib: pip install 'rmn[plots]' "
                                       "(or set run.atlas false)\n"]
    assert blocked["cli_tensorboard"] == [2, "rmn: error: TensorBoard logging needs tensorboard: "
                                             "pip install 'rmn[tensorboard]' (or set run.tensorboard false)\n"]
    assert blocked["refused_wrote"] is False


def test_an_installed_but_broken_extra_is_not_reported_as_missing(tmp_path, monkeypatch):
    (tmp_path / "rmn_broken_extra").mkdir()
    (tmp_path / "rmn_broken_extra" / "__init__.py").write_text("import rmn_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingExtra) as e:
        require("rmn_broken_extra", extra="plots", feature="a feature")
    assert str(e.value) == ("a feature needs rmn_broken_extra: pip install 'rmn[plots]'; rmn_broken_extra is "
                            "installed but failed to import: No module named 'rmn_no_such_dependency'")
    assert require("json", extra="plots", feature="a feature").dumps([]) == "[]"


def _toml_list(text: str, key: str) -> list[str]:
    """The strings of ``key = [...]`` in pyproject.toml (tomllib is Python >= 3.11; rmn supports 3.10)."""
    match = re.search(rf"^{re.escape(key)} = \[(.*?)\][ \t]*(#.*)?$", text, re.S | re.M)
    assert match, key
    return re.findall(r'"([^"]+)"', match.group(1))


def test_the_core_dependencies_are_exactly_five_and_the_extras_cover_the_rest():
    text = (ROOT / "pyproject.toml").read_text()
    name = re.compile(r"^[A-Za-z0-9_.-]+")
    core = _toml_list(text, "dependencies")
    assert {name.match(d).group(0).lower() for d in core} == CORE and len(core) == 5
    extras = {k: {name.match(d).group(0).lower() for d in _toml_list(text, k)}
              for k in ("plots", "tensorboard", "digits", "images", "fused", "all", "dev")}
    assert extras["plots"] == {"matplotlib", "pillow"}
    assert extras["tensorboard"] == {"tensorboard"}
    assert extras["digits"] == {"scikit-learn"}
    assert extras["images"] == {"pillow"}
    assert extras["fused"] == {"ninja"}
    assert _toml_list(text, "all") == ["rmn[plots,tensorboard,digits,images,fused]"]
    makefile = (ROOT / "Makefile").read_text()
    assert '-e ".[all,dev]"' in makefile and "torch==2.13.0" in makefile
