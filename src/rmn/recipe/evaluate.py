"""Evaluate a checkpoint alone: it carries its config, so it rebuilds its own model."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

from . import build
from .checkpoint import (CheckpointError, best_checkpoint, checkpoint_config, describe_skipped, load_checkpoint,
                         newest_checkpoint, newest_readable, read_meta)


def load_model(path: str | Path, device: str = "cpu", say=None):
    """(model, config, checkpoint) from a checkpoint file or the newest readable one in a run folder;
    ``say`` (default: stderr) hears which damaged newer files were skipped and which one is used."""
    p = Path(path)
    dev = build.resolve_device(device, "--device")
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    if p.is_dir():
        ckpt, skipped = newest_checkpoint(p / "checkpoints" if (p / "checkpoints").is_dir() else p, dev)
        if ckpt is None:
            found = f" (unreadable: {describe_skipped(skipped)})" if skipped else ""
            raise CheckpointError(f"{p} holds no readable checkpoint{found}")
        for skip, why in skipped:
            say(f"rmn: skipped {skip.name}: {why}")
        if skipped:
            say(f"rmn: using {ckpt.path.name}, the newest readable checkpoint")
    else:
        ckpt = load_checkpoint(p, dev)
    cfg = checkpoint_config(ckpt)
    shape = ckpt.meta.get("data_shape")  # the data the model was built for; no dataset needed to rebuild it
    if not isinstance(shape, dict) or not {"num_classes", "in_channels", "image_size"} <= set(shape):
        raise CheckpointError(f"{ckpt.path}: rmn metadata lacks data_shape (num_classes, in_channels, image_size)")
    spec = SimpleNamespace(num_classes=shape["num_classes"], in_channels=shape["in_channels"])
    model = build.model_from_checkpoint(cfg, spec, shape["image_size"], ckpt, dev)
    model.eval()
    return model, cfg, ckpt


def evaluate_checkpoint(path: str | Path, device: str = "auto", data_root: str | None = None, amp: str = "none",
                        channels_last: bool = False) -> dict:
    """Top-1/top-5 of a checkpoint on its evaluation split, in the precision asked for (``--amp``,
    ``--channels-last``: a model trained in float32 can be evaluated in bf16 and vice versa)."""
    from ..precision import Precision
    from .loop import evaluate
    from .run import Run

    model, cfg, ckpt = load_model(path, device)
    if data_root is not None:
        cfg.data.root = data_root
    cfg.run.device = device
    data = build.build_data(cfg)
    dev = build.resolve_device(device, "--device")
    loaders = build.build_loaders(cfg, data, dev)
    precision = Precision(amp, channels_last, dev.type)
    run = Run(cfg, Path(ckpt.path).parent, dev, data, precision.model(model), None, ckpt.meta["phase"], loaders=loaders,
              precision=precision)
    result = {"checkpoint": str(ckpt.path), "phase": ckpt.meta["phase"], "epoch": ckpt.meta["epoch"]}
    result.update(evaluate(run))
    return result


def model_spec(path: str | Path) -> dict:
    """What ``rmn summary`` needs to rebuild the cost table: from a YAML config, a checkpoint or a run folder."""
    from .config import load_config

    p = Path(path)
    if p.suffix in (".yaml", ".yml"):
        from ..data import dataset_spec

        cfg = load_config(p)
        spec = dataset_spec(cfg.data.dataset)
        if spec.num_classes is None:
            raise ValueError(f"{p}: the class count of a 'folder' dataset is only known from the data; pass --num-classes")
        size, classes, channels = cfg.data.image_size or spec.image_size, spec.num_classes, spec.in_channels
    else:
        _, cfg, ckpt = load_model(rmn_run_of(p), "cpu")
        shape = ckpt.meta["data_shape"]
        size, classes, channels = shape["image_size"], shape["num_classes"], shape["in_channels"]
    return {"name": cfg.model.backbone, "num_classes": classes, "image_size": size, "in_channels": channels,
            "width_mult": cfg.model.width_mult, "num_procedures": cfg.model.num_procedures}


def model_for_atlas(path: str | Path, device: str = "auto"):
    """(model, info) for ``rmn atlas``: the checkpoint's model, where its data lives, the run folder it
    belongs to (the atlas goes there by default), the run's name and the checkpoint's epoch and precision
    settings. A ``run.mode: both`` folder means its ``rmn/`` run."""
    model, cfg, ckpt = load_model(rmn_run_of(path), device)
    ckpt_dir = Path(ckpt.path).parent
    run_dir = ckpt_dir.parent if ckpt_dir.name == "checkpoints" else ckpt_dir
    return model, {"dataset": cfg.data.dataset, "data_root": cfg.data.root, "run_dir": str(run_dir),
                   "name": cfg.run.name, "epoch": ckpt.meta["epoch"]}


def atlas_checkpoint(run_dir: str | Path, keep_best: bool) -> Path | None:
    """The checkpoint a finished RMN run draws its atlas from: its best (``run.keep_best``) when that one is
    routed, otherwise its newest readable one; None when it has none."""
    where = Path(run_dir) / "checkpoints"
    best = best_checkpoint(where) if keep_best else None
    if best is not None and read_meta(best)["phase"] == "routed":
        return best
    return newest_readable(where)


def evaluation_targets(path: str | Path) -> list[tuple[str | None, Path]]:
    """What ``rmn eval PATH`` evaluates: PATH itself, or, for the folder of a ``run.mode: both`` run (no
    checkpoints of its own), its ``baseline/`` and ``rmn/`` runs, labelled."""
    p = Path(path)
    if p.is_dir() and not (p / "checkpoints").is_dir():
        kinds = [kind for kind in ("baseline", "rmn") if (p / kind / "checkpoints").is_dir()]
        if kinds:
            return [(kind, p / kind) for kind in kinds]
    return [(None, p)]


def result_lines(result: dict) -> list[str]:
    """``rmn eval``'s report: accuracies in percent, as every other command prints them."""
    lines = [f"checkpoint: {result['checkpoint']}", f"phase: {result['phase']}", f"epoch: {result['epoch']}",
             f"top-1: {100 * result['eval_top1']:.2f}%", f"top-5: {100 * result['eval_top5']:.2f}%"]
    lines += [f"evaluation load, stage {k[len('eval_load_stage'):]}: " + " ".join(f"{v:.2f}" for v in result[k])
              for k in result if k.startswith("eval_load_stage")]
    return lines


def rmn_run_of(path: str | Path) -> Path:
    """``path`` itself, or the ``rmn/`` run of a ``run.mode: both`` folder (what atlas and summary describe)."""
    return dict(evaluation_targets(path)).get("rmn", Path(path))
