"""MNIST and Fashion-MNIST from their idx files (plain or ``.gz``), held in memory as uint8.

The idx format: a big-endian uint32 magic ``0x00000800 | ndim`` (2051 for images, 2049 for labels),
then one big-endian uint32 per dimension, then the raw ubyte values. Files are named
``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``; Debian's ``dataset-fashion-mnist`` ships the
four ``.gz`` files in ``/usr/share/datasets/fashion-mnist``, the default root for ``fashion-mnist``.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from .base import DataError, InMemoryDataset, dataset_spec, default_root, one_line, resolve_split

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DEFAULT_ROOTS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist"), "mnist": None}
_TORCHVISION_DIRS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


def load_mnist(name: str, root=None, split: str = "train") -> InMemoryDataset:
    """Read ``mnist`` or ``fashion-mnist``; ``root`` may also be a torchvision ``<root>/<Name>/raw`` tree."""
    split = resolve_split(split, "test", name)
    folder = _find_folder(name, root)
    prefix = "train" if split == "train" else "t10k"
    lpath = _pick(folder, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(_pick(folder, f"{prefix}-images-idx3-ubyte"), IMAGES_MAGIC)
    labels = read_idx(lpath, LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{lpath}: {labels.shape[0]} labels for {images.shape[0]} images")
    if labels.size and labels.max() > 9:
        raise DataError(f"{lpath}: labels must lie in 0..9, found {labels.max()}")
    classes = FASHION_CLASSES if name == "fashion-mnist" else [str(i) for i in range(10)]
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return InMemoryDataset(x, y, classes, dataset_spec(name), split)


def _find_folder(name: str, root) -> Path:
    if root is None:
        base = DEFAULT_ROOTS[name] or default_root() / name
        hint = " (install the Debian package dataset-fashion-mnist or pass root=)" if name == "fashion-mnist" \
            else " (pass root=)"
    else:
        base, hint = Path(root), ""
    if not base.exists():
        raise DataError(f"{name}: root {base} does not exist{hint}")
    for candidate in (base, base / _TORCHVISION_DIRS[name] / "raw"):
        if any(candidate.glob("*-idx[13]-ubyte*")):
            return candidate
    raise DataError(f"{name}: {base} holds no idx files (expected train-images-idx3-ubyte[.gz] and friends)")


def _pick(folder: Path, stem: str) -> Path:
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.exists():
            return path
    raise DataError(f"{folder / stem}[.gz]: missing")


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read one idx ubyte file, checking the magic number and that the payload is complete."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({type(exc).__name__}: {one_line(exc) or 'truncated gzip'})") from None
    ndim = magic & 0xFF
    if len(raw) < 4:
        raise DataError(f"{path}: truncated: {len(raw)} bytes is too short for an idx header")
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        kind = "image (idx3)" if magic == IMAGES_MAGIC else "label (idx1)"
        raise DataError(f"{path}: wrong magic number {found} (0x{found:08x}); an {kind} ubyte file starts with {magic}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated: header needs {header} bytes, file has {len(raw)}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    need = int(np.prod(dims, dtype=np.int64))
    have = len(raw) - header
    if have < need:
        raise DataError(f"{path}: truncated: header promises {'x'.join(map(str, dims))} values "
                        f"({need} bytes) but only {have} follow")
    if have > need:
        raise DataError(f"{path}: {have - need} unexpected bytes after the {'x'.join(map(str, dims))} values")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
