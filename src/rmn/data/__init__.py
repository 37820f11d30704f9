"""Datasets read from their real on-disk releases, and fast reproducible batch loaders.

>>> ds = build_dataset("cifar100", root="data", split="train")       # doctest: +SKIP
>>> loader = build_loader(ds, 128, train=True, augment=True, device="cuda")  # doctest: +SKIP
>>> for epoch in range(epochs):                                         # doctest: +SKIP
...     loader.set_epoch(epoch)
...     for x, y in loader: ...

Datasets return un-augmented ``(float32 [C,H,W] in [0,1], int label)`` items and carry ``.classes``,
``.num_classes`` and ``.spec``; in-memory ones (CIFAR, (Fashion-)MNIST, digits) also ``.images`` (uint8
``[N,C,H,W]``) and ``.targets`` (int64 ``[N]``). Bad input raises :class:`DataError` (a ``ValueError``)
with a one-line message naming the file or option.
"""
from __future__ import annotations


from .augment import pad_crop_flip, random_resized_crop_box
from .base import SPECS, DataError, DatasetSpec, InMemoryDataset, dataset_spec
from .cifar import load_cifar
from .digits import load_digits_dataset
from .folder import ImageFileDataset, load_folder
from .imagenet import load_imagenet
from .loader import FileLoader, TensorLoader, build_loader
from .mnist import load_mnist
from .tiny_imagenet import load_tiny_imagenet

DATASETS = tuple(SPECS)

_READERS = {
    "cifar10": lambda **kw: load_cifar("cifar10", **kw),
    "cifar100": lambda **kw: load_cifar("cifar100", **kw),
    "tiny-imagenet": load_tiny_imagenet,
    "imagenet": load_imagenet,
    "fashion-mnist": lambda **kw: load_mnist("fashion-mnist", **kw),
    "mnist": lambda **kw: load_mnist("mnist", **kw),
    "digits": load_digits_dataset,
    "folder": load_folder,
}
# Options beyond root/split each reader takes (download only where an official archive exists).
_OPTIONS = {
    "cifar10": {"download", "url", "md5"},
    "cifar100": {"download", "url", "md5"},
    "imagenet": {"val_labels"},
}


def build_dataset(name: str, root=None, split: str = "train", download: bool = False, **kw):
    """The ``split`` of dataset ``name`` read from ``root``; see the module docstring for what it returns.

    ``root`` defaults to ``$RMN_DATA`` (or ``./data``); for ``fashion-mnist`` to
    ``/usr/share/datasets/fashion-mnist``; ``digits`` ships with scikit-learn and ignores it.
    Extra options: ``url=``/``md5=`` (CIFAR download source), ``val_labels=`` (ImageNet flat val/).
    """
    dataset_spec(name)  # unknown name -> DataError
    allowed = _OPTIONS.get(name, set())
    if download:
        if "download" not in allowed:
            raise DataError(f"build_dataset({name!r}): download=True is only available for cifar10 and cifar100 "
                            "(the other releases need a manual download or licence acceptance)")
        kw["download"] = True
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise DataError(f"build_dataset({name!r}): unexpected option {unknown[0]!r}"
                        + (f" (accepted: {', '.join(sorted(allowed))})" if allowed else ""))
    if not isinstance(split, str):
        raise DataError(f"build_dataset({name!r}): split must be a string such as 'train', got {split!r}")
    return _READERS[name](root=root, split=split, **kw)


__all__ = [
    "DATASETS", "DataError", "DatasetSpec", "FileLoader", "ImageFileDataset", "InMemoryDataset", "TensorLoader",
    "build_dataset", "build_loader", "dataset_spec", "pad_crop_flip", "random_resized_crop_box",
]
