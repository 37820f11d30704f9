"""Statistics-matched cloning (rmn.bn_match) against a plain reference on random inputs."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rmn.bn_match import match_batchnorm
from rmn.kmeans import kmeans
from rmn.memory import nearest
from tests.conftest import toy_backbone
from rmn.features import stage_inputs
from rmn.route import memory_banks
from conftest import routed_net
from rmn.route import last_routes, routed_stages


def routed_toy(seed=0, n=3, attention=False, routed_stages=None):
    torch.manual_seed(seed)
    backbone = toy_backbone()
    for m in backbone.modules():  # a trained-looking network: non-trivial running statistics and affine terms
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    return routed_net(backbone, num_procedures=n, attention=attention, routed_stages=routed_stages)


def init_memories(net, x):
    net.eval()
    with torch.no_grad():
        feats = stage_inputs(net, x, "stem")
    for bank, f in zip(memory_banks(net), feats):
        bank.set_memories(kmeans(f, bank.num_memories, seed=0).centers)


def test_first_layer_against_a_plain_reference():
    """Stage 0's first BatchNorm of every procedure, against its input computed plainly (training-mode stem)."""
    net = routed_toy()
    x = torch.randn(96, 3, 16, 16) + torch.linspace(-1, 1, 96).view(-1, 1, 1, 1)
    stage = routed_stages(net)[0]
    with torch.no_grad():  # memories on the training-mode stage-0 inputs, so that every cluster is used
        stage.memory.set_memories(kmeans(copy.deepcopy(net).train().stem(x).mean(dim=(2, 3)), 3, seed=0).centers)
    old = [(bn.weight.clone().double(), bn.bias.clone().double(), bn.eps) for bn in (p[0][1] for p in stage.procedures)]
    state = copy.deepcopy(net.state_dict())
    reference = copy.deepcopy(net).train()
    firsts, routes = [], []
    with torch.no_grad():
        for chunk in x.split(32):
            h = reference.stem(chunk)  # training mode: each chunk normalised over itself
            routes.append(torch.cdist(h.mean(dim=(2, 3)), stage.memory.memories).argmin(1))
            firsts.append(stage.procedures[0][0][0](h))
    first, route = torch.cat(firsts), torch.cat(routes)
    net.train()
    matched = match_batchnorm(net, x.split(32))
    assert net.training
    assert 0 < matched <= sum(isinstance(m, nn.BatchNorm2d) for s in routed_stages(net) for m in s.procedures.modules())
    every = first.transpose(0, 1).flatten(1).double()
    used = sorted(set(route.tolist()))
    assert len(used) >= 2
    for j in used:
        sel = first[route == j].transpose(0, 1).flatten(1).double()
        gamma, beta, eps = old[j]
        sigma = (every.var(1) + eps).sqrt()
        bn = stage.procedures[j][0][1]
        torch.testing.assert_close(bn.running_mean.double(), sel.mean(1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), sel.var(1), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(bn.weight.double(), gamma * (sel.var(1) + eps).sqrt() / sigma, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(bn.bias.double(), beta + gamma * (sel.mean(1) - every.mean(1)) / sigma, rtol=1e-4, atol=1e-5)
    # the pass ran on a copy: nothing but the procedures' BatchNorm changed (no running statistic of the stem)
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, state[k])}
    assert changed and all(".procedures." in k and k.rsplit(".", 1)[1] in ("weight", "bias", "running_mean", "running_var")
                           for k in changed)


@pytest.mark.parametrize("attention", [False, "ca"])
def test_training_mode_output_follows_the_plain_network(attention):
    """The plain network in training mode on X against its clone in training mode on X: without matching the
    procedures normalise over their clusters and the output moves; matched, it stays (up to n/(n-1)).
    With Conditional Attention the plain network is the recipe's stem network (CA without its route)."""

    torch.manual_seed(1)
    x = torch.randn(384, 3, 16, 16) * torch.linspace(0.3, 3, 384).view(-1, 1, 1, 1) + torch.linspace(-2, 2, 384).view(-1, 1, 1, 1)
    # the plain network: one procedure per stage, no routing (with CA: the step-1 network, CA for 3 routes)
    plain = routed_toy(seed=1, n=3, attention=attention, routed_stages=())
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0  # running statistics := those of the batch below (as after training on it)
    plain.train()
    with torch.no_grad():
        plain(x)
        want = copy.deepcopy(plain)(x)  # training mode, statistics of the whole batch

    def clone(match: bool):
        net = routed_net(copy.deepcopy(plain), num_procedures=3, attention=attention)
        init_memories(net, x)
        if match:
            assert match_batchnorm(net, [x]) > 0
        net.train()
        with torch.no_grad():
            out = net(x)
        assert all(len(set(r.tolist())) == 3 for r in last_routes(net))  # every procedure got its cluster
        return out, net

    def plain_with_routes(net):
        """CA changes the function at cloning by design (its route input goes from random to the memory's);
        the target is then the plain network fed those routes, normalising over the whole batch."""
        ref = copy.deepcopy(plain).train()
        routes = []
        with torch.no_grad():
            h = ref.stem(x)
            for stage, routed in zip(ref.stages, routed_stages(net)):
                routes.append(nearest(h.mean(dim=(2, 3)), routed.memory.memories))
                h = stage.attention(stage.procedures[0](h), routes[-1])
            return ref.head(h), torch.stack(routes)

    (out0, net0), (out1, net1) = clone(False), clone(True)
    if attention:
        want, routes = plain_with_routes(net0)
        # a sample at a cluster boundary may take another route in the clone, and CA then gives it another
        # code: compare the samples routed alike in every stage (most of them)
        keep = (last_routes(net1) == routes).all(0)
        assert keep.float().mean() > 0.9
        out0, out1, want = out0[keep], out1[keep], want[keep]
    unmatched = (out0 - want).norm() / want.norm()
    matched = (out1 - want).norm() / want.norm()
    assert unmatched > 0.05, unmatched
    assert matched < 0.02 * unmatched, (matched, unmatched)


def test_nothing_routed_nothing_matched_and_an_empty_cluster_is_left_alone():
    net = routed_toy(n=2)
    x = torch.randn(16, 3, 16, 16)
    for bank in memory_banks(net):  # memory 1 far away: procedure 1 of every stage gets nothing
        m = torch.zeros(bank.memories.shape)
        m[1] = 1e6
        bank.set_memories(m)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    matched = match_batchnorm(net, [x])
    per_procedure = sum(isinstance(m, nn.BatchNorm2d) for m in routed_stages(net)[0].procedures[0].modules())
    assert matched == per_procedure * len(routed_stages(net))  # procedure 0 of each stage only
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".procedures.0." in k for k in changed)
    stem_network = routed_net(toy_backbone(), num_procedures=2, attention=False, routed_stages=())
    assert match_batchnorm(stem_network, [x]) == 0  # step 1's network: no procedures to match
