"""rmn.route on a model rmn did not build: a torchvision-layout ResNet-18 and an EfficientNet-style
``features`` Sequential whose stages are groups of its entries."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision_layout import ResNet18, randomize_batchnorm

import rmn
from rmn.features import collect_stage_features

LAYERS = ["layer1", "layer2", "layer3", "layer4"]


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    return randomize_batchnorm(ResNet18(num_classes=10, width=8)).eval()


def _images(n=16, size=64, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_routed_copy_keeps_names_outputs_and_leaves_the_original_alone(resnet):
    original = copy.deepcopy(resnet.state_dict())
    net = rmn.route(resnet, LAYERS, num_procedures=4, attention="none")
    assert type(net) is ResNet18 and net is not resnet
    keys = set(net.state_dict())
    assert {"conv1.weight", "fc.weight", "layer1.procedures.3.0.conv1.weight", "layer4.memory.memories"} <= keys
    assert not {id(p) for p in net.parameters()} & {id(p) for p in resnet.parameters()}
    x = _images()
    assert torch.equal(net(x), resnet(x))  # zero memories: every sample takes procedure 0, an exact copy
    assert [tuple(r.shape) for r in rmn.last_routes(net)] == [(16,)] * 4
    assert net.rmn_routing.stage_channels == [8, 8, 16, 32] and net.rmn_routing.out_channels == [8, 16, 32, 64]

    rmn.init_memories(net, [x])
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    before = {n: m.clone() for n, m in net.named_buffers() if n.endswith("memories")}
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), torch.arange(16) % 10).backward()
        opt.step()
    moved = [n for n, m in net.named_buffers() if n.endswith("memories") and not torch.equal(m, before[n])]
    assert moved, "a training forward with gradients on moves the memories"
    for k, v in resnet.state_dict().items():
        assert torch.equal(v, original[k]), k


def test_init_memories_over_a_dataloader_spreads_the_routes(resnet):
    net = rmn.route(resnet, LAYERS, num_procedures=4, attention="ca")
    data = torch.utils.data.TensorDataset(_images(64, seed=3), torch.zeros(64, dtype=torch.long))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    result = rmn.init_memories(net, loader, seed=0)
    assert sorted(result.cluster_sizes) == ["stage0", "stage1", "stage2", "stage3"]
    net.eval()
    with torch.no_grad():
        net(_images(64, seed=3))
    for stage, routes in zip(rmn.routed_stages(net), rmn.last_routes(net)):
        assert stage.memory is not None and len(routes.unique()) > 1


def test_no_grad_training_forward_moves_no_memory(resnet):
    net = rmn.route(resnet, LAYERS, num_procedures=4, attention="none")
    rmn.init_memories(net, [_images()])
    before = copy.deepcopy(net.state_dict())
    net.train()
    with torch.no_grad():
        net(_images())
    for stage in rmn.routed_stages(net):
        assert int(stage.memory.load.sum()) == 0
    for k in before:
        if k.endswith("memories"):
            assert torch.equal(before[k], net.state_dict()[k])


def test_step1_then_step2_clones_procedures_attention_and_optimizer_state(resnet):
    plain = rmn.route(resnet, LAYERS, num_procedures=4, attention="ca", clone=False)
    assert all(not s.routed and s.attention.num_routes == 4 for s in rmn.routed_stages(plain))
    plain.train()
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    nn.functional.cross_entropy(plain(_images()), torch.arange(16) % 10).backward()
    opt.step()
    net = rmn.route(plain, num_procedures=4)
    assert [s.num_procedures for s in rmn.routed_stages(net)] == [4, 4, 4, 4]
    new = rmn.clone_optimizer(opt, plain, net)
    params = dict(net.named_parameters())
    src = dict(plain.named_parameters())
    for j in range(4):
        p = params[f"layer2.procedures.{j}.0.conv1.weight"]
        assert torch.equal(p, src["layer2.procedures.0.0.conv1.weight"])
        assert torch.equal(new.state[p]["momentum_buffer"], opt.state[src["layer2.procedures.0.0.conv1.weight"]]["momentum_buffer"])
    assert torch.equal(new.state[params["layer2.attention.up.weight"]]["momentum_buffer"],
                       opt.state[src["layer2.attention.up.weight"]]["momentum_buffer"])
    late = rmn.route(plain, ["layer3", "layer4"], num_procedures=4)  # only the later stages routed
    assert [s.routed for s in rmn.routed_stages(late)] == [False, False, True, True]


def test_attention_inserted_into_a_trained_model_starts_near_identity(resnet):
    x = _images(32)
    ref = resnet(x)
    near = rmn.route(resnet, LAYERS, num_procedures=8, attention="ca")(x)
    fresh = rmn.route(resnet, LAYERS, num_procedures=8, attention="ca", attention_init="random")(x)
    err_near = ((near - ref).norm() / ref.norm()).item()
    err_fresh = ((fresh - ref).norm() / ref.norm()).item()
    assert err_near < 0.1 < err_fresh
    assert (near.argmax(1) == ref.argmax(1)).float().mean() >= 0.9


def test_features_of_the_routed_copy_are_the_plain_model_s(resnet):
    net = rmn.route(resnet, LAYERS, num_procedures=4, attention="none")
    x = _images()
    seen = []
    hooks = [resnet.get_submodule(n).register_forward_pre_hook(lambda m, a: seen.append(a[0].mean((2, 3))))
             for n in LAYERS]
    resnet(x)
    for h in hooks:
        h.remove()
    feats, _ = collect_stage_features(net, [x], path="stem")
    for mine, theirs in zip(feats, seen):
        torch.testing.assert_close(mine, theirs)


class EffNetLike(nn.Module):
    """EfficientNet's layout: ``features`` (a Sequential of blocks), ``avgpool``, ``classifier``."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU())
        self.features = nn.Sequential(block(3, 8, 2), block(8, 8, 1), block(8, 16, 2), block(16, 16, 1),
                                      block(16, 24, 2), block(24, 32, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 5))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def test_groups_of_consecutive_modules_form_one_stage():
    torch.manual_seed(0)
    model = randomize_batchnorm(EffNetLike()).eval()
    groups = [["features.1"], ["features.2", "features.3"], ["features.4", "features.5"]]
    net = rmn.route(model, groups, num_procedures=3, attention="none")
    assert isinstance(net.features[3], nn.Identity) and isinstance(net.features[2], rmn.RoutedStage)
    assert "features.2.procedures.2.1.0.weight" in net.state_dict()  # procedure = Sequential(features.2, features.3)
    assert net.rmn_routing.stage_channels == [8, 8, 16] and net.rmn_routing.out_channels == [8, 16, 32]
    assert net.rmn_routing.clone_sources["features.2.procedures.2.1.0.weight"] == "features.3.0.weight"
    x = _images(8)
    assert torch.equal(net(x), model(x))
    rmn.init_memories(net, [x])
    assert sum(len(r.unique()) for r in (collect_stage_features(net, [x], with_routes=True)[1])) > 3


@pytest.mark.parametrize("stages, message", [
    (["layer9"], "has no submodule 'layer9'"),
    ([["layer1", "layer3"]], "consecutive"),
    ([["layer1", "conv1"]], "consecutive"),
    (["layer2", "layer1"], "order"),
    (["layer1", "layer1"], "two stages"),
    (["fc"], "not a [B, C, H, W] feature map"),
    ("layer1", "non-empty list"),
])
def test_bad_stage_lists_get_one_line_errors(resnet, stages, message):
    with pytest.raises(ValueError, match=None) as err:
        rmn.route(resnet, stages)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_model_without_stage_names_needs_stages(resnet):
    with pytest.raises(ValueError, match="declares no stage_names"):
        rmn.route(resnet)


def test_the_readme_route_your_own_model_runs_as_written(monkeypatch):
    """README "Route your own model", executed with a stand-in torchvision (a torchvision-layout ResNet-18 at
    1/8 width; the real one cannot be imported here): the routed copy trains, its memories move, and the
    model it was made from is untouched."""
    import sys
    import types
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Route your own model"):]
    code = section[section.index("```python") + 9:section.index("```\n", section.index("```python") + 9)]
    made = []

    def resnet18(weights=None, num_classes=1000):
        made.append(randomize_batchnorm(ResNet18(num_classes, width=64 // 8)))
        return made[-1]
    tv = types.ModuleType("torchvision")
    tv.models = types.SimpleNamespace(resnet18=resnet18)
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    code = code.replace("torch.nn.Linear(512, 10)", "torch.nn.Linear(64, 10)")  # the 1/8-width stand-in
    x = _images(64, seed=5)
    y = torch.arange(64) % 10
    data = torch.utils.data.TensorDataset(x, y)
    ns = {"loader": torch.utils.data.DataLoader(data, batch_size=32, shuffle=True),
          "feature_loader": torch.utils.data.DataLoader(data, batch_size=32)}
    torch.manual_seed(0)
    code_head, code_loop = code.split("opt = torch.optim.SGD")
    exec(compile(code_head, "README.md", "exec"), ns)
    original = copy.deepcopy(made[0].state_dict())
    before = [s.memory.memories.clone() for s in rmn.routed_stages(ns["net"])]
    exec(compile("opt = torch.optim.SGD" + code_loop, "README.md", "exec"), ns)
    after = [s.memory.memories for s in rmn.routed_stages(ns["net"])]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.equal(v, original[k]) for k, v in made[0].state_dict().items())
    assert sum(len(r.unique()) > 1 for r in rmn.last_routes(ns["net"])) >= 2
