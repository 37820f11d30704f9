"""Memory-update variants beyond the paper: count-weighted EMA, multi-step statistics, revival."""
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rmn.memory import MemoryBank
from tests.conftest import toy_backbone
from tests.test_distributed import free_port
from rmn.training import reclone_procedure
from conftest import routed_net


def bank_with(mem, **kw):
    b = MemoryBank(mem.shape[0], mem.shape[1], **kw)
    b.set_memories(mem)
    return b


def test_count_ema_matches_formula():
    mem = torch.tensor([[0.0, 0.0], [10.0, 10.0], [-50.0, 0.0]])
    b = bank_with(mem, momentum=0.9, rule="count_ema", smoothing=2.0)
    f1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]])
    b.route(f1)
    b.update()
    a, lam = 0.9, 2.0
    c = (1 - a) * torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    s = (1 - a) * torch.stack([f1[:2].sum(0), f1[2], torch.zeros(2)]).double()
    expect = (s + lam * mem.double()) / (c + lam)[:, None]
    torch.testing.assert_close(b.memories, expect.float(), rtol=0, atol=1e-6)
    assert torch.equal(b.memories[2], mem[2])  # no samples: stays exactly where it was
    # a second step: the EMAs continue from their state
    prev = b.memories.double().clone()
    f2 = torch.tensor([[0.5, 0.5]])
    b.route(f2)
    b.update()
    c = a * c + (1 - a) * torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    s = a * s + (1 - a) * torch.stack([f2[0], torch.zeros(2), torch.zeros(2)]).double()
    torch.testing.assert_close(b.memories, ((s + lam * prev) / (c + lam)[:, None]).float(), rtol=0, atol=1e-6)


def test_accumulated_steps_make_one_update():
    g = torch.Generator().manual_seed(0)
    mem = torch.randn(4, 3, generator=g)
    feats = [torch.randn(16, 3, generator=g) for _ in range(3)]
    k3 = bank_with(mem, accumulate_steps=3)
    for f in feats[:2]:
        k3.route(f)
        k3.update()
        assert torch.equal(k3.memories, mem)  # nothing moves before the third step
    k3.route(feats[2])
    k3.update()
    one = bank_with(mem)
    one.route(torch.cat(feats))  # same memories during the 3 steps, so the same routes
    one.update()
    torch.testing.assert_close(k3.memories, one.memories, rtol=0, atol=1e-6)
    assert "acc_sum" in k3.state_dict()  # saved, so a resume mid-way continues exactly


def test_revival_triggers_exactly_at_the_threshold():
    mem = torch.tensor([[0.0, 0.0], [1.0, 1.0], [100.0, 100.0]])
    b = bank_with(mem, revive_after=3, split_scale=0.5)
    g = torch.Generator().manual_seed(0)
    for step in range(1, 4):
        f = torch.randn(32, 2, generator=g) * 0.1  # all near memory 0: memories 1? some, 2 never
        f[:4] += 1.0
        b.route(f)
        counts = b.pending_count.clone()
        sums, sq = b.pending_sum.clone(), b.pending_sqsum.clone()
        events = b.update()
        if step < 3:
            assert events == [] and int(b.idle_steps[2]) == step
    assert events == [(2, 0)]
    mu = sums[0] / counts[0]
    sigma = (sq[0] / counts[0] - mu * mu).clamp_min(0).sqrt()
    after_ema_donor = mu  # the donor is re-seeded from its step statistics
    torch.testing.assert_close(b.memories[2].double(), after_ema_donor + 0.5 * sigma, rtol=0, atol=1e-5)
    torch.testing.assert_close(b.memories[0].double(), after_ema_donor - 0.5 * sigma, rtol=0, atol=1e-5)
    assert int(b.idle_steps[2]) == 0


def test_revival_threshold_on_load_share():
    b = bank_with(torch.tensor([[0.0], [10.0]]), revive_after=1, revive_threshold=0.2)
    b.route(torch.tensor([[0.1], [0.2], [0.3], [0.4], [0.5], [9.0]]))  # memory 1 gets 1/6 < 0.2
    assert b.update() == [(1, 0)]


def test_reclone_procedure_copies_weights_and_optimizer_state():
    net = routed_net(toy_backbone(), num_procedures=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net.train()(torch.randn(4, 3, 16, 16)).sum().backward()
    opt.step()
    reclone_procedure(net, 0, 2, 0, opt)
    for p2, p0 in zip(net.stages[0].procedures[2].parameters(), net.stages[0].procedures[0].parameters()):
        assert torch.equal(p2, p0) and p2 is not p0
        assert p2.grad is None
        if p0 in opt.state:
            assert torch.equal(opt.state[p2]["momentum_buffer"], opt.state[p0]["momentum_buffer"])
            assert opt.state[p2]["momentum_buffer"] is not opt.state[p0]["momentum_buffer"]


def _revival_worker(rank, world, port, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = bank_with(torch.tensor([[0.0, 0.0], [3.0, 3.0], [100.0, 100.0]]), revive_after=2, rule="count_ema")
        g = torch.Generator().manual_seed(10 + rank)  # each rank sees different samples
        log = []
        for _ in range(4):
            f = torch.randn(8, 2, generator=g) + (3.0 if rank == 1 else 0.0)
            b.route(f)
            log.append((b.update(), b.memories.clone()))
        torch.save(log, Path(outdir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_revival_is_synchronised_across_processes(tmp_path):
    mp.start_processes(_revival_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert any(events for events, _ in a)  # memory 2 starves on both ranks and is revived
    for (ea, ma), (eb, mb) in zip(a, b):
        assert ea == eb
        assert torch.equal(ma, mb)


@pytest.mark.parametrize("kw,msg", [({"rule": "vq"}, "rule"), ({"accumulate_steps": 0}, "accumulate_steps"),
                                    ({"smoothing": 0}, "smoothing"), ({"revive_threshold": 1.0}, "revive")])
def test_bad_variant_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        MemoryBank(2, 2, **kw)
