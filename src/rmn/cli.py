"""The ``rmn`` command, every subcommand's parser and handler: one subcommand per recipe step, ``run`` for
all of them, ``eval``, and the analysis commands. It only parses and calls; the work lives in
:mod:`rmn.recipe` (training) and :mod:`rmn.analysis` (what is read from a trained model), and data flows one
way: ``rmn run`` trains, then draws the memory atlas (``run.atlas``) from the run's checkpoint as ``rmn atlas``
would.

    rmn run CONFIG [--resume] [--epochs N] [--section.key VALUE ...]     (and train-stem, clone, init-memory, train-routed)
    rmn eval CHECKPOINT_OR_RUN [--amp bfloat16] [--channels-last]
    rmn summary [CONFIG | CHECKPOINT] [--model resnet18 --num-classes 100 --image-size 32] [--procedures 8] [--csv F] [--json F]
    rmn bench latency|dispatch [--quick] ...
    rmn atlas CHECKPOINT_OR_RUN [--dataset cifar100] [--data-dir data] [--out DIR] [--top-k 8] [--max-images 1024]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import distributed
from .extras import MissingExtra
from .precision import AMP_DTYPES

# timm-style flags users already know, and where they land in the config.
SHORT_FLAGS = {
    "--model": "model.backbone",
    "--procedures": "model.num_procedures",
    "--dataset": "data.dataset",
    "--data-dir": "data.root",
    "--batch-size": "data.batch_size",
    "--workers": "data.workers",
    "--epochs": "schedule.epochs",
    "--stem-epochs": "schedule.stem_epochs",
    "--lr": "optim.lr",
    "--seed": "run.seed",
    "--device": "run.device",
    "--output": "run.output",
    "--amp": "run.amp",
}
# switches without a value (timm's --channels-last, --torchcompile)
SWITCHES = {
    "--channels-last": ("run.channels_last", "NHWC weights and activations (run.channels_last true)"),
    "--compile": ("run.compile", "torch.compile the network's parts (run.compile true)"),
}

STEP_HELP = {
    "run": "all four steps (or the baseline, or both: run.mode) end to end",
    "train-stem": "step 1: train the plain network for schedule.stem_epochs",
    "clone": "step 2: clone each stage N times with its optimizer state",
    "init-memory": "step 3: k-means on the stage inputs initialises the memories",
    "train-routed": "step 4: routed training to the last epoch",
}


def _add_run_options(p: argparse.ArgumentParser, config_required: bool) -> None:
    p.add_argument("config", nargs=None if config_required else "?", help="YAML config (configs/*.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from the newest readable checkpoint in the output folder; with a larger --epochs, extend the run")
    for flag, key in SHORT_FLAGS.items():
        p.add_argument(flag, dest=key, default=None, metavar="VALUE", help=f"sets {key}")
    for flag, (key, text) in SWITCHES.items():
        p.add_argument(flag, dest=key, action="store_const", const=True, default=None, help=text)
    p.epilog = "Any config key can be set as --section.key VALUE, e.g. --optim.warmup_epochs 2 --model.attention se"


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="rmn", description="Routing-by-Memory Networks (Neural Routing by Memory, NeurIPS 2021)")
    parser.add_argument("--version", action="version", version=f"rmn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in STEP_HELP.items():
        p = sub.add_parser(name, help=text, description=text)
        _add_run_options(p, config_required=name in ("run",))
        p.set_defaults(func=_run_command)
    p = sub.add_parser("eval", help="evaluate a checkpoint (file or run folder) on the evaluation split")
    p.add_argument("checkpoint", help="a .safetensors checkpoint or a run folder (a run.mode both folder: both models)")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None, help="dataset root, if it moved since training")
    p.add_argument("--amp", default="none", choices=tuple(AMP_DTYPES), help="autocast dtype (default float32)")
    p.add_argument("--channels-last", action="store_true", help="NHWC weights and activations")
    p.set_defaults(func=_eval_command)
    _add_analysis_commands(sub)
    return parser


def _add_analysis_commands(sub) -> None:
    """``summary``, ``bench {latency,dispatch}`` and ``atlas``."""
    p = sub.add_parser("summary", help="parameters and MACs per image: backbone vs RMN without/with CA",
                       description="Parameters and multiply-adds per image (counted on the executed routed "
                                   "path), in the layout of the paper's tables.")
    p.add_argument("source", nargs="?", help="CONFIG (yaml) or CHECKPOINT to read the model from")
    p.add_argument("--model", help="backbone name (resnet18, resnet50, vgg16, efficientnet_b0)")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--in-channels", type=int)
    p.add_argument("--width-mult", type=float)
    p.add_argument("--procedures", type=int, help="N, procedures per routed stage (default 8)")
    p.add_argument("--se", action="store_true", help="add the '+ SE' rows (CA without the route input)")
    p.add_argument("--csv", help="also write the table as CSV here")
    p.add_argument("--json", help="also write the table as JSON here")
    p.set_defaults(func=_summary_command)

    from .analysis.dispatch_bench import add_arguments as dispatch_args
    from .analysis.latency import add_arguments as latency_args

    b = sub.add_parser("bench", help="speed benchmarks (latency, dispatch overhead)")
    bsub = b.add_subparsers(dest="bench", metavar="{latency,dispatch}")
    bsub.required = True
    lat = bsub.add_parser("latency", help="CPU/CUDA latency and throughput, backbone vs RMN (random weights)")
    latency_args(lat).set_defaults(func=_latency_command)
    dis = bsub.add_parser("dispatch", help="eval and train-step overhead of routed dispatch over the plain network")
    dispatch_args(dis).set_defaults(func=_dispatch_command)

    a = sub.add_parser("atlas", help="each memory's top-K nearest images, routing heat maps and load charts")
    a.add_argument("checkpoint", help="a trained RMN checkpoint or run folder (a run.mode both folder: its rmn/ run)")
    a.add_argument("--dataset", help="dataset name (default: the checkpoint's)")
    a.add_argument("--data-dir", "--data-root", dest="data_root", metavar="DIR",
                   help="dataset root (default: the checkpoint's, or $RMN_DATA); --data-root is the old spelling")
    a.add_argument("--split", default="test", help="evaluation split (default: test)")
    a.add_argument("--out", default=None, metavar="DIR", help="output folder (default: atlas/ in the checkpoint's run folder)")
    a.add_argument("--top-k", type=int, default=8)
    a.add_argument("--max-images", type=int, default=1024)
    a.set_defaults(func=_atlas_command)


def parse_overrides(args: argparse.Namespace, extra: list[str]) -> dict:
    """Collect --section.key VALUE pairs (known flags and the free-form rest)."""
    from .recipe.config import ConfigError, parse_override_value

    overrides = {k: parse_override_value(v) if isinstance(v, str) else v
                 for k, v in vars(args).items() if "." in k and v is not None}
    i = 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--") or "." not in item:
            raise ConfigError(f"unrecognised argument {item!r} (config keys are given as --section.key VALUE)")
        if "=" in item:
            key, value = item[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                raise ConfigError(f"{item} needs a value")
            key, value = item[2:], extra[i + 1]
            i += 2
        overrides[key] = parse_override_value(value)
    if "data.root" in overrides and overrides["data.root"] is not None:
        overrides["data.root"] = str(overrides["data.root"])
    if "run.output" in overrides and overrides["run.output"] is not None:
        overrides["run.output"] = str(overrides["run.output"])
    return overrides


def _config_for(args, overrides):
    """The config of a command: the YAML given, or the run folder's own config.yaml."""
    from .recipe.config import ConfigError, load_config

    path = args.config
    if path is None:
        out = overrides.get("run.output")
        if out is None:
            raise ConfigError("give a CONFIG file, or --output of an existing run")
        path = Path(out) / "config.yaml"
        if not path.is_file() and (Path(out) / "rmn" / "config.yaml").is_file():
            raise ConfigError(f"{out} holds a run.mode both comparison; its RMN run is --output {Path(out) / 'rmn'}")
        if not path.is_file():
            raise ConfigError(f"{out} holds no run (no config.yaml); give a CONFIG file to start one")
    return load_config(path, overrides)


def _run_command(args, extra) -> int:
    from .recipe import steps
    from .recipe.run import RecipeError, Run
    from .recipe.runner import run_experiment, write_summary

    overrides = parse_overrides(args, extra)
    cfg = _config_for(args, overrides)
    args.resolved_config = cfg  # for the interruption message
    if args.command == "run":
        draws = cfg.run.atlas and cfg.run.mode != "baseline"
        if draws:  # a missing extra stops the run now, not after training
            from .analysis.atlas import require_plotting

            require_plotting(instead="or set run.atlas false")
        run_experiment(cfg, resume=args.resume)
        if draws and distributed.rank() == 0:
            _atlas_after_run(cfg)
        return 0
    if cfg.run.mode == "both":
        raise RecipeError(f"single steps need run.mode rmn, and {args.config or 'the config'} says 'both' "
                          "(only 'rmn run' takes it): add --run.mode rmn")
    # Single steps always continue the run in the output folder when there is one.
    run = Run.open(cfg, resume=True)
    step = {"train-stem": steps.train_stem, "clone": steps.clone, "init-memory": steps.init_memory,
            "train-routed": steps.train_routed}[args.command]
    step(run)
    if args.command == "train-routed":
        write_summary(run, 0.0)
    run.say(f"{args.command}: done; the run is in phase '{run.phase}' at epoch {run.epoch} ({run.out})")
    run.log.close()
    return 0


def _kept(cfg) -> str:
    """What an interrupted run left to resume from, as found on disk (so the message is true)."""
    if cfg is None:
        return "nothing was written"
    from .recipe.checkpoint import newest_readable

    out = cfg.output_dir()
    folders = [out / "baseline", out / "rmn"] if cfg.run.mode == "both" else [out]
    found = [p for p in (newest_readable(f / "checkpoints") for f in folders) if p is not None]
    if not found:
        return f"no complete checkpoint in {out} yet (nothing to resume)"
    return "newest complete checkpoint kept: " + ", ".join(map(str, found)) + " (continue with --resume)"


def _eval_command(args) -> int:
    from .recipe.evaluate import evaluate_checkpoint, evaluation_targets, result_lines

    targets = evaluation_targets(args.checkpoint)
    for kind, path in targets:
        if kind is not None:
            print(f"== {kind} ({path})")
        result = evaluate_checkpoint(path, device=args.device, data_root=args.data_dir, amp=args.amp,
                                     channels_last=args.channels_last)
        print("\n".join(result_lines(result)), flush=True)
    return 0


def _atlas_after_run(cfg) -> None:
    """``run.atlas``: the finished RMN run's memory atlas in ``<run>/atlas``, drawn from its best (else newest)
    routed checkpoint as ``rmn atlas CHECKPOINT`` draws it, in the run's precision, with its images in
    TensorBoard when ``run.tensorboard`` is on. An atlas newer than the run's summary is already this run's."""
    from .precision import Precision
    from .recipe.evaluate import atlas_checkpoint, model_for_atlas, rmn_run_of

    run_dir = rmn_run_of(cfg.output_dir())
    out, summary = run_dir / "atlas", run_dir / "summary.json"
    if (out / "atlas.html").is_file() and summary.is_file() and (
            (out / "atlas.html").stat().st_mtime_ns >= summary.stat().st_mtime_ns):
        return
    ckpt = atlas_checkpoint(run_dir, cfg.run.keep_best)
    if ckpt is None:
        return
    model, info = model_for_atlas(ckpt, cfg.run.device)
    precision = Precision(cfg.run.amp, cfg.run.channels_last, next(model.parameters()).device.type)
    with precision.autocast():  # the features the run's own routing saw
        _draw(precision.model(model), info, out, split="test", title=info["name"])
    if cfg.run.progress != "none":
        print(f"[atlas] {out / 'atlas.html'}", flush=True)
    if cfg.run.tensorboard:
        from .recipe.logs import images_to_tensorboard

        images_to_tensorboard(run_dir, info["epoch"], sorted(out.glob("*.png")))


def _draw(model, info: dict, out, split: str, dataset: str | None = None, data_root: str | None = None,
          top_k: int = 8, max_images: int = 1024, title: str | None = None) -> None:
    """The atlas of a loaded checkpoint over its evaluation data (or ``dataset`` from ``data_root``)."""
    from .analysis.atlas import draw_atlas
    from .data import build_dataset

    name = dataset or info.get("dataset")
    if not name:
        raise ValueError("atlas: --dataset is needed (the checkpoint does not name one)")
    ds = build_dataset(name, root=data_root or info.get("data_root"), split=split)
    draw_atlas(model, ds, out, top_k, max_images, title=title)


def _atlas_command(args) -> int:
    from .recipe.evaluate import model_for_atlas

    model, info = model_for_atlas(args.checkpoint)
    out = args.out or (Path(info["run_dir"]) / "atlas" if info.get("run_dir") else Path("atlas"))
    _draw(model, info, out, args.split, args.dataset, args.data_root, args.top_k, args.max_images)
    return 0


def _summary_command(args) -> int:
    from .analysis.cost import SPEC_DEFAULTS, format_table, summary_from_spec, write_csv, write_json

    spec = {}
    if args.source:
        from .recipe.evaluate import model_spec

        spec.update(model_spec(args.source))
    flags = {"name": args.model, "num_classes": args.num_classes, "image_size": args.image_size,
             "in_channels": args.in_channels, "width_mult": args.width_mult, "num_procedures": args.procedures}
    spec.update({k: v for k, v in flags.items() if v is not None})  # flags override the file
    if spec.get("name") is None or spec.get("num_classes") is None:
        raise ValueError("summary: give a CONFIG/CHECKPOINT or --model and --num-classes")
    rows = summary_from_spec(spec, include_se=args.se)
    s = {**SPEC_DEFAULTS, **spec}
    print(f"{s['name']}: {s['num_classes']} classes, {s['image_size']}x{s['image_size']}x{s['in_channels']}, "
          f"width x{s['width_mult']}, N = {s['num_procedures']}; MACs per image on the executed path")
    print(format_table(rows))
    if args.csv:
        print(f"wrote {write_csv(rows, args.csv)}")
    if args.json:
        print(f"wrote {write_json(rows, args.json, meta={'spec': s})}")
    return 0


def _latency_command(args) -> int:
    from .analysis.latency import command

    return command(args)


def _dispatch_command(args) -> int:
    from .analysis.dispatch_bench import command

    return command(args)


def _split_dotted(argv: list[str]) -> tuple[list[str], list[str]]:
    """Take the ``--section.key VALUE`` / ``--section.key=VALUE`` pairs out before argparse sees them:
    argparse would hand an unknown option's VALUE to a positional (CONFIG) instead."""
    rest, dotted, i = [], [], 0
    while i < len(argv):
        item = argv[i]
        if item == "--":
            rest += argv[i:]
            break
        if item.startswith("--") and "." in item.split("=", 1)[0]:
            take = 1 if "=" in item or i + 1 >= len(argv) or argv[i + 1].startswith("--") else 2
            dotted += argv[i:i + take]
            i += take
        else:
            rest.append(item)
            i += 1
    return rest, dotted


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    rest, dotted = _split_dotted(list(sys.argv[1:] if argv is None else argv))
    args, extra = parser.parse_known_args(rest)
    extra += dotted
    clean = False
    try:
        if args.func is _run_command:  # the training commands take --section.key VALUE overrides
            code = _run_command(args, extra) or 0
        else:
            if extra:
                raise ValueError(f"unrecognised argument {extra[0]!r}")
            code = args.func(args) or 0
        clean = True
        return code
    except KeyboardInterrupt:
        print(f"rmn: interrupted; {_kept(getattr(args, 'resolved_config', None))}", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError, MissingExtra) as e:  # ConfigError, DataError, RecipeError, ...
        if isinstance(e, RuntimeError) and type(e).__name__ not in ("RecipeError",):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"rmn: error: {message}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown(clean)


def entry() -> None:
    """The ``rmn`` command and ``python -m rmn``. A torchrun worker leaves with ``os._exit`` once its work is
    saved and its process group destroyed: a finished rank was still seen to abort in C++ teardown at
    interpreter exit ("terminate called without an active exception"), which torchrun reports as a failed job."""
    code = main()
    if distributed.launched_by_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
