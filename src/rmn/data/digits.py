"""scikit-learn's bundled digits (1,797 real 8x8 scans), so demos and tests run with no download.

Pixel values 0..16 are scaled to uint8 0..255. The train/test split is stratified 80/20 with a fixed
seed (0) that does not follow the run seed, so every run evaluates on the same 360 images.
"""
from __future__ import annotations

import numpy as np
import torch

from ..extras import require
from .base import InMemoryDataset, dataset_spec, resolve_split

SPLIT_SEED = 0


def digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(images uint8 [N,1,8,8], labels int64 [N], train_index, test_index)``, indices sorted."""
    feature = "the digits dataset"
    load_digits = require("sklearn.datasets", extra="digits", feature=feature).load_digits
    train_test_split = require("sklearn.model_selection", extra="digits", feature=feature).train_test_split

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    train, test = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels,
                                   random_state=SPLIT_SEED)
    return images, labels, np.sort(train), np.sort(test)


def load_digits_dataset(root=None, split: str = "train") -> InMemoryDataset:
    """``root`` is accepted for a uniform interface and ignored: the data ships with scikit-learn."""
    split = resolve_split(split, "test", "digits")
    images, labels, train, test = digits_arrays()
    index = train if split == "train" else test
    return InMemoryDataset(torch.from_numpy(images[index]), torch.from_numpy(labels[index]),
                           [str(i) for i in range(10)], dataset_spec("digits"), split)
