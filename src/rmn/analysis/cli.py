"""Subcommands of the ``rmn`` command that belong to the analysis side: ``summary``, ``bench``, ``atlas``.

``rmn.cli`` builds the top-level parser and calls :func:`register`; every subcommand sets
``func=handler(args) -> int``. Loading a config/checkpoint is the caller's business: pass
``load_spec(path) -> model_spec dict`` and ``load_model(path) -> (model, info dict)`` to
:func:`register`, and the positional CONFIG/CHECKPOINT arguments start working.

    rmn summary --model resnet18 --num-classes 100 --image-size 32 [--width-mult 1] [--procedures 8] [--csv F] [--json F]
    rmn bench latency [--quick] [--models resnet18 ...] [--json benchmarks/results/latency.json]
    rmn bench dispatch [--quick]
    rmn atlas CHECKPOINT [--dataset cifar100] [--data-dir data] [--out DIR] [--top-k 8] [--max-images 1024]
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from .cost import cost_table, format_table, write_csv, write_json

SPEC_KEYS = ("name", "num_classes", "image_size", "in_channels", "width_mult", "num_procedures")
SPEC_DEFAULTS = {"image_size": 224, "in_channels": 3, "width_mult": 1.0, "num_procedures": 8}


# -- summary -------------------------------------------------------------------------------------
def summary_from_spec(spec: dict[str, Any], include_se: bool = False) -> list[dict[str, Any]]:
    """The cost table of a model spec ``{name, num_classes, image_size, in_channels, width_mult,
    num_procedures}`` (missing optional keys take :data:`SPEC_DEFAULTS`)."""
    missing = [k for k in ("name", "num_classes") if spec.get(k) is None]
    if missing:
        raise ValueError(f"model spec needs {', '.join(missing)} (got {spec})")
    s = {**SPEC_DEFAULTS, **{k: v for k, v in spec.items() if v is not None}}
    return cost_table(s["name"], int(s["num_classes"]), int(s["image_size"]), int(s["in_channels"]),
                      float(s["width_mult"]), int(s["num_procedures"]), include_se=include_se)


def _spec_from_args(args: argparse.Namespace, load_spec: Callable[[str], dict] | None) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if getattr(args, "source", None):
        if load_spec is None:
            raise ValueError(f"summary: cannot read {args.source} here (no config/checkpoint loader); "
                             "use --model/--num-classes/--image-size")
        spec.update(load_spec(args.source))
    flags = {"name": args.model, "num_classes": args.num_classes, "image_size": args.image_size,
             "in_channels": args.in_channels, "width_mult": args.width_mult, "num_procedures": args.procedures}
    spec.update({k: v for k, v in flags.items() if v is not None})  # flags override the file
    if spec.get("name") is None or spec.get("num_classes") is None:
        raise ValueError("summary: give a CONFIG/CHECKPOINT or --model and --num-classes")
    return spec


def summary_command(args: argparse.Namespace, load_spec: Callable[[str], dict] | None = None) -> int:
    spec = _spec_from_args(args, load_spec)
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


# -- atlas ---------------------------------------------------------------------------------------
def atlas_command(model, dataset, out_dir: str | Path = "atlas", top_k: int = 8, max_images: int = 1024,
                  image_size: int | None = None, title: str | None = None) -> dict[str, Any]:
    """The memory atlas of ``model`` (a RoutedNetwork) over ``dataset`` (from ``rmn.data.build_dataset``).

    ``image_size``: the side the model takes, when it differs from the dataset's (default: the
    model's ``info.image_size`` if it has one). Returns the written paths (see ``memory_atlas``).
    """
    from .atlas import atlas_inputs, memory_atlas

    if image_size is None:
        info = getattr(model, "info", None)
        size = getattr(info, "image_size", None)
        image_size = size if size and size != dataset.spec.image_size else None
    images, display, labels, names = atlas_inputs(dataset, max_images=max_images, image_size=image_size)
    title = title or f"RMN memory atlas ({dataset.spec.name}, {images.shape[0]} images)"
    written = memory_atlas(model, images, display, labels, names, top_k=top_k, out_dir=out_dir, title=title)
    print(f"wrote {written['html']} ({len(written['grids'])} stage grids, load chart, "
          f"{len(written['heatmaps'])} heat maps)")
    return written


def _atlas_handler(args: argparse.Namespace, load_model) -> int:
    if load_model is None:
        raise ValueError("atlas: no checkpoint loader is wired into this command")
    from ..data import build_dataset

    model, info = load_model(args.checkpoint)
    info = info or {}
    name = args.dataset or info.get("dataset")
    if not name:
        raise ValueError("atlas: --dataset is needed (the checkpoint does not name one)")
    root = args.data_root or info.get("data_root")
    ds = build_dataset(name, root=root, split=args.split)
    out = args.out or (Path(info["run_dir"]) / "atlas" if info.get("run_dir") else Path("atlas"))
    atlas_command(model, ds, out, args.top_k, args.max_images)
    return 0


# -- bench ---------------------------------------------------------------------------------------
def _latency_handler(args: argparse.Namespace) -> int:
    from .latency import command

    return command(args)


def _dispatch_handler(args: argparse.Namespace) -> int:
    from .dispatch_bench import command

    return command(args)


def register(subparsers, load_spec: Callable[[str], dict] | None = None,
             load_model: Callable[[str], tuple[Any, dict]] | None = None) -> None:
    """Add ``summary``, ``bench {latency,dispatch}`` and ``atlas`` to an argparse ``subparsers``."""
    p = subparsers.add_parser("summary", help="parameters and MACs per image: backbone vs RMN without/with CA",
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
    p.set_defaults(func=lambda a: summary_command(a, load_spec))

    from .dispatch_bench import add_arguments as dispatch_args
    from .latency import add_arguments as latency_args

    b = subparsers.add_parser("bench", help="speed benchmarks (latency, dispatch overhead)")
    bsub = b.add_subparsers(dest="bench", metavar="{latency,dispatch}")
    bsub.required = True
    lat = bsub.add_parser("latency", help="CPU/CUDA latency and throughput, backbone vs RMN (random weights)")
    latency_args(lat).set_defaults(func=_latency_handler)
    dis = bsub.add_parser("dispatch", help="eval and train-step overhead of routed dispatch over the plain network")
    dispatch_args(dis).set_defaults(func=_dispatch_handler)

    a = subparsers.add_parser("atlas", help="each memory's top-K nearest images, routing heat maps and load charts")
    a.add_argument("checkpoint", help="a trained RMN checkpoint or run folder (a run.mode both folder: its rmn/ run)")
    a.add_argument("--dataset", help="dataset name (default: the checkpoint's)")
    a.add_argument("--data-dir", "--data-root", dest="data_root", metavar="DIR",
                   help="dataset root (default: the checkpoint's, or $RMN_DATA); --data-root is the old spelling")
    a.add_argument("--split", default="test", help="evaluation split (default: test)")
    a.add_argument("--out", default=None, metavar="DIR", help="output folder (default: atlas/ in the checkpoint's run folder)")
    a.add_argument("--top-k", type=int, default=8)
    a.add_argument("--max-images", type=int, default=1024)
    a.set_defaults(func=lambda args: _atlas_handler(args, load_model))


def main(argv=None) -> int:
    """Stand-alone entry (``python -m rmn.analysis.cli``) for use before ``rmn.cli`` wires it."""
    parser = argparse.ArgumentParser(prog="rmn")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        parser.exit(2, f"rmn: error: {e}\n")


if __name__ == "__main__":
    raise SystemExit(main())
