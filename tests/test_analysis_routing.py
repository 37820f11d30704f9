import math

import pytest
import torch

from rmn.analysis.routing import (class_memory_counts, load_stats, mean_purity, network_load_stats, purity,
                                  route_stats, routing_report)
from rmn.route import memory_banks
from conftest import routed_net
from rmn.route import last_routes, routed_stages


def test_load_stats_balanced():
    st = load_stats(torch.tensor([5, 5, 5, 5]))
    assert st["share"] == [0.25] * 4
    assert st["entropy"] == pytest.approx(1.0)
    assert st["dead"] == 0
    assert st["max_over_mean"] == pytest.approx(1.0)
    assert st["max_over_min"] == pytest.approx(1.0)
    assert st["total"] == 20


def test_load_stats_skewed_and_dead():
    st = load_stats(torch.tensor([6, 2, 0, 0]))
    assert sum(st["share"]) == pytest.approx(1.0)
    assert st["share"] == pytest.approx([0.75, 0.25, 0.0, 0.0])
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert st["entropy"] == pytest.approx(h / math.log(4))
    assert st["dead"] == 2
    assert st["max_over_mean"] == pytest.approx(6 / 2)
    assert st["max_over_min"] is None


def test_load_stats_all_on_one_and_empty():
    st = load_stats(torch.tensor([0, 9, 0]))
    assert st["entropy"] == 0.0 and st["dead"] == 2 and st["max_over_mean"] == pytest.approx(3.0)
    empty = load_stats(torch.zeros(5, dtype=torch.long))
    assert empty["share"] == [0.0] * 5 and empty["entropy"] == 0.0 and empty["dead"] == 5
    assert empty["max_over_mean"] == 0.0
    assert load_stats(torch.tensor([3]))["entropy"] == 1.0
    with pytest.raises(ValueError):
        load_stats(torch.tensor([1, -1]))


def test_class_memory_counts_and_purity():
    routes = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    labels = torch.tensor([1, 1, 0, 2, 2, 0, 1, 2, 0])
    counts = class_memory_counts(routes, labels, num_memories=4, num_classes=3)
    expected = torch.tensor([[1, 0, 2, 0], [2, 0, 1, 0], [0, 2, 1, 0]])
    assert torch.equal(counts, expected)
    p = purity(counts)
    assert p[:3].tolist() == pytest.approx([2 / 3, 1.0, 2 / 4])
    assert math.isnan(p[3].item())  # memory 3 got nothing
    assert mean_purity(counts) == pytest.approx((2 + 2 + 2) / 9)
    with pytest.raises(ValueError):
        class_memory_counts(torch.tensor([4]), torch.tensor([0]), 4, 3)
    with pytest.raises(ValueError):
        class_memory_counts(torch.tensor([0, 1]), torch.tensor([0]), 4, 3)


def test_route_stats_and_report_skip_unrouted_rows():
    routes = torch.tensor([[-1, -1, -1, -1], [0, 1, 1, 1], [2, 2, 2, 2]])
    labels = torch.tensor([0, 1, 1, 0])
    stats = route_stats(routes, 3)
    assert stats[0] is None
    assert stats[1]["load"] == [1, 3, 0] and stats[1]["dead"] == 1
    assert stats[2]["entropy"] == 0.0
    rep = routing_report(routes, labels, 3, 2)
    assert rep[0] is None
    assert rep[1]["counts"] == [[1, 1, 0], [0, 2, 0]]
    assert rep[1]["purity"][0] == 1.0 and rep[1]["purity"][1] == pytest.approx(2 / 3)
    assert rep[2]["mean_purity"] == pytest.approx(0.5)


def test_network_load_stats(toy):
    net = routed_net(toy, num_procedures=4, attention=False, routed_stages=[0, 2])
    for bank in memory_banks(net):
        if bank is not None:
            bank.set_memories(torch.randn(bank.num_memories, bank.dim))
    net.train()
    net(torch.randn(6, 3, 16, 16))
    stats = network_load_stats(net)
    assert stats[1] is None
    for i in (0, 2):
        assert stats[i]["total"] == 6
        assert stats[i]["load"] == routed_stages(net)[i].memory.load.tolist()
        assert stats[i]["load"] == torch.bincount(last_routes(net)[i], minlength=4).tolist()
