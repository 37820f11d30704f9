"""CIFAR-10 / CIFAR-100 from the official python-pickle releases, held in memory as uint8.

Layouts (exactly as unpacked from the official archives)::

    cifar-100-python/{train,test,meta}            keys data [N,3072] uint8, fine_labels; fine_label_names
    cifar-10-batches-py/data_batch_{1..5},test_batch,batches.meta   keys data, labels; label_names

Rows of ``data`` are three 32x32 planes (R, G, B), so a reshape to ``[N, 3, 32, 32]`` is exact.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import DataError, InMemoryDataset, dataset_spec, default_root, find_dataset_dir, resolve_split
from .download import download_release
from .safe_pickle import load_pickle, text_keys

_RELEASES = {
    "cifar100": dict(
        dirname="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        files={"train": ["train"], "test": ["test"]},
        meta="meta", names_key="fine_label_names", labels_key="fine_labels",
    ),
    "cifar10": dict(
        dirname="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        files={"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        meta="batches.meta", names_key="label_names", labels_key="labels",
    ),
}


def load_cifar(name: str, root=None, split: str = "train", download: bool = False,
               url: str | None = None, md5: str | None = None) -> InMemoryDataset:
    """Read a CIFAR release; with ``download=True`` fetch it first if ``root`` lacks it.

    ``url``/``md5`` override the official archive (tests serve a small one from 127.0.0.1).
    """
    rel = _RELEASES[name]
    split = resolve_split(split, "test", name)
    if download:
        download_release(url or rel["url"], md5 or rel["md5"], Path(root) if root is not None else default_root(),
                         rel["dirname"])
    folder = find_dataset_dir(root, rel["dirname"], rel["meta"], name)
    classes = _read_names(folder / rel["meta"], rel["names_key"])
    images, labels = [], []
    for fname in rel["files"][split]:
        path = folder / fname
        if not path.exists():
            raise DataError(f"{path}: missing (the {name} release has {', '.join(sum(rel['files'].values(), []))})")
        x, y = _read_batch(path, rel["labels_key"], len(classes))
        images.append(x)
        labels.append(y)
    x = torch.from_numpy(np.concatenate(images)).reshape(-1, 3, 32, 32)
    y = torch.from_numpy(np.concatenate(labels))
    return InMemoryDataset(x, y, classes, dataset_spec(name), split)


def _read_names(path: Path, key: str) -> list[str]:
    meta = text_keys(load_pickle(path), path)
    names = meta.get(key)
    if not isinstance(names, list) or not names:
        raise DataError(f"{path}: key {key!r} is missing or not a list of class names")
    out = []
    for n in names:
        if isinstance(n, bytes):
            n = n.decode("latin1")
        if not isinstance(n, str):
            raise DataError(f"{path}: class name {n!r} in {key!r} is not a string")
        out.append(n)
    return out


def _read_batch(path: Path, labels_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = text_keys(load_pickle(path), path)
    data = batch.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} array of shape {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: key 'data' must be a uint8 array of shape [N, 3072], found {got}")
    raw = batch.get(labels_key)
    if not isinstance(raw, (list, np.ndarray)) or not all(isinstance(v, (int, np.integer)) for v in raw):
        raise DataError(f"{path}: key {labels_key!r} is missing or not a list of integer labels")
    labels = np.asarray(raw, dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {len(labels)} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}")
    return data, labels
