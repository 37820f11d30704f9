"""Two real processes (gloo on 127.0.0.1): synchronised memories, DDP with conditional procedures,
synchronised BatchNorm, and 2 ranks x batch B equal to 1 process x batch 2B."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from rmn import init_memories
from rmn.distributed import data_parallel
from rmn.syncbn import GlobalBatchNorm2d, convert_sync_batchnorm
from tests.conftest import toy_backbone
from rmn.features import stage_inputs
from rmn.route import memory_banks, update_memories
from rmn.training import drop_idle_gradients
from conftest import routed_net
from rmn.route import set_auto_update

STEPS, B = 3, 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_setup():
    """Same network, memories and data in every process; sample 0 alone is routed to procedure 2."""
    torch.manual_seed(0)
    net = routed_net(toy_backbone(), num_procedures=3, attention=True)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(2 * B, 3, 16, 16, generator=g), torch.randint(5, (2 * B,), generator=g)) for _ in range(STEPS)]
    net.eval()
    feats = stage_inputs(net, data[0][0], "stem")
    for bank, f in zip(memory_banks(net), feats):
        m = torch.stack([f[1:].mean(0), f[1:].mean(0) + 0.05 * f[1:].std(0), f[0]])
        bank.set_memories(m)
    net.train()
    set_auto_update(net, False)
    return net, data


def train_steps(net, model, data, shard):
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    out = []
    for x, y in data:
        x, y = x[shard], y[shard]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        counts = [b.pending_count.clone() for b in memory_banks(net)]
        update_memories(net)
        drop_idle_gradients(net)
        opt.step()
        out.append({"loss": loss.detach(), "counts": counts, "memories": [b.memories.clone() for b in memory_banks(net)]})
    out.append({"state": {k: v.clone() for k, v in net.state_dict().items()}})
    return out


def init_on_shard(rank, world):
    """rmn.init_memories on this process's half of the data (a fresh clone, as recipe step 3 sees it)."""
    torch.manual_seed(0)
    stem = routed_net(toy_backbone(), num_procedures=3, attention=True, routed_stages=())
    net = routed_net(stem, num_procedures=3)
    x = torch.randn(40, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    done = init_memories(net, list(x[rank::world].split(8)), iters=20)
    return {"memories": [b.memories.clone() for b in memory_banks(net)], "sizes": done.cluster_sizes}


def worker(rank, world, port, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        net, data = make_setup()
        convert_sync_batchnorm(net)
        ddp = data_parallel(net, device_ids=None)
        shard = slice(rank * B, (rank + 1) * B)
        result = train_steps(net, ddp, data, shard)
        result[-1]["init"] = init_on_shard(rank, world)
        torch.save(result, Path(outdir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(worker, args=(2, free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_memories_identical_across_ranks_after_every_step(two_rank_results):
    r0, r1 = two_rank_results
    one_rank_only = False
    for s in range(STEPS):
        for m0, m1 in zip(r0[s]["memories"], r1[s]["memories"]):
            assert torch.equal(m0, m1)  # bit-identical
        # before the update's all-reduce, the pending counts are each rank's own
        for c0, c1 in zip(r0[s]["counts"], r1[s]["counts"]):
            one_rank_only |= bool(((c0 > 0) & (c1 == 0)).any() or ((c1 > 0) & (c0 == 0)).any())
    assert one_rank_only, "the setup must route some procedure's samples to one rank only"


def test_init_memories_gives_every_process_the_same_memories(two_rank_results):
    """Each process passes its own shard; k-means all-reduces, so the memories agree bit for bit and
    the cluster sizes count both processes' samples."""
    i0, i1 = (r[-1]["init"] for r in two_rank_results)
    assert i0["sizes"] == i1["sizes"] and all(sum(s) == 40 for s in i0["sizes"].values())
    for a, b in zip(i0["memories"], i1["memories"]):
        assert torch.equal(a, b)


def test_two_ranks_equal_one_process_with_double_batch(two_rank_results):
    net, data = make_setup()
    convert_sync_batchnorm(net)  # falls back to plain BatchNorm in a single process
    ref = train_steps(net, net, data, slice(0, 2 * B))
    for s in range(STEPS):
        mean_loss = (two_rank_results[0][s]["loss"] + two_rank_results[1][s]["loss"]) / 2
        torch.testing.assert_close(mean_loss, ref[s]["loss"], rtol=1e-5, atol=1e-6)
        for m_dist, m_ref in zip(two_rank_results[0][s]["memories"], ref[s]["memories"]):
            torch.testing.assert_close(m_dist, m_ref, rtol=1e-5, atol=1e-6)
    for r in range(2):
        state = two_rank_results[r][-1]["state"]
        for k, v in ref[-1]["state"].items():
            if v.is_floating_point():
                torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_global_batchnorm_is_batchnorm_in_one_process():
    bn = torch.nn.BatchNorm2d(4)
    g = GlobalBatchNorm2d(4)
    g.load_state_dict(bn.state_dict())
    x = torch.randn(5, 4, 3, 3)
    torch.testing.assert_close(g(x), bn(x))
    torch.testing.assert_close(g.running_var, bn.running_var)


REPO = Path(__file__).resolve().parents[1]


def torchrun(args, out, port, extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "rmn", *args, "--output", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


CFG = ["--model.width_mult", "0.125", "--model.num_procedures", "2", "--data.image_size", "16", "--data.batch_size", "128",
       "--schedule.epochs", "3", "--schedule.stem_epochs", "1", "--optim.lr", "0.05", "--run.progress", "lines",
       "--run.tensorboard", "false", "--run.threads", "1", "--run.mode", "rmn"]


def test_torchrun_two_processes_resume_equals_uninterrupted(tmp_path):
    """`torchrun -m rmn`: a 2-process run stopped after stem training and resumed ends with the same
    weights and memories as an uninterrupted 2-process run."""
    full, split = tmp_path / "full", tmp_path / "split"
    torchrun(["run", "configs/demo.yaml", *CFG], full, free_port())
    torchrun(["train-stem", "configs/demo.yaml", *CFG], split, free_port())
    torchrun(["run", "configs/demo.yaml", *CFG, "--resume"], split, free_port())
    from rmn.recipe import latest_checkpoint

    a, b = latest_checkpoint(full / "checkpoints"), latest_checkpoint(split / "checkpoints")
    assert a.meta["phase"] == b.meta["phase"] == "routed" and a.meta["epoch"] == b.meta["epoch"] == 3
    for k, v in a.model_state.items():
        assert torch.equal(v, b.model_state[k]), k
    import json

    s = json.loads((full / "summary.json").read_text())
    assert s["eval_top1"] == json.loads((split / "summary.json").read_text())["eval_top1"]


def test_the_cli_leaves_the_process_group_it_joined(tmp_path, monkeypatch):
    """A gloo group still alive at interpreter exit can abort a finished rank ("terminate called without an
    active exception"); the command must destroy it before returning, on success and on error."""
    from rmn.cli import main

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    try:
        args = ["train-stem", str(REPO / "configs/demo.yaml"), *CFG, "--run.device", "cpu", "--schedule.stem_epochs", "1",
                "--data.batch_size", "512", "--output", str(tmp_path / "run")]
        assert main(args) == 0
        assert not dist.is_initialized()
        assert main([*args, "--optim.lr", "-1"]) == 2  # a config error after the group was joined
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
