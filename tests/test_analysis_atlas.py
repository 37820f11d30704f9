import json

import pytest
import torch
from PIL import Image

from rmn.analysis.atlas import grid_size, memory_atlas, nearest_images
from rmn.analysis.calibrate import calibrate_memories
from rmn.route import memory_banks
from conftest import routed_net
from rmn.route import set_auto_update


def test_nearest_images_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(50, 7, generator=g)
    feats[10] = feats[3]  # an exact tie: the lower index must come first
    mems = torch.randn(4, 7, generator=g)
    mems[0] = feats[3]
    idx = nearest_images(feats, mems, 6)
    assert idx.shape == (4, 6) and idx.dtype == torch.long
    for j in range(4):
        d = [((feats[m].double() - mems[j].double()) ** 2).sum().item() for m in range(50)]
        brute = sorted(range(50), key=lambda m: (d[m], m))[:6]
        assert idx[j].tolist() == brute
    assert idx[0, :2].tolist() == [3, 10]
    assert nearest_images(feats[:3], mems, 8).shape == (4, 3)  # k capped at M
    with pytest.raises(ValueError):
        nearest_images(feats, torch.randn(4, 6), 2)


@pytest.fixture
def atlas_setup(toy):
    torch.manual_seed(1)
    net = routed_net(toy, num_procedures=3, attention=True).eval()
    images = torch.randn(24, 3, 16, 16)
    calibrate_memories(net, images, method="random", seed=0)
    display = torch.rand(24, 3, 16, 16)
    labels = torch.arange(24) % 5
    return net, images, display, labels


def _brute_force_nearest(net, images, k):
    """Per image, one at a time: GAP'd stage inputs along the path the image takes, then sort."""
    feats = [[] for _ in net.stages]
    with torch.no_grad():
        for img in images:
            h = net.stem(img[None])
            for i, stage in enumerate(net.stages):
                feats[i].append(h.mean((2, 3))[0].double())
                h = stage(h)
    out = {}
    for i, stage in enumerate(net.stages):
        f = torch.stack(feats[i])
        mem = stage.memory.memories.double()
        rows = []
        for j in range(mem.shape[0]):
            d = [float(((f[m] - mem[j]) ** 2).sum()) for m in range(f.shape[0])]
            rows.append(sorted(range(f.shape[0]), key=lambda m: (d[m], m))[:k])
        out[i] = rows
    return out


def _check_png(path, size):
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size == size
        lo_hi = im.convert("L").getextrema()
        assert lo_hi[0] < lo_hi[1]  # not a blank canvas


def test_atlas_picks_exactly_the_nearest_images_and_writes_figures(atlas_setup, tmp_path):
    net, images, display, labels = atlas_setup
    names = [f"class{c}" for c in range(5)]
    out = memory_atlas(net, images, display, labels, names, top_k=4, out_dir=tmp_path, batch_size=7)
    brute = _brute_force_nearest(net, images, 4)
    assert sorted(out["nearest"]) == [0, 1, 2]
    for i, idx in out["nearest"].items():
        assert idx.tolist() == brute[i]
    for i, path in out["grids"].items():
        _check_png(path, grid_size(3, 4))
    for i, path in out["heatmaps"].items():
        _check_png(path, (800, 600))
    _check_png(out["load"], (1000, 300))
    page = out["html"].read_text()
    for p in list(out["grids"].values()) + list(out["heatmaps"].values()) + [out["load"]]:
        assert f"src='{p.name}'" in page
    summary = json.loads(out["json"].read_text())
    assert [s["stage"] for s in summary["stages"]] == [0, 1, 2]
    for s in summary["stages"]:
        assert s["share_source"] == "eval routing"  # load was never counted (eval only)
        assert sum(s["eval_counts"]) == 24
        assert len(s["purity"]) == 3
    assert not net.training


def test_atlas_uses_training_load_and_works_without_labels(atlas_setup, tmp_path):
    net, images, display, _ = atlas_setup
    net.train()
    set_auto_update(net, False)
    net(images[:10])  # a training forward (gradients on) counts the load
    net.eval()
    out = memory_atlas(net, images, display[:, :1], None, None, top_k=2, out_dir=tmp_path)
    assert out["heatmaps"] == {}
    summary = json.loads(out["json"].read_text())
    for s, bank in zip(summary["stages"], memory_banks(net)):
        assert s["share_source"] == "training load"
        assert s["load"]["load"] == bank.load.tolist() and s["load"]["total"] == 10
    _check_png(out["grids"][0], grid_size(3, 2))


def test_atlas_refuses_unrouted_network(toy, tmp_path):
    net = routed_net(toy, num_procedures=2, routed_stages=())
    with pytest.raises(ValueError, match="routes no stage"):
        memory_atlas(net, torch.randn(4, 3, 16, 16), torch.rand(4, 3, 16, 16), out_dir=tmp_path)
