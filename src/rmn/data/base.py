"""Shared pieces of ``rmn.data``: the error type, dataset specs, root/split resolution.

Every reader raises :class:`DataError` with one line that names the file or option and says what
is wrong, so a user with a broken download sees the cause instead of a traceback.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import Dataset


class DataError(ValueError):
    """Bad data or a bad data option; the message is one line naming the file/option and the problem."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def one_line(text: str) -> str:
    """Collapse whitespace so messages built from foreign exceptions stay on a single line."""
    return " ".join(str(text).split())


@dataclass(frozen=True)
class DatasetSpec:
    """What a model and a loader need to know about a dataset before reading it.

    ``image_size`` is the native side (for ImageNet and image folders: the crop side the loader
    produces). ``augmentation`` names the training augmentation: ``"pad-crop"`` (zero-pad by
    ``padding`` then random crop back to native size, plus a horizontal flip when ``flip``) or
    ``"random-resized-crop"`` (Inception-style crop to ``image_size`` plus flip). ``num_classes`` is
    ``None`` only for ``folder``, where it is known once the folder is read (``dataset.spec``).
    """

    name: str
    num_classes: int | None
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augmentation: str
    padding: int = 0
    flip: bool = True
    in_memory: bool = False

    def with_classes(self, num_classes: int) -> "DatasetSpec":
        return replace(self, num_classes=num_classes)


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

SPECS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                           "pad-crop", padding=4, flip=True, in_memory=True),
    "cifar100": DatasetSpec("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                            "pad-crop", padding=4, flip=True, in_memory=True),
    "tiny-imagenet": DatasetSpec("tiny-imagenet", 200, 3, 64, _IMAGENET_MEAN, _IMAGENET_STD,
                                 "pad-crop", padding=8, flip=True),
    "imagenet": DatasetSpec("imagenet", 1000, 3, 224, _IMAGENET_MEAN, _IMAGENET_STD,
                            "random-resized-crop", flip=True),
    # Fashion-MNIST items are left/right symmetric (shoes point either way), so flipping is valid.
    "fashion-mnist": DatasetSpec("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,),
                                 "pad-crop", padding=4, flip=True, in_memory=True),
    # Handwritten digits are not flip-invariant (a flipped 2 is not a 2).
    "mnist": DatasetSpec("mnist", 10, 1, 28, (0.1307,), (0.3081,),
                         "pad-crop", padding=4, flip=False, in_memory=True),
    # 8x8 images: a 1-pixel shift is already 12% of the side, so pad 1 (pad 4 would erase digits).
    # mean/std measured on the fixed train split (see digits.py; a test re-derives them).
    "digits": DatasetSpec("digits", 10, 1, 8, (0.3054,), (0.3760,),
                          "pad-crop", padding=1, flip=False, in_memory=True),
    "folder": DatasetSpec("folder", None, 3, 224, _IMAGENET_MEAN, _IMAGENET_STD,
                          "random-resized-crop", flip=True),
}


def dataset_spec(name: str) -> DatasetSpec:
    """The static :class:`DatasetSpec` of a dataset name (see :data:`SPECS`)."""
    try:
        return SPECS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(SPECS)}") from None


# Canonical split names: in-memory sets have "train"/"test", ImageNet-style sets "train"/"val";
# the other evaluation name is accepted as an alias so callers can say either.
_ALIASES = {"test": "test", "val": "test"}


def resolve_split(split: str, eval_name: str, dataset: str) -> str:
    """Map ``split`` to ``"train"`` or ``eval_name`` (``"test"`` or ``"val"``)."""
    if split == "train":
        return "train"
    if split in _ALIASES:
        return eval_name
    raise DataError(f"{dataset}: split {split!r} is not one of 'train', '{eval_name}' "
                    f"(or its alias '{'val' if eval_name == 'test' else 'test'}')")


def default_root() -> Path:
    """Where datasets live when ``root`` is not given: ``$RMN_DATA`` or ``./data``."""
    return Path(os.environ.get("RMN_DATA", "data"))


def find_dataset_dir(root: str | os.PathLike | None, dirname: str, marker: str, dataset: str) -> Path:
    """Accept ``root`` as either the release folder itself or the folder that holds it."""
    base = Path(root) if root is not None else default_root()
    if not base.exists():
        raise DataError(f"{dataset}: root {base} does not exist")
    for candidate in (base / dirname, base):
        if (candidate / marker).exists():
            return candidate
    raise DataError(f"{dataset}: {base} holds no {dirname} release (looked for {base / dirname / marker} "
                    f"and {base / marker})")


class LabelledDataset(Dataset):
    """What every dataset here carries: class names in label order, its spec and its split."""

    def _set_labels(self, classes: list[str], spec: DatasetSpec, split: str) -> None:
        self.classes = list(classes)
        self.spec = spec
        self.split = split

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class InMemoryDataset(LabelledDataset):
    """A whole dataset as one uint8 tensor, so loaders index batches without per-item Python.

    ``images`` is uint8 ``[N, C, H, W]``, ``targets`` int64 ``[N]``; ``ds[i]`` is the un-augmented
    image as float32 in [0, 1] and its int label.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, classes: list[str], spec: DatasetSpec,
                 split: str) -> None:
        assert images.dtype == torch.uint8 and images.dim() == 4
        assert targets.dtype == torch.int64 and targets.shape == (images.shape[0],)
        self.images = images
        self.targets = targets
        self._set_labels(classes, spec, split)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float().div_(255.0), int(self.targets[index])

    def __repr__(self) -> str:
        c, h, w = self.images.shape[1:]
        return f"{type(self).__name__}({self.spec.name!r}, split={self.split!r}, n={len(self)}, {c}x{h}x{w})"
