"""Image-file datasets (decoded lazily with Pillow, the ``images`` extra) and the ``root/<class>/*.jpg`` reader.

Paths are kept as one numpy byte-string array rather than a list of Python strings: DataLoader
workers then share one buffer instead of touching (and so copying) a million small objects.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..extras import require
from .base import DataError, DatasetSpec, LabelledDataset, dataset_spec, default_root, one_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def pil_image():
    """Pillow's ``PIL.Image`` module, imported on first use (the ``images`` extra)."""
    return require("PIL.Image", extra="images", feature="image-file datasets (folder, tiny-imagenet, imagenet)")


def decode_rgb(path: str | os.PathLike) -> "Image.Image":
    """Fully decode ``path`` as RGB (grey and CMYK files exist in ImageNet); one-line error if it cannot."""
    Image = pil_image()
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: image file is missing (removed after the dataset was listed?)") from None
    except Exception as exc:  # Pillow raises OSError, UnidentifiedImageError, SyntaxError, ValueError...
        raise DataError(f"{path}: cannot decode image ({type(exc).__name__}: {one_line(exc)})") from None


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """An RGB Pillow image as a contiguous uint8 ``[3, H, W]`` tensor.

    The transpose is done by numpy (single-threaded): a per-image torch copy would start intra-op
    threads, which costs more than it saves on images this small and thrashes a loaded machine.
    """
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)))


class ImageFileDataset(LabelledDataset):
    """Images on disk with integer labels; ``ds[i]`` is the decoded, un-augmented float [0,1] image.

    ``classes`` are the folder names (wnids for the ImageNets) in label order; ``class_names`` are
    human-readable names where the release has them (Tiny ImageNet's ``words.txt``), else ``classes``.
    """

    def __init__(self, root: Path, relpaths: list[str], targets: list[int], classes: list[str],
                 spec: DatasetSpec, split: str, class_names: list[str] | None = None) -> None:
        pil_image()  # a missing Pillow is said now, not by the first decode in a loader worker
        if not relpaths:
            raise DataError(f"{root}: no images found for split {split!r}")
        self.root = str(root)
        self._paths = np.array([p.encode("utf-8") for p in relpaths])
        self.targets = torch.tensor(targets, dtype=torch.int64)
        self._set_labels(classes, spec, split)
        self.class_names = list(class_names) if class_names is not None else list(classes)

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> str:
        return os.path.join(self.root, self._paths[index].decode("utf-8"))

    def load(self, index: int) -> Image.Image:
        """The decoded RGB Pillow image of sample ``index`` (for the loader's transforms)."""
        return decode_rgb(self.path(index))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return pil_to_uint8(self.load(index)).float().div_(255.0), int(self.targets[index])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.name!r}, split={self.split!r}, n={len(self)}, root={self.root!r})"


def list_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursively), as sorted paths relative to ``folder``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        rel = os.path.relpath(dirpath, folder)
        for f in sorted(filenames):
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                found.append(f if rel == "." else os.path.join(rel, f))
    return found


def class_dirs(folder: Path) -> list[str]:
    """Sorted names of the sub-folders of ``folder`` (hidden ones skipped)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def scan_class_folders(split_dir: Path, classes: list[str], root: Path, require_all: bool
                       ) -> tuple[list[str], list[int]]:
    """``split_dir/<class>/**/*.jpg`` -> (paths relative to ``root``, labels by position in ``classes``)."""
    index = {c: i for i, c in enumerate(classes)}
    present = class_dirs(split_dir)
    unknown = [c for c in present if c not in index]
    if unknown:
        raise DataError(f"{split_dir}: class folder {unknown[0]!r} is not among the {len(classes)} training classes")
    paths, labels = [], []
    prefix = os.path.relpath(split_dir, root)
    for c in present if not require_all else classes:
        cdir = split_dir / c
        if not cdir.is_dir():
            raise DataError(f"{cdir}: missing class folder")
        files = list_images(cdir)
        if not files and require_all:
            raise DataError(f"{cdir}: class folder holds no images ({'/'.join(IMAGE_EXTENSIONS)})")
        paths += [os.path.join(prefix, c, f) for f in files]
        labels += [index[c]] * len(files)
    return paths, labels


def load_folder(root=None, split: str = "train") -> ImageFileDataset:
    """Any ``root/<class>/*.{jpg,jpeg,png,bmp}``; classes are the sorted folder names.

    If ``root`` has ``train/``, ``val/`` or ``test/`` sub-folders these are the splits (``val`` and
    ``test`` are aliases; whichever exists is used) and the class list comes from ``train/``.
    Otherwise ``root`` itself is a single training set and asking for an evaluation split is an error.
    """
    base = Path(root) if root is not None else default_root()
    if not base.is_dir():
        raise DataError(f"folder: root {base} does not exist or is not a folder")
    has_splits = any((base / s).is_dir() for s in ("train", "val", "test"))
    if split not in ("train", "val", "test"):
        raise DataError(f"folder: split {split!r} is not one of 'train', 'val', 'test'")
    if not has_splits:
        if split != "train":
            raise DataError(f"folder: {base} has no train/, val/ or test/ sub-folders, so it is one training "
                            f"set; split {split!r} does not exist")
        split_dir = base
    elif split == "train":
        split_dir = base / "train"
    else:
        split_dir = next((base / s for s in (split, "val" if split == "test" else "test") if (base / s).is_dir()),
                         base / split)
    if not split_dir.is_dir():
        raise DataError(f"folder: split folder {split_dir} is missing")
    class_source = base / "train" if (base / "train").is_dir() else split_dir
    classes = class_dirs(class_source)
    if not classes:
        raise DataError(f"folder: {class_source} has no class sub-folders (expected {class_source}/<class>/*.jpg)")
    paths, labels = scan_class_folders(split_dir, classes, base, require_all=split_dir == class_source)
    split_name = "train" if split == "train" else split_dir.name
    return ImageFileDataset(base, paths, labels, classes, dataset_spec("folder").with_classes(len(classes)),
                            split_name)
