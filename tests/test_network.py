"""The routed network: equality with the backbone after cloning, gradients, FLOPs, optimizer cloning."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import rmn
from rmn import clone_optimizer
from rmn.attention import ConditionalAttention
from tests.conftest import toy_backbone
from rmn.route import is_routed, memory_banks, update_memories
from rmn.training import scale_procedure_gradients
from conftest import routed_net
from rmn.route import last_routes, routed_stages, set_auto_update


def small_backbones():
    """(name, builder, input) for every registered backbone at a small width, plus the toy CNN."""
    cases = [("toy", lambda: toy_backbone(), torch.randn(6, 3, 16, 16))]
    for name in rmn.list_backbones():
        size = 32
        cases.append((name, lambda name=name: rmn.create_backbone(name, 10, image_size=size, width_mult=0.25), torch.randn(6, 3, size, size)))
    return cases


CASES = small_backbones()
IDS = [c[0] for c in CASES]


def randomize_bn(model):
    """Non-trivial BN statistics so eval-mode equality is a real check."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def random_memories(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    for bank in memory_banks(net):
        if bank is not None:
            bank.set_memories(torch.randn(bank.memories.shape, generator=g))


@pytest.mark.parametrize("name,build,x", CASES, ids=IDS)
def test_eval_output_equals_backbone_after_cloning(name, build, x):
    torch.manual_seed(0)
    bb = build()
    randomize_bn(bb)
    bb.eval()
    expected = bb(x)
    net = routed_net(bb, num_procedures=4, attention=False).eval()
    random_memories(net)
    out = net(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert last_routes(net).shape == (len(bb.stage_names), x.shape[0])
    assert len(set(last_routes(net).flatten().tolist())) > 1  # the samples really went different ways


@pytest.mark.parametrize("name,build,x", CASES, ids=IDS)
def test_train_output_equals_backbone_when_all_take_one_route(name, build, x):
    torch.manual_seed(0)
    bb = build().train()
    net = routed_net(bb, num_procedures=3, attention=False).train()
    for bank in memory_banks(net):  # memory 2 at the origin-ish, others far away: everybody goes to 2
        m = torch.full(bank.memories.shape, 1e4)
        m[2] = 0
        bank.set_memories(m)
    torch.manual_seed(1)
    expected = bb(x)
    torch.manual_seed(1)
    out = net(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert (last_routes(net) == 2).all()


def test_gradients_only_reach_used_procedures_and_never_memories(toy):
    net = routed_net(toy, num_procedures=4, attention=True).train()
    for bank in memory_banks(net):
        m = torch.full(bank.memories.shape, 1e4)
        m[0], m[2] = 0, 0.0
        m[2, 0] = 1e-3  # 0 and 2 nearly tied at the origin: samples split between them
        bank.set_memories(m)
    x = torch.randn(8, 3, 16, 16)
    net(x).sum().backward()
    for i, stage in enumerate(routed_stages(net)):
        used = set(last_routes(net)[i].tolist())
        for j, proc in enumerate(stage.procedures):
            got = any(p.grad is not None and p.grad.abs().sum() > 0 for p in proc.parameters())
            assert got == (j in used), (i, j, used)
        assert stage.memory.memories.grad is None
        assert not stage.memory.memories.requires_grad


def test_scale_procedure_gradients_touches_only_routed_procedures(toy):
    net = routed_net(toy, num_procedures=3, attention=True, routed_stages=[1]).train()
    random_memories(net)
    net(torch.randn(16, 3, 16, 16)).sum().backward()
    before = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    scale_procedure_gradients(net, 2.5)
    for n, p in net.named_parameters():
        if n not in before:
            assert p.grad is None
            continue
        factor = 2.5 if n.startswith("stages.1.procedures.") else 1.0  # stem, unrouted stages, attention, head: 1
        torch.testing.assert_close(p.grad, factor * before[n], rtol=0, atol=0)
    assert any(n.startswith("stages.1.procedures.") for n in before)


def test_memories_move_only_in_training(toy):
    net = routed_net(toy, num_procedures=2)
    random_memories(net)
    before = [b.memories.clone() for b in memory_banks(net)]
    net.eval()(torch.randn(4, 3, 16, 16))
    assert all(torch.equal(a, b.memories) for a, b in zip(before, memory_banks(net)))
    net.train()(torch.randn(4, 3, 16, 16))
    assert all(not torch.equal(a, b.memories) for a, b in zip(before, memory_banks(net)))


def test_auto_update_off_defers_until_update_memories(toy):
    net = routed_net(toy, num_procedures=2)
    random_memories(net)
    set_auto_update(net, False)
    before = [b.memories.clone() for b in memory_banks(net)]
    net.train()(torch.randn(4, 3, 16, 16))
    assert all(torch.equal(a, b.memories) for a, b in zip(before, memory_banks(net)))
    update_memories(net)
    assert all(not torch.equal(a, b.memories) for a, b in zip(before, memory_banks(net)))


def macs(model, x):
    with FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() / 2


@pytest.mark.parametrize("name,build,x", CASES, ids=IDS)
def test_flops_of_routed_model_equal_backbone(name, build, x):
    bb = build().eval()
    base = macs(bb, x)
    for attention in (False, True):
        net = routed_net(bb, num_procedures=8, attention=attention).eval()
        random_memories(net)
        routed = macs(net, x)
        assert abs(routed - base) / base < 0.01, (attention, routed, base)


def test_n1_equals_backbone_in_train_and_eval(toy):
    net = routed_net(toy, num_procedures=1, attention=False)
    x = torch.randn(5, 3, 16, 16)
    for mode in (True, False):
        toy.train(mode), net.train(mode)
        torch.testing.assert_close(net(x), toy(x))


def test_subset_routing(toy):
    net = routed_net(toy, num_procedures=4, routed_stages=[1])
    assert [s.routed for s in routed_stages(net)] == [False, True, False]
    assert routed_stages(net)[0].procedures[0] is not toy.stages[0]  # a copy: the source model is never shared
    net.eval()(torch.randn(3, 3, 16, 16))
    assert (last_routes(net)[0] == -1).all() and (last_routes(net)[1] >= 0).all()
    with pytest.raises(ValueError, match="out of range"):
        routed_net(toy, num_procedures=4, routed_stages=[5])


def test_procedures_are_real_copies(toy):
    net = routed_net(toy, num_procedures=3)
    p = [list(proc.parameters())[0] for proc in routed_stages(net)[0].procedures]
    assert p[0] is not p[1] and p[0].data_ptr() != p[1].data_ptr()
    assert net.stem is not toy.stem and not set(map(id, net.parameters())) & set(map(id, toy.parameters()))
    n_stage = sum(q.numel() for s in toy.stages for q in s.parameters())
    n_net = sum(q.numel() for s in routed_stages(net) for proc in s.procedures for q in proc.parameters())
    assert n_net == 3 * n_stage


def test_stem_network_with_attention_then_clone_keeps_attention(toy):
    stem_net = routed_net(toy, num_procedures=4, attention=True, routed_stages=())
    assert not is_routed(stem_net)
    attn = [s.attention for s in routed_stages(stem_net)]
    assert all(a is not None and a.num_routes == 4 for a in attn)
    x = torch.randn(6, 3, 16, 16)
    # training: random routes -> output depends on the random draw; eval: uniform route code, deterministic
    stem_net.train()
    torch.manual_seed(0)
    a = stem_net(x)
    torch.manual_seed(1)
    b = stem_net(x)
    assert not torch.allclose(a, b)
    stem_net.eval()
    torch.testing.assert_close(stem_net(x), stem_net(x))
    code = attn[0].route_code(None, 2, "cpu", torch.float32)
    torch.testing.assert_close(code, torch.full((2, 4), 0.25))
    net = routed_net(stem_net, num_procedures=4)
    for kept, a in zip((s.attention for s in routed_stages(net)), attn):  # a copy of the trained attention
        assert kept is not a and all(torch.equal(p, q) for p, q in zip(kept.parameters(), a.parameters()))
    with pytest.raises(ValueError, match="routes"):
        routed_net(stem_net, num_procedures=8)


def test_se_attention_has_no_route_input(toy):
    net = routed_net(toy, num_procedures=1, attention="se", routed_stages=())
    assert all(s.attention.num_routes == 0 for s in routed_stages(net))
    net.train()
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(net(x), net(x))  # no random route input


@pytest.mark.parametrize("opt_name", ["sgd", "rmsprop", "adamw"])
def test_cloned_optimizer_step_equals_backbone_step(opt_name):
    torch.manual_seed(0)
    bb = toy_backbone().train()
    make = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-5),
        "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9, alpha=0.9, eps=1e-3),
        "adamw": lambda p: torch.optim.AdamW(p, lr=0.01),
    }[opt_name]
    opt = make(bb.parameters())
    x, y = torch.randn(8, 3, 16, 16), torch.randint(5, (8,))
    for _ in range(2):  # build up optimizer state
        opt.zero_grad()
        nn.functional.cross_entropy(bb(x), y).backward()
        opt.step()
    # an independent copy of the backbone and its optimizer to step as the reference
    ref = copy.deepcopy(bb)
    ref_opt = make(ref.parameters())
    ref_opt.load_state_dict(opt.state_dict())
    net = routed_net(bb, num_procedures=3, attention=False)
    new_opt = clone_optimizer(opt, bb, net)
    assert type(new_opt) is type(opt)
    for bank in memory_banks(net):  # all to procedure 1
        m = torch.full(bank.memories.shape, 1e4)
        m[1] = 0
        bank.set_memories(m)
    # one more step on each
    ref_opt.zero_grad()
    nn.functional.cross_entropy(ref(x), y).backward()
    ref_opt.step()
    new_opt.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    new_opt.step()
    for i, stage in enumerate(ref.stages):
        for j in range(3):
            for (n1, p1), (n2, p2) in zip(stage.named_parameters(), routed_stages(net)[i].procedures[j].named_parameters()):
                if j == 1:  # the procedure that ran: identical to the backbone's step
                    torch.testing.assert_close(p2, p1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(list(net.head.parameters())[0], list(ref.head.parameters())[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(list(net.stem.parameters())[0], list(ref.stem.parameters())[0], rtol=1e-5, atol=1e-6)
    if opt_name == "sgd":  # unused procedures still move with their cloned momentum (as a copy of the stem would)
        p_unused = list(routed_stages(net)[0].procedures[0].parameters())[0]
        assert p_unused in new_opt.state and "momentum_buffer" in new_opt.state[p_unused]


def test_bad_input_errors(toy):
    with pytest.raises(ValueError, match="num_procedures"):
        routed_net(toy, num_procedures=0)
    net = routed_net(toy, num_procedures=2)
    with pytest.raises(ValueError, match="channels"):
        net(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="too small"):
        net(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="attention"):
        routed_net(toy, attention="maybe")
    with pytest.raises(ValueError, match="declares no stage_names"):
        routed_net(nn.Linear(2, 2))


def test_users_own_cnn_with_example_input():
    class MyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3, padding=1)
            self.stages = nn.ModuleList([nn.Conv2d(4, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 2, 1)])
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

        def forward(self, x):
            x = self.stem(x)
            for stage in self.stages:
                x = stage(x)
            return self.head(x)

    x = torch.randn(4, 1, 16, 16)
    with pytest.raises(ValueError, match="declares no stage_names"):
        routed_net(MyNet())
    mine = MyNet()
    net = rmn.route(mine, ["stages.0", "stages.1"], num_procedures=3, example_input=x)  # channels from one probe
    assert [b.dim for b in memory_banks(net)] == [4, 8]
    assert net(x).shape == (4, 3)


def test_route_code_is_one_hot_and_its_kept_identity_serves_every_mode():
    """The identity CA keeps for its route codes is made once per device and dtype, also when first needed in
    inference mode, and then serves a training step with gradients (an inference tensor could not)."""
    attn = ConditionalAttention(16, 4)
    routes = torch.tensor([2, 0, 3, 3])
    with torch.inference_mode():
        code = attn.route_code(routes, 4, torch.device("cpu"), torch.float32)
    assert torch.equal(code, F.one_hot(routes, 4).float())
    assert not attn._identity("cpu", torch.float32).is_inference()
    y = torch.randn(4, 16, 3, 3, requires_grad=True)
    attn(y, routes).sum().backward()
    assert y.grad is not None and attn.up.weight.grad is not None
    assert torch.equal(attn.route_code(routes, 4, "cpu", torch.bfloat16), F.one_hot(routes, 4).bfloat16())
    assert len(attn._eyes) == 2  # float32 and bfloat16
    assert not any("eye" in k for k in attn.state_dict())  # not state: checkpoints are unchanged
