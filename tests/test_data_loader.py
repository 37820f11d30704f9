"""Batched augmentation against a per-image reference, epoch reproducibility, sharding, options."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rmn.data import DataError, InMemoryDataset, build_dataset, build_loader, dataset_spec, pad_crop_flip
from rmn.data.augment import pad_crop_flip_pil, random_resized_crop, random_resized_crop_box, resize_center_crop


def reference_pad_crop_flip(img: np.ndarray, dy: int, dx: int, flip: bool, padding: int) -> np.ndarray:
    """The textbook per-image version: zero-pad, slice the crop, mirror it."""
    c, h, w = img.shape
    padded = np.zeros((c, h + 2 * padding, w + 2 * padding), img.dtype)
    padded[:, padding:padding + h, padding:padding + w] = img
    crop = padded[:, dy:dy + h, dx:dx + w]
    return crop[:, :, ::-1] if flip else crop


def fake_dataset(n=50, name="cifar10", seed=0, unique_targets=True) -> InMemoryDataset:
    spec = dataset_spec(name)
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, spec.in_channels, spec.image_size, spec.image_size), generator=g,
                           dtype=torch.uint8)
    targets = torch.arange(n) if unique_targets else torch.randint(0, 10, (n,), generator=g)
    return InMemoryDataset(images, targets.long(), [str(i) for i in range(max(n, 10))], spec, "train")


@pytest.mark.parametrize("padding, shape", [(4, (3, 32, 32)), (1, (1, 8, 8)), (0, (3, 5, 7)), (2, (2, 6, 9))])
def test_batched_crop_flip_equals_per_image_reference(padding, shape):
    rng = np.random.default_rng(padding)
    b = 16
    x = rng.integers(0, 256, (b,) + shape, dtype=np.uint8)
    dy = rng.integers(0, 2 * padding + 1, b)
    dx = rng.integers(0, 2 * padding + 1, b)
    flip = rng.random(b) < 0.5
    out = pad_crop_flip(torch.from_numpy(x), torch.from_numpy(dy), torch.from_numpy(dx), torch.from_numpy(flip),
                        padding)
    for i in range(b):
        assert np.array_equal(out[i].numpy(), reference_pad_crop_flip(x[i], dy[i], dx[i], flip[i], padding))


@pytest.mark.parametrize("padding, size", [(8, (64, 64)), (3, (10, 7))])
def test_per_image_pillow_crop_flip_equals_reference(padding, size):
    for seed in range(12):
        rng = np.random.default_rng(seed)
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        out = np.asarray(pad_crop_flip_pil(Image.fromarray(arr), padding, True, np.random.default_rng(100 + seed)))
        draw = np.random.default_rng(100 + seed)
        dy, dx = draw.integers(0, 2 * padding + 1, size=2)
        flip = draw.random() < 0.5
        ref = reference_pad_crop_flip(arr.transpose(2, 0, 1), dy, dx, flip, padding).transpose(1, 2, 0)
        assert np.array_equal(out, ref)


def test_loader_output_equals_reference_pipeline():
    ds = fake_dataset(40)
    loader = build_loader(ds, 16, train=True, augment=True, seed=7)
    loader.set_epoch(5)
    dy, dx, flip = loader.augment_params()
    mean = np.array(ds.spec.mean, np.float32)[:, None, None]
    std = np.array(ds.spec.std, np.float32)[:, None, None]
    seen = []
    for x, y in loader:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (16, 3, 32, 32)
        for xi, yi in zip(x, y.tolist()):
            ref = reference_pad_crop_flip(ds.images[yi].numpy(), dy[yi], dx[yi], flip[yi], 4)
            np.testing.assert_allclose(xi.numpy(), (ref / 255.0 - mean) / std, rtol=0, atol=1e-5)
            seen.append(yi)
    assert len(seen) == 32 and len(set(seen)) == 32  # drop_last: 40 -> two full batches, no repeats


def test_flip_only_where_the_dataset_allows_it():
    for name, flips in (("cifar100", True), ("fashion-mnist", True), ("mnist", False), ("digits", False)):
        ds = fake_dataset(200, name)
        _, _, flip = build_loader(ds, 8, train=True, augment=True).augment_params()
        assert flip.any() == flips, name
    assert dataset_spec("digits").padding == 1 and dataset_spec("cifar10").padding == 4


def test_set_epoch_reproduces_batches_and_epochs_differ():
    ds = fake_dataset(64)
    a = build_loader(ds, 16, train=True, augment=True, seed=3)
    a.set_epoch(4)
    first, again = list(a), list(a)
    resumed = build_loader(ds, 16, train=True, augment=True, seed=3)  # a fresh process resuming at epoch 4
    resumed.set_epoch(4)
    for (x1, y1), (x2, y2), (x3, y3) in zip(first, again, list(resumed)):
        assert torch.equal(x1, x2) and torch.equal(x1, x3) and torch.equal(y1, y2) and torch.equal(y1, y3)
    a.set_epoch(5)
    assert not torch.equal(torch.cat([y for _, y in a]), torch.cat([y for _, y in first]))
    other_seed = build_loader(ds, 16, train=True, augment=True, seed=4)
    other_seed.set_epoch(4)
    assert not torch.equal(next(iter(other_seed))[1], first[0][1])


def test_augmentation_of_a_sample_does_not_depend_on_batch_size():
    ds = fake_dataset(48)
    outs = {}
    for bs in (8, 12):
        loader = build_loader(ds, bs, train=True, augment=True, seed=1)
        loader.set_epoch(2)
        outs[bs] = {int(yi): xi for x, y in loader for xi, yi in zip(x, y)}
    assert outs[8].keys() == outs[12].keys()
    assert all(torch.equal(outs[8][k], outs[12][k]) for k in outs[8])


@pytest.mark.parametrize("n, world, drop_last", [(50, 3, True), (50, 3, False), (48, 4, True), (7, 2, False)])
def test_training_shards_are_disjoint_and_equal_sized(n, world, drop_last):
    ds = fake_dataset(n)
    loaders = [build_loader(ds, 4, train=True, augment=True, rank=r, world_size=world, drop_last=drop_last, seed=2)
               for r in range(world)]
    for lo in loaders:
        lo.set_epoch(1)
    shards = [lo.indices() for lo in loaders]
    assert len({len(s) for s in shards}) == 1 and len({len(lo) for lo in loaders}) == 1
    flat = np.concatenate(shards)
    if drop_last:
        assert len(set(flat.tolist())) == len(flat) == (n // world) * world  # disjoint
    else:
        assert set(flat.tolist()) == set(range(n)) and len(flat) - n < world  # covered; < world repeats
    yielded = [torch.cat([y for _, y in lo]) for lo in loaders]
    assert len({len(y) for y in yielded}) == 1
    if drop_last:
        assert len(set(torch.cat(yielded).tolist())) == sum(len(y) for y in yielded)


def test_eval_shards_cover_every_sample_once_in_order():
    ds = fake_dataset(23)
    ys = []
    for r in range(3):
        lo = build_loader(ds, 5, train=False, augment=False, rank=r, world_size=3)
        ys.append(torch.cat([y for _, y in lo]))
    assert torch.cat(ys).tolist() == list(range(23))
    full = list(build_loader(ds, 5, train=False, augment=False))
    assert [len(y) for _, y in full] == [5, 5, 5, 5, 3]  # no drop_last, no shuffle
    mean = torch.tensor(ds.spec.mean)[:, None, None]
    std = torch.tensor(ds.spec.std)[:, None, None]
    assert torch.allclose(full[0][0][0], (ds[0][0] - mean) / std, atol=1e-6)  # eval is un-augmented


def test_image_size_resizes_whole_batches():
    ds = build_dataset("digits")
    x, y = next(iter(build_loader(ds, 32, train=True, augment=True, image_size=16)))
    assert x.shape == (32, 1, 16, 16)
    ev_x, _ = next(iter(build_loader(ds, 32, train=False, augment=False, image_size=16)))
    up = torch.nn.functional.interpolate(ds.images[:32].float(), size=(16, 16), mode="bilinear", antialias=True,
                                         align_corners=False)
    assert torch.allclose(ev_x, (up / 255 - 0.3054) / 0.3760, atol=1e-4)


def test_real_digits_through_a_loader_is_normalised():
    ds = build_dataset("digits")
    x = torch.cat([x for x, _ in build_loader(ds, 64, train=False, augment=False)])
    assert x.shape == (1437, 1, 8, 8)
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-2


def test_random_resized_crop_box_rules():
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = int(rng.integers(10, 300)), int(rng.integers(10, 300))
        left, top, right, bottom = random_resized_crop_box(w, h, rng)
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
    boxes = [random_resized_crop_box(100, 80, np.random.default_rng(9)) for _ in range(2)]
    assert boxes[0] == boxes[1]
    assert random_resized_crop_box(1000, 10, np.random.default_rng(1)) == (493, 0, 506, 10)  # fallback: centre
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    assert random_resized_crop(img, 32, np.random.default_rng(1)).shape == (3, 32, 32)
    assert resize_center_crop(img, 48).shape == (3, 48, 48)


def test_option_errors_are_one_line():
    ds = fake_dataset(10)
    cases = [
        (lambda: build_dataset("cifar1000"), "unknown dataset 'cifar1000'"),
        (lambda: build_dataset("mnist", download=True), "download=True is only available"),
        (lambda: build_dataset("cifar10", colour="red"), "unexpected option 'colour'"),
        (lambda: build_dataset("digits", split="holdout"), "'holdout'"),
        (lambda: build_loader(ds, 4, train=False, augment=True), "augment=True needs train=True"),
        (lambda: build_loader(ds, 0, train=True, augment=True), "batch_size"),
        (lambda: build_loader(ds, 4, train=True, augment=True, rank=2, world_size=2), "rank=2"),
        (lambda: build_loader(ds, 4, train=True, augment=True, seed=-1), "seed"),
        (lambda: build_loader(ds, 64, train=True, augment=True), "batch_size=64 exceeds"),
        (lambda: build_loader(list(range(3)), 4, train=True, augment=True), "no .spec"),
    ]
    for call, needle in cases:
        with pytest.raises(DataError) as exc:
            call()
        assert "\n" not in str(exc.value) and needle in str(exc.value), (needle, str(exc.value))
    assert len(build_loader(ds, 64, train=True, augment=True, drop_last=False)) == 1
