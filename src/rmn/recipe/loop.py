"""The training loop every phase shares: :func:`train_step` (one optimizer step), :func:`train_epochs`
(epochs of steps, each ending with evaluation, a metrics row and a checkpoint) and :func:`evaluate`.

    for x, y in loader:
        loss, lr = train_step(run, x, y, tally)

One step: set the LR, run the micro-batches (gradients all-reduced on the last), update the memories
once over the whole batch, revive idle memories, drop the gradients of procedures that saw no sample,
tie the procedures' gradients while they untie (``optim.untie_epochs``), scale them, measure them
(:mod:`rmn.recipe.measures`), and let the (fp16) scaler take the optimizer step.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import distributed
from ..memory import load_stats
from ..route import is_routed, memory_banks, num_procedures, reset_load, routed_stages, set_auto_update, update_memories
from ..training import (drop_idle_gradients, procedure_grad_norms, reclone_procedure, scale_procedure_gradients,
                        tie_procedure_gradients)
from .logs import RunClock, Throughput, progress, progress_mode
from .measures import GradNormMeans, remember_routes, remembered_routes, route_flips
from .run import RecipeError, Run
from .schedule import Schedule, untied_at

HOST_CHECK_EVERY = 25  # on an accelerator, steps between host reads of the loss (divergence check, progress bar)


@dataclass
class Tally:
    """An epoch's running sums, kept on the device so a step never waits for the host."""
    loss_sum: torch.Tensor  # float64: sum over samples of the cross-entropy
    correct: torch.Tensor
    finite: torch.Tensor  # False once any loss was not finite
    revived: int = 0
    grad_norms: GradNormMeans = field(default_factory=GradNormMeans)  # per procedure, routed steps only

    @classmethod
    def zeros(cls, device: torch.device) -> "Tally":
        return cls(torch.zeros((), dtype=torch.float64, device=device), torch.zeros((), dtype=torch.long, device=device),
                   torch.ones((), dtype=torch.bool, device=device))

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss_sum += loss.detach().double() * y.shape[0]
        self.correct += (logits.argmax(1) == y).sum()
        self.finite &= torch.isfinite(loss.detach())


def schedule(run: Run) -> Schedule:
    return Schedule.of(run.cfg, len(run.loaders[0]))


def _host_every(run: Run) -> int:
    """Reading the loss on the host waits for the device: on CPU that costs nothing, on a GPU every few steps."""
    return 1 if run.device.type == "cpu" else HOST_CHECK_EVERY


def set_lr(run: Run) -> float:
    """The schedule's LR at ``run.step``, set on every parameter group."""
    lr = schedule(run).lr(run.step)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    return lr


def micro_batches(run: Run, x: torch.Tensor, y: torch.Tensor):
    """(x, y, sync context) pieces of ``data.micro_batch_size`` (split over the ranks); under DDP the
    gradients are all-reduced once, on the last piece."""
    micro = run.cfg.data.micro_batch_size
    size = max(1, micro // distributed.world_size()) if micro else x.shape[0]
    pieces = list(zip(x.split(size), y.split(size)))
    for k, (xm, ym) in enumerate(pieces):
        last = k == len(pieces) - 1
        yield xm, ym, run.ddp.no_sync() if run.ddp is not None and not last else contextlib.nullcontext()


def revive(run: Run, revivals: list) -> int:
    """Say each memory re-seeded by this step's update (re-cloning its procedure if asked); their number."""
    reclone = run.cfg.model.revive_reclone
    for stage_i, dead, donor in revivals:
        if reclone:
            reclone_procedure(run.model, stage_i, dead, donor, run.optimizer)
        run.say(f"[revive] step {run.step}: stage {stage_i} memory {dead} re-seeded from memory {donor}"
                + (" (procedure re-cloned)" if reclone else ""))
    return len(revivals)


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor, tally: Tally) -> tuple[torch.Tensor, float]:
    """One optimizer step on the batch ``(x, y)``, its sums added to ``tally``; returns the (last
    micro-batch's) loss and the LR used."""
    cfg, model, prec = run.cfg, run.model, run.precision
    x = prec.batch(x)
    lr = set_lr(run)
    run.optimizer.zero_grad(set_to_none=True)
    for xm, ym, sync in micro_batches(run, x, y):
        with sync:
            with prec.autocast():
                logits = run.train_model(xm)
                loss = F.cross_entropy(logits, ym, label_smoothing=cfg.optim.label_smoothing)
            run.scaler.scale(loss * (xm.shape[0] / x.shape[0])).backward()
        tally.add(loss, logits, ym)
    every = _host_every(run)
    if (run.step + 1) % every == 0 and not bool(tally.finite):
        raise RecipeError(f"training diverged {'at' if every == 1 else 'at or before'} step {run.step} (loss {float(loss.detach())}); lower optim.lr")
    rate = min(1.0, lr / cfg.optim.lr) if cfg.model.memory_follows_lr else 1.0
    tally.revived += revive(run, update_memories(model, rate))  # once per optimizer step, over the whole (global) batch
    drop_idle_gradients(model)
    if is_routed(model):
        if cfg.optim.untie_epochs > 0 or cfg.optim.untie_to < 1:
            spe = len(run.loaders[0])
            tie_procedure_gradients(model, untied_at(run.step, cfg.schedule.stem_epochs * spe,
                                                     round(cfg.optim.untie_epochs * spe), cfg.optim.untie_to))
        if cfg.optim.procedure_grad_scale != 1.0:
            scale_procedure_gradients(model, cfg.optim.procedure_grad_scale)
        run.scaler.unscale_(run.optimizer)  # fp16: what step() would do first (a no-op otherwise)
        tally.grad_norms.add(procedure_grad_norms(model))
    run.scaler.step(run.optimizer)  # fp16: unscales (unless done above), and skips the step if a gradient overflowed
    run.scaler.update()
    run.step += 1
    return loss.detach(), lr


def train_epochs(run: Run, end_epoch: int) -> None:
    """Train from ``run.epoch`` to ``end_epoch``: the same loop for every phase; routed stages update
    their memories once per optimizer step, over the whole (accumulated) batch."""
    every, mode = _host_every(run), progress_mode(run.cfg.run.progress)
    train_loader = run.loaders[0]
    set_auto_update(run.model, False)  # one memory update per optimizer step, in train_step
    clock = RunClock(run.step, schedule(run).total_steps)
    for epoch in range(run.epoch, end_epoch):
        run.model.train()
        reset_load(run.model)
        train_loader.set_epoch(epoch)
        meter, tally = Throughput(), Tally.zeros(run.device)
        bar = progress(train_loader, len(train_loader), f"{run.phase} {epoch + 1}/{run.total_epochs}", mode)
        for x, y in bar:
            loss, lr = train_step(run, x, y, tally)
            meter.add(x.shape[0])
            if run.step % every == 0:
                _after_step(run, bar if mode == "bar" else None, float(loss), lr, meter, clock)
        if not bool(tally.finite):
            raise RecipeError(f"training diverged in epoch {epoch + 1} (a non-finite loss by step {run.step}); lower optim.lr")
        run.epoch = epoch + 1
        _end_epoch(run, end_epoch, tally, meter, lr, clock)


def _end_epoch(run: Run, end_epoch: int, tally: Tally, meter: Throughput, lr: float, clock: RunClock) -> None:
    """The epoch's metrics row (global sums, evaluation when due, routing loads), its log lines and checkpoint."""
    cfg, model = run.cfg, run.model
    distributed.average_batchnorm_statistics(model)
    totals = torch.stack([tally.loss_sum, tally.correct.double(),
                          torch.tensor(float(meter.images), dtype=torch.float64, device=run.device)])
    distributed.all_reduce_sum(totals)
    images = max(float(totals[2]), 1.0)
    row = {"epoch": run.epoch, "phase": run.phase, "step": run.step, "lr": lr,
           "train_loss": float(totals[0]) / images, "train_acc": float(totals[1]) / images,
           "images_per_s": float(totals[2]) / max(meter.seconds, 1e-9), "epoch_seconds": meter.seconds}
    if run.epoch % cfg.run.eval_every == 0 or run.epoch == end_epoch:
        scores, routes = evaluate_routes(run)
        row.update(scores)
        if routes:  # against the previous evaluation's routes, then kept (in the checkpoint) for the next
            row.update(route_flips(remembered_routes(run.extra), routes))
            remember_routes(run.extra, routes)
    # every rank ends the epoch with the global loads (reset when the next epoch starts)
    distributed.all_reduce_sum(*[b.load for b in memory_banks(model) if b is not None])
    row.update(routing_row(model))
    row.update(tally.grad_norms.row())
    if cfg.model.revive_after:
        row["revived"] = tally.revived
    row["seq"] = run.seq + 1
    run.log.write(row)
    _log_routes(run)
    run.say(_epoch_line(row) + (f" | run ETA {clock.text(run.step)}" if run.epoch < run.total_epochs else ""))
    run.save(row.get("eval_top1"))


def _after_step(run: Run, bar, loss: float, lr: float, meter: Throughput, clock: RunClock) -> None:
    """Per-step reporting: TensorBoard's step loss, and the bar's loss, LR, speed and whole-run ETA."""
    run.log.step(run.step, loss, lr)
    if bar is not None:
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.3g}", img_s=f"{meter.rate:.0f}", run_eta=clock.text(run.step))


def _log_routes(run: Run) -> None:
    """The epoch's route histogram of every routed stage (global counts: called after their all-reduce)."""
    counts = {f"stage{i}": [int(c) for c in b.load.tolist()] for i, b in enumerate(memory_banks(run.model)) if b is not None}
    if counts:
        run.log.route_histograms(run.epoch, counts)


def routing_row(model: torch.nn.Module) -> dict:
    """Per-stage load shares and entropy of the epoch, and the number of dead procedures."""
    row, dead = {}, 0
    for i, bank in enumerate(memory_banks(model)):
        if bank is None:
            continue
        st = load_stats(bank.load)
        row[f"load_stage{i}"] = [round(s, 4) for s in st["share"]]
        row[f"entropy_stage{i}"] = st["entropy"]
        dead += st["dead"]
    if row:
        row["dead_procedures"] = dead
    return row


def _epoch_line(row: dict) -> str:
    parts = [f"[{row['phase']}] epoch {row['epoch']}", f"loss {row['train_loss']:.4f}", f"train {100 * row['train_acc']:.2f}%"]
    if "eval_top1" in row:
        parts.append(f"eval top-1 {100 * row['eval_top1']:.2f}% top-5 {100 * row['eval_top5']:.2f}%")
    parts.append(f"lr {row['lr']:.4g}")
    parts.append(f"{row['images_per_s']:.0f} img/s")
    if "dead_procedures" in row:
        parts.append(f"dead {row['dead_procedures']}")
    return " | ".join(parts)


def evaluate(run: Run, loader=None) -> dict:
    """Top-1/top-5 on the evaluation split, and how evaluation samples spread over the memories."""
    return evaluate_routes(run, loader)[0]


@torch.no_grad()
def evaluate_routes(run: Run, loader=None) -> tuple[dict, dict[int, torch.Tensor]]:
    """:func:`evaluate`'s scores, and the procedure each evaluation sample took in each routed stage
    (by stage index, in the loader's order; this rank's samples)."""
    model = run.model
    model.eval()
    loader = loader if loader is not None else run.loaders[1]
    n = torch.zeros(3, dtype=torch.float64, device=run.device)  # samples, top-1 hits, top-5 hits
    stages = routed_stages(model)
    n_procs = num_procedures(model)
    route_counts = torch.zeros(len(stages), n_procs, dtype=torch.long, device=run.device)
    routes = {i: [] for i, stage in enumerate(stages) if stage.routed}
    for x, y in loader:
        with run.precision.autocast():
            logits = model(run.precision.batch(x))
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        n += torch.stack([torch.tensor(float(x.shape[0]), device=run.device, dtype=torch.float64),
                          (top[:, 0] == y).sum().double(), (top == y[:, None]).any(1).sum().double()])
        for i, stage in enumerate(stages):
            if stage.last_routes is not None:
                route_counts[i] += torch.bincount(stage.last_routes, minlength=n_procs)
                if i in routes:
                    routes[i].append(stage.last_routes)
    # ranks may hold different numbers of evaluation batches: collectives only after the loop
    distributed.all_reduce_sum(n, route_counts)
    out = {"eval_top1": float(n[1] / n[0]), "eval_top5": float(n[2] / n[0])}
    if is_routed(model):
        for i, bank in enumerate(memory_banks(model)):
            if bank is not None:
                out[f"eval_load_stage{i}"] = [round(float(c), 4) for c in (route_counts[i].double() / route_counts[i].sum()).tolist()]
    empty = torch.zeros(0, dtype=torch.long, device=run.device)  # a rank without evaluation batches
    return out, {i: torch.cat(r) if r else empty for i, r in routes.items()}

