"""Images/s of the rmn.data pipelines, next to the training throughput they must keep fed.

* in-memory: CIFAR-shaped uint8 data (generated), batch 256, pad-4 crop + flip + normalise as batched
  tensor ops; also without augmentation.
* image files: generated JPEG trees in the real Tiny ImageNet layout (64x64, pad-crop + flip) and an
  ImageNet layout (~500x375, random-resized-crop 224 + flip), Pillow decoding with 0 and 2 workers.
* training: forward+backward+SGD step of a width-16 ResNet-18 (``width_mult=0.25``) on 32x32 inputs,
  the project's yardstick (the in-memory pipeline must be >= 10x faster); skipped if the backbone is absent.

Each figure is the median over several timed passes after a warm-up pass. Run:
``.venv/bin/python benchmarks/data_loading.py [--device cuda]``; writes ``benchmarks/results/data_loading.json``
(``--quick``: a smoke run on smaller data, written only to ``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's rmn
from rmn.data import InMemoryDataset, build_dataset, build_loader, dataset_spec  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "data_loading.json"


def timed_passes(loader, passes: int, max_batches: int | None = None) -> float:
    """Median images/s over ``passes`` iterations (epochs ``1..passes``) after a warm-up at epoch 0."""
    rates = []
    for epoch in range(passes + 1):
        loader.set_epoch(epoch)
        n, start = 0, time.perf_counter()
        for i, (x, y) in enumerate(loader):
            n += y.shape[0]
            if max_batches is not None and i + 1 >= max_batches:
                break
        if x.is_cuda:
            torch.cuda.synchronize()
        if epoch:
            rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def natural_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth random image (low-res noise upsampled) so JPEG sizes/decoding resemble photographs."""
    small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    noise = rng.integers(-12, 13, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8))


def write_tiny(root: Path, classes: int, per_class: int) -> Path:
    rng = np.random.default_rng(0)
    d = root / "tiny-imagenet-200"
    wnids = [f"n{10000000 + i:08d}" for i in range(classes)]
    (d / "val" / "images").mkdir(parents=True)
    (d / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        (d / "train" / w / "images").mkdir(parents=True)
        for i in range(per_class):
            natural_like(rng, 64, 64).save(d / "train" / w / "images" / f"{w}_{i}.JPEG", quality=90)
    natural_like(rng, 64, 64).save(d / "val" / "images" / "val_0.JPEG")
    (d / "val" / "val_annotations.txt").write_text(f"val_0.JPEG\t{wnids[0]}\t0\t0\t63\t63\n")
    return d


def write_imagenet(root: Path, classes: int, per_class: int) -> Path:
    rng = np.random.default_rng(1)
    for c in range(classes):
        d = root / "train" / f"n{20000000 + c:08d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            size = (500, 375) if i % 2 else (375, 500)
            natural_like(rng, *size).save(d / f"img_{i}.JPEG", quality=90)
    return root


def training_throughput(batch: int, steps: int, device: torch.device) -> float | None:
    try:
        from rmn.backbones import create_backbone
    except ImportError:
        return None
    model = create_backbone("resnet18", num_classes=100, image_size=32, in_channels=3, width_mult=0.25).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    rates = []
    for step in range(steps + 1):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            rates.append(batch / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="smaller data, fewer passes (a smoke run); writes only to --out")
    ap.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/data_loading.json; none with --quick)")
    args = ap.parse_args()
    device = torch.device(args.device)
    q = args.quick
    rows = []

    n = 10_000 if q else 50_000
    spec = dataset_spec("cifar100")
    g = torch.Generator().manual_seed(0)
    cifar = InMemoryDataset(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                            torch.randint(0, 100, (n,), generator=g), [str(i) for i in range(100)], spec, "train")
    for augment in (True, False):
        loader = build_loader(cifar, 256, train=True, augment=augment, device=device)
        rows.append(dict(pipeline="in-memory CIFAR 32x32", augment=augment, workers=0, batch=256,
                         images_per_s=timed_passes(loader, 2 if q else 3)))

    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_dataset("tiny-imagenet", root=write_tiny(Path(tmp), 10, 40 if q else 150))
        big = build_dataset("imagenet", root=write_imagenet(Path(tmp) / "imagenet", 4, 16 if q else 64))
        for name, ds, batch in (("JPEG folder Tiny ImageNet 64x64", tiny, 128), ("JPEG folder ImageNet RRC 224", big, 32)):
            for workers in (0, 2):
                loader = build_loader(ds, batch, train=True, augment=True, device=device, workers=workers)
                rows.append(dict(pipeline=name, augment=True, workers=workers, batch=batch,
                                 images_per_s=timed_passes(loader, 1 if q else 2)))

    train_rate = training_throughput(256 if not q else 64, 3 if q else 5, device)
    rows.append(dict(pipeline="train step ResNet-18 width 16 (32x32)", augment=None, workers=None,
                     batch=256 if not q else 64, images_per_s=train_rate))

    print(f"{'pipeline':40s} {'aug':>5s} {'workers':>7s} {'batch':>5s} {'images/s':>10s}")
    for r in rows:
        rate = "n/a" if r["images_per_s"] is None else f"{r['images_per_s']:,.0f}"
        aug = "" if r["augment"] is None else ("yes" if r["augment"] else "no")
        workers = "" if r["workers"] is None else str(r["workers"])
        print(f"{r['pipeline']:40s} {aug:>5s} {workers:>7s} {r['batch']:>5d} {rate:>10s}")
    ratio = rows[0]["images_per_s"] / train_rate if train_rate else None
    if ratio is not None:
        print(f"in-memory pipeline with augmentation / training throughput = {ratio:.1f}x (needs >= 10x)")

    result = dict(
        rows=rows, in_memory_over_training=ratio, quick=q,
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        torch=torch.__version__, python=platform.python_version(), cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(), load_average=os.getloadavg(),
        time=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    out = args.out or (None if q else RESULTS)
    if out is None:
        print("not written (--quick)")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_out, out)  # never leave a half-written results file
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
