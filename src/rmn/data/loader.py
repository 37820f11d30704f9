"""Batch loaders: normalised ``(x float32 [B,C,H,W], y int64 [B])`` on ``device``, reproducible per epoch.

Everything random is a pure function of ``(seed, epoch)`` -- the shuffle order -- and of
``(seed, epoch, sample index)`` -- each sample's augmentation -- so iterating an epoch twice gives the
same batches (exact checkpoint resume) whatever the worker count or device.

Sharding (``rank``/``world_size``):

* training (``train=True``): every rank draws the same epoch permutation and takes every
  ``world_size``-th entry starting at ``rank``. With ``drop_last`` (the default for training) the
  permutation is cut to a multiple of ``world_size`` and each rank's share to whole batches; without
  it the permutation is padded by wrapping around, so a few samples appear twice in that epoch. Either
  way all ranks yield the same number of batches.
* evaluation (``train=False``): no shuffling, no augmentation, nothing dropped and nothing padded:
  rank ``r`` gets the contiguous slice ``[n*r//W, n*(r+1)//W)``, so summing correct/total over ranks
  counts every sample exactly once (ranks may differ by one batch; do not put a collective per batch).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .augment import (fit_square, normalize_, pad_crop_flip, pad_crop_flip_pil, random_resized_crop,
                      resize_batch, resize_center_crop)
from .base import DataError
from .folder import pil_to_uint8

_SHUFFLE, _AUGMENT, _PER_IMAGE = 0, 1, 2  # stream ids, so the three random streams never coincide


def build_loader(dataset, batch_size: int, *, train: bool, augment: bool, device="cpu", workers: int = 0,
                 seed: int = 0, image_size: int | None = None, drop_last: bool | None = None,
                 rank: int = 0, world_size: int = 1) -> "TensorLoader | FileLoader":
    """A loader over a dataset from :func:`rmn.data.build_dataset`.

    ``augment`` applies the dataset's training augmentation and needs ``train=True``. ``image_size``
    resizes whole batches (in-memory sets and Tiny ImageNet) or sets the crop side (ImageNet, folder).
    ``workers`` is the number of decoding processes for image-file datasets (ignored in memory).
    ``drop_last`` defaults to ``train``.
    """
    spec = getattr(dataset, "spec", None)
    if spec is None:
        raise DataError(f"build_loader: {type(dataset).__name__} has no .spec; make datasets with build_dataset()")
    _check_int("batch_size", batch_size, 1)
    _check_int("workers", workers, 0)
    _check_int("seed", seed, 0)
    _check_int("world_size", world_size, 1)
    _check_int("rank", rank, 0)
    if rank >= world_size:
        raise DataError(f"build_loader: rank={rank} must be below world_size={world_size}")
    if image_size is not None:
        _check_int("image_size", image_size, 1)
    if augment and not train:
        raise DataError("build_loader: augment=True needs train=True (evaluation is never augmented)")
    cls = TensorLoader if hasattr(dataset, "images") else FileLoader
    loader = cls(dataset, batch_size, train=bool(train), augment=bool(augment), device=torch.device(device),
                 workers=workers, seed=seed, image_size=image_size,
                 drop_last=bool(train) if drop_last is None else bool(drop_last), rank=rank, world_size=world_size)
    if len(loader) == 0 and len(dataset) > 0 and train:
        raise DataError(f"build_loader: batch_size={batch_size} exceeds the {loader.per_rank} samples per rank "
                        f"of this {len(dataset)}-sample set, so an epoch has no batch; lower batch_size or "
                        "pass drop_last=False")
    return loader


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise DataError(f"build_loader: {name} must be an integer >= {low}, got {value!r}")


class _Loader:
    """Epoch bookkeeping and sharding shared by both loaders."""

    def __init__(self, dataset, batch_size, *, train, augment, device, workers, seed, image_size, drop_last,
                 rank, world_size) -> None:
        self.dataset = dataset
        self.spec = dataset.spec
        self.batch_size = batch_size
        self.train, self.augment, self.device = train, augment, device
        self.workers, self.seed, self.image_size = workers, seed, image_size
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch = 0
        n = len(dataset)
        if train:
            self.per_rank = n // world_size if drop_last else math.ceil(n / world_size)
        else:
            self.per_rank = n * (rank + 1) // world_size - n * rank // world_size
        self._mean = torch.tensor(self.spec.mean, dtype=torch.float32, device=device)
        self._std = torch.tensor(self.spec.std, dtype=torch.float32, device=device)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration reproduces."""
        _check_int("epoch", epoch, 0)
        self.epoch = int(epoch)

    def __len__(self) -> int:
        b = self.batch_size
        return self.per_rank // b if self.drop_last else math.ceil(self.per_rank / b)

    def indices(self) -> np.ndarray:
        """This rank's sample indices for the current epoch, in batch order (before dropping a tail)."""
        n, w = len(self.dataset), self.world_size
        if not self.train:
            return np.arange(n * self.rank // w, n * (self.rank + 1) // w)
        order = np.random.default_rng([self.seed, self.epoch, _SHUFFLE]).permutation(n)
        if w > 1:
            total = self.per_rank * w
            order = order[:total] if total <= n else np.resize(order, total)  # np.resize wraps around
            order = order[self.rank::w]
        return order

    def _batches(self) -> list[np.ndarray]:
        order = self.indices()
        b = self.batch_size
        return [order[i:i + b] for i in range(0, len(self) * b, b)]

    def _finish(self, x: torch.Tensor, resize: bool) -> torch.Tensor:
        x = x.float()
        if resize and self.image_size is not None:
            x = resize_batch(x, self.image_size)
        return normalize_(x, self._mean, self._std)


class TensorLoader(_Loader):
    """In-memory datasets: uint8 images live on ``device``; batches are indexed and augmented as tensors."""

    def __init__(self, dataset, batch_size, **kw) -> None:
        super().__init__(dataset, batch_size, **kw)
        # One device copy per dataset, shared by all its loaders (train, eval-mode feature pass, ...).
        cache = dataset.__dict__.setdefault("_device_copies", {})
        hit = cache.get(self.device)
        if hit is None or hit[0] is not dataset.images or hit[1] is not dataset.targets:
            hit = (dataset.images, dataset.targets, dataset.images.to(self.device), dataset.targets.to(self.device))
            cache[self.device] = hit
        self._images, self._targets = hit[2], hit[3]

    def augment_params(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(dy, dx, flip)`` for every sample of the dataset in the current epoch (indexed by sample)."""
        n, p = len(self.dataset), self.spec.padding
        rng = np.random.default_rng([self.seed, self.epoch, _AUGMENT])
        dy = rng.integers(0, 2 * p + 1, size=n)
        dx = rng.integers(0, 2 * p + 1, size=n)
        flip = rng.random(n) < 0.5 if self.spec.flip else np.zeros(n, dtype=bool)
        return dy, dx, flip

    def __iter__(self):
        batches = self._batches()
        dev = self.device
        if self.augment:
            dy, dx, flip = (torch.from_numpy(a).to(dev) for a in self.augment_params())
        order = torch.from_numpy(np.concatenate(batches) if batches else np.zeros(0, np.int64)).to(dev)
        start = 0
        for batch in batches:
            idx = order[start:start + len(batch)]
            start += len(batch)
            x = self._images.index_select(0, idx).float()  # index_select: ~15x faster than x[idx] for uint8
            if self.augment:  # float gather is ~2x faster than uint8 gather on CPU
                x = pad_crop_flip(x, dy[idx], dx[idx], flip[idx], self.spec.padding)
            yield self._finish(x, resize=True), self._targets.index_select(0, idx)


class _Failed:
    """A batch that could not be decoded; carries the one-line message back from the worker."""

    def __init__(self, message: str) -> None:
        self.message = message


def _collate(items):
    for item in items:
        if isinstance(item, _Failed):
            return item
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.int64)


class _Transformed(Dataset):
    """What the worker processes index: ``(sample index, epoch)`` -> transformed uint8 image and label.

    Decode errors are returned, not raised, so the main process can raise them as a one-line
    :class:`DataError` instead of DataLoader's multi-line re-raised worker traceback.
    """

    def __init__(self, dataset, train_augment: bool, size: int, seed: int) -> None:
        self.dataset, self.train_augment, self.size, self.seed = dataset, train_augment, size, seed
        self.spec = dataset.spec

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key
        try:
            img = self.dataset.load(index)
        except DataError as exc:
            return _Failed(str(exc))
        spec = self.spec
        if spec.augmentation == "random-resized-crop":
            if self.train_augment:
                rng = np.random.default_rng([self.seed, epoch, _PER_IMAGE, index])
                x = random_resized_crop(img, self.size, rng, flip=spec.flip)
            else:
                x = resize_center_crop(img, self.size)
        else:  # "pad-crop" at the native size (Tiny ImageNet)
            img = fit_square(img, spec.image_size)
            if self.train_augment:
                rng = np.random.default_rng([self.seed, epoch, _PER_IMAGE, index])
                img = pad_crop_flip_pil(img, spec.padding, spec.flip, rng)
            x = pil_to_uint8(img)
        return x, int(self.dataset.targets[index])


class FileLoader(_Loader):
    """Image-file datasets: Pillow decoding and per-image transforms in ``workers`` processes."""

    def __iter__(self):
        rrc = self.spec.augmentation == "random-resized-crop"
        size = (self.image_size or self.spec.image_size) if rrc else self.spec.image_size
        view = _Transformed(self.dataset, self.augment, size, self.seed)
        keyed = [[(int(i), self.epoch) for i in batch] for batch in self._batches()]
        pin = self.device.type == "cuda"
        loader = DataLoader(view, batch_sampler=keyed, num_workers=self.workers, collate_fn=_collate,
                            pin_memory=pin)
        for batch in loader:
            if isinstance(batch, _Failed):
                raise DataError(batch.message)
            x, y = batch
            x = x.to(self.device, non_blocking=pin)
            yield self._finish(x, resize=not rrc), y.to(self.device, non_blocking=pin)
