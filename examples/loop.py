"""What the examples share: a small real dataset as tensors and a plain PyTorch train / evaluate loop.

Nothing here knows about rmn: it is the loop you already have. The data is scikit-learn's digits (1,797 real
8x8 scans, bundled, no download: ``pip install 'rmn[digits]'``), upsampled to RGB so ImageNet-layout
models take them; swap in your own DataLoader.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from rmn.data import load_digits_dataset


def options(doc: str, procedures: int, lr: float, argv: list[str] | None = None) -> argparse.Namespace:
    """The examples' command line: ``--pretrained --procedures --epochs --image-size --batch-size --lr --max-steps``."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--pretrained", action="store_true", help="start from torchvision's ImageNet weights")
    p.add_argument("--procedures", type=int, default=procedures, help="N, procedures per stage")
    p.add_argument("--epochs", type=int, default=3, help="epochs of each training step")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--max-steps", type=int, default=None, help="stop each training step after this many batches")
    return p.parse_args(argv)


def digits(split: str, image_size: int) -> TensorDataset:
    """The digits ``split`` ("train": 1,437 images, "test": 360) as 3 x image_size x image_size floats."""
    d = load_digits_dataset(split=split)
    x = d.images.float().div(255.0).repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
    return TensorDataset((x - 0.5) / 0.5, d.targets)


def loaders(image_size: int, batch_size: int, seed: int = 0) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Shuffled training batches, the training set in order (for step 3's features), the test set."""
    train, test = digits("train", image_size), digits("test", image_size)
    g = torch.Generator().manual_seed(seed)
    return (DataLoader(train, batch_size, shuffle=True, drop_last=True, generator=g),
            DataLoader(train, 256), DataLoader(test, 256))


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, loader: DataLoader, epochs: int,
          max_steps: int | None = None) -> float:
    """Plain cross-entropy training; returns the last epoch's mean loss."""
    model.train()
    steps, mean = 0, float("nan")
    for _ in range(epochs):
        total, n = 0.0, 0
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n, steps = total + loss.item(), n + 1, steps + 1
            if max_steps is not None and steps >= max_steps:
                return total / n
        mean = total / n
    return mean


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return 100.0 * hits / len(loader.dataset)
