"""Parameters and multiply-adds per image, in the layout of the paper's tables.

The counting itself (:func:`count_params`, :func:`macs_per_image` on the executed path) lives in
:mod:`rmn.cost`, shared with the run summary; this module builds the tables from it.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backbones import create_backbone
from ..cost import count_params, macs_per_image
from ..route import route

PRETTY = {"resnet18": "ResNet-18", "resnet50": "ResNet-50", "vgg16": "VGG-16", "efficientnet_b0": "EfficientNet-B0"}


def pretty_name(name: str) -> str:
    return PRETTY.get(name.lower(), name)


# -- the paper's table -------------------------------------------------------------------------
VARIANTS = {
    # key: (label suffix, routed?, attention)
    "backbone": ("", False, False),
    "se": (" + SE", False, "se"),
    "rmn": ("RMN without CA", True, False),
    "rmn_se": ("RMN + SE", True, "se"),
    "rmn_ca": ("RMN with CA", True, True),
}


def _row(label: str, name: str, variant: str, n: int, model: nn.Module, input_shape, batch: int) -> dict[str, Any]:
    params = count_params(model)
    macs = macs_per_image(model, input_shape, batch=batch)
    return {
        "model": label,
        "backbone": name,
        "variant": variant,
        "num_procedures": n,
        "params": params,
        "params_M": round(params / 1e6, 2),
        "macs": macs,
        "macs_G": round(macs / 1e9, 3),
    }


def cost_table(
    name: str,
    num_classes: int,
    image_size: int = 224,
    in_channels: int = 3,
    width_mult: float = 1.0,
    num_procedures: int = 8,
    include_se: bool = False,
    batch: int = 2,
) -> list[dict[str, Any]]:
    """Rows ``backbone / [backbone + SE] / RMN without CA / [RMN + SE] / RMN with CA``.

    Each row: ``model`` (label), ``backbone``, ``variant``, ``num_procedures``, ``params``,
    ``params_M``, ``macs`` (per image), ``macs_G``. Models have random weights and all-zero
    memories (every sample takes procedure 0: the cost of any single path is the same).
    """
    torch.manual_seed(0)
    bb = create_backbone(name, num_classes, image_size=image_size, in_channels=in_channels, width_mult=width_mult).eval()
    shape = (in_channels, image_size, image_size)
    pretty = pretty_name(name)
    keys = ["backbone", "se", "rmn", "rmn_se", "rmn_ca"] if include_se else ["backbone", "rmn", "rmn_ca"]
    rows = []
    for key in keys:
        suffix, routed, attention = VARIANTS[key]
        if key == "backbone":
            model, label, n = bb, pretty, 1
        elif not routed:
            model = route(bb, None, 1, attention, clone=False, attention_init="random")
            label, n = pretty + suffix, 1
        else:
            model = route(bb, None, num_procedures, attention, attention_init="random")
            label, n = f"{pretty} {suffix} (N={num_procedures})", num_procedures
        rows.append(_row(label, name, key, n, model.eval(), shape, batch))
        del model
    return rows


SPEC_DEFAULTS = {"image_size": 224, "in_channels": 3, "width_mult": 1.0, "num_procedures": 8}


def summary_from_spec(spec: dict[str, Any], include_se: bool = False) -> list[dict[str, Any]]:
    """The cost table of a model spec ``{name, num_classes, image_size, in_channels, width_mult,
    num_procedures}`` (missing optional keys take :data:`SPEC_DEFAULTS`), as ``rmn summary`` prints it."""
    missing = [k for k in ("name", "num_classes") if spec.get(k) is None]
    if missing:
        raise ValueError(f"model spec needs {', '.join(missing)} (got {spec})")
    s = {**SPEC_DEFAULTS, **{k: v for k, v in spec.items() if v is not None}}
    return cost_table(s["name"], int(s["num_classes"]), int(s["image_size"]), int(s["in_channels"]),
                      float(s["width_mult"]), int(s["num_procedures"]), include_se=include_se)


# -- output ------------------------------------------------------------------------------------
TABLE_COLUMNS = [("model", "Model"), ("params_M", "Params (M)"), ("macs_G", "MACs (G)")]


def format_table(rows: list[dict[str, Any]], columns=TABLE_COLUMNS) -> str:
    """Aligned plain-text table (first column left-aligned, numbers right-aligned)."""
    header = [title for _, title in columns]

    def cell(row, key):
        v = row.get(key, "")
        if key == "params_M" and isinstance(v, (int, float)):
            return f"{v:.2f}"
        if key == "macs_G" and isinstance(v, (int, float)):
            return f"{v:.3f}"
        return str(v)

    body = [[cell(r, k) for k, _ in columns] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), "  ".join("-" * w for w in widths)] + [line(b) for b in body]
    return "\n".join(out)


CSV_FIELDS = ["model", "backbone", "variant", "num_procedures", "params", "params_M", "macs", "macs_G"]


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(rows_to_csv(rows))
    return path


def write_json(rows: list[dict[str, Any]], path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    return write_report({"rows": rows} if meta is None else {"meta": meta, "rows": rows}, path)


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """A benchmark's or table's results as indented JSON (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
