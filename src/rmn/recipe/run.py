"""The :class:`Run`: one training run's config, data, model, optimizer and position, opened fresh or
resumed from its newest readable checkpoint, saved after every epoch and step; and the checks that
refuse a run before it trains (an output folder one cannot write, a config that would change a resumed
run, a ``run.start_from`` that is not this config's plain network).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..backbones.weights import STATE_DICT_SUFFIXES, WeightsError, read_state_dict
from ..pooled_bn import check_single_process
from ..precision import FLOAT32, Precision, compile_parts
from ..route import routed_stages
from ..syncbn import convert_sync_batchnorm
from . import build
from .checkpoint import (Checkpoint, CheckpointError, checkpoint_config, describe_skipped, is_plain_safetensors,
                         latest_checkpoint, load_checkpoint, newest_checkpoint, restore_rng, save_checkpoint, set_aside)
from .config import Config, ConfigError, ScheduleConfig
from .logs import RunLog, tensorboard_writer
from .schedule import Schedule


class RecipeError(RuntimeError):
    """A step asked of a run that is not ready for it; the message says what to do."""


@dataclass
class Run:
    cfg: Config
    out: Path
    device: torch.device
    data: build.Data
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    phase: str
    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimizer steps
    seq: int = 0  # number of the last checkpoint written
    extra: dict[str, Any] = field(default_factory=dict)
    loaders: tuple = ()
    log: RunLog | None = None
    ddp: torch.nn.Module | None = None  # DistributedDataParallel around ``model`` under torchrun
    precision: Precision = FLOAT32  # run.amp / run.channels_last on this device (set by _ready)
    scaler: torch.amp.GradScaler | None = None  # fp16's gradient scaler (disabled otherwise)

    def wrap(self) -> None:
        """(Re)build the training wrapper around ``model``: SyncBN if asked, DDP when distributed
        (see :func:`rmn.distributed.data_parallel` for how routing and DDP are reconciled)."""
        if self.cfg.run.sync_bn:
            convert_sync_batchnorm(self.model)
        if not distributed.is_distributed():
            self.ddp = None
            return
        self.ddp = distributed.data_parallel(self.model, [self.device.index] if self.device.type == "cuda" else None)

    @property
    def train_model(self) -> torch.nn.Module:
        return self.ddp if self.ddp is not None else self.model

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    def open(cls, cfg: Config, resume: bool = True, baseline: bool | None = None) -> "Run":
        """A run in ``cfg.output_dir()``: resumed from its newest readable checkpoint, or started fresh.

        Resuming says which checkpoint it continues from and which newer files it skipped (moved to
        ``checkpoints/unreadable/``); when no checkpoint file reads, it stops and changes nothing."""
        out = cfg.output_dir()
        local = build.resolve_device(cfg.run.device)  # a device this machine lacks is refused first
        if cfg.run.tensorboard:
            tensorboard_writer()  # a missing extra is said before anything is written
        # Under torchrun: join the process group (gloo on CPU, NCCL with one GPU per process).
        device = distributed.init_from_env(cfg.run.device) or local
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        try:
            Precision(cfg.run.amp, cfg.run.channels_last, device.type).check_training(torch.get_num_threads())
        except ValueError as e:
            raise RecipeError(str(e)) from None
        if cfg.model.procedure_batchnorm == "pooled":
            try:
                check_single_process()
            except ValueError as e:
                raise ConfigError(f"model.{e}") from None
        _check_output(out)
        ckpt, skipped = newest_checkpoint(out / "checkpoints", device)
        _check_found(out, ckpt, skipped, resume)
        initial = None  # a state-dict file's tensors, loaded into the fresh backbone below
        if ckpt is None and cfg.run.start_from:
            initial = _start_weights(cfg)
            if initial is None:
                is_baseline = baseline if baseline is not None else cfg.run.mode == "baseline"
                return cls._started_from(cfg, out, device, _plain_checkpoint(cfg, device), "baseline" if is_baseline else "stem")
        old_schedule = None
        if ckpt is not None:
            saved = checkpoint_config(ckpt)
            _check_resume(saved, cfg, ckpt)
            old_schedule = saved.schedule
            saved.run, saved.schedule = cfg.run, cfg.schedule  # run settings are the caller's; epochs may grow
            cfg = saved
        data = build.build_data(cfg)
        if ckpt is None:
            torch.manual_seed(cfg.run.seed)
            phase = "baseline" if (baseline if baseline is not None else cfg.run.mode == "baseline") else "stem"
            try:
                model = build.build_stem_network(cfg, data.spec, data.image_size, initial).to(device)
            except WeightsError as e:
                raise RecipeError(f"run.start_from: {e}") from None
            _check_routed_stages(cfg, model)
            extra = {"started_from": f"{cfg.run.start_from} (initial weights)"} if initial is not None else {}
            return cls(cfg, out, device, data, model, build.build_optimizer(cfg, model), phase, extra=extra)._ready()
        m = ckpt.meta
        run = cls(cfg, out, device, data, *_restore(cfg, data, ckpt, m["phase"], device), m["phase"],
                  m["epoch"], m["step"], m["seq"], m.get("extra", {}))
        moved = set_aside([p for p, _ in skipped]) if distributed.rank() == 0 else None
        run._ready()
        run._say_resumed(ckpt, skipped, moved, old_schedule)
        return run

    def _say_resumed(self, ckpt: Checkpoint, skipped: list, moved: Path | None, old: ScheduleConfig) -> None:
        """What --resume did: every file it skipped and why, where it continues, and a schedule change."""
        for path, why in skipped:
            self.say(f"[resume] skipped {path.name}: {why}" + (f"; moved to {moved}/" if moved else ""))
        where = f"{self.phase}, epoch {self.epoch} of {self.total_epochs}, step {self.step}"
        dropped = f"; {self.log.dropped} metrics row(s) written after it will be recomputed" if self.log.dropped else ""
        if not self.finished:
            self.say(f"[resume] continuing from {ckpt.path} ({where}){dropped}")
        if old.epochs != self.total_epochs:
            self.say(_schedule_change(self, old))

    @property
    def finished(self) -> bool:
        return self.phase in ("routed", "baseline") and self.epoch >= self.total_epochs

    @classmethod
    def _started_from(cls, cfg: Config, out: Path, device: torch.device, ckpt: Checkpoint, phase: str) -> "Run":
        """A new run whose first epochs are ``ckpt``'s plain network, optimizer and random state."""
        data = build.build_data(cfg)
        m = ckpt.meta
        run = cls(cfg, out, device, data, *_restore(cfg, data, ckpt, "stem", device), phase, m["epoch"], m["step"], 0,
                  {"started_from": f"{ckpt.path} (epoch {m['epoch']})"})
        _check_routed_stages(cfg, run.model)
        run._ready()
        run.say(f"[start] epochs 1-{m['epoch']} taken from {ckpt.path} ({m['phase']} run)")
        run.save()  # the copy is this run's own: resuming no longer needs run.start_from's files
        return run

    def _ready(self) -> "Run":
        self.precision = Precision(self.cfg.run.amp, self.cfg.run.channels_last, self.device.type)
        self.precision.model(self.model)
        if self.cfg.run.compile:
            compile_parts(self.model)
        self.scaler = self.precision.scaler()
        if self.scaler.is_enabled() and "grad_scaler" in self.extra:  # resume: the scale it had reached
            self.scaler.load_state_dict(self.extra["grad_scaler"])
        self.wrap()
        self.loaders = build.build_loaders(self.cfg, self.data, self.device, distributed.rank(), distributed.world_size())
        if distributed.rank() == 0:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"run.output={self.out}: cannot create it ({e.strerror})") from None
            (self.out / "config.yaml").write_text(self.cfg.to_yaml())
        self.log = RunLog(self.out, self.seq, self.cfg.run.tensorboard, enabled=distributed.rank() == 0)
        return self

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, eval_top1: float | None = None) -> None:
        """Write the next checkpoint; ``eval_top1`` (when this epoch was evaluated) lets run.keep_best find it."""
        self.seq += 1
        if self.scaler is not None and self.scaler.is_enabled():
            self.extra["grad_scaler"] = self.scaler.state_dict()
        if distributed.rank() == 0:
            spec = self.data.spec
            shape = {"num_classes": spec.num_classes, "in_channels": spec.in_channels, "image_size": self.data.image_size}
            meta = {"config": self.cfg.to_dict(), "step": self.step, "extra": self.extra, "data_shape": shape}
            if eval_top1 is not None:
                meta["eval_top1"] = eval_top1
            save_checkpoint(self.out / "checkpoints", self.seq, self.phase, self.epoch, self.model, self.optimizer, meta,
                            keep=self.cfg.run.keep_checkpoints, keep_best=self.cfg.run.keep_best)

    def say(self, text: str) -> None:
        if distributed.rank() == 0 and self.cfg.run.progress != "none":
            print(text, flush=True)

    @property
    def total_epochs(self) -> int:
        return self.cfg.schedule.epochs


# Keys that change neither the model nor the schedule: where the data lives and how it is fed.
FEEDING_ONLY = {("data", k) for k in ("workers", "eval_batch_size", "root", "micro_batch_size")}
# Keys a resumed run may change, within the limits :func:`_check_resume` sets.
SCHEDULE_LENGTH = {("schedule", "epochs"), ("schedule", "stem_epochs")}


def _first_difference(saved: Config, given: Config, ignore: set[tuple[str, str]]) -> str | None:
    """'section.key=given differs from saved' for the first model/data/optim/schedule key that differs."""
    for section in ("model", "data", "optim", "schedule"):
        a, b = getattr(saved, section), getattr(given, section)
        for key, value in vars(a).items():
            if (section, key) not in ignore and getattr(b, key) != value:
                return f"{section}.{key}={getattr(b, key)!r} differs from {value!r}"
    return None


def _check_output(out: Path) -> None:
    """run.output must be a folder, or a path one can create: said before any training, not after."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"run.output={out} exists and is not a folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"run.output={out}: cannot write in {parent}")


def _check_routed_stages(cfg: Config, model: torch.nn.Module) -> None:
    """model.routed_stages is checked before step 1, not when step 2 meets it epochs later."""
    n, wanted = len(routed_stages(model)), cfg.model.routed_stages
    if wanted is not None and any(not 0 <= i < n for i in wanted):
        raise ConfigError(f"model.routed_stages={wanted} out of range: {cfg.model.backbone} has {n} stages (0..{n - 1})")


def _check_found(out: Path, ckpt: Checkpoint | None, skipped: list, resume: bool) -> None:
    """Refuse to overwrite a run, and to resume one none of whose checkpoints reads (changing nothing)."""
    if ckpt is not None and not resume:
        raise RecipeError(f"{out} already holds a run (checkpoint {ckpt.path.name}); pass --resume to continue it or choose another --output")
    if ckpt is None and skipped:
        where = out / "checkpoints"
        if not resume:
            raise RecipeError(f"{where} holds checkpoint files but none is readable [{describe_skipped(skipped)}]; "
                              "nothing was changed: choose another --output")
        raise RecipeError(f"cannot resume {where}: none of its {len(skipped)} checkpoint file(s) is readable "
                          f"[{describe_skipped(skipped)}]; nothing was changed or deleted: move them away to start "
                          "afresh in this folder, or choose another --output")


def _check_resume(saved: Config, given: Config, ckpt: Checkpoint) -> None:
    """Resuming with a config that would build a different model or schedule is refused; only the
    number of epochs may change (to no fewer than are done), and stem_epochs only before cloning."""
    path, done, phase = ckpt.path, ckpt.meta["epoch"], ckpt.meta["phase"]
    diff = _first_difference(saved, given, FEEDING_ONLY | SCHEDULE_LENGTH)
    if diff:
        raise ConfigError(f"{diff} in {path}; resume with the run's own config.yaml or start a new --output")
    if given.schedule.epochs < done:
        raise ConfigError(f"schedule.epochs={given.schedule.epochs} (--epochs) is fewer than the {done} epochs "
                          f"{path} has done; a run cannot be shortened below what it trained")
    stem = given.schedule.stem_epochs
    if stem != saved.schedule.stem_epochs:
        if phase != "stem":
            raise ConfigError(f"schedule.stem_epochs={stem} differs from {saved.schedule.stem_epochs} in {path}; "
                              f"the run was cloned after epoch {saved.schedule.stem_epochs} and step 1 cannot change now")
        if stem < done:
            raise ConfigError(f"schedule.stem_epochs={stem} is fewer than the {done} stem epochs {path} has done")


def _schedule_change(run: Run, old: ScheduleConfig) -> str:
    """The printed account of a resumed run whose total epochs changed: the cosine is a function of the
    total, so from here on the LR follows the new run's curve (a jump, not a smooth continuation)."""
    steps = len(run.loaders[0])
    o = run.cfg.optim
    before = Schedule.of(run.cfg, steps, old).lr(run.step)
    after = Schedule.of(run.cfg, steps).lr(run.step)
    return (f"[resume] schedule.epochs {old.epochs} -> {run.total_epochs}: the learning rate follows the cosine "
            f"schedule of {run.total_epochs} epochs from step {run.step} on, so it goes from {before:.4g} (the {old.epochs}-epoch "
            f"curve) to {after:.4g} and decays to {o.end_lr:.4g} at epoch {run.total_epochs}; epochs 1-{run.epoch} keep "
            f"the {old.epochs}-epoch curve they were trained on")


def _restore(cfg: Config, data: build.Data, ckpt: Checkpoint, phase: str, device: torch.device):
    """Model (with ``phase``'s structure) and optimizer from ``ckpt``; the random state too."""
    model = build.model_from_checkpoint(cfg, data.spec, data.image_size, ckpt, device, phase)
    optimizer = build.build_optimizer(cfg, model)
    if ckpt.optimizer_state is not None:
        try:
            optimizer.load_state_dict(ckpt.optimizer_state)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise CheckpointError(f"{ckpt.path}: its optimizer state does not fit the model ({e})") from None
    restore_rng(ckpt)
    return model, optimizer


# Keys that only matter once stages are routed: a plain network trained under any of them is the
# same network (with CA the stem's random routes depend on N, so N must match then).
ROUTING_ONLY = {("model", k) for k in ("routed_stages", "memory_momentum", "memory_rule", "memory_accumulate_steps",
                                       "memory_smoothing", "memory_follows_lr", "revive_after", "revive_threshold",
                                       "revive_reclone", "match_batchnorm", "procedure_batchnorm")} | {
    ("optim", k) for k in ("procedure_grad_scale", "rewarm_epochs", "untie_epochs", "untie_to")}


def _start_weights(cfg: Config) -> dict[str, torch.Tensor] | None:
    """``run.start_from``'s tensors when it is a plain state-dict file (torchvision/timm layout: .pth, .pt,
    .bin, or .safetensors without rmn's checkpoint metadata); None when it names an rmn run or checkpoint."""
    src = Path(cfg.run.start_from)
    if src.suffix not in STATE_DICT_SUFFIXES or (src.suffix == ".safetensors" and not is_plain_safetensors(src)):
        return None
    try:
        return read_state_dict(src)
    except WeightsError as e:
        raise RecipeError(f"run.start_from: {e}") from None


def plain_network_difference(source: Config, cfg: Config) -> str | None:
    """Why a run of ``source`` does not train ``cfg``'s step 1 (the first difference), or None when its first
    ``cfg.schedule.stem_epochs`` epochs are exactly those of ``cfg`` (the same plain network, data and schedule;
    only routing options and, without CA, N may differ)."""
    ignore = FEEDING_ONLY | ROUTING_ONLY | ({("model", "num_procedures")} if cfg.model.attention != "ca" else set())
    return _first_difference(source, cfg, ignore)


def _plain_checkpoint(cfg: Config, device: torch.device) -> Checkpoint:
    """``run.start_from``'s newest checkpoint, checked to be this config's plain network before cloning."""
    src = Path(cfg.run.start_from)
    where = f"run.start_from={cfg.run.start_from}"
    try:
        ckpt = load_checkpoint(src, device) if src.is_file() else latest_checkpoint(
            src / "checkpoints" if (src / "checkpoints").is_dir() else src, device)
    except CheckpointError as e:
        raise RecipeError(f"{where}: {e}") from None
    if ckpt is None:
        raise RecipeError(f"{where}: no checkpoint there (give a run folder or a checkpoint file)")
    phase, epoch = ckpt.meta["phase"], ckpt.meta["epoch"]
    if phase not in ("stem", "baseline"):
        raise RecipeError(f"{where}: {ckpt.path.name} is a '{phase}' checkpoint; step 1 needs a plain network (a stem or baseline run)")
    if epoch > cfg.schedule.stem_epochs:
        raise RecipeError(f"{where}: {ckpt.path.name} is at epoch {epoch}, past schedule.stem_epochs={cfg.schedule.stem_epochs}")
    diff = plain_network_difference(checkpoint_config(ckpt), cfg)
    if diff:
        raise ConfigError(f"{where}: {diff} in {ckpt.path}")
    return ckpt

