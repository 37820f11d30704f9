"""What routed epochs measure (rmn.recipe.measures): per-procedure gradient norms and route flips between
evaluations, each on a hand-made case, and both in metrics.jsonl of a tiny routed run, where they agree with
the loads and with the routes kept in the checkpoints."""
from __future__ import annotations

import json
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

import rmn
from rmn.recipe.checkpoint import list_checkpoints, read_meta
from rmn.recipe.measures import (GradNormMeans, decode_routes, encode_routes, remember_routes, remembered_routes,
                                 route_flips)
from rmn.recipe.runner import run_steps
from rmn.training import procedure_grad_norms
from test_recipe import tiny_cfg


def test_procedure_grad_norms_per_routed_procedure():
    torch.manual_seed(0)
    seq = nn.Sequential(OrderedDict(a=nn.Conv2d(2, 2, 1), b=nn.Conv2d(2, 2, 1)))
    plain = rmn.route(seq, ["a", "b"], num_procedures=3, attention="none", clone=False)
    net = rmn.route(plain, ["b"])  # stage 0 stays unrouted: it is not measured
    procs = rmn.routed_stages(net)[1].procedures
    procs[0].weight.grad = torch.ones(2, 2, 1, 1)
    procs[0].bias.grad = torch.ones(2)  # |(1,1,1,1,1,1)| = sqrt(6)
    procs[1].weight.grad = torch.tensor([3.0, 4.0, 0.0, 0.0]).view(2, 2, 1, 1)  # bias without gradient: 5
    rmn.routed_stages(net)[0].procedures[0].weight.grad = torch.ones(2, 2, 1, 1)
    norms = procedure_grad_norms(net)
    assert list(norms) == [1]
    assert norms[1][:2].tolist() == pytest.approx([math.sqrt(6), 5.0])
    assert math.isnan(norms[1][2])  # procedure 2 received no sample: no gradient


def test_grad_norm_means_leave_out_idle_and_overflowed_steps():
    means = GradNormMeans()
    nan, inf = float("nan"), float("inf")
    means.add({1: torch.tensor([3.0, nan, inf, nan])})
    means.add({1: torch.tensor([5.0, nan, 1.0, 2.0])})
    means.add({1: torch.tensor([4.0, nan, 3.0, nan])})
    # (3+5+4)/3; never a gradient: 0; the fp16 overflow left out: (1+3)/2; one step with a gradient: 2
    assert means.row() == {"grad_norm_stage1": [4.0, 0.0, 2.0, 2.0]}
    assert GradNormMeans().row() == {}  # an unrouted epoch logs nothing


def test_route_flips_share_of_changed_samples_per_stage():
    previous = {0: torch.tensor([0, 1, 2, 3]), 1: torch.tensor([1, 1, 1]), 2: torch.tensor([0, 0])}
    current = {0: torch.tensor([0, 1, 3, 3]), 1: torch.tensor([0, 2, 1]), 3: torch.tensor([1, 1])}
    assert route_flips(previous, current) == {"route_flips_stage0": 0.25, "route_flips_stage1": pytest.approx(2 / 3)}
    assert route_flips({}, current) == {}  # a first evaluation: nothing to compare with
    assert route_flips({0: torch.tensor([0, 1])}, {0: torch.tensor([0, 1, 2])}) == {}  # not the same samples


def test_routes_round_trip_through_checkpoint_metadata():
    routes = {0: torch.tensor([0, 7, 3, 3, 1]), 2: torch.randint(0, 300, (1000,))}
    back = decode_routes(json.loads(json.dumps(encode_routes(routes))))
    assert back.keys() == routes.keys() and all(torch.equal(back[i], routes[i]) for i in routes)
    extra = {}
    assert remembered_routes(extra) == {}
    remember_routes(extra, routes)
    assert extra["eval_routes"]["world_size"] == 1
    assert all(torch.equal(remembered_routes(extra)[i], routes[i]) for i in routes)
    extra["eval_routes"]["world_size"] = 2  # resumed with another number of processes: other shards
    assert remembered_routes(extra) == {}


def test_a_routed_run_logs_both_and_they_agree_with_loads_and_routes(tmp_path):
    run_steps(tiny_cfg(tmp_path, **{"schedule.epochs": 3, "schedule.stem_epochs": 1}))  # N=3, every stage routed
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    stages = range(4)
    assert not [k for k in rows[0] if k.startswith(("grad_norm", "route_flips"))]  # the plain epoch: neither
    for r in rows[1:]:
        for i in stages:
            norms, loads = r[f"grad_norm_stage{i}"], r[f"load_stage{i}"]
            assert len(norms) == 3
            # a procedure has a gradient norm exactly when it received training samples this epoch
            assert [n > 0 for n in norms] == [s > 0 for s in loads], (r["epoch"], i)
    assert not [k for k in rows[1] if k.startswith("route_flips")]  # the first routed evaluation
    # epoch 3's flips are the share of evaluation samples whose routes differ from epoch 2's, as kept in
    # the two checkpoints
    metas = {m["epoch"]: m for m in map(read_meta, list_checkpoints(tmp_path / "checkpoints")) if m["phase"] == "routed"}
    before, after = (decode_routes(metas[e]["extra"]["eval_routes"]["ranks"][0]) for e in (2, 3))
    for i in stages:
        assert len(after[i]) == 360  # digits' evaluation split
        assert rows[2][f"route_flips_stage{i}"] == pytest.approx(float((before[i] != after[i]).double().mean()), abs=0)
    assert any(rows[2][f"route_flips_stage{i}"] > 0 for i in stages)  # routes do move in training
