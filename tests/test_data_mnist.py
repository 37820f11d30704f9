"""MNIST / Fashion-MNIST idx readers (plain and gz, real magic numbers) and the bundled digits set."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from rmn.data import DataError, build_dataset, dataset_spec
from rmn.data.digits import digits_arrays

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.astype(np.uint8).tobytes()


def write_mnist(root: Path, gz: bool, n_train=9, n_test=4, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        arrays[prefix] = (images, labels)
        for kind, arr, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
            data = idx_bytes(arr, magic)
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
    return arrays


def assert_one_line(exc, *needles):
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_reading(tmp_path, gz, name):
    arrays = write_mnist(tmp_path, gz)
    ds = build_dataset(name, root=tmp_path, split="train")
    images, labels = arrays["train"]
    assert ds.images.shape == (9, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert ds.targets.tolist() == labels.tolist() and ds.targets.dtype == torch.int64
    x, y = ds[2]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == int(labels[2])
    assert len(build_dataset(name, root=tmp_path, split="test")) == 4
    assert len(build_dataset(name, root=tmp_path, split="val")) == 4
    assert ds.num_classes == 10
    assert ds.classes[0] == ("T-shirt/top" if name == "fashion-mnist" else "0")


def test_torchvision_raw_layout_is_found(tmp_path):
    write_mnist(tmp_path / "FashionMNIST" / "raw", gz=True)
    assert len(build_dataset("fashion-mnist", root=tmp_path)) == 9


def test_wrong_magic_truncation_and_mismatch(tmp_path):
    write_mnist(tmp_path, gz=False)
    img = tmp_path / "train-images-idx3-ubyte"
    lab = tmp_path / "train-labels-idx1-ubyte"
    good_img, good_lab = img.read_bytes(), lab.read_bytes()

    img.write_bytes(struct.pack(">I", 2049) + good_img[4:])  # a label magic on an image file
    with pytest.raises(DataError) as exc:
        build_dataset("mnist", root=tmp_path)
    assert_one_line(exc, str(img), "wrong magic number 2049", "2051")

    img.write_bytes(good_img[:-100])
    with pytest.raises(DataError) as exc:
        build_dataset("mnist", root=tmp_path)
    assert_one_line(exc, str(img), "truncated", "9x28x28")

    img.write_bytes(good_img[:10])
    with pytest.raises(DataError) as exc:
        build_dataset("mnist", root=tmp_path)
    assert_one_line(exc, str(img), "truncated")

    img.write_bytes(good_img)
    lab.write_bytes(idx_bytes(np.zeros(8, np.uint8), 2049))
    with pytest.raises(DataError) as exc:
        build_dataset("mnist", root=tmp_path)
    assert_one_line(exc, str(lab), "8 labels for 9 images")

    lab.write_bytes(idx_bytes(np.full(9, 12, np.uint8), 2049))
    with pytest.raises(DataError) as exc:
        build_dataset("mnist", root=tmp_path)
    assert_one_line(exc, str(lab), "0..9")
    lab.write_bytes(good_lab)


def test_truncated_gzip_and_missing_files(tmp_path):
    write_mnist(tmp_path, gz=True)
    gz = tmp_path / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-30])
    with pytest.raises(DataError) as exc:
        build_dataset("fashion-mnist", root=tmp_path, split="test")
    assert_one_line(exc, str(gz), "cannot read")
    gz.unlink()
    with pytest.raises(DataError) as exc:
        build_dataset("fashion-mnist", root=tmp_path, split="test")
    assert_one_line(exc, "t10k-images-idx3-ubyte", "missing")
    with pytest.raises(DataError) as exc:
        build_dataset("mnist", root=tmp_path / "absent")
    assert_one_line(exc, str(tmp_path / "absent"), "does not exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as exc:
        build_dataset("mnist", root=tmp_path / "empty")
    assert_one_line(exc, "holds no idx files")


@pytest.mark.skipif(not REAL_FASHION.exists(),
                    reason="real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist():
    train = build_dataset("fashion-mnist")
    test = build_dataset("fashion-mnist", split="test")
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert train.targets.bincount().tolist() == [6000] * 10
    assert test.targets.bincount().tolist() == [1000] * 10
    mean = train.images.float().div(255).mean().item()
    std = train.images.float().div(255).std().item()
    spec = dataset_spec("fashion-mnist")
    assert abs(mean - spec.mean[0]) < 5e-4 and abs(std - spec.std[0]) < 5e-4


def test_digits_split_is_fixed_stratified_and_scaled():
    train = build_dataset("digits", split="train")
    test = build_dataset("digits", split="test")
    assert len(train) == 1437 and len(test) == 360 and train.images.shape[1:] == (1, 8, 8)
    counts_train, counts_test = train.targets.bincount(), test.targets.bincount()
    # stratified: every class's share of the test split is 20% within rounding
    total = counts_train + counts_test
    assert ((counts_test.float() - 0.2 * total.float()).abs() <= 1).all()
    assert train.images.max() == 255 and train.images.min() == 0
    _, _, tr, te = digits_arrays()
    assert not set(tr.tolist()) & set(te.tolist()) and len(tr) + len(te) == 1797
    assert torch.equal(build_dataset("digits", split="val").images, test.images)  # val is an alias
    values = train.images.float().div(255)
    spec = dataset_spec("digits")
    assert round(values.mean().item(), 4) == spec.mean[0] and round(values.std(unbiased=False).item(), 4) == spec.std[0]
