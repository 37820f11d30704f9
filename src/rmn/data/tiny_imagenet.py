"""Tiny ImageNet (``tiny-imagenet-200``) read in its released layout, no re-foldering needed::

    wnids.txt                         200 wnids, one per line
    words.txt                         optional: "wnid<TAB>names" for class names
    train/<wnid>/images/*.JPEG        500 per class
    val/images/*.JPEG + val/val_annotations.txt   "file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1"

Label order is the *sorted* wnids (not the order of ``wnids.txt``) so that indices agree with the
usual ImageFolder conversion of the same data. ``test/`` has no published labels and is never read;
``split="test"`` is an alias of ``"val"``.
"""
from __future__ import annotations

import os
from pathlib import Path

from .base import DataError, dataset_spec, find_dataset_dir, resolve_split
from .folder import IMAGE_EXTENSIONS, ImageFileDataset, list_images


def load_tiny_imagenet(root=None, split: str = "train") -> ImageFileDataset:
    split = resolve_split(split, "val", "tiny-imagenet")
    folder = find_dataset_dir(root, "tiny-imagenet-200", "wnids.txt", "tiny-imagenet")
    classes = sorted(_read_wnids(folder / "wnids.txt"))
    index = {w: i for i, w in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    if split == "train":
        if not (folder / "train").is_dir():
            raise DataError(f"{folder / 'train'}: missing (split 'train' of tiny-imagenet)")
        for wnid in classes:
            d = folder / "train" / wnid / "images"
            if not d.is_dir():
                raise DataError(f"{d}: missing (wnids.txt lists {wnid})")
            files = list_images(d)
            if not files:
                raise DataError(f"{d}: holds no JPEG images")
            paths += [os.path.join("train", wnid, "images", f) for f in files]
            labels += [index[wnid]] * len(files)
    else:
        paths, labels = _read_val(folder, index)
    names = _read_words(folder / "words.txt", classes)
    return ImageFileDataset(folder, paths, labels, classes, dataset_spec("tiny-imagenet"), split, names)


def _read_wnids(path: Path) -> list[str]:
    try:
        wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    bad = next((w for w in wnids if len(w.split()) != 1), None)
    if bad is not None or not wnids:
        raise DataError(f"{path}: expected one wnid per line, found {bad!r}" if bad else f"{path}: is empty")
    if len(set(wnids)) != len(wnids):
        raise DataError(f"{path}: lists a wnid more than once")
    return wnids


def _read_val(folder: Path, index: dict[str, int]) -> tuple[list[str], list[int]]:
    ann = folder / "val" / "val_annotations.txt"
    images = folder / "val" / "images"
    if not ann.exists():
        raise DataError(f"{ann}: missing (split 'val' of tiny-imagenet)")
    if not images.is_dir():
        raise DataError(f"{images}: missing (split 'val' of tiny-imagenet)")
    present = set(os.listdir(images))
    rows = []
    try:
        lines = ann.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{ann}: cannot read ({exc})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 6 or not all(f.strip().lstrip("-").isdigit() for f in fields[2:]):
            raise DataError(f"{ann}:{n}: expected 'file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1', found {line!r}")
        fname, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise DataError(f"{ann}:{n}: wnid {wnid} is not in wnids.txt")
        if fname not in present or not fname.lower().endswith(IMAGE_EXTENSIONS):
            raise DataError(f"{images / fname}: listed in {ann.name} line {n} but missing")
        rows.append((fname, index[wnid]))
    if not rows:
        raise DataError(f"{ann}: lists no images")
    rows.sort()
    return [os.path.join("val", "images", f) for f, _ in rows], [y for _, y in rows]


def _read_words(path: Path, classes: list[str]) -> list[str] | None:
    """Class names from ``words.txt`` (first synonym), or ``None`` if the file is absent."""
    if not path.exists():
        return None
    wanted, names = set(classes), {}
    for line in path.read_text(errors="replace").splitlines():
        wnid, _, words = line.partition("\t")
        wnid = wnid.strip()
        if wnid in wanted:
            names[wnid] = words.split(",")[0].strip() or wnid
    return [names.get(w, w) for w in classes]
