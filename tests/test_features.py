"""The one intermediate-feature pass (rmn.features): every consumer sees the same features."""
import functools
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from rmn import init_memories, kmeans
from rmn.analysis import collect_stage_features
from rmn.features import resolve_path, stage_inputs, walk_stages
from rmn.memory import nearest
from tests.conftest import toy_backbone
from rmn.route import memory_banks
from conftest import routed_net
from rmn.route import last_routes


def fresh_clone(attention=True, num_procedures=3):
    """Step 1 network, then step 2: every procedure a copy, memories not set yet."""
    torch.manual_seed(0)
    stem = routed_net(toy_backbone(), num_procedures=num_procedures, attention=attention, routed_stages=())
    return stem, routed_net(stem, num_procedures=num_procedures)


def stem_reference(stem, x):
    """Each stage's GAP'd input as the trained plain network computes it, read by forward pre-hooks on
    its own forward in eval mode: what recipe step 3 must cluster, written without rmn's feature code."""
    feats = []
    hooks = [s.register_forward_pre_hook(lambda m, inp: feats.append(inp[0].mean(dim=(2, 3)))) for s in stem.stages]
    try:
        with torch.no_grad():
            stem.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return feats


def test_public_features_of_a_fresh_clone_are_the_stem_features_step_3_clusters():
    """On a freshly cloned network with Conditional Attention the public helper, the recipe's pass and
    the plain network's own forward agree in every stage (they once differed from stage 1 on)."""
    stem, net = fresh_clone(attention=True)
    x = torch.randn(10, 3, 16, 16)
    want = stem_reference(stem, x)
    public, _ = collect_stage_features(net, x, batch_size=4)
    recipe = stage_inputs(net.eval(), x, "stem")
    assert len(public) == len(recipe) == len(want) == 3
    for i, (w, p, r) in enumerate(zip(want, public, recipe)):
        assert torch.allclose(p, w, atol=1e-6), f"public helper, stage {i}"
        assert torch.allclose(r, w, atol=1e-6), f"recipe pass, stage {i}"


def test_the_paths_of_the_pass():
    """'stem' is the plain network, 'routed' the network's own forward, 'cloned' procedure 0 with the
    memories' routes; 'auto' is 'stem' until a memory is set; a plain backbone runs as it is."""
    stem, net = fresh_clone(attention=True)
    net.eval()
    x = torch.randn(12, 3, 16, 16)
    with torch.no_grad():
        assert resolve_path(net) == "stem"
        for a, b in zip(stage_inputs(net, x, "auto"), stem_reference(stem, x)):
            assert torch.allclose(a, b, atol=1e-6)
        init_memories(net, [x])
        assert resolve_path(net) == "routed"
        items = list(walk_stages(net, x, "routed"))
        net(x)
        for item, r in zip(items, last_routes(net)):
            assert torch.equal(item.routes, r)
        for f, item in zip(stage_inputs(net, x), items):
            assert torch.equal(f, item.feature)
        for item in walk_stages(net, x, "cloned"):
            assert torch.equal(item.routes, nearest(item.feature, item.stage.memory.memories))
        plain = [f for f in stage_inputs(toy_backbone(), x)]
        assert [f.shape[1] for f in plain] == [8, 16, 32]
    with pytest.raises(ValueError, match="feature path"):
        stage_inputs(net, x, "sideways")


def loaders(n=48, batch=16, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, size, size, generator=g), torch.randint(5, (n,), generator=g)
    return x, y, DataLoader(TensorDataset(x, y), batch_size=batch)


def test_init_memories_over_any_iterable_of_batches_is_step_3():
    """A DataLoader, a list of tensors and a list of (x, y) pairs set the same memories: the k-means
    centres (the recipe's settings) of the plain network's stage inputs; samples then spread."""
    x, y, loader = loaders()
    stem, _ = fresh_clone()
    want = stem_reference(stem, x)
    results = []
    for batches in (loader, list(x.split(16)), list(zip(x.split(16), y.split(16)))):
        net = routed_net(stem, num_procedures=3)
        done = init_memories(net, batches, iters=20, seed=1)
        results.append(([b.memories.clone() for b in memory_banks(net)], done.cluster_sizes))
        assert set(done.seconds) == {"features", "kmeans"}
    for memories, sizes in results[1:]:
        assert sizes == results[0][1]
        for a, b in zip(memories, results[0][0]):
            assert torch.equal(a, b)
    for i, (f, mem) in enumerate(zip(want, results[0][0])):
        res = kmeans(f, 3, max_iter=20, seed=1)
        torch.testing.assert_close(mem, res.centers, rtol=1e-5, atol=1e-6)
        assert results[0][1][f"stage{i}"] == res.counts.tolist()
    with torch.no_grad():
        net.eval()(x)
    assert all(r.unique().numel() > 1 for r in last_routes(net))


def test_init_memories_caps_the_samples_and_refuses_what_it_cannot_do():
    x, _, loader = loaders()
    stem, net = fresh_clone()
    done = init_memories(net, loader, max_samples=20)
    assert all(sum(s) == 20 for s in done.cluster_sizes.values())
    with pytest.raises(ValueError, match="no routed stage"):
        init_memories(stem, loader)
    with pytest.raises(ValueError, match="no batches"):
        init_memories(net, [])
    with pytest.raises(TypeError, match="image tensor"):
        init_memories(net, [{"x": x}])


README = Path(__file__).resolve().parents[1] / "README.md"


def python_api_snippet() -> str:
    text = README.read_text()
    section = text[text.index("## The Python API"):]
    return section[section.index("```python") + len("```python"):section.index("```\n", section.index("```python") + 9)]


def test_the_readme_python_api_runs_as_written(monkeypatch):
    """The README's snippet, executed: a plain loop trains the plain network, clones it, sets the memories
    with rmn.init_memories over a DataLoader (samples then reach several procedures) and trains routed
    (a training step moves the memories). The ResNet-18 is built at 1/8 width to keep the test fast."""
    import rmn

    monkeypatch.setattr(rmn, "create_backbone", functools.partial(rmn.create_backbone, width_mult=0.125))
    code = python_api_snippet()
    head, tail = code.split("train(net, opt, loader)")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(10, (64,), generator=g)
    torch.manual_seed(0)
    ns = {"loader": DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True),
          "feature_loader": DataLoader(TensorDataset(x, y), batch_size=32)}
    exec(compile(head, "README.md", "exec"), ns)
    net = ns["net"]
    assert sorted(ns["sizes"]) == ["stage0", "stage1", "stage2", "stage3"]
    assert all(sum(s) == 64 for s in ns["sizes"].values())
    before = [b.memories.clone() for b in memory_banks(net)]
    with torch.no_grad():
        net.eval()(x)
    assert all(r.unique().numel() > 1 for r in last_routes(net))
    exec(compile("train(net, opt, loader)" + tail, "README.md", "exec"), ns)
    assert all(not torch.equal(a, b.memories) for a, b in zip(before, memory_banks(net)))

