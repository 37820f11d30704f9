"""Typed run configuration: dataclasses, set by YAML files, overridden from the command line.

Every key is checked: an unknown key or a value of the wrong type is a one-line ``ConfigError``
naming the key. The resolved config is saved beside every run and inside every checkpoint, so a
checkpoint can rebuild its model alone.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..pooled_bn import PROCEDURE_BATCHNORMS
from ..precision import AMP_DTYPES


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A bad config file or override; the message names the key."""


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    # modules imported before the backbone is built: a user's module that registers one (rmn.register_backbone)
    imports: list[str] = field(default_factory=list)
    # the routed stages by module name, or groups of consecutive names; None = the backbone's stage_names
    stages: Optional[list] = None
    width_mult: float = 1.0
    num_procedures: int = 8
    attention: str = "ca"  # "ca" (Conditional Attention), "se" (no route input), "none"
    routed_stages: Optional[list[int]] = None  # None = every stage
    memory_momentum: float = 0.9  # the paper's alpha
    # Beyond the paper (rmn.memory): "ema" (paper) or "count_ema"; statistics over K steps; revival.
    memory_rule: str = "ema"
    memory_accumulate_steps: int = 1
    memory_smoothing: float = 1.0  # count_ema's Laplace pseudo-count
    # Beyond the paper: scale each step's memory update by the LR over its peak, so the memories settle as the LR
    # anneals (the paper's memories keep moving at the same rate while the procedures' LR goes to zero)
    memory_follows_lr: bool = False
    revive_after: int = 0  # steps a memory may starve before it is re-seeded (0 = never)
    revive_threshold: float = 0.0  # load share at or below which a memory is starving
    revive_reclone: bool = True  # also copy the donor's procedure and optimizer state
    match_batchnorm: bool = False  # step 3 also re-expresses each procedure's BatchNorm in its cluster's statistics
    # Beyond the paper (rmn.pooled_bn): "slice" (paper: each procedure's BatchNorm normalises over its own samples)
    # or "pooled" (over the whole batch at each layer, each procedure's own affine; exact at cloning). Single process.
    procedure_batchnorm: str = "slice"
    attention_reduction: int = 16
    drop_path_rate: Optional[float] = None  # EfficientNet stochastic depth; None = the backbone's default


@dataclass
class DataConfig:
    dataset: str = "digits"
    root: Optional[str] = None
    image_size: Optional[int] = None  # resize batches to this side; None = the dataset's native size
    batch_size: int = 256  # effective batch per optimizer step (over all processes)
    micro_batch_size: Optional[int] = None  # gradient accumulation: forward/backward in chunks of this
    eval_batch_size: int = 512
    workers: int = 0
    augment: bool = True
    download: bool = False


@dataclass
class OptimConfig:
    optimizer: str = "auto"  # "sgd", "rmsprop", or "auto" (RMSprop for EfficientNet, SGD otherwise)
    lr: float = 0.48  # peak learning rate after warm-up
    start_lr: float = 1e-5
    end_lr: float = 1e-5
    warmup_epochs: float = 5.0
    momentum: float = 0.9
    weight_decay: float = 1e-5
    rmsprop_alpha: float = 0.9
    rmsprop_eps: float = 1e-3
    label_smoothing: float = 0.0
    # Beyond the paper: multiply routed procedures' gradients by this (SGD: their learning rate). The loss
    # is a mean over the whole batch, so a procedure that saw a share s of it gets s times the gradient
    # of its own samples' mean loss: at N=8 it learns about 8x slower than the shared layers.
    procedure_grad_scale: float = 1.0
    # Beyond the paper (upcycling practice; 0 = off): at the clone step (the first optimizer step after
    # schedule.stem_epochs) the LR restarts: linear warm-up from the LR reached to optim.lr over this many
    # epochs, then the cosine to optim.end_lr over the remaining steps (rmn.recipe.schedule). A baseline
    # under the same config follows the same curve (mode "both" stays a same-schedule comparison).
    rewarm_epochs: float = 0.0
    # Beyond the paper: after cloning, procedures start tied (each gets the gradient the shared stage would,
    # the sum over procedures) and untie linearly over this many epochs (rmn.training.tie_procedure_gradients).
    # 0: the paper, each procedure trains on its own samples from the first routed step.
    untie_epochs: float = 0.0
    # Beyond the paper: the untied share the procedures end with (and keep to the end of training): 1 unties them
    # fully (the paper, after untie_epochs); below 1 each procedure keeps getting that mix of its own gradient and
    # (1 - untie_to) of the shared stage's, a pull towards the others (reached over untie_epochs, or at once).
    untie_to: float = 1.0


@dataclass
class ScheduleConfig:
    epochs: int = 120
    stem_epochs: int = 40  # recipe step 1: epochs of plain training before cloning


@dataclass
class RunConfig:
    name: str = "run"
    mode: str = "rmn"  # "rmn" (the four steps), "baseline" (same schedule, no cloning), "both"
    # The baseline of mode "both": "none" = the plain network (the paper's baseline), "se" = plain + SE
    # (the paper's "+SE" row); model.attention applies to the RMN only.
    baseline_attention: str = "none"
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    output: Optional[str] = None  # default runs/<name>
    eval_every: int = 1
    keep_checkpoints: int = 2  # the newest readable checkpoints kept; older ones are deleted
    keep_best: bool = True  # also keep the checkpoint with the best eval top-1 (never pruned)
    kmeans_iters: int = 100
    kmeans_seed: int = 0
    kmeans_max_samples: Optional[int] = None  # cap on features per stage for k-means (None = all)
    threads: Optional[int] = None  # torch CPU threads; None = torch's default
    progress: str = "auto"  # "auto" (bar on a terminal, lines otherwise), "bar", "lines", "none"
    tensorboard: bool = True
    sync_bn: bool = False
    # Arithmetic (rmn.precision), for training, evaluation and every feature pass. Routing, memories and
    # k-means stay float32 whatever is chosen here.
    amp: str = "none"  # "none" (float32), "bf16" (autocast to bfloat16), "fp16" (float16 + gradient scaler)
    channels_last: bool = False  # NHWC weights and activations (what fast convolution kernels want)
    compile: bool = False  # torch.compile each routed procedure, the stem and the head
    atlas: bool = True  # `rmn run`, after an RMN run: each memory's nearest evaluation images (<output>/atlas)
    # Step 1 done elsewhere: a run folder or checkpoint file of the same plain network (a baseline or
    # a stem run, at or before schedule.stem_epochs); a fresh run continues from it instead of epoch 0.
    # Or initial weights: a torchvision/timm-layout state-dict file (.pth, .pt, .bin, .safetensors) loaded
    # strictly into the backbone before step 1 (rmn.backbones.load_weights).
    start_from: Optional[str] = None
    # With a state-dict file: leave the classifier freshly initialised (another number of classes).
    start_from_skip_classifier: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> "Config":
        """Cross-field checks that types alone cannot express."""
        m, d, s, o, r = self.model, self.data, self.schedule, self.optim, self.run
        checks = [
            (m.num_procedures >= 1, "model.num_procedures must be >= 1"),
            (m.stages is None or (len(m.stages) > 0 and all(_stage_spec(s) for s in m.stages)),
             f"model.stages must be a non-empty list of module names or of lists of names, got {m.stages!r}"),
            (m.attention in ("ca", "se", "none"), f"model.attention must be 'ca', 'se' or 'none', got {m.attention!r}"),
            (0.0 <= m.memory_momentum <= 1.0, "model.memory_momentum must be in [0, 1]"),
            (m.memory_rule in ("ema", "count_ema"), f"model.memory_rule must be 'ema' or 'count_ema', got {m.memory_rule!r}"),
            (m.memory_accumulate_steps >= 1, "model.memory_accumulate_steps must be >= 1"),
            (m.memory_smoothing > 0, "model.memory_smoothing must be > 0"),
            (m.revive_after >= 0, "model.revive_after must be >= 0"),
            (m.procedure_batchnorm in PROCEDURE_BATCHNORMS,
             f"model.procedure_batchnorm must be 'slice' or 'pooled', got {m.procedure_batchnorm!r}"),
            (not (m.match_batchnorm and m.procedure_batchnorm == "pooled"),
             "model.match_batchnorm re-expresses BatchNorm in cluster statistics, which model.procedure_batchnorm=pooled "
             "does not use: set one of them"),
            (0.0 <= m.revive_threshold < 1.0, "model.revive_threshold must be in [0, 1)"),
            (m.width_mult > 0, "model.width_mult must be > 0"),
            (d.batch_size >= 1, "data.batch_size must be >= 1"),
            (d.micro_batch_size is None or 1 <= d.micro_batch_size <= d.batch_size,
             "data.micro_batch_size must be between 1 and data.batch_size"),
            (d.eval_batch_size >= 1, "data.eval_batch_size must be >= 1"),
            (d.workers >= 0, "data.workers must be >= 0"),
            (s.epochs >= 1, "schedule.epochs must be >= 1"),
            (0 <= s.stem_epochs <= s.epochs, "schedule.stem_epochs must be between 0 and schedule.epochs"),
            (o.optimizer in ("auto", "sgd", "rmsprop"), f"optim.optimizer must be 'auto', 'sgd' or 'rmsprop', got {o.optimizer!r}"),
            (o.lr > 0, "optim.lr must be > 0"),
            (o.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0"),
            (o.procedure_grad_scale > 0, "optim.procedure_grad_scale must be > 0"),
            (o.rewarm_epochs >= 0, "optim.rewarm_epochs must be >= 0"),
            (o.untie_epochs >= 0, "optim.untie_epochs must be >= 0"),
            (0 <= o.untie_to <= 1, "optim.untie_to must be between 0 and 1"),
            (r.amp in AMP_DTYPES, f"run.amp must be 'none', 'bf16' or 'fp16', got {r.amp!r}"),
            (r.mode in ("rmn", "baseline", "both"), f"run.mode must be 'rmn', 'baseline' or 'both', got {r.mode!r}"),
            (r.baseline_attention in ("none", "se"),
             f"run.baseline_attention must be 'none' or 'se', got {r.baseline_attention!r}"),
            (r.progress in ("auto", "bar", "lines", "none"), "run.progress must be 'auto', 'bar', 'lines' or 'none'"),
            (r.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1"),
            (r.eval_every >= 1, "run.eval_every must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    def output_dir(self) -> Path:
        return Path(self.run.output or f"runs/{self.run.name}")


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_types(section: str) -> dict[str, Any]:
    cls = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "schedule": ScheduleConfig, "run": RunConfig}[section]
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _stage_spec(spec: Any) -> bool:
    if isinstance(spec, str):
        return bool(spec)
    return isinstance(spec, list) and len(spec) > 0 and all(isinstance(n, str) and n for n in spec)


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check ``value`` against the annotation ``typ`` (int widens to float); raise naming ``key``."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(typ)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
    if typ is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if not isinstance(value, typ):
        raise ConfigError(f"{key}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(data: dict | None, base: Config | None = None) -> Config:
    """Apply a nested dict {section: {key: value}} onto ``base`` (default: the defaults)."""
    cfg = base or Config()
    for section, values in (data or {}).items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section '{section}' (sections: {', '.join(SECTIONS)})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping, got {values!r}")
        types_ = _section_types(section)
        target = getattr(cfg, section)
        for key, value in values.items():
            if key not in types_:
                raise ConfigError(f"unknown config key '{section}.{key}' (valid: {', '.join(types_)})")
            setattr(target, key, _coerce(f"{section}.{key}", value, types_[key]))
    return cfg


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- YAML file <- dotted overrides ({'optim.lr': 0.1}); validated."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {yaml_error_text(e)}") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        try:
            cfg = from_dict(data, cfg)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not key:
            raise ConfigError(f"override '{dotted}' must look like section.key")
        cfg = from_dict({section: {key: value}}, cfg)
    return cfg.validate()


def yaml_error_text(e: yaml.YAMLError) -> str:
    """What a YAML error says, with where (1-based line and column), in one line."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(e).split())
    text = f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    context, where = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context:
        text += f" ({context}" + (f" started at line {where.line + 1}, column {where.column + 1})" if where else ")")
    return text


def parse_override_value(text: str) -> Any:
    """Command-line values are YAML scalars: 0.1, true, null, [0, 1], resnet18."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text
