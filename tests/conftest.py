import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from rmn.backbones.base import Backbone

torch.set_num_threads(1)  # pytest -n 2 runs two workers on two cores


def conv_bn(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def toy_backbone(in_channels=3, num_classes=5, width=8, stages=3) -> Backbone:
    """A small stem/stages/head CNN: each stage halves the resolution."""
    stem = conv_bn(in_channels, width)
    chans = [width * (2**i) for i in range(stages + 1)]
    st = [nn.Sequential(conv_bn(chans[i], chans[i + 1], 2), conv_bn(chans[i + 1], chans[i + 1])) for i in range(stages)]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(chans[-1], num_classes))
    return Backbone(stem, st, head, chans[:-1], chans[1:], in_channels, min_image_size=2**stages)


@pytest.fixture
def toy():
    torch.manual_seed(0)
    return toy_backbone()


@pytest.fixture(scope="session")
def load_benchmark():
    """Import a script of benchmarks/ (not a package) as a module: ``load_benchmark("demo_seeds")``."""
    root = Path(__file__).resolve().parents[1]

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, root / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module

    return load


def write_config(tmp_path_factory, name: str, config: dict):
    """A YAML config file of ``config`` in a fresh temporary folder (for module-scoped fixtures)."""
    import yaml

    p = tmp_path_factory.mktemp("cfg") / name
    p.write_text(yaml.safe_dump(config))
    return p


def routed_net(model, num_procedures=8, attention=True, routed_stages=None, **kw):
    """A routed network as the recipe builds one from ``model``: ``routed_stages=()`` gives the plain network of
    step 1 (attention for N routes, no memories), a list of indices routes only those stages of it, None all;
    attention starts from PyTorch's default initialisation (the paper's step 1 from scratch)."""
    import rmn
    from rmn.route import has_routing

    if has_routing(model):
        return rmn.route(model, None, num_procedures, **kw)
    memory = {k: kw.pop(k) for k in ("memory_momentum", "memory_options") if k in kw}
    if routed_stages is None:
        return rmn.route(model, None, num_procedures, attention, attention_init="random", **kw, **memory)
    plain = rmn.route(model, None, num_procedures, attention, clone=False, attention_init="random", **kw)
    if not routed_stages:
        return plain
    names = plain.rmn_routing.stages
    bad = [i for i in routed_stages if not 0 <= i < len(names)]
    if bad:
        raise ValueError(f"routed_stages {bad} out of range: the model has {len(names)} stages")
    return rmn.route(plain, [names[i] for i in routed_stages], num_procedures, **memory)


def stem_of(model):
    """The three phases of one of rmn's backbones as modules: what runs before the first stage, ..."""
    from torch import nn
    return nn.Sequential(*model.stem_modules())


def stages_of(model):
    """... each stage (a named module, or an nn.Sequential of a group's modules) ..."""
    from torch import nn
    return [model.get_submodule(g) if isinstance(g, str) else nn.Sequential(*(model.get_submodule(n) for n in g))
            for g in model.stage_names]


def head_of(model):
    """... and what runs after the last stage."""
    from torch import nn
    return nn.Sequential(*model.head_modules())
