"""ImageNet (ILSVRC-2012 classification) in the two layouts people actually have::

    train/<wnid>/*.JPEG   val/<wnid>/*.JPEG          (ImageFolder layout)
    train/<wnid>/*.JPEG   val/*.JPEG + labels file   (the official flat validation folder)

The labels file for a flat ``val/`` is Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``,
the wnid is the first token of the prediction string) or plain text lines ``<filename> <wnid>``. It is
found next to ``val/`` or up to three folders above ``root`` (Kaggle's ``ILSVRC/Data/CLS-LOC`` tree),
or given as ``val_labels=``. The devkit's ``ILSVRC2012_validation_ground_truth.txt`` (ILSVRC ids in
the devkit's own order) is not supported. Class index = position in the sorted wnids of ``train/``.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from .base import DataError, dataset_spec, default_root, resolve_split
from .folder import IMAGE_EXTENSIONS, ImageFileDataset, class_dirs, scan_class_folders

LABEL_FILES = ("LOC_val_solution.csv", "val_labels.txt")


def load_imagenet(root=None, split: str = "train", val_labels=None) -> ImageFileDataset:
    split = resolve_split(split, "val", "imagenet")
    base = Path(root) if root is not None else default_root() / "imagenet"
    if not base.is_dir():
        raise DataError(f"imagenet: root {base} does not exist")
    train_dir, val_dir = base / "train", base / "val"
    split_dir = train_dir if split == "train" else val_dir
    if not split_dir.is_dir():
        raise DataError(f"imagenet: {split_dir} is missing (split {split!r})")
    classes = class_dirs(train_dir) if train_dir.is_dir() else None
    if split == "train" or class_dirs(val_dir):
        classes = classes or class_dirs(val_dir)
        if not classes:
            raise DataError(f"imagenet: {train_dir} has no <wnid> class folders")
        paths, labels = scan_class_folders(split_dir, classes, base, require_all=split == "train")
    else:
        label_file = Path(val_labels) if val_labels is not None else _find_label_file(base)
        rows = _read_val_labels(label_file)
        classes = classes or sorted(set(rows.values()))
        paths, labels = _match_flat_val(val_dir, rows, classes, label_file)
    return ImageFileDataset(base, paths, labels, classes, dataset_spec("imagenet"), split)


def _find_label_file(base: Path) -> Path:
    places = [base / "val", base] + list(base.resolve().parents)[:3]
    for place in places:
        for name in LABEL_FILES:
            if (place / name).is_file():
                return place / name
    raise DataError(f"imagenet: {base / 'val'} is a flat folder, so it needs a labels file: put "
                    f"LOC_val_solution.csv (or 'filename wnid' lines in val_labels.txt) next to it, or pass val_labels=")


def _read_val_labels(path: Path) -> dict[str, str]:
    """``{image stem: wnid}`` from a LOC_val_solution.csv or a ``filename wnid`` text file."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the validation labels ({exc})") from None
    lines = text.splitlines()
    out: dict[str, str] = {}
    if lines and lines[0].startswith("ImageId"):
        for n, row in enumerate(csv.reader(lines[1:]), 2):
            if not row:
                continue
            if len(row) != 2 or not row[1].split():
                raise DataError(f"{path}:{n}: expected 'ImageId,PredictionString', found {','.join(row)!r}")
            out[Path(row[0].strip()).stem] = row[1].split()[0]
    else:
        for n, line in enumerate(lines, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) == 1 and fields[0].isdigit():
                raise DataError(f"{path}: looks like the devkit's ILSVRC2012_validation_ground_truth.txt (ILSVRC ids), "
                                "which is not supported; use LOC_val_solution.csv or 'filename wnid' lines")
            if len(fields) != 2:
                raise DataError(f"{path}:{n}: expected '<filename> <wnid>', found {line!r}")
            out[Path(fields[0]).stem] = fields[1]
    if not out:
        raise DataError(f"{path}: lists no validation labels")
    return out


def _match_flat_val(val_dir: Path, rows: dict[str, str], classes: list[str], label_file: Path
                    ) -> tuple[list[str], list[int]]:
    index = {c: i for i, c in enumerate(classes)}
    files = sorted(f for f in os.listdir(val_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise DataError(f"imagenet: {val_dir} holds no images")
    paths, labels = [], []
    for f in files:
        wnid = rows.get(Path(f).stem)
        if wnid is None:
            raise DataError(f"{val_dir / f}: has no label in {label_file}")
        if wnid not in index:
            raise DataError(f"{label_file}: wnid {wnid} (for {f}) is not a class folder of train/")
        paths.append(os.path.join("val", f))
        labels.append(index[wnid])
    return paths, labels
