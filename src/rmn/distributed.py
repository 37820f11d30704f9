"""Tiny helpers around ``torch.distributed`` so single-process code never has to ask twice."""
from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum tensors in place across ranks in one collective (no-op on one process)."""
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t).to(t.dtype))
        offset += n


def all_gather_object(obj):
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` on one process."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def launched_by_torchrun() -> bool:
    """torchrun (and torch.distributed.launch) announce themselves through these variables."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def init_from_env(device: str = "auto") -> torch.device | None:
    """Join the process group torchrun set up: NCCL with one GPU per process, gloo on CPU.

    Returns this process's device, or None when not launched by torchrun (single process).
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) < 1:
        return None
    local = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        # The group is ours, so is its teardown: also for library users who never reach the CLI's.
        atexit.register(shutdown, clean=False)
    return torch.device("cuda", local) if use_cuda else torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown(clean: bool = True) -> None:
    """Leave the process group before the interpreter exits.

    A gloo group still alive at exit can abort the process in its destructor ("terminate called
    without an active exception") after all the work is done and saved. On a clean finish the
    ranks first meet at a barrier, so none tears down its connections while another still talks.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if clean and is_distributed():
            dist.barrier()
    finally:
        dist.destroy_process_group()


@torch.no_grad()
def average_batchnorm_statistics(model: torch.nn.Module) -> None:
    """Average BatchNorm running statistics over ranks (each rank saw only its own samples), so
    every rank evaluates and checkpoints the same model."""
    if not is_distributed():
        return
    stats = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    tensors = [t for m in stats for t in (m.running_mean, m.running_var)]
    if tensors:
        all_reduce_sum(*tensors)
        for t in tensors:
            t.div_(world_size())


def data_parallel(model: torch.nn.Module, device_ids=None) -> torch.nn.Module:
    """DistributedDataParallel set up for routed networks.

    * No buffer broadcast at each forward: the pending memory statistics are per-rank buffers that
      ``MemoryBank.update`` all-reduces; rank 0's copy must not overwrite the others'.
      (Parameters and buffers are still synchronised once, when DDP is built.)
    * ``find_unused_parameters`` when some stage is routed: a procedure that gets no sample on a
      rank has no gradient there; DDP then marks it ready and averages what the other ranks have.
      The cost is one extra pass over the autograd graph per step.
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    routed = any(getattr(m, "routed", False) for m in model.modules() if hasattr(m, "memory"))
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_forward_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=routed, **no_forward_sync)
