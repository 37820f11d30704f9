"""Memory heads: nearest lookup, the moving-average formula, loads, accumulation."""
import pytest
import torch

from rmn.memory import MemoryBank, nearest, stage_feature


def brute_nearest(f, m):
    return torch.stack([((m - f[b]) ** 2).sum(1).argmin() for b in range(f.shape[0])])


def test_nearest_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        f, m = torch.randn(64, 16, generator=g), torch.randn(7, 16, generator=g)
        assert torch.equal(nearest(f, m), brute_nearest(f, m))


def test_nearest_rounds_as_the_two_step_distance():
    """nearest's one-op ``sq - 2 f.m`` picks exactly what the written-out formula picks, ties included, at
    every scale and at the ResNet and EfficientNet stage widths (routes of earlier runs must not change)."""
    g = torch.Generator().manual_seed(1)
    for b, c, n in [(1, 64, 8), (256, 512, 8), (1024, 1280, 16), (33, 3, 2)]:
        for scale in (1e-3, 1.0, 1e3):
            f, m = scale * torch.randn(b, c, generator=g), scale * torch.randn(n, c, generator=g)
            m[n - 1] = m[0]  # an exact tie: the lower index wins in both
            reference = (m.pow(2).sum(1).unsqueeze(0) - 2.0 * (f @ m.t())).argmin(dim=1)
            assert torch.equal(nearest(f, m), reference)


def test_ema_update_matches_formula_and_leaves_others_untouched():
    bank = MemoryBank(4, 3, momentum=0.9)
    mem = torch.tensor([[0.0, 0, 0], [10, 10, 10], [-10, 0, 0], [0, 50, 0]])
    bank.set_memories(mem)
    feats = torch.tensor([[1.0, 0, 0], [0, 1, 0], [9, 9, 9], [11, 11, 12.0]])
    bank.train()
    routes = bank.route(feats)
    assert routes.tolist() == [0, 0, 1, 1]
    bank.update()
    expect0 = 0.9 * mem[0] + 0.1 * feats[:2].mean(0)
    expect1 = 0.9 * mem[1] + 0.1 * feats[2:].mean(0)
    torch.testing.assert_close(bank.memories[0], expect0, rtol=0, atol=1e-6)
    torch.testing.assert_close(bank.memories[1], expect1, rtol=0, atol=1e-6)
    assert torch.equal(bank.memories[2:], mem[2:])  # bit-identical
    assert bank.load.tolist() == [2, 2, 0, 0]
    # statistics were consumed: another update changes nothing
    before = bank.memories.clone()
    bank.update()
    assert torch.equal(bank.memories, before)


@pytest.mark.parametrize("rule", ["ema", "count_ema"])
def test_update_rate_scales_the_step(rule):
    """rate r moves like momentum 1 - (1 - alpha) r (rule for rule); r = 1 is the paper's update, bit for bit,
    and r = 0 leaves fresh memories where they are."""
    g = torch.Generator().manual_seed(0)
    mem, feats = torch.randn(4, 3, generator=g), torch.randn(32, 3, generator=g)

    def after(momentum, **kw):
        bank = MemoryBank(4, 3, momentum=momentum, rule=rule)
        bank.set_memories(mem)
        bank.train()
        bank.route(feats)
        bank.update(**kw)
        return bank.memories.clone()

    assert torch.equal(after(0.9, rate=1.0), after(0.9))
    assert torch.equal(after(0.9, rate=0.0), mem)
    torch.testing.assert_close(after(0.9, rate=0.25), after(1 - 0.1 * 0.25), rtol=0, atol=1e-6)
    assert not torch.allclose(after(0.9, rate=0.25), after(0.9))
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\]"):
        after(0.9, rate=1.5)


def test_eval_mode_changes_nothing():
    bank = MemoryBank(3, 5)
    bank.set_memories(torch.randn(3, 5))
    before = bank.memories.clone()
    bank.eval()
    bank.route(torch.randn(10, 5))
    bank.update()
    assert torch.equal(bank.memories, before)
    assert bank.load.sum() == 0


def test_accumulated_micro_batches_equal_one_batch():
    g = torch.Generator().manual_seed(3)
    mem = torch.randn(8, 6, generator=g)
    feats = torch.randn(256, 6, generator=g)
    one, four = MemoryBank(8, 6), MemoryBank(8, 6)
    for b in (one, four):
        b.set_memories(mem)
    one.route(feats)
    one.update()
    for chunk in feats.split(64):
        four.route(chunk)
    four.update()
    torch.testing.assert_close(one.memories, four.memories, rtol=0, atol=1e-6)
    assert torch.equal(one.load, four.load)


def test_memories_are_buffers_without_gradient():
    bank = MemoryBank(2, 3)
    assert list(bank.parameters()) == []
    assert "memories" in bank.state_dict() and "load" in bank.state_dict()
    assert "pending_sum" not in bank.state_dict()
    f = torch.randn(4, 3, requires_grad=True)
    r = bank.route(f)
    assert not r.requires_grad and not bank.memories.requires_grad


@pytest.mark.parametrize("kw,msg", [({"num_memories": 0, "dim": 3}, "num_memories"), ({"num_memories": 2, "dim": 3, "momentum": 1.5}, "momentum")])
def test_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        MemoryBank(**kw)


def test_set_memories_shape_error():
    with pytest.raises(ValueError, match="shape"):
        MemoryBank(2, 3).set_memories(torch.zeros(3, 3))


def test_stage_feature_of_float32_is_the_float32_mean_whatever_the_layout():
    x = torch.randn(5, 6, 7, 3) * 3 + 1
    for t in (x, x.contiguous(memory_format=torch.channels_last)):
        assert torch.equal(stage_feature(t), torch.mean(t, dim=(2, 3), dtype=torch.float32))
    assert stage_feature(x.bfloat16()).dtype == torch.float32


def test_cached_squared_norms_follow_every_change_of_the_memories():
    """The routes of a bank with cached ||m||^2 equal the uncached reference after every way the
    memories change: in-place updates, loads, reassignment, a copy."""
    torch.manual_seed(0)
    bank = MemoryBank(8, 16, momentum=0.5).train()
    f = torch.randn(64, 16)

    def check(b):
        assert torch.equal(b.route(f), nearest(f, b.memories.clone()))

    bank.set_memories(torch.randn(8, 16))
    check(bank)
    with torch.enable_grad():
        bank.route(f * 3)  # records statistics; update() moves the memories in place
    bank.update()
    check(bank)
    bank.memories.mul_(-1)
    check(bank)
    bank.load_state_dict({**bank.state_dict(), "memories": torch.randn(8, 16)})
    check(bank)
    bank.memories = torch.randn(8, 16)
    check(bank)
    copy = __import__("copy").deepcopy(bank)
    copy.memories.add_(5)
    check(copy)
    check(bank)
    with torch.inference_mode():  # tensors made here have no version counter: no cache, same routes
        fresh = MemoryBank(8, 16).eval()
        fresh.set_memories(torch.randn(8, 16))
        assert torch.equal(fresh.route(f), nearest(f, fresh.memories))
