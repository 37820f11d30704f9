"""rmn's backbones under torchvision's module names: torchvision state dicts load with strict=True.

The reference layouts (tests/torchvision_layout.py) are written for the tests, independently of rmn's
backbone code, from the module names and forwards in torchvision's own source (torchvision/models/
resnet.py, vgg.py, efficientnet.py and ops/misc.py: ``Conv2dNormActivation`` is an ``nn.Sequential``
of conv, BN and activation; ``SqueezeExcitation`` holds ``avgpool fc1 fc2 activation
scale_activation``). Where torchvision itself is importable, the same checks also run against it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import rmn
from rmn import clone_optimizer

from torchvision_layout import ResNet18, ResNet50, efficientnet_b0, randomize_batchnorm, vgg16_bn

NAMES = ["resnet18", "resnet50", "vgg16", "efficientnet_b0"]


TEST_LAYOUTS = {"resnet18": ResNet18, "resnet50": ResNet50, "vgg16": vgg16_bn, "efficientnet_b0": efficientnet_b0}


def layout(model: nn.Module) -> list[tuple[str, tuple]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# torchvision state dicts load as they are


@pytest.mark.parametrize("name", NAMES)
def test_key_names_and_shapes_equal_torchvision_layout(name):
    with torch.device("meta"):  # layouts only: no memory, no initialisation cost
        ours = rmn.create_backbone(name, num_classes=1000, image_size=224)
        ref = TEST_LAYOUTS[name]()
    assert layout(ours) == layout(ref)  # same names, same shapes, same order


def test_vgg_features_indexed_as_torchvision():
    with torch.device("meta"):
        ours = rmn.create_backbone("vgg16", num_classes=1000, image_size=224)
        tiny = rmn.create_backbone("vgg16", num_classes=10, image_size=64)
        ref = vgg16_bn()
    assert [type(m) for m in ours.features] == [type(m) for m in ref.features]
    pools = [i for i, m in enumerate(ours.features) if isinstance(m, nn.MaxPool2d)]
    assert pools == [6, 13, 23, 33, 43]
    assert [i for i, m in enumerate(tiny.features) if isinstance(m, nn.Identity)] == [6, 13]


@pytest.mark.parametrize("name, make", [("resnet18", ResNet18), ("efficientnet_b0", efficientnet_b0)])
def test_state_dict_loads_strictly_with_bit_identical_outputs(name, make):
    torch.manual_seed(0)
    ref = randomize_batchnorm(make()).eval()
    ours = rmn.create_backbone(name, num_classes=1000, image_size=224)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


def test_torchvision_itself():
    tv = pytest.importorskip("torchvision")
    builders = {"resnet18": tv.models.resnet18, "resnet50": tv.models.resnet50, "vgg16": tv.models.vgg16_bn,
                "efficientnet_b0": tv.models.efficientnet_b0}
    for name, build in builders.items():
        with torch.device("meta"):
            assert layout(rmn.create_backbone(name, num_classes=1000)) == layout(build()), name
    for name in ("resnet18", "efficientnet_b0"):
        torch.manual_seed(0)
        ref = randomize_batchnorm(builders[name]()).eval()
        ours = rmn.create_backbone(name, num_classes=1000)
        ours.load_state_dict(ref.state_dict(), strict=True)
        x = torch.randn(2, 3, 224, 224)
        with torch.no_grad():
            assert torch.equal(ours.eval()(x), ref(x)), name


# ---------------------------------------------------------------------------------------------
# routed stages by name; rmn 0.1's checkpoint names


def test_stage_names():
    with torch.device("meta"):
        r18, vgg, eff = (rmn.create_backbone(n, num_classes=10, image_size=224) for n in ("resnet18", "vgg16", "efficientnet_b0"))
    assert r18.stage_names == ["layer1", "layer2", "layer3", "layer4"]
    assert eff.stage_names == [["features.1"], ["features.2"], ["features.3"], ["features.4", "features.5"],
                               ["features.6", "features.7", "features.8"]]
    assert vgg.stage_names == [[f"features.{k}" for k in range(a, b)] for a, b in ((6, 13), (13, 23), (23, 33), (33, 43))]
    assert (r18.classifier_name, vgg.classifier_name, eff.classifier_name) == ("fc", "classifier.6", "classifier.1")


@pytest.mark.parametrize("name", NAMES)
def test_every_module_is_reachable_once(name):
    model = rmn.create_backbone(name, num_classes=10, image_size=32, width_mult=0.125)
    names = [n for n, _ in model.named_modules(remove_duplicate=False)]
    assert len(names) == len(list(model.named_modules()))  # no module reachable twice


# rmn 0.1 checkpoints named the routed network's tensors stem.* / stages.i.* / head.*
LEGACY_RUN = Path(__file__).resolve().parent / "data" / "rmn-0.1-run"


def test_a_run_written_by_rmn_0_1_still_evaluates_to_its_summary(tmp_path):
    """tests/data/rmn-0.1-run: a digits run (ResNet-18 at width 1/32, N=2, CA, two epochs) written by rmn
    at 524e1a3, before the backbones kept torchvision's names. Its checkpoint loads under the new names and
    evaluates to exactly the accuracy the run reported."""
    from rmn.recipe.evaluate import evaluate_checkpoint

    run = tmp_path / "run"
    shutil.copytree(LEGACY_RUN, run)
    summary = json.loads((run / "summary.json").read_text())
    result = evaluate_checkpoint(run, device="cpu")
    assert (result["eval_top1"], result["eval_top5"]) == (summary["eval_top1"], summary["eval_top5"])


def test_only_the_0_1_layout_is_renamed():
    from rmn.recipe.checkpoint import legacy_renamed

    net = rmn.route(rmn.create_backbone("resnet18", num_classes=10, image_size=32, width_mult=0.125), None, 2, "none")
    state = net.state_dict()
    assert legacy_renamed(state, net) is None  # today's names: nothing to do
    assert legacy_renamed({"stem.0.weight": state["conv1.weight"]}, net) is None  # not the whole model: no guess


def test_clone_optimizer_from_a_named_backbone_copies_every_state():
    torch.manual_seed(0)
    bb = rmn.create_backbone("resnet18", num_classes=5, image_size=16, in_channels=1, width_mult=0.125).train()
    opt = torch.optim.SGD(bb.parameters(), lr=0.1, momentum=0.9)
    nn.functional.cross_entropy(bb(torch.randn(8, 1, 16, 16)), torch.randint(5, (8,))).backward()
    opt.step()
    net = rmn.route(bb, None, 2, attention=False)
    new = clone_optimizer(opt, bb, net)
    source = dict(bb.named_parameters())
    sources = net.rmn_routing.clone_sources
    for name, p in net.named_parameters():
        want = opt.state[source[sources.get(name, name)]]["momentum_buffer"]
        assert torch.equal(new.state[p]["momentum_buffer"], want), name


# ---------------------------------------------------------------------------------------------
# the registry takes any builder returning an nn.Module


@pytest.fixture
def registered():
    from rmn.backbones import registry

    names = []
    yield lambda name: (names.append(name), rmn.register_backbone(name))[1]
    for name in names:
        registry._REGISTRY.pop(name, None)


def test_registry_takes_kwargs_builders_of_any_module(registered):
    seen = {}

    @registered("kw_net")
    def kw_net(pretrained=False, **kwargs):  # timm's @register_model style
        seen.update(kwargs)
        return nn.Sequential(nn.Flatten(1), nn.LazyLinear(kwargs["num_classes"]))

    model = rmn.create_backbone("kw_net", num_classes=4, image_size=8, extra=1)
    assert seen == {"num_classes": 4, "image_size": 8, "in_channels": 3, "width_mult": 1.0, "extra": 1}
    assert model.info.name == "kw_net" and model(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_registry_passes_only_the_options_a_builder_names(registered):
    registered("plain_net")(lambda num_classes: nn.Linear(3, num_classes))
    assert rmn.create_backbone("plain_net", num_classes=6).out_features == 6
    with pytest.raises(ValueError, match="unknown option 'depth' for backbone 'plain_net'; valid options: \\(none\\)"):
        rmn.create_backbone("plain_net", num_classes=6, depth=3)


def test_registry_refuses_a_builder_returning_no_module(registered):
    registered("not_a_net")(lambda **kw: "oops")
    with pytest.raises(TypeError, match=r"^builder for 'not_a_net' returned str, not an nn.Module$"):
        rmn.create_backbone("not_a_net", num_classes=2)


# ---------------------------------------------------------------------------------------------
# rmn.backbones.load_weights: strict, one line naming the file


def test_load_weights_reports_mismatches_in_one_line(tmp_path):
    from rmn.backbones import WeightsError, load_weights, read_state_dict

    torch.manual_seed(0)
    model = rmn.create_backbone("resnet18", num_classes=10, image_size=32, width_mult=0.125)
    sd = ResNet18(width=8, num_classes=10, small=True).state_dict()
    path = tmp_path / "w.pth"
    torch.save({"model": sd}, path)
    load_weights(model, read_state_dict(path), source=str(path))
    assert torch.equal(model.layer2[0].downsample[0].weight, sd["layer2.0.downsample.0.weight"])

    broken = dict(sd, **{"head.weight": sd["fc.weight"]})
    del broken["layer1.0.conv1.weight"]
    with pytest.raises(WeightsError, match=r"w\.pth: .*1 missing \(layer1\.0\.conv1\.weight\); 1 unexpected \(head\.weight\)"):
        load_weights(model, broken, source=str(path))
    wide = ResNet18(width=16, num_classes=10, small=True).state_dict()
    with pytest.raises(WeightsError, match=r"of another shape .*first: conv1\.weight is \(16, 3, 7, 7\)"):
        load_weights(model, wide, source=str(path))
    other = ResNet18(width=8, num_classes=1000, small=True).state_dict()
    with pytest.raises(WeightsError, match=r"another number of classes \(fc\.weight is \(1000, 64\), the model's \(10, 64\)\); "
                                           r"set skip_classifier=True"):
        load_weights(model, other, source=str(path))
    fc = model.fc.weight.clone()
    load_weights(model, other, skip_classifier=True)
    assert torch.equal(model.fc.weight, fc) and torch.equal(model.conv1.weight, other["conv1.weight"])

    for content, why in ((b"not a pickle", "unreadable as a state dict"), ([1, 2], "holds a list"), ({}, "empty state dict"),
                         ({"a": 1}, "entry 'a' is not a named tensor")):
        bad = tmp_path / "bad.pt"
        bad.write_bytes(content) if isinstance(content, bytes) else torch.save(content, bad)
        with pytest.raises(WeightsError, match=why) as err:
            read_state_dict(bad)
        assert "\n" not in str(err.value) and str(bad) in str(err.value)
    with pytest.raises(WeightsError, match=r"not a state-dict file \(expected \.pth"):
        read_state_dict(tmp_path / "w.npz")


def test_a_state_dict_saved_from_a_wrapped_model_loads_into_the_bare_one(tmp_path):
    """DistributedDataParallel adds ``module.`` and torch.compile ``_orig_mod.`` to every name."""
    from rmn.backbones import load_weights, read_state_dict

    torch.manual_seed(0)
    sd = ResNet18(width=8, num_classes=10, small=True).state_dict()
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        path = tmp_path / "wrapped.pth"
        torch.save({"state_dict": {prefix + k: v for k, v in sd.items()}}, path)
        read = read_state_dict(path)
        assert list(read) == list(sd)
        model = rmn.create_backbone("resnet18", num_classes=10, image_size=32, width_mult=0.125)
        load_weights(model, read, source=str(path))
        assert torch.equal(model.conv1.weight, sd["conv1.weight"])
    partly = {("module." + k if i else k): v for i, (k, v) in enumerate(sd.items())}  # not a wrapper's: left alone
    torch.save(partly, tmp_path / "partly.pth")
    assert list(read_state_dict(tmp_path / "partly.pth")) == list(partly)
