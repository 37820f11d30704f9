"""Config -> data, model and optimizer. The only place that knows how a config becomes objects."""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import data as rdata
from ..backbones import create_backbone, load_weights
from ..route import route
from .checkpoint import Checkpoint, CheckpointError, load_model_state
from .config import Config, ConfigError

ROUTED_PHASES = ("cloned", "memory", "routed")


@dataclass
class Data:
    spec: rdata.DatasetSpec
    train: torch.utils.data.Dataset
    eval: torch.utils.data.Dataset
    image_size: int


def resolve_device(name: str, option: str = "run.device") -> torch.device:
    """``name`` as a torch device this machine has; anything else is a one-line ValueError naming ``option``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{option}={name!r} is not a device (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option}={name!r} but CUDA is not available on this machine (use cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{option}={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"{option}={name!r} but Apple's MPS backend is not available on this machine (use cpu or auto)")
    elif dev.type != "cpu":
        raise ValueError(f"{option}={name!r}: rmn runs on cpu, cuda or mps, not {dev.type}")
    return dev


def build_data(cfg: Config) -> Data:
    d = cfg.data
    kw = {"download": True} if d.download else {}
    train = rdata.build_dataset(d.dataset, root=d.root, split="train", **kw)
    evald = rdata.build_dataset(d.dataset, root=d.root, split="val" if d.dataset in ("tiny-imagenet", "imagenet") else "test")
    spec = getattr(train, "spec", rdata.dataset_spec(d.dataset))
    return Data(spec, train, evald, d.image_size or spec.image_size)


def build_loaders(cfg: Config, data: Data, device: torch.device, rank: int = 0, world_size: int = 1):
    """Training (augmented, shuffled), evaluation, and feature (un-augmented training set) loaders."""
    d = cfg.data
    per_rank = max(1, d.batch_size // world_size)
    common = dict(device=device, workers=d.workers, seed=cfg.run.seed, image_size=d.image_size, rank=rank, world_size=world_size)
    train = rdata.build_loader(data.train, per_rank, train=True, augment=d.augment, **common)
    evl = rdata.build_loader(data.eval, d.eval_batch_size, train=False, augment=False, **common)
    feats = rdata.build_loader(data.train, d.eval_batch_size, train=False, augment=False, **common)
    return train, evl, feats


def import_user_modules(cfg: Config) -> None:
    """Import ``model.imports`` (with the working directory on the path, as ``python -m`` has it), so a user's
    module can register its backbone before it is built; a module that does not import is a one-line error."""
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    for name in cfg.model.imports:
        try:
            importlib.import_module(name)
        except Exception as e:  # an ImportError, or whatever the user's module raised while importing
            raise ConfigError(f"model.imports: cannot import {name!r} ({type(e).__name__}: {e})") from None


def build_backbone(cfg: Config, data_spec, image_size: int):
    import_user_modules(cfg)
    m = cfg.model
    kwargs = {}
    if m.drop_path_rate is not None:
        kwargs["drop_path_rate"] = m.drop_path_rate
    return create_backbone(m.backbone, num_classes=data_spec.num_classes, image_size=image_size,
                           in_channels=data_spec.in_channels, width_mult=m.width_mult, **kwargs)


def attention_option(cfg: Config):
    return None if cfg.model.attention == "none" else cfg.model.attention


def build_stem_network(cfg: Config, data_spec, image_size: int, initial: dict | None = None) -> nn.Module:
    """The plain network of recipe step 1 (and of the baseline): no stage routed yet. ``initial``: a
    torchvision-layout state dict loaded into the backbone first (``run.start_from``, a WeightsError
    when it does not fit; ``run.start_from_skip_classifier`` keeps the classifier fresh)."""
    backbone = build_backbone(cfg, data_spec, image_size)
    if initial is not None:
        load_weights(backbone, initial, cfg.run.start_from_skip_classifier, source=cfg.run.start_from,
                     skip_option="run.start_from_skip_classifier=true")
    stages = cfg.model.stages or getattr(backbone, "stage_names", None)
    if not stages:
        raise ConfigError(f"model.stages: backbone {cfg.model.backbone!r} ({type(backbone).__name__}) declares no "
                          "stage_names; list its stages by module name, e.g. [layer1, layer2, layer3, layer4]")
    try:
        return route(backbone, stages, cfg.model.num_procedures, attention_option(cfg), clone=False, attention_init="random",
                     attention_reduction=cfg.model.attention_reduction)
    except ValueError as e:
        raise ConfigError(f"model.stages: {e}") from None


def clone_network(cfg: Config, stem: nn.Module) -> nn.Module:
    """Recipe step 2 on the model side: N procedures per routed stage (``model.routed_stages``, indices into
    the stages; default all), memories to be initialised. ``stem`` itself is left as it is."""
    m = cfg.model
    memory = {"rule": m.memory_rule, "accumulate_steps": m.memory_accumulate_steps, "smoothing": m.memory_smoothing,
              "revive_after": m.revive_after, "revive_threshold": m.revive_threshold}
    names = stem.rmn_routing.stages
    chosen = None if m.routed_stages is None else [names[i] for i in m.routed_stages]
    return route(stem, chosen, m.num_procedures, memory_momentum=m.memory_momentum, memory_options=memory,
                 procedure_batchnorm=m.procedure_batchnorm)


def build_model(cfg: Config, data_spec, image_size: int, phase: str) -> nn.Module:
    """The network with the structure of ``phase`` (randomly initialised; load weights after)."""
    stem = build_stem_network(cfg, data_spec, image_size)
    return clone_network(cfg, stem) if phase in ROUTED_PHASES else stem


def model_from_checkpoint(cfg: Config, data_spec, image_size: int, ckpt: Checkpoint, device, phase: str | None = None) -> nn.Module:
    """The network of ``phase`` (default: ``ckpt``'s) with ``ckpt``'s weights; a config that builds no model, or tensors that do
    not fit it, is a one-line CheckpointError naming the file."""
    try:
        model = build_model(cfg, data_spec, image_size, phase or ckpt.meta["phase"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt.path}: its stored config builds no model ({e})") from None
    model = model.to(device)
    load_model_state(model, ckpt)
    return model


def optimizer_kind(cfg: Config) -> str:
    if cfg.optim.optimizer != "auto":
        return cfg.optim.optimizer
    return "rmsprop" if cfg.model.backbone.startswith("efficientnet") else "sgd"


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum 0.9, wd 1e-5) as in the paper; RMSprop (alpha 0.9, eps 1e-3, momentum 0.9)
    for EfficientNet, following the EfficientNet paper's TF settings. The LR is set every step.

    ``foreach=True`` (torch's default on GPUs) updates all parameters in a few multi-tensor kernels
    instead of a Python loop over them; an RMN has N times the parameters, and the loop cost showed
    (bit-identical results, tests/test_recipe.py)."""
    o = cfg.optim
    if optimizer_kind(cfg) == "rmsprop":
        return torch.optim.RMSprop(model.parameters(), lr=o.start_lr, alpha=o.rmsprop_alpha, eps=o.rmsprop_eps,
                                   momentum=o.momentum, weight_decay=o.weight_decay, foreach=True)
    return torch.optim.SGD(model.parameters(), lr=o.start_lr, momentum=o.momentum, weight_decay=o.weight_decay,
                           foreach=True)
