import pytest
import torch

from rmn import create_backbone
from rmn.analysis.cost import count_params, cost_table, format_table, macs_per_image, rows_to_csv, write_json
from rmn.analysis.calibrate import calibrate_memories
from rmn.analysis.features import stage_inputs
from rmn.route import memory_banks
from conftest import routed_net, stages_of
from rmn.route import last_routes


def _randomise(net):
    for bank in memory_banks(net):
        if bank is not None:
            bank.set_memories(torch.randn(bank.num_memories, bank.dim))


@pytest.mark.parametrize("name,size", [("resnet18", 32), ("resnet50", 32), ("vgg16", 32), ("efficientnet_b0", 32)])
def test_routed_macs_equal_backbone_within_1pct(name, size):
    torch.manual_seed(0)
    bb = create_backbone(name, 10, image_size=size, width_mult=0.25).eval()
    x = torch.randn(12, 3, size, size)
    base = macs_per_image(bb, inputs=x)
    for attention in (False, True):
        net = routed_net(bb, num_procedures=8, attention=attention).eval()
        calibrate_memories(net, x, method="random")  # samples spread over procedures: the executed path counts
        with torch.no_grad():
            net(x)
        assert last_routes(net)[0].unique().numel() > 1  # several procedures really ran
        routed = macs_per_image(net, inputs=x)
        assert abs(routed - base) / base < 0.01, (name, attention, routed, base)


def test_macs_per_image_is_per_image_and_restores_mode(toy):
    toy.train()
    a = macs_per_image(toy, (3, 16, 16), batch=1)
    b = macs_per_image(toy, (3, 16, 16), batch=4)
    assert a == pytest.approx(b) and a > 0
    assert toy.training


def test_cost_table_rows():
    rows = cost_table("resnet18", 100, image_size=32, width_mult=0.25, num_procedures=8, include_se=True)
    assert [r["variant"] for r in rows] == ["backbone", "se", "rmn", "rmn_se", "rmn_ca"]
    by = {r["variant"]: r for r in rows}
    bb = create_backbone("resnet18", 100, image_size=32, width_mult=0.25)
    stage_params = sum(count_params(s) for s in stages_of(bb))
    assert by["backbone"]["params"] == count_params(bb)
    # routed stages hold 8 copies; stem and head are shared
    assert by["rmn"]["params"] == count_params(bb) + 7 * stage_params
    assert by["rmn_ca"]["params"] > by["rmn_se"]["params"] > by["rmn"]["params"]
    assert by["se"]["params"] - by["backbone"]["params"] == by["rmn_se"]["params"] - by["rmn"]["params"]
    for r in rows:
        assert abs(r["macs"] - by["backbone"]["macs"]) / by["backbone"]["macs"] < 0.01
        assert r["params_M"] == round(r["params"] / 1e6, 2)
    text = format_table(rows)
    assert "RMN with CA (N=8)" in text and "Params (M)" in text and "MACs (G)" in text
    assert len({len(line) for line in text.splitlines()}) <= 2  # aligned
    csv = rows_to_csv(rows)
    assert csv.splitlines()[0].startswith("model,backbone,variant") and len(csv.splitlines()) == 6


def test_write_json(tmp_path):
    rows = [{"model": "x", "params": 1, "macs": 2.0}]
    p = write_json(rows, tmp_path / "a" / "t.json", meta={"k": 1})
    import json

    assert json.loads(p.read_text()) == {"meta": {"k": 1}, "rows": rows}


def test_stage_inputs_match_routing_features(toy):
    net = routed_net(toy, num_procedures=3, attention=True).eval()
    _randomise(net)
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        feats = stage_inputs(net, x)
        net(x)
    assert [f.shape[1] for f in feats] == toy.stage_channels
    for f, bank, r in zip(feats, memory_banks(net), last_routes(net)):
        d = torch.cdist(f.double(), bank.memories.double())
        assert torch.equal(d.argmin(1), r)
