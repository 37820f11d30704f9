"""Tiny ImageNet, ImageNet (both validation layouts) and image folders on generated JPEG/PNG trees."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rmn.data import DataError, build_dataset, build_loader

TINY_WNIDS = ["n09999999", "n01000001", "n05000000"]  # wnids.txt order; labels follow sorted order


def save_image(path: Path, size=(64, 64), seed=0, mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(arr if channels == 3 else arr[..., 0], mode).save(path)


def write_tiny(root: Path, per_class=4) -> Path:
    d = root / "tiny-imagenet-200"
    d.mkdir(parents=True)
    (d / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    (d / "words.txt").write_text("n00001740\tentity\n" + "".join(f"{w}\tthing {w[-1]}, other\n" for w in TINY_WNIDS))
    seed = 0
    for w in TINY_WNIDS:
        boxes = []
        for i in range(per_class):
            seed += 1
            save_image(d / "train" / w / "images" / f"{w}_{i}.JPEG", seed=seed, mode="L" if i == 0 else "RGB")
            boxes.append(f"{w}_{i}.JPEG\t0\t0\t63\t63")
        (d / "train" / w / f"{w}_boxes.txt").write_text("\n".join(boxes) + "\n")
    lines = []
    for i, w in enumerate(["n05000000", "n09999999", "n01000001", "n05000000", "n09999999", "n01000001"]):
        save_image(d / "val" / "images" / f"val_{i}.JPEG", seed=100 + i)
        lines.append(f"val_{i}.JPEG\t{w}\t{i}\t{i + 1}\t40\t50")
    (d / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    save_image(d / "test" / "images" / "test_0.JPEG", seed=999)
    return d


def assert_one_line(exc, *needles):
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)


# --- Tiny ImageNet -------------------------------------------------------------------------------

def test_tiny_imagenet_layout_labels_and_names(tmp_path):
    d = write_tiny(tmp_path)
    train = build_dataset("tiny-imagenet", root=tmp_path, split="train")
    assert train.classes == sorted(TINY_WNIDS) and train.num_classes == 3
    assert train.class_names == ["thing 1", "thing 0", "thing 9"]
    assert len(train) == 12 and train.targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert train.path(0).endswith("train/n01000001/images/n01000001_0.JPEG")
    x, y = train[0]  # a greyscale JPEG comes back as 3 channels
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and y == 0
    val = build_dataset("tiny-imagenet", root=d, split="val")
    assert len(val) == 6 and val.targets.tolist() == [1, 2, 0, 1, 2, 0]
    assert len(build_dataset("tiny-imagenet", root=d, split="test")) == 6  # alias of val; test/ is unlabelled


def test_tiny_imagenet_bad_inputs(tmp_path):
    d = write_tiny(tmp_path)
    ann = d / "val" / "val_annotations.txt"
    good = ann.read_text()
    ann.write_text(good.replace("n05000000", "n07777777", 1))
    with pytest.raises(DataError) as exc:
        build_dataset("tiny-imagenet", root=tmp_path, split="val")
    assert_one_line(exc, f"{ann}:1", "n07777777", "wnids.txt")
    ann.write_text(good.replace("\t", " ", 1))
    with pytest.raises(DataError) as exc:
        build_dataset("tiny-imagenet", root=tmp_path, split="val")
    assert_one_line(exc, f"{ann}:1", "expected")
    ann.write_text(good + "val_77.JPEG\tn05000000\t0\t0\t1\t1\n")
    with pytest.raises(DataError) as exc:
        build_dataset("tiny-imagenet", root=tmp_path, split="val")
    assert_one_line(exc, "val_77.JPEG", "missing")
    ann.unlink()
    with pytest.raises(DataError) as exc:
        build_dataset("tiny-imagenet", root=tmp_path, split="val")
    assert_one_line(exc, str(ann), "missing")
    for f in (d / "train" / "n05000000" / "images").iterdir():
        f.unlink()
    with pytest.raises(DataError) as exc:
        build_dataset("tiny-imagenet", root=tmp_path, split="train")
    assert_one_line(exc, "n05000000/images", "no JPEG")
    with pytest.raises(DataError) as exc:
        build_dataset("tiny-imagenet", root=tmp_path / "elsewhere")
    assert_one_line(exc, "elsewhere", "does not exist")


def test_corrupt_jpeg_is_a_one_line_error_naming_the_file(tmp_path):
    d = write_tiny(tmp_path)
    bad = d / "train" / "n05000000" / "images" / "n05000000_2.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated mid-scan
    ds = build_dataset("tiny-imagenet", root=tmp_path)  # listing does not decode
    index = next(i for i in range(len(ds)) if ds.path(i) == str(bad))
    with pytest.raises(DataError) as exc:
        ds[index]
    assert_one_line(exc, str(bad), "cannot decode image")
    garbage = d / "train" / "n01000001" / "images" / "n01000001_1.JPEG"
    garbage.write_bytes(b"this is not a JPEG")
    for workers in (0, 2):  # decoded in worker processes: still one line naming the file
        loader = build_loader(ds, 4, train=True, augment=True, workers=workers)
        with pytest.raises(DataError) as exc:
            for _ in loader:
                pass
        assert_one_line(exc, "cannot decode image")
        assert str(bad) in str(exc.value) or str(garbage) in str(exc.value)


def test_tiny_imagenet_loader_is_deterministic_across_worker_counts(tmp_path):
    write_tiny(tmp_path, per_class=6)
    ds = build_dataset("tiny-imagenet", root=tmp_path)
    runs = []
    for workers in (0, 2):
        loader = build_loader(ds, 5, train=True, augment=True, workers=workers, seed=3)
        loader.set_epoch(2)
        runs.append(list(loader))
    assert len(runs[0]) == len(loader) == 3  # 18 samples, batch 5, drop_last
    for (xa, ya), (xb, yb) in zip(*runs):
        assert xa.shape == (5, 3, 64, 64) and xa.dtype == torch.float32
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    loader.set_epoch(3)
    assert not torch.equal(next(iter(loader))[0], runs[0][0][0])
    # evaluation: images as they are, in order, normalised with the ImageNet statistics
    ev = build_loader(build_dataset("tiny-imagenet", root=tmp_path, split="val"), 4, train=False, augment=False)
    batches = list(ev)
    assert [len(y) for _, y in batches] == [4, 2]
    ref = build_dataset("tiny-imagenet", root=tmp_path, split="val")[0][0]
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    assert torch.allclose(batches[0][0][0], (ref - mean) / std, atol=1e-5)
    small = build_loader(ds, 6, train=True, augment=False, image_size=32)
    assert next(iter(small))[0].shape == (6, 3, 32, 32)


# --- ImageNet ------------------------------------------------------------------------------------

IMAGENET_WNIDS = ["n02000000", "n01000000", "n03000000"]


def write_imagenet(root: Path, flat_val: bool) -> dict:
    sizes = [(40, 30), (30, 50), (64, 64)]
    labels = {}
    for k, w in enumerate(IMAGENET_WNIDS):
        for i in range(3):
            save_image(root / "train" / w / f"{w}_{i}.JPEG", size=sizes[i], seed=10 * k + i)
    for i, w in enumerate(["n03000000", "n01000000", "n02000000", "n01000000"]):
        name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        labels[name] = w
        save_image(root / "val" / (name if flat_val else f"{w}/{name}"), size=sizes[i % 3], seed=50 + i)
    return labels


def test_imagenet_imagefolder_layout(tmp_path):
    write_imagenet(tmp_path, flat_val=False)
    train = build_dataset("imagenet", root=tmp_path)
    assert train.classes == sorted(IMAGENET_WNIDS) and len(train) == 9
    assert train.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert train[1][0].shape == (3, 50, 30)  # un-augmented: the decoded image at its own size
    val = build_dataset("imagenet", root=tmp_path, split="val")
    by_name = {Path(val.path(i)).name: int(val.targets[i]) for i in range(len(val))}
    assert by_name == {"ILSVRC2012_val_00000001.JPEG": 2, "ILSVRC2012_val_00000002.JPEG": 0,
                       "ILSVRC2012_val_00000003.JPEG": 1, "ILSVRC2012_val_00000004.JPEG": 0}


def _expected_flat(labels):
    index = {w: i for i, w in enumerate(sorted(IMAGENET_WNIDS))}
    return [index[labels[n]] for n in sorted(labels)]


def test_imagenet_flat_val_with_loc_solution_csv(tmp_path):
    root = tmp_path / "ILSVRC" / "Data" / "CLS-LOC"  # Kaggle's tree; the CSV sits three levels up
    labels = write_imagenet(root, flat_val=True)
    rows = ["ImageId,PredictionString"] + [f"{Path(n).stem},{w} 1 2 30 40 {w} 5 6 20 20" for n, w in labels.items()]
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    val = build_dataset("imagenet", root=root, split="val")
    assert val.targets.tolist() == _expected_flat(labels)
    assert val.classes == sorted(IMAGENET_WNIDS)


def test_imagenet_flat_val_with_plain_labels_file(tmp_path):
    labels = write_imagenet(tmp_path / "in", flat_val=True)
    gt = tmp_path / "my_labels.txt"
    gt.write_text("".join(f"{n} {w}\n" for n, w in labels.items()))
    val = build_dataset("imagenet", root=tmp_path / "in", split="test", val_labels=gt)
    assert val.targets.tolist() == _expected_flat(labels)
    gt.write_text("".join(f"{n} {w}\n" for n, w in list(labels.items())[1:]))
    with pytest.raises(DataError) as exc:
        build_dataset("imagenet", root=tmp_path / "in", split="val", val_labels=gt)
    assert_one_line(exc, "ILSVRC2012_val_00000001.JPEG", "has no label", str(gt))
    gt.write_text("490\n361\n171\n822\n")
    with pytest.raises(DataError) as exc:
        build_dataset("imagenet", root=tmp_path / "in", split="val", val_labels=gt)
    assert_one_line(exc, str(gt), "ILSVRC2012_validation_ground_truth.txt", "not supported")
    gt.write_text("".join(f"{n} n09999999\n" for n in labels))
    with pytest.raises(DataError) as exc:
        build_dataset("imagenet", root=tmp_path / "in", split="val", val_labels=gt)
    assert_one_line(exc, str(gt), "n09999999")
    with pytest.raises(DataError) as exc:  # no labels file anywhere near
        build_dataset("imagenet", root=tmp_path / "in", split="val")
    assert_one_line(exc, "flat folder", "val_labels=")


def test_imagenet_loader_transforms(tmp_path):
    write_imagenet(tmp_path, flat_val=False)
    train = build_dataset("imagenet", root=tmp_path)
    loader = build_loader(train, 4, train=True, augment=True, image_size=24, seed=1)
    a, b = list(loader), list(loader)
    assert len(a) == 2 and a[0][0].shape == (4, 3, 24, 24)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    ev = build_loader(build_dataset("imagenet", root=tmp_path, split="val"), 3, train=False, augment=False,
                      image_size=28)
    xs = [x for x, _ in ev]
    assert [x.shape[0] for x in xs] == [3, 1] and xs[0].shape[1:] == (3, 28, 28)
    with pytest.raises(DataError) as exc:
        build_dataset("imagenet", root=tmp_path / "none")
    assert_one_line(exc, "does not exist")


def test_imagenet_missing_split(tmp_path):
    write_imagenet(tmp_path, flat_val=False)
    import shutil
    shutil.rmtree(tmp_path / "val")
    with pytest.raises(DataError) as exc:
        build_dataset("imagenet", root=tmp_path, split="val")
    assert_one_line(exc, str(tmp_path / "val"), "missing")


# --- generic folders -----------------------------------------------------------------------------

def test_folder_single_tree_and_split_tree(tmp_path):
    single = tmp_path / "single"
    for i in range(3):
        save_image(single / "dog" / f"{i}.jpg", size=(20, 16), seed=i)
        save_image(single / "cat" / f"{i}.PNG", size=(16, 20), seed=10 + i)
    save_image(single / "cat" / "nested" / "extra.bmp", size=(8, 8), seed=99)
    (single / "cat" / "notes.txt").write_text("ignored")
    ds = build_dataset("folder", root=single)
    assert ds.classes == ["cat", "dog"] and len(ds) == 7 and ds.num_classes == 2
    assert ds.spec.num_classes == 2 and ds.targets.tolist() == [0] * 4 + [1] * 3
    with pytest.raises(DataError) as exc:
        build_dataset("folder", root=single, split="val")
    assert_one_line(exc, str(single), "no train/, val/ or test/")

    split = tmp_path / "split"
    for c in ("a", "b", "c"):
        save_image(split / "train" / c / "x.jpg", seed=ord(c))
    save_image(split / "test" / "b" / "y.jpg", seed=1)
    val = build_dataset("folder", root=split, split="val")  # served by test/
    assert val.classes == ["a", "b", "c"] and val.targets.tolist() == [1]
    save_image(split / "test" / "zebra" / "z.jpg", seed=2)
    with pytest.raises(DataError) as exc:
        build_dataset("folder", root=split, split="test")
    assert_one_line(exc, "zebra", "not among")
    loader = build_loader(build_dataset("folder", root=split), 3, train=True, augment=True, image_size=16)
    assert next(iter(loader))[0].shape == (3, 3, 16, 16)
    with pytest.raises(DataError) as exc:
        build_dataset("folder", root=tmp_path / "nothing")
    assert_one_line(exc, "nothing", "does not exist")
